"""Fused projections split at import: a checkpoint's [q; k; v] or [gate; up] tensor seen as its parts.

Some architectures (Phi-3) store q, k and v as one matrix and gate and up as another, in Hugging
Face checkpoints and in llama.cpp GGUF files alike. The flash layout wants ordinary projections
(and one gate row, one up row per neuron bundle), so the architecture module lists its fused
tensors (`fused_tensors(config)`: suffix after `model.layers.{i}.` -> parts as (suffix, first
row, end row)) and this wrapper presents any ModelSource with the parts in place of the fused
tensor. Reading a part reads the fused tensor and slices its rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmflash.conversion.source import ModelSource, TokenizerSpec
from llmflash.errors import LLMFlashError


class SplitFused:
    """A ModelSource whose fused tensors are replaced by their row slices."""

    def __init__(self, source: ModelSource, fused: dict[str, list[tuple[str, int, int]]], num_layers: int):
        self.source = source
        self.path: Path = source.path
        self._parts: dict[str, tuple[str, int, int]] = {}
        names = source.tensor_names()
        present = set(names)
        self._names: list[str] = []
        fused_full = {}
        for i in range(num_layers):
            for suffix, parts in fused.items():
                fused_full[f"model.layers.{i}.{suffix}"] = [(f"model.layers.{i}.{s}", a, b) for s, a, b in parts]
        for name in names:
            parts = fused_full.get(name)
            if parts is None:
                self._names.append(name)
                continue
            shape = tuple(source.tensor_shape(name))
            rows = parts[-1][2]
            if len(shape) != 2 or shape[0] != rows:
                raise LLMFlashError(
                    f"fused tensor {name} in {self.path} has shape {shape}; the config implies {rows} rows "
                    f"({', '.join(p[0].rsplit('.', 2)[-2] for p in parts)})"
                )
            for part, start, stop in parts:
                if part in present:
                    raise LLMFlashError(f"{self.path} has both {name} and {part}")
                self._parts[part] = (name, start, stop)
                self._names.append(part)

    def hf_config(self) -> dict:
        return self.source.hf_config()

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        part = self._parts.get(name)
        if part is None:
            return tuple(self.source.tensor_shape(name))
        fused, start, stop = part
        return (stop - start, *tuple(self.source.tensor_shape(fused))[1:])

    def read_tensor(self, name: str) -> torch.Tensor:
        part = self._parts.get(name)
        if part is None:
            return self.source.read_tensor(name)
        fused, start, stop = part
        return self.source.read_tensor(fused)[start:stop].contiguous()

    def tokenizer(self) -> TokenizerSpec:
        return self.source.tokenizer()
