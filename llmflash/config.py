"""One normalised model config for every supported architecture.

Hugging Face configs name the same thing differently per family (OPT's `ffn_dim` is Llama's
`intermediate_size`); the runtime reads only this dataclass, so adding a family means adding one
mapping function here and one forward module in models/.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmflash.errors import LLMFlashError

# model_type -> our architecture family
LLAMA_FAMILY = {"llama", "mistral", "qwen2", "smollm2", "smollm"}
OPT_FAMILY = {"opt"}
SUPPORTED_MODEL_TYPES = sorted(LLAMA_FAMILY | OPT_FAMILY)

# FFN activations the runtime implements. "fatrelu" is ReLU with a positive threshold (ProSparse).
ACTIVATIONS = {"silu", "relu", "fatrelu"}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, independent of the source checkpoint's naming."""

    family: str  # "llama" or "opt"
    model_type: str  # as in the source config (llama, mistral, qwen2, opt, ...)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    hidden_act: str
    act_threshold: float = 0.0  # FATReLU threshold; 0 for plain ReLU
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases
    attention_out_bias: bool = False  # o_proj bias
    mlp_bias: bool = False  # gate/up/down biases
    sliding_window: int | None = None
    # OPT specifics
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def gated(self) -> bool:
        """Gated FFN (gate, up, down) as in Llama; plain (fc1, fc2) as in OPT."""
        return self.family == "llama"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _activation(hf: dict, where: str) -> tuple[str, float]:
    act = hf.get("hidden_act") or hf.get("activation_function") or "silu"
    threshold = 0.0
    if act == "fatrelu":
        threshold = float(hf.get("hidden_act_param", hf.get("fatrelu_threshold", 0.0)))
    elif act == "swish":
        act = "silu"
    if act not in ACTIVATIONS:
        raise LLMFlashError(
            f"unsupported FFN activation {act!r} in {where}; supported: {sorted(ACTIVATIONS)}"
        )
    return act, threshold


def _check_rope_scaling(scaling: dict | None, where: str) -> dict | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise LLMFlashError(
            f"unsupported rope_scaling type {kind!r} in {where}; supported: default, linear, llama3"
        )
    return dict(scaling, rope_type=kind)


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Map a transformers config.json dict to ModelConfig, refusing what the runtime cannot run."""
    model_type = hf.get("model_type")
    if model_type in LLAMA_FAMILY:
        return _llama_from_hf(hf, model_type, where)
    if model_type in OPT_FAMILY:
        return _opt_from_hf(hf, where)
    raise LLMFlashError(
        f"unsupported architecture {model_type!r} in {where}; supported model_type values: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _rope_theta(hf: dict) -> float:
    if "rope_theta" in hf and hf["rope_theta"] is not None:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling")
    if scaling is None:
        params = hf.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = params
    return scaling


def _llama_from_hf(hf: dict, model_type: str, where: str) -> ModelConfig:
    act, threshold = _activation(hf, where)
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
        rope_theta=_rope_theta(hf),
        rope_scaling=_check_rope_scaling(_rope_scaling(hf), where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos_list(hf.get("eos_token_id")),
    )


def _opt_from_hf(hf: dict, where: str) -> ModelConfig:
    act, threshold = _activation(hf, where)
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
        eos_token_id=_eos_list(hf.get("eos_token_id")),
    )
