"""Tiny randomly initialised transformers models, built in the test run (no download).

transformers is the reference implementation: tests build a model here, save it as a normal
Hugging Face directory (safetensors + config.json + a real byte-level BPE tokenizer trained on a
few sentences), convert it with llmflash and compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 384
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Flash memory is larger than DRAM but slower to read.",
    "Large language models predict the next token from the previous ones.",
    "def add(a, b):\n    return a + b\n",
] * 4


def write_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer.json (tokenizers library) with <s> and </s> specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}",
    }))


def build(kind: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Build, save and return a tiny model of the given kind in float32."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    act_threshold = None
    if kind == "opt":
        cfg = tf.OPTConfig(ffn_dim=160, word_embed_proj_dim=64, do_layer_norm_before=True,
                           pad_token_id=0, **common)
        model = tf.OPTForCausalLM(cfg)
    elif kind == "opt-proj":  # word_embed_proj_dim != hidden_size, as OPT-350m (post-LN)
        cfg = tf.OPTConfig(ffn_dim=160, word_embed_proj_dim=32, do_layer_norm_before=False,
                           pad_token_id=0, **common)
        model = tf.OPTForCausalLM(cfg)
    elif kind in ("llama-gqa", "llama-tied", "fatrelu", "llama-relu", "llama-bias"):
        extra = {}
        if kind == "llama-tied":
            extra["tie_word_embeddings"] = True
        if kind == "llama-relu" or kind == "fatrelu":
            extra["hidden_act"] = "relu"
        if kind == "llama-bias":
            extra.update(attention_bias=True, mlp_bias=True)
        cfg = tf.LlamaConfig(intermediate_size=160, num_key_value_heads=2, rms_norm_eps=1e-5,
                             rope_theta=10000.0, **common, **extra)
        model = tf.LlamaForCausalLM(cfg)
        if kind == "fatrelu":
            act_threshold = 0.05

            class FATReLU(torch.nn.Module):
                def forward(self, x):
                    return torch.where(x > act_threshold, x, torch.zeros((), dtype=x.dtype))

            for layer in model.model.layers:
                layer.mlp.act_fn = FATReLU()
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=160, num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(intermediate_size=160, num_key_value_heads=2, sliding_window=16,
                               **common)
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Random init gives tiny weights and near-uniform logits; scale up so tests are sensitive.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if act_threshold is not None:
        cfg_path = directory / "config.json"
        data = json.loads(cfg_path.read_text())
        data["hidden_act"] = "fatrelu"
        data["hidden_act_param"] = act_threshold
        cfg_path.write_text(json.dumps(data))
    write_tokenizer(directory)
    return model
