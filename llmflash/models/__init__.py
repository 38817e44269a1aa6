"""Decoder architectures, one module each, and the registry that picks one.

An architecture module (llama.py, opt.py, ...) holds everything about its family: FAMILY,
MODEL_TYPES (config.json model_type values), GGUF_ARCHITECTURES, `from_hf` (config.json ->
ModelConfig), `normalise_name`, `ffn_tensor_names` / `resident_tensor_names` (which tensors go
into bundles and which stay resident), GGUF_LAYER_TENSORS / GGUF_GLOBAL_TENSORS where llama.cpp
supports it, and `Model` (the forward pass). Adding one: a new module plus one entry in
ARCHITECTURES (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from types import ModuleType

import torch

from llmflash.errors import LLMFlashError
from llmflash.models import gemma3, llama, opt, phi3, qwen3
from llmflash.models.base import FFNProvider, KVCache
from llmflash.models.config import ModelConfig

ARCHITECTURES: tuple[ModuleType, ...] = (llama, opt, gemma3, qwen3, phi3)
BY_FAMILY = {m.FAMILY: m for m in ARCHITECTURES}
BY_MODEL_TYPE = {t: m for m in ARCHITECTURES for t in m.MODEL_TYPES}
BY_GGUF_ARCHITECTURE = {a: m for m in ARCHITECTURES for a in m.GGUF_ARCHITECTURES}
SUPPORTED_MODEL_TYPES = sorted(BY_MODEL_TYPE)


def architecture(config: ModelConfig) -> ModuleType:
    """The module that runs a config's family."""
    try:
        return BY_FAMILY[config.family]
    except KeyError:
        raise LLMFlashError(f"unknown architecture family {config.family!r}; known: "
                            f"{', '.join(sorted(BY_FAMILY))}") from None


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Map a transformers config.json dict to ModelConfig, refusing what the runtime cannot run."""
    model_type = hf.get("model_type")
    module = BY_MODEL_TYPE.get(model_type)
    if module is None:
        raise LLMFlashError(f"unsupported architecture {model_type!r} in {where}; supported model_type "
                            f"values: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return module.from_hf(hf, model_type, where)


def normalise_name(name: str, config: ModelConfig) -> str:
    return architecture(config).normalise_name(name)


def ffn_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    return architecture(config).ffn_tensor_names(config, layer)


def resident_tensor_names(config: ModelConfig) -> list[str]:
    return architecture(config).resident_tensor_names(config)


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                max_len: int, dtype: torch.dtype = torch.float32):
    """The decoder for a config over its resident weights, with `ffn` plugged in."""
    return architecture(config).Model(config, weights, ffn, max_len, dtype)


__all__ = ["ARCHITECTURES", "ModelConfig", "FFNProvider", "KVCache", "architecture", "build_model",
           "config_from_hf", "ffn_tensor_names", "normalise_name", "resident_tensor_names"]
