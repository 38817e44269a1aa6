"""The FFN computed from neuron bundles: the same code for the whole layer or any subset of rows.

Rows are bundles (gate row | up row | down column | biases), so an FFN over any set of neurons is
three (or two) matmuls over a row slice; the order of rows never changes the result. Dense mode
passes a whole layer; sparse and flash modes pass the rows of the neurons they selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmflash.format.layout import BundleLayout
from llmflash.models.base import FFNProvider


def activate(x: torch.Tensor, act: str, threshold: float = 0.0) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "relu":
        return F.relu(x)
    if act == "fatrelu":  # ProSparse: x where x > threshold, else 0
        return torch.where(x > threshold, x, torch.zeros((), dtype=x.dtype))
    raise ValueError(f"unknown activation {act}")


class BundleSlices:
    """Column slices of a bundle row, resolved once per model."""

    def __init__(self, layout: BundleLayout):
        def span(name: str) -> slice | None:
            part = layout.part(name)
            return None if part is None else slice(part.offset, part.offset + part.length)

        self.gate = span("gate")
        self.up = span("up")
        self.down = span("down")
        self.gate_bias = span("gate_bias")
        self.up_bias = span("up_bias")
        self.width = layout.elements


def ffn_intermediate(x: torch.Tensor, rows: torch.Tensor, s: BundleSlices, act: str,
                     threshold: float = 0.0) -> torch.Tensor:
    """Activations of the neurons in `rows` for inputs x: [T, hidden] -> [T, len(rows)]."""
    up = F.linear(x, rows[:, s.up], None if s.up_bias is None else rows[:, s.up_bias].reshape(-1))
    if s.gate is None:  # OPT: act(fc1 x + b)
        return activate(up, act, threshold)
    gate = F.linear(x, rows[:, s.gate],
                    None if s.gate_bias is None else rows[:, s.gate_bias].reshape(-1))
    return activate(gate, act, threshold) * up


def ffn_from_rows(x: torch.Tensor, rows: torch.Tensor, s: BundleSlices, act: str,
                  threshold: float = 0.0) -> torch.Tensor:
    """FFN output (without the resident output bias) computed over the given neuron rows."""
    h = ffn_intermediate(x, rows, s, act, threshold)
    return h @ rows[:, s.down]


class DenseFFN(FFNProvider):
    """Every layer's bundles held in DRAM: the speed ceiling when memory is plentiful."""

    def __init__(self, layers: list[torch.Tensor], layout: BundleLayout, act: str, threshold: float):
        self.layers = layers
        self.slices = BundleSlices(layout)
        self.act = act
        self.threshold = threshold

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return ffn_from_rows(x, self.layers[layer], self.slices, self.act, self.threshold)
