"""The FFN computed from neuron bundles: the same code for the whole layer or any subset of rows.

Rows are bundles (gate row | up row | down column | biases), so an FFN over any set of neurons is
three (or two) matmuls over a row slice; the order of rows never changes the result. Dense mode
passes a whole layer; sparse and flash modes pass the rows of the neurons they selected.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmflash.compute import linear, linear_split, matmul_rows, split_columns
from llmflash.format.layout import BundleLayout
from llmflash.models.base import FFNProvider


def activate(x: torch.Tensor, act: str, threshold: float = 0.0) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":  # Gemma's GeGLU: transformers' gelu_pytorch_tanh
        return F.gelu(x, approximate="tanh")
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

    @classmethod
    def empty(cls) -> "BundleSlices":
        """No parts yet: for narrowed copies that keep only some columns of a bundle."""
        s = cls.__new__(cls)
        s.gate = s.up = s.down = s.gate_bias = s.up_bias = None
        s.width = 0
        return s


def ffn_intermediate(x: torch.Tensor, rows: torch.Tensor, s: BundleSlices, act: str,
                     threshold: float = 0.0) -> torch.Tensor:
    """Activations of the neurons in `rows` for inputs x: [T, hidden] -> [T, len(rows)].

    rows may be held at a lower precision than x (weights at their stored dtype): the products
    then go through llmflash.compute and the activations stay at x's dtype."""
    up = linear(x, rows[:, s.up], None if s.up_bias is None else rows[:, s.up_bias].reshape(-1))
    if s.gate is None:  # OPT: act(fc1 x + b)
        return activate(up, act, threshold)
    gate = linear(x, rows[:, s.gate],
                  None if s.gate_bias is None else rows[:, s.gate_bias].reshape(-1))
    return activate(gate, act, threshold) * up


def ffn_from_rows(x: torch.Tensor, rows: torch.Tensor, s: BundleSlices, act: str,
                  threshold: float = 0.0) -> torch.Tensor:
    """FFN output (without the resident output bias) computed over the given neuron rows."""
    h = ffn_intermediate(x, rows, s, act, threshold)
    return matmul_rows(h, rows[:, s.down])


class DenseFFN(FFNProvider):
    """Every layer's bundles held in DRAM: the speed ceiling when memory is plentiful.

    Weights at the activations' dtype (float32) are used as bundle rows. Weights held at a lower
    precision are re-laid out once per layer at load, same bytes: the gate and up rows as one
    contiguous [2n, d] matrix (one product for both), the down columns transposed to [d, n] and
    stored as contiguous column blocks (compute.split_columns), the per-neuron biases as float32,
    so both products run in the dot-product form that half-precision kernels are fast at
    (llmflash.compute). `layers[i]` still gives the
    bundle rows (rebuilt on demand) for tools that want them.
    """

    def __init__(self, layers: list[torch.Tensor], layout: BundleLayout, act: str, threshold: float,
                 activations: torch.dtype = torch.float32):
        self.slices = BundleSlices(layout)
        self.act = act
        self.threshold = threshold
        self.activations = activations
        self.packed: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] | None = None
        self._layers: list[torch.Tensor] | None = None
        for i in range(len(layers)):  # one layer at a time: the peak is one extra layer
            self.append(layers[i])
            layers[i] = None  # type: ignore[call-overload]

    def quantized(self, model_dir) -> None:
        """Layers will come as quantized bundle bytes (uint8 rows in slot order) of this model:
        each is held in torch's packed int4 layout (runtime/quant_ffn.py), in neuron order."""
        self.model_dir = model_dir

    def append(self, rows: torch.Tensor) -> None:
        """Add the next layer's bundle rows (packed when held below the activations' precision)."""
        if rows.dtype == torch.uint8:  # int8/int4 bundles (QUANTIZED_ROWS)
            from llmflash.runtime.quant_ffn import QuantDenseLayer

            if self.packed is None:
                self.packed = []
            d, layer = self.model_dir, len(self.packed)
            slot_of = torch.from_numpy(np.argsort(d.layers[layer].permutation()))
            self.packed.append(QuantDenseLayer(rows.index_select(0, slot_of), d.codec, d.down_scales(layer),
                                               self.act, self.threshold, d.down_mins(layer)))
            return
        if rows.dtype != self.activations:
            if self.packed is None:
                self.packed = []
            self.packed.append(self._pack(rows))
        else:
            if self._layers is None:
                self._layers = []
            self._layers.append(rows)

    def _pack(self, rows: torch.Tensor):
        s = self.slices
        parts = ([rows[:, s.gate]] if s.gate is not None else []) + [rows[:, s.up]]
        gu = torch.cat(parts, 0).contiguous() if len(parts) > 1 else parts[0].contiguous()
        biases = [rows[:, b].reshape(-1) for b in (s.gate_bias, s.up_bias) if b is not None]
        bias = torch.cat(biases).to(self.activations) if biases else None
        return gu, bias, split_columns(rows[:, s.down].t())

    @property
    def layers(self):
        """Bundle rows per layer ([neurons, elements]); rebuilt from the packed form if packed."""
        return (self._layers or []) if self.packed is None else _Rebuilt(self)

    def _rebuild(self, layer: int) -> torch.Tensor:
        if not isinstance(self.packed[layer], tuple):  # quantized: the dequantized rows, slot order
            return self.model_dir.read_layer_bundles(layer)
        gu, bias, down_blocks = self.packed[layer]
        down_t = torch.cat(down_blocks, 1)
        s, n = self.slices, down_t.shape[1]
        rows = torch.zeros(n, s.width, dtype=gu.dtype)
        if s.gate is not None:
            rows[:, s.gate], rows[:, s.up] = gu[:n], gu[n:]
        else:
            rows[:, s.up] = gu
        rows[:, s.down] = down_t.t()
        if bias is not None:
            k = 0
            for b in (s.gate_bias, s.up_bias):
                if b is not None:
                    rows[:, b] = bias[k * n:(k + 1) * n].reshape(n, 1).to(gu.dtype)
                    k += 1
        return rows

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return ffn_from_rows(x, self._layers[layer], self.slices, self.act, self.threshold)
        if not isinstance(self.packed[layer], tuple):
            return self.packed[layer](x)
        gu, bias, down_blocks = self.packed[layer]
        y = linear(x, gu, bias)
        if self.slices.gate is not None:
            gate, up = y.chunk(2, dim=-1)
            h = activate(gate, self.act, self.threshold) * up
        else:
            h = activate(y, self.act, self.threshold)
        return linear_split(h, down_blocks)


class _Rebuilt:
    def __init__(self, ffn: DenseFFN):
        self.ffn = ffn

    def __len__(self) -> int:
        return len(self.ffn.packed)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.ffn._rebuild(layer)
