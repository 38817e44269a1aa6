"""Sparse FFN execution in DRAM: compute only the selected neurons' rows.

`SparseFFN(layer, x)` asks its selector (runtime.selectors: exact, magnitude, predictor, trace -
the same objects flash mode uses) for a neuron set per input row, gathers those bundle rows
(`rows.index_select`) and runs the same `ffn_intermediate` / down-projection code as the dense FFN
over them, so the arithmetic done is proportional to the selection. Without a selector it is the
dense FFN.

With several input rows (prefill, evaluation), the rows of the union of the per-row selections are
gathered once, and each row's activations outside its own selection are zeroed, so every token
sees exactly the FFN it would see when decoded alone. With one row (decode) there is no mask at all.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from llmflash.format.layout import FlashModelDir
from llmflash.models.base import FFNProvider
from llmflash.compute import matmul_rows
from llmflash.runtime.ffn import BundleSlices, ffn_intermediate
from llmflash.runtime.layer_weights import LayerWeights, slot_order
from llmflash.runtime.selectors import NeuronSelector, make_selector, resolve_sparsity


class SparseFFN(FFNProvider):
    """All FFN bundles in DRAM (slot order); per call, the FFN over the selected rows only."""

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, selector: NeuronSelector | None = None):
        c = model_dir.config
        self.act, self.threshold = c.hidden_act, c.act_threshold
        self.slices = BundleSlices(model_dir.bundle)
        # int8/int4/int4m held as stored (uint8 rows): the selected rows computed per call (quant_ffn)
        self.dir = model_dir
        self.quant = dtype == torch.uint8 and model_dir.quantized
        self.layers = [model_dir.layer_rows(i, dtype) for i in range(c.num_layers)]
        # selections are in neuron order; rows are slots: perm maps the first to the second.
        self.perm, self.slot_of = [], []
        self.identity = True
        for l in range(c.num_layers):
            perm, slot_of = slot_order(model_dir, l)
            self.perm.append(torch.from_numpy(perm))
            self.slot_of.append(torch.from_numpy(slot_of))
            self.identity &= bool(np.array_equal(perm, np.arange(len(perm))))
        self.selector = selector
        # statistics of the calls since the last reset
        self.selected = np.zeros(c.num_layers, dtype=np.int64)  # neuron-rows computed
        self.rows_seen = np.zeros(c.num_layers, dtype=np.int64)  # input rows
        self.record: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def neuron_weights(self) -> list[LayerWeights]:
        """This provider's rows in neuron order, for a selector to decide from without a copy
        (views when the layout is in neuron order)."""
        if self.quant:  # the selector decides from float rows (neuron order), not the quantized bytes
            rows = [self.dir.read_layer_bundles(i)[s] for i, s in enumerate(self.slot_of)]
            return [LayerWeights(r, self.slices, self.act, self.threshold) for r in rows]
        rows = self.layers if self.identity else [r[s] for r, s in zip(self.layers, self.slot_of)]
        return [LayerWeights(r, self.slices, self.act, self.threshold) for r in rows]

    def begin_pass(self, tokens: int) -> None:
        if self.selector is not None:
            self.selector.begin_pass(tokens)

    def summary(self) -> dict:
        return self.selector.summary() if self.selector is not None else {}

    def reset_stats(self) -> None:
        self.selected[:] = 0
        self.rows_seen[:] = 0

    def selected_fraction(self) -> np.ndarray:
        n = np.array([r.shape[0] for r in self.layers])
        return self.selected / np.maximum(self.rows_seen * n, 1)

    def _down(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return matmul_rows(h, rows[:, self.slices.down])  # float32 accumulation for half rows

    def _ffn(self, layer: int, x: torch.Tensor, slots: torch.Tensor | None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """FFN over the rows at `slots` (None: all), activations masked per input row if given."""
        rows = self.layers[layer] if slots is None else self.layers[layer].index_select(0, slots)
        if self.quant:
            ids = self.perm[layer] if slots is None else self.perm[layer][slots]
            rows = self.dir.dequantize_rows(rows, layer, ids.numpy())
        h = ffn_intermediate(x, rows, self.slices, self.act, self.threshold)
        return self._down(h if mask is None else h * mask, rows)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        rows = self.layers[layer]
        T = x.shape[0]
        self.rows_seen[layer] += T
        if self.selector is None:
            self.selected[layer] += T * rows.shape[0]
            return self._ffn(layer, x, None)
        mask = self.selector.select(layer, x).mask
        if self.record is not None:
            self.record(layer, x, mask)
        if not self.identity:
            mask = mask[:, self.perm[layer]]
        self.selected[layer] += int(mask.sum())
        if T == 1:
            return self._ffn(layer, x, torch.nonzero(mask[0]).reshape(-1))
        union = torch.nonzero(mask.any(0)).reshape(-1)
        return self._ffn(layer, x, union, mask[:, union])


def sparse_ffn_factory(sparsity: str, density: float | None = None) -> Callable[[FlashModelDir, torch.dtype], SparseFFN]:
    """Engine FFN factory for a sparse run in DRAM with the named selector (none = dense).

    exact and magnitude decide from the provider's own rows (no copy); predictor loads the trained
    predictors (density: use the thresholds that selected that share on calibration text)."""

    def factory(model_dir: FlashModelDir, dtype: torch.dtype) -> SparseFFN:
        name = resolve_sparsity(model_dir, sparsity, "dense")
        ffn = SparseFFN(model_dir, dtype)
        if name != "none":
            weights = ffn.neuron_weights() if name in ("exact", "magnitude") else None
            ffn.selector = make_selector(model_dir, name, dtype, density, weights=weights)
        return ffn

    return factory
