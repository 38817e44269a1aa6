"""Decoder architectures. `build_model` picks the module from the config's family."""

from __future__ import annotations

import torch

from llmflash.config import ModelConfig
from llmflash.models.base import FFNProvider, KVCache


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], ffn: FFNProvider,
                max_len: int, dtype: torch.dtype = torch.float32):
    if config.family == "opt":
        from llmflash.models.opt import OPTModel

        return OPTModel(config, weights, ffn, max_len, dtype)
    from llmflash.models.llama import LlamaModel

    return LlamaModel(config, weights, ffn, max_len, dtype)


__all__ = ["build_model", "FFNProvider", "KVCache"]
