"""Gemma 3, Qwen3 and Phi-3 against transformers: tiny random models built here, imported from
Hugging Face safetensors and from a GGUF this test writes the way llama.cpp's converter does.

The GGUF route is compared against the same transformers model as the safetensors route: the
test writes the model's own tensors under llama.cpp's names and layouts (Gemma's norms stored
+1, Phi-3's qkv and gate|up left fused, longrope factors as tensors), so importing it must give
back exactly that model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import gemma_ref
from gguf_reference import plain_view
import tiny_models
from llmflash.conversion.writer import convert
from llmflash.runtime.engine import Engine

VOCAB = tiny_models.VOCAB
PROMPT = [1, 17, 42, 99, 7, 250, 3, 18, 77, 5, 200, 11]


# ------------------------------------------------------------------------------ tiny models


def build(kind: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model of the given family with odd sizes, saved in `directory`."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gemma3":
        # 7 layers: pattern 6 gives sliding layers 0-4, 6 and one global layer (5); window 5 is
        # shorter than the prompt. head_dim 24 != hidden/heads, query_pre_attn_scalar != head_dim,
        # 3 heads over 1 kv head, both soft-caps on.
        cfg = tf.Gemma3TextConfig(
            hidden_size=42, intermediate_size=72, num_hidden_layers=7, num_attention_heads=3,
            num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
            max_position_embeddings=256, rope_theta=10000.0, rope_local_base_freq=100.0,
            attn_logit_softcapping=30.0, final_logit_softcapping=20.0, rms_norm_eps=1e-6,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, **common)
        cfg._attn_implementation = "eager"  # softcapping is eager-only in transformers
        model = tf.Gemma3ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(
            hidden_size=40, intermediate_size=88, num_hidden_layers=3, num_attention_heads=5,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=256, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif kind in ("phi3", "phi3-longrope"):
        extra = {}
        if kind == "phi3-longrope":  # the -128k configs: short/long factors, original context 64
            rng = np.random.default_rng(1)  # head_dim 12: 6 frequencies
            extra = dict(max_position_embeddings=512, original_max_position_embeddings=64,
                         rope_scaling={"type": "longrope",
                                       "short_factor": (1 + rng.random(6)).round(3).tolist(),
                                       "long_factor": (2 + 4 * rng.random(6)).round(3).tolist()})
        else:  # the -4k configs: no scaling, a sliding window
            extra = dict(max_position_embeddings=256, sliding_window=9)
        cfg = tf.Phi3Config(
            hidden_size=36, intermediate_size=70, num_hidden_layers=2, num_attention_heads=3,
            num_key_value_heads=3 if kind == "phi3" else 1, rope_theta=10000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, **common, **extra)
        model = tf.Phi3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.2)  # Gemma stores weight-1
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tiny_models.write_tokenizer(directory)
    return model


# ------------------------------------------------------------------------------ GGUF writer


def _gguf_tokenizer(writer: gguf.GGUFWriter, directory: Path) -> None:
    """The tiny byte-level BPE tokenizer.json as GGUF tokenizer.ggml.* metadata."""
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)


def write_gguf(kind: str, model: torch.nn.Module, directory: Path, path: Path) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py would write it (float32 tensors)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    arch = {"gemma3": "gemma3", "qwen3": "qwen3"}.get(kind, "phi3")
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tensors: dict[str, np.ndarray] = {"token_embd.weight": sd["model.embed_tokens.weight"],
                                      "output_norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.o_proj.weight": "attn_output", "mlp.down_proj.weight": "ffn_down",
             "input_layernorm.weight": "attn_norm"}
    if kind == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
        names |= {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                  "self_attn.v_proj.weight": "attn_v", "self_attn.q_norm.weight": "attn_q_norm",
                  "self_attn.k_norm.weight": "attn_k_norm", "mlp.gate_proj.weight": "ffn_gate",
                  "mlp.up_proj.weight": "ffn_up", "post_attention_layernorm.weight": "post_attention_norm",
                  "pre_feedforward_layernorm.weight": "ffn_norm",
                  "post_feedforward_layernorm.weight": "post_ffw_norm"}
        # What llama.cpp does not store: the test model's non-default values, as the keys
        # llmflash reads (llama.cpp hard-codes them per model size).
        w.add_float32("gemma3.rope.freq_base_swa", cfg.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_float32("gemma3.attention.query_pre_attn_scalar", float(cfg.query_pre_attn_scalar))
        w.add_float32("gemma3.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32("gemma3.final_logit_softcapping", cfg.final_logit_softcapping)
    elif kind == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        names |= {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                  "self_attn.v_proj.weight": "attn_v", "self_attn.q_norm.weight": "attn_q_norm",
                  "self_attn.k_norm.weight": "attn_k_norm", "mlp.gate_proj.weight": "ffn_gate",
                  "mlp.up_proj.weight": "ffn_up", "post_attention_layernorm.weight": "ffn_norm"}
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_sliding_window(cfg.sliding_window or 0)
        names |= {"self_attn.qkv_proj.weight": "attn_qkv", "mlp.gate_up_proj.weight": "ffn_up",
                  "post_attention_layernorm.weight": "ffn_norm"}
        rope = cfg.rope_parameters
        if rope.get("rope_type") == "longrope":
            original = cfg.original_max_position_embeddings
            w.add_rope_scaling_orig_ctx_len(original)
            scale = cfg.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
            tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
            tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    for i in range(cfg.num_hidden_layers):
        for hf_suffix, gguf_suffix in names.items():
            value = sd[f"model.layers.{i}.{hf_suffix}"]
            if kind == "gemma3" and hf_suffix.endswith("norm.weight"):
                value = value + 1  # llama.cpp stores Gemma's (1 + weight)
            tensors[f"blk.{i}.{gguf_suffix}.weight"] = value
    if kind == "gemma3":
        tensors["output_norm.weight"] = tensors["output_norm.weight"] + 1
    _gguf_tokenizer(w, directory)
    for name, value in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------ tests

KINDS = ["gemma3", "qwen3", "phi3", "phi3-longrope"]


@pytest.fixture(scope="module", params=[(k, route) for k in KINDS for route in ("hf", "gguf")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory):
    kind, route = request.param
    base = tmp_path_factory.mktemp(f"{kind}-{route}")
    ref = build(kind, base / "hf")
    src = base / "hf"
    if route == "gguf":
        src = base / "model.gguf"
        write_gguf(kind, ref, base / "hf", src)
    convert(src, base / "flash", dtype="float32", progress=False)
    return ref, Engine(base / "flash")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_prefill_logits_match(pair):
    ref, ours = pair
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    assert rel_err(ours.logits(PROMPT), expected) < 1e-4


def test_decode_steps_match(pair):
    """Prefill then single-token steps through the KV cache, past the sliding window."""
    ref, ours = pair
    ids = list(PROMPT)
    cache = ours.model.new_cache(len(ids) + 12)
    ours.model.forward(torch.tensor(ids), cache)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        nxt = int(torch.randint(3, VOCAB, (1,), generator=gen))
        ids.append(nxt)
        got = ours.model.forward(torch.tensor([nxt]), cache)[-1]
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        assert rel_err(got, expected) < 1e-4


def test_greedy_generation_identical(pair):
    ref, ours = pair
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    assert ours.generate(PROMPT, 20, temperature=0.0, stop_at_eos=False).token_ids == expected


def test_longrope_long_factors_past_the_original_context(tmp_path):
    """A prompt longer than original_max_position_embeddings (64): transformers rotates the whole
    sequence with the long factors, and so do we (the KV cache is sized past the original)."""
    ref = build("phi3-longrope", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False)
    ours = Engine(tmp_path / "flash")
    ids = [int(i) for i in torch.randint(3, VOCAB, (80,), generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert rel_err(ours.logits(ids), expected) < 1e-4


def test_gemma_attention_softcapping_is_ignored_as_transformers_does(tmp_path):
    """The tiny Gemma 3 config sets attn_logit_softcapping (30): transformers' Gemma3Attention
    does not apply it (Gemma 2 did), so the comparisons above already show we ignore it too;
    final_logit_softcapping (20) is applied by both: logits stay inside (-20, 20)."""
    ref = build("gemma3", tmp_path / "hf")
    assert ref.config.attn_logit_softcapping == 30.0 and ref.config.final_logit_softcapping == 20.0
    convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False)
    ours = Engine(tmp_path / "flash")
    assert ours.config.final_logit_softcapping == 20.0
    assert float(ours.logits(PROMPT).abs().max()) < 20.0


# ------------------------------------------------------------------------------ Gemma-3-270M


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The real GGUF converted in float32, and transformers loading the same file. The 1.1 GB
    conversion is removed when this module's tests end, so it never sits on CI's disk beside the
    models of later modules."""
    path = gemma_ref.gguf_path()
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("gemma-3-270m")
    out = base / "gemma-3-270m-f32"
    convert(path, out, dtype="float32", progress=False)
    with plain_view():
        ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                dtype=torch.float32).eval()
    yield out, Engine(out), ref
    shutil.rmtree(base, ignore_errors=True)


