"""Llama family decoder (Llama, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, grouped-query attention.

The gated FFN is computed by the engine's FFN provider; this module only adds its output bias.
"""

from __future__ import annotations

import torch

from llmflash.config import ModelConfig
from llmflash.models.base import (Decoder, FFNProvider, KVCache, Rotary, attention, causal_mask,
                                     linear, rms_norm)


class LlamaModel(Decoder):
    """Forward pass over resident tensors (HF names) with a pluggable FFN."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__(config, weights, ffn, dtype)
        self.rotary = Rotary(config, max_len, dtype)

    def _attention(self, layer: int, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        c, p, w = self.config, f"model.layers.{layer}.self_attn.", self.w
        T = x.shape[0]
        q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias"))
        k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias"))
        v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias"))
        q = q.view(T, c.num_heads, c.head_dim).transpose(0, 1)
        k = k.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        v = v.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)
        q = self.rotary.apply(q, start)
        k = self.rotary.apply(k, start)
        k_all, v_all = cache.append(layer, start, k, v)
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
