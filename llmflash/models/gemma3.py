"""Gemma 3 decoder (text): GeGLU FFN, (1 + weight) RMSNorms, four norms per layer, q/k norms,
scaled embeddings, interleaved sliding-window and global attention with two RoPE bases.

One file per architecture (docs/ARCHITECTURE.md): config.json mapping, resident and bundled
tensors (Hugging Face and llama.cpp GGUF names, GGUF metadata), forward. The gated FFN
(gelu_tanh(gate) * up, down) is computed by the engine's FFN provider through `self.ffn(layer, x)`,
so flash mode and the sparsity tools run on it as on any gated model.

What transformers' Gemma3ForCausalLM does, and so what this does:
- every RMSNorm multiplies by (1 + weight), computed in float32;
- embeddings are multiplied by sqrt(hidden_size) rounded to the embedding dtype;
- layer i is a sliding-window layer unless layer_types says "full_attention" (by default every
  6th layer is global); sliding layers rotate with rope_local_base_freq, global ones with
  rope_theta (and rope_scaling, if any);
- attention scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- final_logit_softcapping, when set, is tanh(logits / cap) * cap.
attn_logit_softcapping is read but not applied: transformers' and llama.cpp's Gemma 3 do not
apply it (it was Gemma 2's), and every Gemma 3 config sets it to null.

GGUF (llama.cpp): norm weights are stored as 1 + weight, so import subtracts 1, as transformers'
GGUF loader does; no q/k row permutation (llama.cpp rotates Gemma in the NeoX layout). llama.cpp
writes neither rope_local_base_freq nor query_pre_attn_scalar: it hard-codes 10000 and head_dim
(hidden / heads for the 27B size); we do the same, and read `gemma3.rope.freq_base_swa` /
`gemma3.attention.query_pre_attn_scalar` where a file has them.
"""

from __future__ import annotations

import dataclasses

import torch

from llmflash.errors import LLMFlashError
from llmflash.models.base import Decoder, FFNProvider, KVCache, Rotary, attention, causal_mask, linear
from llmflash.models.config import ModelConfig, check_rope_scaling, eos_list

FAMILY = "gemma3"
MODEL_TYPES = ("gemma3_text",)
GGUF_ARCHITECTURES = ("gemma3",)
SLIDING, FULL = "sliding_attention", "full_attention"
SLIDING_WINDOW_PATTERN = 6  # transformers' and llama.cpp's default: every 6th layer is global

GGUF_LAYER_TENSORS: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GGUF_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json), used when a file has none
# (the Gemma-3-270M GGUF carries no tokenizer.chat_template).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
# Gemma's chat turns end with <end_of_turn>; generation stops there as well as at <eos>.
EXTRA_EOS_TOKENS = ("<end_of_turn>",)


