"""Sparse FFN execution in DRAM: compute only the selected neurons' rows.

`SparseFFN(layer, x)` picks a neuron set per input row, gathers those bundle rows
(`rows.index_select`) and runs the same `ffn_intermediate` / down-projection code as the dense FFN
over them, so the arithmetic done is proportional to the selection:

* mode "none": every row (the dense FFN);
* mode "oracle": the truly active neurons. ReLU / FATReLU: activation != 0, which reproduces the
  dense result up to float summation order. Other activations: |act(gate) * up| (or |act(gate)|,
  CATS) above the calibrated per-layer threshold. The oracle must compute the gate (and up) for
  all neurons to know the set, so it saves only the down projection: it is an accuracy reference;
* mode "predictor": the low-rank predictors choose before anything of the FFN is computed.

With several input rows (prefill, evaluation), the rows of the union of the per-row selections are
gathered once, and each row's activations outside its own selection are zeroed, so every token
sees exactly the FFN it would see when decoded alone. With one row (decode) there is no mask at all.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from llmflash.runtime.ffn import BundleSlices, ffn_intermediate
from llmflash.errors import LLMFlashError
from llmflash.runtime.layer_weights import RELU_ACTS, slot_order
from llmflash.format.layout import FlashModelDir
from llmflash.models.base import FFNProvider

MODES = ("none", "oracle", "predictor")


class SparseFFN(FFNProvider):
    """All FFN bundles in DRAM (slot order); per call, the FFN over the selected rows only."""

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, mode: str,
                 predictors=None, thresholds: list[float] | None = None, criterion: str = "glu"):
        if mode not in MODES:
            raise LLMFlashError(f"unknown sparsity mode {mode!r}; choose one of {', '.join(MODES)}")
        c = model_dir.config
        self.mode = mode
        self.act, self.threshold = c.hidden_act, c.act_threshold
        self.slices = BundleSlices(model_dir.bundle)
        self.layers = [model_dir.read_layer_bundles(i).to(dtype) for i in range(c.num_layers)]
        # predictor ids are neuron ids; rows are slots: slot_of maps the first to the second.
        self.perm, self.slot_of = [], []
        self.identity = True
        for l in range(c.num_layers):
            perm, slot_of = slot_order(model_dir, l)
            self.perm.append(torch.from_numpy(perm))
            self.slot_of.append(torch.from_numpy(slot_of))
            self.identity &= bool(np.array_equal(perm, np.arange(len(perm))))
        self.predictors = predictors
        self.thresholds = thresholds
        self.criterion = criterion
        self.relu = c.hidden_act in RELU_ACTS
        if mode == "oracle" and not self.relu and thresholds is None:
            raise LLMFlashError(f"oracle sparsity for a {c.hidden_act} model needs calibrated thresholds; "
                                f"run `llmflash calibrate {model_dir.path} --text FILE`")
        # statistics of the calls since the last reset
        self.selected = np.zeros(c.num_layers, dtype=np.int64)  # neuron-rows computed
        self.rows_seen = np.zeros(c.num_layers, dtype=np.int64)  # input rows
        self.record: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def reset_stats(self) -> None:
        self.selected[:] = 0
        self.rows_seen[:] = 0

    def selected_fraction(self) -> np.ndarray:
        n = np.array([r.shape[0] for r in self.layers])
        return self.selected / np.maximum(self.rows_seen * n, 1)

    def _slot_mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Boolean [T, slots] selection from the predictors (neuron order mapped to slots)."""
        m = self.predictors.mask(layer, x)
        return m if self.identity else m[:, self.perm[layer]]

    def _down(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return h @ rows[:, self.slices.down]

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        rows = self.layers[layer]
        T = x.shape[0]
        self.rows_seen[layer] += T
        if self.mode == "none":
            self.selected[layer] += T * rows.shape[0]
            return self._down(ffn_intermediate(x, rows, self.slices, self.act, self.threshold), rows)
        if self.mode == "oracle":
            h = ffn_intermediate(x, rows, self.slices, self.act, self.threshold)
            if self.relu:
                mask = h != 0 if self.slices.gate is None else self._relu_gate_mask(x, rows)
            elif self.criterion == "cats" and self.slices.gate is not None:
                mask = self._cats_mask(x, rows) > self.thresholds[layer]
            else:
                mask = h.abs() > self.thresholds[layer]
            if self.record is not None:
                self.record(layer, x, mask)
            self.selected[layer] += int(mask.sum())
            if T == 1:
                idx = torch.nonzero(mask[0]).reshape(-1)
                return self._down(h[:, idx], rows.index_select(0, idx))
            return self._down(h * mask, rows)
        mask = self._slot_mask(layer, x)
        if self.record is not None:
            self.record(layer, x, mask)
        self.selected[layer] += int(mask.sum())
        if T == 1:
            idx = torch.nonzero(mask[0]).reshape(-1)
            sub = rows.index_select(0, idx)
            return self._down(ffn_intermediate(x, sub, self.slices, self.act, self.threshold), sub)
        union = torch.nonzero(mask.any(0)).reshape(-1)
        sub = rows.index_select(0, union)
        h = ffn_intermediate(x, sub, self.slices, self.act, self.threshold) * mask[:, union]
        return self._down(h, sub)

    def _relu_gate_mask(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        s = self.slices
        from llmflash.runtime.ffn import activate

        gate = torch.nn.functional.linear(x, rows[:, s.gate],
                                          None if s.gate_bias is None else rows[:, s.gate_bias].reshape(-1))
        return activate(gate, self.act, self.threshold) != 0

    def _cats_mask(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        s = self.slices
        from llmflash.runtime.ffn import activate

        gate = torch.nn.functional.linear(x, rows[:, s.gate],
                                          None if s.gate_bias is None else rows[:, s.gate_bias].reshape(-1))
        return activate(gate, self.act, self.threshold).abs()


def sparse_ffn_factory(mode: str, criterion: str | None = None,
                       budget: float | None = None) -> Callable[[FlashModelDir, torch.dtype], SparseFFN]:
    """Engine FFN factory for --sparsity none|oracle|predictor (loads what the mode needs).

    budget (predictor mode): use the per-layer thresholds that selected this fraction of neurons
    on held-out calibration tokens instead of the trained decision threshold."""
    if mode not in MODES:
        raise LLMFlashError(f"unknown --sparsity {mode!r}; choose one of {', '.join(MODES)}")

    def factory(model_dir: FlashModelDir, dtype: torch.dtype) -> SparseFFN:
        from llmflash.format.sparsity_store import STATS_FILE, SparsityStore

        thresholds, crit, predictors = None, criterion or "glu", None
        relu = model_dir.config.hidden_act in RELU_ACTS
        if mode == "predictor":
            from llmflash.runtime.predictors import PredictorSet

            predictors = PredictorSet.load(model_dir)
            if budget is not None:
                predictors.use_budget(budget)
            crit = criterion or predictors.meta.get("criterion") or "glu"
        if mode == "oracle" and not relu:
            _, meta = SparsityStore(model_dir).read_tensors(STATS_FILE)
            thresholds = meta["thresholds"][crit]
        return SparseFFN(model_dir, dtype, mode, predictors=predictors, thresholds=thresholds, criterion=crit)

    return factory
