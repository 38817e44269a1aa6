"""Llama family decoder (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, grouped-query attention,
gated FFN (SiLU, ReLU or FATReLU).

One file per architecture (docs/ARCHITECTURE.md): what config.json means, which tensors are
resident and which go into neuron bundles (Hugging Face names, and llama.cpp's GGUF names), and
the forward pass. The gated FFN itself is computed by the engine's FFN provider through
`self.ffn(layer, x)`; this module only adds its output bias.
"""

from __future__ import annotations

import torch

from llmflash.models.base import Decoder, FFNProvider, KVCache, Rotary, attention, causal_mask, linear, rms_norm
from llmflash.models.config import (ModelConfig, activation, check_rope_scaling, eos_list, rope_scaling,
                                    rope_theta)

FAMILY = "llama"
MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm2", "smollm")  # config.json model_type values
GGUF_ARCHITECTURES = ("llama",)  # GGUF general.architecture values

# llama.cpp tensor-name suffix (after "blk.{i}.") -> transformers suffix (after "model.layers.{i}.").
# The order is transformers' module order.
GGUF_LAYER_TENSORS: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GGUF_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                       "output.weight": "lm_head.weight"}


# -- config -------------------------------------------------------------------------------------------
def from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    """config.json of a Llama-family model -> ModelConfig."""
    act, threshold = activation(hf, where)
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    # Qwen2 has q/k/v biases but no o_proj bias; Llama's attention_bias covers all four.
    qkv_bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    out_bias = model_type != "qwen2" and bool(hf.get("attention_bias", False))
    sliding = None
    if model_type == "mistral" or (model_type == "qwen2" and hf.get("use_sliding_window")):
        sliding = hf.get("sliding_window")
    return ModelConfig(
        family="llama",
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        hidden_act=act,
        act_threshold=threshold,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta(hf),
        rope_scaling=check_rope_scaling(rope_scaling(hf), where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id")),
    )


# -- weights ------------------------------------------------------------------------------------------
def normalise_name(name: str) -> str:
    return name


def ffn_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Bundle part name -> checkpoint tensor name, for the tensors that go into bundles."""
    p = f"model.layers.{layer}.mlp."
    names = {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight", "down": p + "down_proj.weight"}
    if config.mlp_bias:
        names |= {"gate_bias": p + "gate_proj.bias", "up_bias": p + "up_proj.bias"}
    return names


def resident_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor that stays in DRAM: embeddings, attention, norms, FFN output biases, head."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if config.attention_bias:
            names += [f"{p}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
        if config.attention_out_bias:
            names.append(f"{p}self_attn.o_proj.bias")
        if config.mlp_bias:
            names.append(p + "mlp.down_proj.bias")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


# -- forward ------------------------------------------------------------------------------------------
class Model(Decoder):
    """Forward pass over resident tensors (HF names) with a pluggable FFN."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__(config, weights, ffn, dtype)
        self.rotary = Rotary(config, max_len, dtype)

    def _rotary_for(self, cache: KVCache) -> Rotary:
        """The rotation for a sequence (Phi-3's LongRoPE picks a table from the cache's capacity)."""
        return self.rotary

    def _qk_norm(self, prefix: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query/key normalisation before the rotation: none here (Qwen3 overrides it)."""
        return q, k

    def _attention(self, layer: int, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        c, p, w = self.config, f"model.layers.{layer}.self_attn.", self.w
        T = x.shape[0]
        q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias")).view(T, c.num_heads, c.head_dim)
        k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).view(T, c.num_kv_heads, c.head_dim)
        v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).view(T, c.num_kv_heads, c.head_dim)
        q, k = self._qk_norm(p, q, k)
        rotary = self._rotary_for(cache)
        q = rotary.apply(q.transpose(0, 1), start)
        k = rotary.apply(k.transpose(0, 1), start)
        k_all, v_all = cache.append(layer, start, k, v.transpose(0, 1))
        out = attention(q, k_all, v_all, causal_mask(start, T, c.sliding_window))
        return linear(out, w[p + "o_proj.weight"], w.get(p + "o_proj.bias"))

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits for ids ([T] int64) placed after the cache's current content."""
        c, w = self.config, self.w
        start = cache.length
        self.ffn.begin_pass(ids.shape[0])
        x = self.embed[ids].to(self.dtype)  # weights may be half precision; activations not
        for layer in range(c.num_layers):
            p = f"model.layers.{layer}."
            x = x + self._attention(layer, rms_norm(x, w[p + "input_layernorm.weight"], c.norm_eps),
                                    cache, start)
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], c.norm_eps)
            y = self.ffn(layer, h)
            bias = w.get(p + "mlp.down_proj.bias")
            x = x + (y if bias is None else y + bias)
        cache.length = start + ids.shape[0]
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, w["model.norm.weight"], c.norm_eps), self.lm_head)