@gemma_ref.needs_gemma
def test_gemma_270m_32_greedy_tokens_identical_chat_and_plain(gemma):
    out, ours, ref = gemma
    tok = gemma_ref.ref_tokenizer()
    tok.chat_template = ours.tokenizer.chat_template  # the GGUF has none: Gemma 3's own (gemma3.py)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected_prompt, dict) or hasattr(expected_prompt, "input_ids"):
        expected_prompt = expected_prompt["input_ids"]
    chat = ours.tokenizer.encode_chat("What is the capital of France?")
    assert chat == list(expected_prompt)
    assert chat[:5] == [2, 105, 2364, 107, 3689]  # <bos><start_of_turn>user\nWhat
    plain = ours.tokenizer.encode("The history of the Roman Empire")
    assert plain == tok("The history of the Roman Empire")["input_ids"]
    for ids in (chat, plain):
        with torch.no_grad():
            result = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        expected = result[0, len(ids):].tolist()
        assert ours.generate(ids, 32, stop_at_eos=False).token_ids == expected
    assert ours.config.eos_token_id == [1, 106]  # <eos> and <end_of_turn> stop a chat turn


@gemma_ref.needs_gemma
def test_gemma_270m_logits_close(gemma):
    _, ours, ref = gemma
    ids = ours.tokenizer.encode("Water boils at a temperature of")
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert rel_err(ours.logits(ids), expected) < 1e-4


