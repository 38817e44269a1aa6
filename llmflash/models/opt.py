"""OPT decoder: LayerNorm, learned positions (offset 2), biased attention, ReLU FFN (fc1, fc2).

Supports pre-LN (most OPT sizes) and post-LN (OPT-350m) and the word_embed_proj_dim projections.
One file per architecture (docs/ARCHITECTURE.md): config mapping, tensor names, forward.
"""

from __future__ import annotations

import torch

from llmflash.errors import LLMFlashError
from llmflash.models.base import Decoder, FFNProvider, KVCache, attention, causal_mask, layer_norm, linear
from llmflash.models.config import ModelConfig, activation, eos_list

FAMILY = "opt"
MODEL_TYPES = ("opt",)
GGUF_ARCHITECTURES: tuple[str, ...] = ()  # llama.cpp has no OPT support
POSITION_OFFSET = 2  # OPT's learned position table reserves its first two rows


# -- config -------------------------------------------------------------------------------------------
def from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    """config.json of an OPT model -> ModelConfig."""
    act, threshold = activation(hf, where)
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    if not hf.get("enable_bias", True):
        raise LLMFlashError(f"OPT with enable_bias=false is not supported ({where})")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise LLMFlashError(f"OPT without affine layer norms is not supported ({where})")
    proj = hf.get("word_embed_proj_dim") or hidden
    return ModelConfig(
        family="opt",
        model_type="opt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["ffn_dim"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        hidden_act=act,
        act_threshold=threshold,
        norm_eps=1e-5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True,
        attention_out_bias=True,
        mlp_bias=True,
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        word_embed_proj_dim=int(proj) if proj != hidden else None,
        final_layer_norm=bool(hf.get("do_layer_norm_before", True))
        and not hf.get("_remove_final_layer_norm", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_list(hf.get("eos_token_id")),
    )


# -- weights ------------------------------------------------------------------------------------------
def normalise_name(name: str) -> str:
    """Old OPT checkpoints drop the `model.` prefix; give every name one spelling."""
    return "model." + name if name.startswith("decoder.") else name


def ffn_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Bundle part name -> checkpoint tensor name: fc1 rows (with bias) and fc2 columns."""
    p = f"model.decoder.layers.{layer}."
    return {"up": p + "fc1.weight", "down": p + "fc2.weight", "up_bias": p + "fc1.bias"}


def resident_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor that stays in DRAM: embeddings, positions, attention, norms, fc2 bias, head."""
    d = "model.decoder."
    names = [d + "embed_tokens.weight", d + "embed_positions.weight"]
    if config.word_embed_proj_dim:
        names += [d + "project_in.weight", d + "project_out.weight"]
    if config.final_layer_norm:
        names += [d + "final_layer_norm.weight", d + "final_layer_norm.bias"]
    for i in range(config.num_layers):
        p = f"{d}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names += [f"{p}self_attn.{proj}.weight", f"{p}self_attn.{proj}.bias"]
        names += [p + "self_attn_layer_norm.weight", p + "self_attn_layer_norm.bias",
                  p + "final_layer_norm.weight", p + "final_layer_norm.bias", p + "fc2.bias"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


# -- forward ------------------------------------------------------------------------------------------
class Model(Decoder):
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