# -- config -------------------------------------------------------------------------------------------
def from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    """config.json of a Gemma 3 text model -> ModelConfig."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise LLMFlashError(f"unsupported Gemma 3 FFN activation {act!r} in {where}; supported: gelu_pytorch_tanh")
    if hf.get("use_bidirectional_attention"):
        raise LLMFlashError(f"bidirectional Gemma 3 (an encoder) is not a decoder: {where}")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    layers = int(hf["num_hidden_layers"])
    head_dim = int(hf.get("head_dim") or 256)
    params = hf.get("rope_parameters") or {}
    full = params.get(FULL) or {}
    local = params.get(SLIDING) or {}
    theta = float(hf.get("rope_theta") or full.get("rope_theta") or 1_000_000.0)
    local_theta = float(hf.get("rope_local_base_freq") or local.get("rope_theta") or 10_000.0)
    scaling = hf.get("rope_scaling")
    if scaling is None and full.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    if local.get("rope_type", "default") != "default":
        raise LLMFlashError(f"rope scaling on Gemma 3's sliding layers is not supported: {where}")
    types = hf.get("layer_types") or _default_layer_types(
        layers, int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or SLIDING_WINDOW_PATTERN))
    if len(types) != layers or set(types) - {SLIDING, FULL}:
        raise LLMFlashError(f"layer_types in {where} must list {layers} of {SLIDING!r}/{FULL!r}")
    sliding = hf.get("sliding_window")
    if SLIDING in types and not sliding:
        raise LLMFlashError(f"Gemma 3 with sliding layers but no sliding_window in {where}")
    return ModelConfig(
        family=FAMILY,
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
        hidden_act="gelu_tanh",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=check_rope_scaling(scaling, where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_out_bias=bool(hf.get("attention_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        layer_types=list(types),
        rope_local_theta=local_theta,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or head_dim),
        final_logit_softcapping=_cap(hf.get("final_logit_softcapping")),
        bos_token_id=hf.get("bos_token_id", 2),
        eos_token_id=eos_list(hf.get("eos_token_id", 1)),
    )


def _cap(value) -> float | None:
    return float(value) if value else None


def _default_layer_types(layers: int, pattern: int) -> list[str]:
    return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]


def from_gguf(g) -> dict:
    """config.json of a Gemma 3 GGUF, as transformers' GGUF loader builds it (plus the keys
    llama.cpp hard-codes, so that a 27B-shaped file gets its own query scale)."""
    a = "gemma3"
    hidden = g.meta_int(f"{a}.embedding_length")
    heads = g.meta_int(f"{a}.attention.head_count")
    layers = g.meta_int(f"{a}.block_count")
    head_dim = g.meta_int(f"{a}.attention.key_length", 256)
    if g.meta_int(f"{a}.attention.value_length", head_dim) != head_dim:
        raise LLMFlashError(f"Gemma 3 GGUF with key length != value length: {g.path}")
    scalar = g.meta(f"{a}.attention.query_pre_attn_scalar", None)
    if scalar is None:  # llama.cpp: hidden/heads for the 27B model (62 layers), head_dim otherwise
        scalar = hidden // heads if layers == 62 else head_dim
    pattern = g.meta(f"{a}.attention.sliding_window_pattern", None)
    if isinstance(pattern, list):  # newer llama.cpp: per layer, true = sliding
        types = [SLIDING if p else FULL for p in pattern]
    else:
        types = _default_layer_types(layers, int(pattern or SLIDING_WINDOW_PATTERN))
    config = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": g.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": g.meta_int(f"{a}.feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": g.meta_int(f"{a}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(g.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g.meta(f"{a}.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(g.meta(f"{a}.rope.freq_base_swa", 10_000.0)),
        "rope_scaling": g.rope_scaling(a),
        "sliding_window": g.meta_int(f"{a}.attention.sliding_window", 4096),
        "layer_types": types,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": g.meta(f"{a}.final_logit_softcapping", None),
        "max_position_embeddings": g.meta_int(f"{a}.context_length", 131072),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": not g.has_tensor("output.weight"),
        "torch_dtype": "float32",
    }
    config.update(g.special_token_ids())
    ends = [g.token_id(t) for t in EXTRA_EOS_TOKENS]  # chat turns end here (as generation_config.json)
    eos = config.get("eos_token_id")
    config["eos_token_id"] = ([] if eos is None else [eos]) + [i for i in ends if i is not None and i != eos]
    return config


def gguf_tensor_fix(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores Gemma's norm weights as 1 + weight; transformers keeps the weight."""
    return tensor - 1 if hf_name.endswith("norm.weight") else tensor


# -- weights ------------------------------------------------------------------------------------------
def normalise_name(name: str) -> str:
    return name


def ffn_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}.mlp."
    return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}


def resident_tensor_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm",
                                             "pre_feedforward_layernorm", "post_feedforward_layernorm")]
        names += [f"{p}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        if config.attention_bias:
            names += [f"{p}self_attn.{n}.bias" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


# -- forward ------------------------------------------------------------------------------------------
def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: (x / rms(x)) * (1 + weight), in float32, back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class Model(Decoder):
    """Forward pass over resident tensors (HF names) with a pluggable FFN."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__(config, weights, ffn, dtype)
        local = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None)
        self.rotary = {FULL: Rotary(config, max_len, dtype), SLIDING: Rotary(local, max_len, dtype)}
        self.types = config.layer_types or [FULL] * config.num_layers
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=self.embed.dtype)

    def _attention(self, layer: int, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        c, p, w = self.config, f"model.layers.{layer}.self_attn.", self.w
        T = x.shape[0]
        q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias")).view(T, c.num_heads, c.head_dim)
        k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).view(T, c.num_kv_heads, c.head_dim)
        v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).view(T, c.num_kv_heads, c.head_dim)
        kind = self.types[layer]
        rotary = self.rotary[kind]
        q = rotary.apply(norm(q, w[p + "q_norm.weight"], c.norm_eps).transpose(0, 1), start)
        k = rotary.apply(norm(k, w[p + "k_norm.weight"], c.norm_eps).transpose(0, 1), start)
        k_all, v_all = cache.append(layer, start, k, v.transpose(0, 1))
        window = c.sliding_window if kind == SLIDING else None
        out = attention(q, k_all, v_all, causal_mask(start, T, window), scale=self.scale)
        return linear(out, w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        c, w, eps = self.config, self.w, self.config.norm_eps
        start = cache.length
        self.ffn.begin_pass(ids.shape[0])
        x = (self.embed[ids] * self.embed_scale).to(self.dtype)  # scaled in the embedding dtype
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            h = self._attention(layer, norm(x, w[p + "input_layernorm.weight"], eps), cache, start)
            x = x + norm(h, w[p + "post_attention_layernorm.weight"], eps)
            h = self.ffn(layer, norm(x, w[p + "pre_feedforward_layernorm.weight"], eps))
            x = x + norm(h, w[p + "post_feedforward_layernorm.weight"], eps)
        cache.length = start + ids.shape[0]
        if last_only:
            x = x[-1:]
        logits = linear(norm(x, w["model.norm.weight"], eps), self.lm_head)
        cap = c.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap
