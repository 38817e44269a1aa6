"""A layer's FFN weights in original neuron order and the activity criteria, for selectors and tools.

Neuron index spaces: a converted model stores neuron `perm[j]` in bundle slot j
(`model_dir.layers[l].permutation()`). Everything the sparsity tools store or return (statistics,
predictor outputs, selections) is in the *original* neuron index space; `LayerWeights.rows` are in
that order too (the slots are permuted back when loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmflash.runtime.ffn import BundleSlices, activate, ffn_from_rows
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir

RELU_ACTS = ("relu", "fatrelu")
CRITERIA = ("glu", "cats")  # non-ReLU: |act(gate) * up| (default) or |act(gate)| (CATS)


def is_relu(model_dir: FlashModelDir) -> bool:
    return model_dir.config.hidden_act in RELU_ACTS


# -- weights -----------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One layer's FFN bundles in original neuron order, float32."""

    rows: torch.Tensor  # [neurons, elements]
    slices: BundleSlices
    act: str
    threshold: float

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Gate pre-activation (gated FFN) or fc1 pre-activation (OPT): [T, neurons]."""
        s = self.slices
        part, bias = (s.gate, s.gate_bias) if s.gate is not None else (s.up, s.up_bias)
        return torch.nn.functional.linear(x, self.rows[:, part],
                                          None if bias is None else self.rows[:, bias].reshape(-1))

    def up(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slices
        return torch.nn.functional.linear(x, self.rows[:, s.up],
                                          None if s.up_bias is None else self.rows[:, s.up_bias].reshape(-1))

    def scores(self, x: torch.Tensor, criterion: str = "glu") -> torch.Tensor:
        """Non-negative per-neuron magnitudes that the criterion thresholds: [T, neurons]."""
        pre = self.pre_activation(x)
        a = activate(pre, self.act, self.threshold)
        if self.slices.gate is None or criterion == "cats":
            return a.abs()
        return (a * self.up(x)).abs()

    def active(self, x: torch.Tensor, criterion: str = "glu", threshold: float | None = None) -> torch.Tensor:
        """Boolean [T, neurons]: which neurons count as active for x.

        ReLU/FATReLU: the activation is not exactly zero (the neuron's output is exactly zero
        otherwise, so dropping it changes nothing). Other activations: the criterion's magnitude
        is above the calibrated threshold.
        """
        if self.act in RELU_ACTS:
            return activate(self.pre_activation(x), self.act, self.threshold) != 0
        if threshold is None:
            raise LLMFlashError("a non-ReLU model needs a calibrated threshold; run `llmflash calibrate`")
        return self.scores(x, criterion) > threshold

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return ffn_from_rows(x, self.rows, self.slices, self.act, self.threshold)


def slot_order(model_dir: FlashModelDir, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, slot_of): slot j holds neuron perm[j]; neuron n sits in slot slot_of[n]."""
    perm = model_dir.layers[layer].permutation()
    slot_of = np.empty_like(perm)
    slot_of[perm] = np.arange(len(perm), dtype=np.int64)
    return perm, slot_of


def layer_weights(model_dir: FlashModelDir, layer: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
    rows = model_dir.read_layer_bundles(layer).to(dtype)
    _, slot_of = slot_order(model_dir, layer)
    if not np.array_equal(slot_of, np.arange(len(slot_of))):
        rows = rows[torch.from_numpy(slot_of)]
    c = model_dir.config
    return LayerWeights(rows, BundleSlices(model_dir.bundle), c.hidden_act, c.act_threshold)


