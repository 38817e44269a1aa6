"""Which checkpoint tensors each architecture needs, split into resident and FFN (streamed) parts.

Names are Hugging Face transformers names; the flash layout keeps them for resident tensors so a
user can compare a converted model against the original tensor by tensor.
"""

from __future__ import annotations

from llmflash.config import ModelConfig


def normalise_name(name: str, config: ModelConfig) -> str:
    """Old OPT checkpoints drop the `model.` prefix; give every name one spelling."""
    if config.family == "opt" and name.startswith("decoder."):
        return "model." + name
    return name


def layer_prefix(config: ModelConfig, layer: int) -> str:
    if config.family == "opt":
        return f"model.decoder.layers.{layer}."
    return f"model.layers.{layer}."


def ffn_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Bundle part name -> checkpoint tensor name, for the tensors that go into bundles."""
    p = layer_prefix(config, layer)
    if config.gated:
        names = {"gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
                 "down": p + "mlp.down_proj.weight"}
        if config.mlp_bias:
            names |= {"gate_bias": p + "mlp.gate_proj.bias", "up_bias": p + "mlp.up_proj.bias"}
        return names
    return {"up": p + "fc1.weight", "down": p + "fc2.weight", "up_bias": p + "fc1.bias"}


def resident_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor that stays in DRAM: embeddings, attention, norms, FFN output biases, head."""
    names: list[str] = []
    if config.family == "opt":
        d = "model.decoder."
        names += [d + "embed_tokens.weight", d + "embed_positions.weight"]
        if config.word_embed_proj_dim:
            names += [d + "project_in.weight", d + "project_out.weight"]
        if config.final_layer_norm:
            names += [d + "final_layer_norm.weight", d + "final_layer_norm.bias"]
        for i in range(config.num_layers):
            p = layer_prefix(config, i)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                names += [f"{p}self_attn.{proj}.weight", f"{p}self_attn.{proj}.bias"]
            names += [p + "self_attn_layer_norm.weight", p + "self_attn_layer_norm.bias",
                      p + "final_layer_norm.weight", p + "final_layer_norm.bias", p + "fc2.bias"]
    else:
        names += ["model.embed_tokens.weight", "model.norm.weight"]
        for i in range(config.num_layers):
            p = layer_prefix(config, i)
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names.append(f"{p}self_attn.{proj}.weight")
            if config.attention_bias:
                names += [f"{p}self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")]
            if config.attention_out_bias:
                names.append(f"{p}self_attn.o_proj.bias")
            if config.mlp_bias:
                names.append(p + "mlp.down_proj.bias")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names
