"""An FFN provider wrapper that refuses non-finite outputs, naming the layer.

Corrupted weights (a NaN written into a bundle file whose checksum was not checked, or a model
diverging numerically) must end in an error that says where, never in logits full of NaN that
argmax turns into token 0. The check costs one `isfinite().all()` per layer and pass (about
5 µs for one token's hidden state), negligible next to the FFN itself.
"""

from __future__ import annotations

import torch

from llmflash.errors import LLMFlashError
from llmflash.models.base import FFNProvider


class FiniteCheckedFFN(FFNProvider):
    def __init__(self, inner: FFNProvider, where: str = ""):
        self.inner = inner
        self.where = where

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def begin_generation(self) -> None:
        self.inner.begin_generation()

    def token_log(self):
        return self.inner.token_log()

    def summary(self) -> dict:
        return self.inner.summary()

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(layer, x)
        if not bool(torch.isfinite(y).all()):
            raise LLMFlashError(
                f"layer {layer}'s FFN produced non-finite values (NaN or inf){self.where}: corrupted "
                "weights or a numerical overflow; run `llmflash verify`")
        return y

    def __getattr__(self, name: str):  # tools reach through to the provider (layers, slices...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
