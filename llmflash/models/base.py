"""Pieces shared by the decoder architectures: KV cache, attention, RoPE, norms, the FFN hook.

Batch size is 1, so activations are [tokens, hidden]. The FFN is not computed here: each model
calls `ffn(layer, x)`, an object supplied by the engine (dense, sparse, or flash-backed), which is
the single seam through which the paper's method plugs into an otherwise ordinary decoder.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from llmflash.compute import linear as mixed_linear
from llmflash.models.config import ModelConfig
from llmflash.errors import LLMFlashError


class FFNProvider:
    """The seam between a decoder and the paper's method: computes layer `layer`'s FFN (without
    the output bias) for inputs x: [tokens, hidden].

    The decoder calls `begin_pass(tokens)` once at the start of every forward pass (a prompt or one
    decode step), then `__call__` once per layer. Providers that read from flash log per-pass
    counters and return them from `token_log()`; `summary()` adds provider-wide figures to a
    generation's stats. Subclasses override what they need; the defaults do nothing.
    """

    def begin_pass(self, tokens: int) -> None:
        """A forward pass over `tokens` new positions starts."""

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def token_log(self):
        """Per-pass counters (runtime.providers.TokenLog) or None when the provider does no I/O."""
        return None

    def summary(self) -> dict:
        """Provider-wide figures reported with a generation's stats (cache sizes, selector...)."""
        return {}

    def begin_generation(self) -> None:
        """A new sequence starts: per-pass counters restart."""


class ObservedFFN(FFNProvider):
    """Wraps a provider and shows every layer's FFN input to `observe` first (tools that record
    activations or inputs use it instead of replacing the model's provider with a function)."""

    def __init__(self, inner: FFNProvider, observe):
        self.inner = inner
        self.observe = observe

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.observe(layer, x)
        return self.inner(layer, x)


class Decoder:
    """What every architecture module shares: config, resident weights, the FFN hook, KV caches."""

    embed_name = "model.embed_tokens.weight"

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                 dtype: torch.dtype = torch.float32):
        self.config = config
        self.w = weights
        self.ffn = ffn
        self.dtype = dtype
        self.embed = weights[self.embed_name]
        self.lm_head = weights.get("lm_head.weight", self.embed)  # tied when absent

    def new_cache(self, max_len: int) -> "KVCache":
        return KVCache(self.config, max_len, self.dtype)


class KVCache:
    """Preallocated keys and values for one sequence: [layers, kv_heads, max_len, head_dim]."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype):
        shape = (config.num_layers, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @staticmethod
    def bytes_for(config: ModelConfig, tokens: int, dtype: torch.dtype) -> int:
        """What a cache of `tokens` positions holds (memory plans charge it before allocating)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * tokens * config.head_dim * item

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([kv_heads, T, head_dim]) at positions start.. and return the filled prefix."""
        end = start + k.shape[1]
        if end > self.max_len:
            raise LLMFlashError(f"sequence of {end} tokens exceeds the KV cache of {self.max_len}")
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


def causal_mask(start: int, length: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [length, start+length]: query i (at position start+i) may see keys j <= start+i."""
    q_pos = torch.arange(start, start + length).unsqueeze(1)
    k_pos = torch.arange(start + length).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """q: [heads, T, hd], k/v: [kv_heads, S, hd] (grouped-query) -> [T, heads*hd].

    Scores are scaled by `scale`, hd ** -0.5 unless given (Gemma: query_pre_attn_scalar ** -0.5).

    Written out rather than via scaled_dot_product_attention: for one decode token on CPU the
    fused kernel costs ~10x more than these three small batched matmuls (measured: 1.4 ms vs 0.1 ms).
    Query heads sharing a kv head are folded into one batch row, so k/v are never repeated.
    """
    heads, T, hd = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group * T, hd)
    scores = torch.matmul(qg, k.transpose(1, 2)) * (hd ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask.repeat(group, 1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.reshape(heads, T, hd).transpose(0, 1).reshape(T, heads * hd)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias with x float32 and weight at its stored dtype (llmflash.compute)."""
    return mixed_linear(x, weight, bias)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with the config's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """cos/sin for the positions in use (rotate-half convention, as transformers).

    Computed per forward pass for positions start..start+T-1 rather than tabled for the whole
    context: a 128k-context table is ~100 MB that no memory plan would see, while one decode step
    needs head_dim/2 products. The last pass's values are reused by every layer of that pass.
    """

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype):
        self.inv_freq = rope_inv_freq(config)
        self.dtype = dtype
        self._key: tuple[int, int] | None = None
        self.cos = self.sin = torch.empty(0)

    def at(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key != (start, T):
            t = torch.arange(start, start + T, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
            self._key = (start, T)
        return self.cos, self.sin

    def apply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: [heads, T, head_dim] at positions start..start+T-1."""
        T = x.shape[1]
        cos, sin = self.at(start, T)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin
