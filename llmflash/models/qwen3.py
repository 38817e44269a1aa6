"""Qwen3 decoder: the Llama shape with RMSNorm on each head's queries and keys, no q/k/v bias.

One file per architecture (docs/ARCHITECTURE.md): config.json mapping, resident and bundled
tensors (Hugging Face and llama.cpp GGUF names, GGUF metadata), forward. The gated SiLU FFN is
computed by the engine's FFN provider through `self.ffn(layer, x)`.
"""

from __future__ import annotations

import torch

from llmflash.models import llama
from llmflash.models.base import rms_norm
from llmflash.models.config import ModelConfig, activation, check_rope_scaling, eos_list, rope_scaling, rope_theta

FAMILY = "qwen3"
MODEL_TYPES = ("qwen3",)
GGUF_ARCHITECTURES = ("qwen3",)

# llama.cpp tensor-name suffix (after "blk.{i}.") -> transformers suffix (after "model.layers.{i}.").
GGUF_LAYER_TENSORS: dict[str, str] = {**llama.GGUF_LAYER_TENSORS,
                                     "attn_q_norm.weight": "self_attn.q_norm.weight",
                                     "attn_k_norm.weight": "self_attn.k_norm.weight"}
GGUF_GLOBAL_TENSORS = dict(llama.GGUF_GLOBAL_TENSORS)


# -- config -------------------------------------------------------------------------------------------
def from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    """config.json of a Qwen3 model -> ModelConfig."""
    act, threshold = activation(hf, where)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if sliding and int(hf.get("max_window_layers", 0) or 0) < int(hf["num_hidden_layers"]):
        from llmflash.errors import LLMFlashError

        raise LLMFlashError(f"Qwen3 with sliding-window layers (use_sliding_window, max_window_layers) "
                            f"is not supported: {where}")
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
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        hidden_act=act,
        act_threshold=threshold,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(hf),
        rope_scaling=check_rope_scaling(rope_scaling(hf), where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_out_bias=bool(hf.get("attention_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id")),
    )


def from_gguf(g) -> dict:
    """config.json of a Qwen3 GGUF (llama.cpp's qwen3.* keys)."""
    return llama_like_gguf_config(g, "qwen3", "Qwen3ForCausalLM", default_context=40960)


def llama_like_gguf_config(g, arch: str, hf_arch: str, default_context: int) -> dict:
    """The keys every llama-shaped llama.cpp architecture writes, as a transformers config dict."""
    hidden = g.meta_int(f"{arch}.embedding_length")
    heads = g.meta_int(f"{arch}.attention.head_count")
    head_dim = g.meta_int(f"{arch}.attention.key_length", None) or hidden // heads
    config = {
        "model_type": arch,
        "architectures": [hf_arch],
        "vocab_size": g.vocab_size(),
        "hidden_size": hidden,
        "intermediate_size": g.meta_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": g.meta_int(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": g.meta_int(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(g.meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g.meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": g.meta_int(f"{arch}.context_length", default_context),
        "hidden_act": "silu",
        "tie_word_embeddings": not g.has_tensor("output.weight"),
        "torch_dtype": "float32",
    }
    config.update(g.special_token_ids())
    return config


# -- weights ------------------------------------------------------------------------------------------
def normalise_name(name: str) -> str:
    return name


ffn_tensor_names = llama.ffn_tensor_names


def resident_tensor_names(config: ModelConfig) -> list[str]:
    names = llama.resident_tensor_names(config)
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.self_attn.q_norm.weight", f"model.layers.{i}.self_attn.k_norm.weight"]
    return names


# -- forward ------------------------------------------------------------------------------------------
class Model(llama.Model):
    """Llama's forward with per-head RMSNorm on q and k before the rotation."""

    def _qk_norm(self, prefix: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.config.norm_eps
        return rms_norm(q, self.w[prefix + "q_norm.weight"], eps), rms_norm(k, self.w[prefix + "k_norm.weight"], eps)
