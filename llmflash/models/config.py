"""One normalised model config for every supported architecture, and the helpers that read the
fields Hugging Face configs share.

Hugging Face configs name the same thing differently per family (OPT's `ffn_dim` is Llama's
`intermediate_size`); the runtime reads only this dataclass. Each architecture module maps its own
config.json onto it (`from_hf`); see docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmflash.errors import LLMFlashError

# FFN activations the runtime implements. "fatrelu" is ReLU with a positive threshold (ProSparse);
# "gelu_tanh" is GeLU's tanh approximation (transformers' gelu_pytorch_tanh: Gemma's GeGLU).
ACTIVATIONS = {"silu", "relu", "fatrelu", "gelu_tanh"}


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, independent of the source checkpoint's naming."""

    family: str  # the architecture module that runs it (models/<family>.py): "llama", "opt", ...
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
    # Gemma 3 specifics (models/gemma3.py)
    layer_types: list[str] | None = None  # per layer "sliding_attention" / "full_attention"
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power
    final_logit_softcapping: float | None = None  # logits -> tanh(logits / cap) * cap
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def gated(self) -> bool:
        """Gated FFN (gate, up, down) as in Llama; plain (fc1, fc2) as in OPT."""
        return self.family != "opt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)


def eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def activation(hf: dict, where: str) -> tuple[str, float]:
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


def check_rope_scaling(scaling: dict | None, where: str) -> dict | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise LLMFlashError(
            f"unsupported rope_scaling type {kind!r} in {where}; supported: default, linear, llama3"
        )
    return dict(scaling, rope_type=kind)


def rope_theta(hf: dict) -> float:
    if "rope_theta" in hf and hf["rope_theta"] is not None:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling")
    if scaling is None:
        params = hf.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = params
    return scaling