@gemma_ref.needs_gemma
def test_gemma_270m_flash_equals_dense_with_the_same_selection(gemma):
    """GeGLU has no exact zeros: the magnitude oracle keeps the top |gelu(gate)·up| neurons of each
    token. Flash with all neurons equals dense; flash at density 0.5 equals the DRAM-sparse run that
    applies the same per-token selection to the same weights. Tokens go one per pass (decode steps:
    a prompt pass selects for the prompt as a whole in flash mode, by design)."""
    from llmflash.runtime.modes import RunOptions, ffn_factory

    out, dense, _ = gemma
    ids = dense.tokenizer.encode("The capital of France is")  # <bos> + 5 tokens, one pass each
    sparse = Engine(out, ffn=ffn_factory(RunOptions(mode="dense", sparsity="magnitude", density=0.5)))
    for density, other in ((1.0, dense), (0.5, sparse)):
        # 270M is mostly embeddings (80 % resident); the magnitude selector's gate/up copies are
        # charged too, so at 100 % the caches hold about a quarter of the FFN and the rest streams.
        flash = Engine(out, ffn=ffn_factory(RunOptions(mode="flash", sparsity="magnitude", density=density,
                                                       memory="100%", window=2, context=32)))
        cache_f, cache_o = flash.model.new_cache(32), other.model.new_cache(32)
        for t in ids:
            got = flash.model.forward(torch.tensor([t]), cache_f)
            assert rel_err(got, other.model.forward(torch.tensor([t]), cache_o)) < 1e-5
        assert sum(flash.ffn.log.rows_used) > 0  # it ran through the flash provider
        del flash
