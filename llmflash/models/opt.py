"""OPT decoder: LayerNorm, learned positions (offset 2), biased attention, ReLU FFN.

Supports pre-LN (most OPT sizes) and post-LN (OPT-350m) and the word_embed_proj_dim projections.
"""

from __future__ import annotations

import torch

from llmflash.config import ModelConfig
from llmflash.models.base import Decoder, FFNProvider, KVCache, attention, causal_mask, layer_norm, linear

POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


class OPTModel(Decoder):
    """Forward pass over resident tensors (HF names) with a pluggable FFN."""

    embed_name = "model.decoder.embed_tokens.weight"

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 max_len: int, dtype: torch.dtype = torch.float32):
        super().__init__(config, weights, ffn, dtype)
        self.positions = weights["model.decoder.embed_positions.weight"]

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.config.norm_eps)

    def _attention(self, layer: int, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        c, w = self.config, self.w
        p = f"model.decoder.layers.{layer}.self_attn."
        T = x.shape[0]
        q = linear(x, w[p + "q_proj.weight"], w[p + "q_proj.bias"])
        k = linear(x, w[p + "k_proj.weight"], w[p + "k_proj.bias"])
        v = linear(x, w[p + "v_proj.weight"], w[p + "v_proj.bias"])
        q = q.view(T, c.num_heads, c.head_dim).transpose(0, 1)
        k = k.view(T, c.num_heads, c.head_dim).transpose(0, 1)
        v = v.view(T, c.num_heads, c.head_dim).transpose(0, 1)
        k_all, v_all = cache.append(layer, start, k, v)
        out = attention(q, k_all, v_all, causal_mask(start, T))
        return linear(out, w[p + "out_proj.weight"], w[p + "out_proj.bias"])

    def forward(self, ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        c, w = self.config, self.w
        d = "model.decoder."
        start = cache.length
        self.ffn.begin_pass(ids.shape[0])
        x = self.embed[ids].to(self.dtype)  # weights may be half precision; activations not
        if c.word_embed_proj_dim:
            x = linear(x, w[d + "project_in.weight"])
        pos = torch.arange(start, start + ids.shape[0]) + POSITION_OFFSET
        x = x + self.positions[pos]
        for layer in range(c.num_layers):
            p = f"{d}layers.{layer}."
            if c.do_layer_norm_before:
                x = x + self._attention(layer, self._ln(x, p + "self_attn_layer_norm"), cache, start)
                x = x + self.ffn(layer, self._ln(x, p + "final_layer_norm")) + w[p + "fc2.bias"]
            else:
                x = self._ln(x + self._attention(layer, x, cache, start), p + "self_attn_layer_norm")
                x = self._ln(x + self.ffn(layer, x) + w[p + "fc2.bias"], p + "final_layer_norm")
        cache.length = start + ids.shape[0]
        if last_only:
            x = x[-1:]
        if c.final_layer_norm:
            x = self._ln(x, d + "final_layer_norm")
        if c.word_embed_proj_dim:
            x = linear(x, w[d + "project_out.weight"])
        return linear(x, self.lm_head)
