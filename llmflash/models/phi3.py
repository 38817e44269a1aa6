"""Phi-3 decoder (Phi-3-mini/-small-style dense models, Phi-3.5-mini): the Llama shape with fused
projections in the checkpoint and LongRoPE ("longrope", formerly "su") scaling.

One file per architecture (docs/ARCHITECTURE.md): config.json mapping, resident and bundled
tensors (Hugging Face and llama.cpp GGUF names, GGUF metadata), forward. The gated SiLU FFN is
computed by the engine's FFN provider through `self.ffn(layer, x)`.

Phi-3 checkpoints store q, k and v as one `qkv_proj` ([q; k; v] rows) and gate and up as one
`gate_up_proj` ([gate; up] rows); llama.cpp keeps them fused too (`attn_qkv`, `ffn_up`). Import
splits them (FUSED_TENSORS), so the flash layout holds ordinary q/k/v projections and ordinary
gate|up|down neuron bundles.

LongRoPE: inverse frequencies are divided per dimension by `short_factor` while a sequence fits
the original context and by `long_factor` beyond it, and cos/sin are multiplied by an attention
factor (sqrt(1 + ln(max/original) / ln(original)) unless the config gives one). transformers
switches tables when the sequence grows past the original context; our KV cache keeps rotated
keys, so the table is chosen per sequence from its KV-cache capacity (llama.cpp chooses from its
context size the same way): identical to transformers for every sequence that stays within the
original context, and for every one that is longer than it from the start.
"""

from __future__ import annotations

import math

import torch

from llmflash.errors import LLMFlashError
from llmflash.models import llama, qwen3
from llmflash.models.base import FFNProvider, KVCache, Rotary
from llmflash.models.config import ModelConfig, activation, check_rope_scaling, eos_list, rope_scaling, rope_theta

FAMILY = "phi3"
MODEL_TYPES = ("phi3",)
GGUF_ARCHITECTURES = ("phi3",)

GGUF_LAYER_TENSORS: dict[str, str] = {
    "attn_qkv.weight": "self_attn.qkv_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_up.weight": "mlp.gate_up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_GLOBAL_TENSORS = dict(llama.GGUF_GLOBAL_TENSORS)
# llama.cpp stores LongRoPE's factors as tensors; they are config, read back into rope_scaling.
GGUF_CONFIG_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


def fused_tensors(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Checkpoint tensor (suffix after model.layers.{i}.) -> [(our suffix, first row, end row)]."""
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    n = config.intermediate_size
    return {
        "self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", 0, q), ("self_attn.k_proj.weight", q, q + kv),
                                      ("self_attn.v_proj.weight", q + kv, q + 2 * kv)],
        "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", 0, n), ("mlp.up_proj.weight", n, 2 * n)],
    }


# -- config -------------------------------------------------------------------------------------------
def from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    """config.json of a Phi-3 model -> ModelConfig."""
    act, threshold = activation(hf, where)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    params = hf.get("rope_parameters") or {}
    partial = float(hf.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        raise LLMFlashError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported: {where}")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    scaling = rope_scaling(hf)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("longrope", "su"):
        scaling = _longrope(scaling, hf, max_pos, hidden // heads if not hf.get("head_dim") else int(hf["head_dim"]),
                            where)
    else:
        scaling = check_rope_scaling(scaling, where)
    sliding = hf.get("sliding_window")
    return ModelConfig(
        family=FAMILY,
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        max_position_embeddings=max_pos,
        hidden_act=act,
        act_threshold=threshold,
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta(hf),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id")),
    )


def _longrope(scaling: dict, hf: dict, max_pos: int, head_dim: int, where: str) -> dict:
    original = scaling.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not original:
        raise LLMFlashError(f"longrope rope_scaling without original_max_position_embeddings in {where}")
    out = {"rope_type": "longrope", "original_max_position_embeddings": int(original)}
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != head_dim // 2:
            raise LLMFlashError(f"rope_scaling.{key} in {where} must list {head_dim // 2} factors")
        out[key] = [float(f) for f in factors]
    factor = scaling.get("factor") or max_pos / int(original)
    attn = scaling.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(int(original)))
    out["factor"], out["attention_factor"] = float(factor), float(attn)
    return out


def from_gguf(g) -> dict:
    """config.json of a Phi-3 GGUF; LongRoPE factors come back from their tensors."""
    config = qwen3.llama_like_gguf_config(g, "phi3", "Phi3ForCausalLM", default_context=4096)
    config["model_type"] = "phi3"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config["head_dim"] = head_dim
    rope_dims = g.meta_int("phi3.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        config["partial_rotary_factor"] = rope_dims / head_dim  # refused by from_hf
    sliding = g.meta_int("phi3.attention.sliding_window", 0)
    config["sliding_window"] = sliding or None  # llama.cpp writes 0 for none
    if g.has_tensor("rope_factors_long.weight"):
        original = g.meta_int("phi3.rope.scaling.original_context_length")
        config["original_max_position_embeddings"] = original
        config["rope_scaling"] = {
            "type": "longrope", "original_max_position_embeddings": original,
            "long_factor": g.read_raw("rope_factors_long.weight").tolist(),
            "short_factor": g.read_raw("rope_factors_short.weight").tolist(),
        }
        attn = g.meta("phi3.rope.scaling.attn_factor", None)
        if attn is not None:
            config["rope_scaling"]["attention_factor"] = float(attn)
    return config


# -- weights ------------------------------------------------------------------------------------------
def normalise_name(name: str) -> str:
    return name


ffn_tensor_names = llama.ffn_tensor_names
resident_tensor_names = llama.resident_tensor_names


# -- forward ------------------------------------------------------------------------------------------
class LongRotary(Rotary):
    """LongRoPE for one factor list: frequencies divided per dimension by the factors, cos/sin
    multiplied by the attention factor (transformers' _compute_longrope_parameters)."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, factors: list[float]):
        super().__init__(config, max_len, dtype)
        dim = config.head_dim
        base = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        self.inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * base)
        self.scale = float(config.rope_scaling["attention_factor"])

    def at(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key != (start, T):
            cos, sin = super().at(start, T)
            self.cos, self.sin = cos * self.scale, sin * self.scale
        return self.cos, self.sin


class Model(llama.Model):
    """Llama's forward (no biases); LongRoPE tables picked per sequence from its KV-cache capacity."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__(config, weights, ffn, max_len, dtype)
        s = config.rope_scaling or {}
        if s.get("rope_type") == "longrope":
            self.original = int(s["original_max_position_embeddings"])
            self.short = LongRotary(config, max_len, dtype, s["short_factor"])
            self.long = LongRotary(config, max_len, dtype, s["long_factor"])
        else:
            self.original = None
            self.short = self.long = self.rotary

    def _rotary_for(self, cache: KVCache) -> Rotary:
        return self.long if self.original and cache.max_len > self.original else self.short
