"""Which FFN neurons a token needs: one selection path for sparse runs in DRAM and for flash.

A selector sees a layer's FFN input x ([T, hidden]) before anything of the FFN is computed and
returns a `Selection`: a boolean mask [T, neurons] in original neuron order (each row's own set)
and a per-neuron strength used to order the union (most important first: the flash runtime admits
neurons to a full cache in that order). `SparseFFN` (DRAM) computes over the masked rows;
`FlashFFN` reads `Selection.ids()` from flash.

Selectors, by name (`--sparsity`):
    exact      ReLU / FATReLU only: the truly non-zero neurons, from copies of the gate (fc1) rows;
               leaves the FFN's output unchanged up to summation order.
    magnitude  any activation: per token the `density` share of neurons with the largest
               |act(gate)·up| (the paper's criterion for non-ReLU models), from gate and up copies.
               An accuracy reference, not a method: it reads half the FFN's weights to decide.
    predictor  trained predictors (`llmflash calibrate`), low-rank or low-bit.
    trace:PATH replayed activation sets (runtime.trace_selector), for scale experiments.
Every selector's resident bytes (`nbytes`) are charged to the memory plan.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.format.sparsity_store import PREDICTORS_FILE, SparsityStore
from llmflash.runtime.ffn import BundleSlices, activate
from llmflash.runtime.layer_weights import RELU_ACTS, LayerWeights
from llmflash.runtime.predictors import PredictorSet

SELECTORS = ("none", "exact", "magnitude", "predictor")  # plus "trace:PATH"
DEFAULT_DENSITY = 0.5


@dataclass
class Selection:
    """A layer's selection for T input rows."""

    mask: torch.Tensor  # bool [T, neurons], original neuron order
    strength: torch.Tensor  # float [neurons]: priority among the selected (higher first)

    def ids(self) -> np.ndarray:
        """Neuron ids selected by any row, strongest first (int64)."""
        ids = torch.nonzero(self.mask.any(0)).reshape(-1)
        ids = ids[torch.argsort(self.strength[ids], descending=True, stable=True)]
        return ids.numpy().astype(np.int64, copy=False)


class NeuronSelector:
    """Base of the selectors: `select(layer, x) -> Selection`; `nbytes()` resident bytes."""

    name = "selector"

    def begin_pass(self, tokens: int) -> None:
        """A forward pass over `tokens` new positions starts (selectors that replay a sequence
        advance here; the others ignore it)."""

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        raise NotImplementedError

    def lookahead(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """A guess at `layer`'s selection from an earlier input (flash mode passes layer l-1's FFN
        input), strongest first: what the runtime starts reading before `layer` needs it. Only
        a prefetch: the neurons `layer` computes come from `select` on its own input, so a wrong
        guess costs reads, never results. By default the layer's own selector applied to the earlier
        input (measured on the relufied SmolLM2 with quant predictors: docs/FLASH.md, "Overlap")."""
        return self.select(layer, x).ids()

    def nbytes(self) -> int:
        return 0

    def summary(self) -> dict:
        return {"selector": self.name, "selector_bytes": self.nbytes()}


def deciding_weights(model_dir: FlashModelDir, dtype: torch.dtype, with_up: bool) -> list[LayerWeights]:
    """Per layer, copies of only the bundle columns that decide a neuron (gate or fc1 with bias;
    up too when `with_up`), in original neuron order: what exact/magnitude selectors hold."""
    full = BundleSlices(model_dir.bundle)
    wanted = ["gate", "gate_bias"] if full.gate is not None else ["up", "up_bias"]
    if with_up:
        wanted += ["up", "up_bias"]
    columns: list[int] = []
    narrow = BundleSlices.empty()
    for name in dict.fromkeys(wanted):
        span = getattr(full, name)
        if span is not None:
            setattr(narrow, name, slice(len(columns), len(columns) + span.stop - span.start))
            columns += range(span.start, span.stop)
    narrow.width = len(columns)
    index = torch.tensor(columns)
    cfg = model_dir.config
    out = []
    for layer, region in enumerate(model_dir.layers):
        rows = model_dir.read_layer_bundles(layer)
        perm = region.permutation()
        if not np.array_equal(perm, np.arange(len(perm))):
            rows = rows[torch.from_numpy(np.argsort(perm))]
        out.append(LayerWeights(rows[:, index].to(dtype).contiguous(), narrow, cfg.hidden_act,
                                cfg.act_threshold))
    return out


def _weights_nbytes(weights: list[LayerWeights]) -> int:
    return sum(w.rows.numel() * w.rows.element_size() for w in weights)


class ExactSelector(NeuronSelector):
    """ReLU / FATReLU: the neurons whose activation is non-zero (exact)."""

    name = "exact"

    def __init__(self, weights: list[LayerWeights], owned: bool = True):
        self.weights = weights
        self.owned = owned  # False when the weights are another provider's rows (not extra DRAM)

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        w = self.weights[layer]
        act = activate(w.pre_activation(x.to(w.rows.dtype)), w.act, w.threshold).abs()
        return Selection(act != 0, act.amax(dim=0))

    def nbytes(self) -> int:
        return _weights_nbytes(self.weights) if self.owned else 0


class MagnitudeSelector(NeuronSelector):
    """Per token, the `density` share of neurons with the largest |act(gate)·up| (|act(gate)| with
    criterion "cats"); or, given calibrated per-layer `thresholds`, those above the threshold."""

    name = "magnitude"

    def __init__(self, weights: list[LayerWeights], density: float = DEFAULT_DENSITY,
                 thresholds: list[float] | None = None, criterion: str = "glu", owned: bool = True):
        if not 0 < density <= 1:
            raise LLMFlashError(f"density must be in (0, 1], got {density}")
        self.weights = weights
        self.density = density
        self.thresholds = thresholds
        self.criterion = criterion
        self.owned = owned

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        w = self.weights[layer]
        mag = w.scores(x.to(w.rows.dtype), self.criterion)
        if self.thresholds is not None:
            mask = mag > self.thresholds[layer]
        else:
            k = max(1, int(round(self.density * mag.shape[1])))
            cut = torch.topk(mag, k, dim=1).values[:, -1:]
            mask = (mag >= cut) & (mag > 0)
        return Selection(mask, torch.where(mask, mag, torch.zeros((), dtype=mag.dtype)).amax(dim=0))

    def nbytes(self) -> int:
        return _weights_nbytes(self.weights) if self.owned else 0

    def summary(self) -> dict:
        return super().summary() | {"density": self.density}


class PredictorSelector(NeuronSelector):
    """Trained predictors: neurons whose score reaches the layer's decision threshold."""

    name = "predictor"

    def __init__(self, predictors):
        self.predictors = predictors

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        z = self.predictors.logits(layer, x)
        mask = z >= self.predictors.z_threshold[layer]
        return Selection(mask, z.max(dim=0).values)

    def nbytes(self) -> int:
        return self.predictors.nbytes()

    def summary(self) -> dict:
        return super().summary() | {"predictor_kind": self.predictors.kind}


def resolve_sparsity(model_dir: FlashModelDir, sparsity: str | None, mode: str) -> str:
    """The selector name a run uses. None: none in dense mode; in flash mode predictor where
    `llmflash calibrate` stored predictors, else exact for ReLU models and magnitude otherwise.
    "oracle" (older releases) means exact on ReLU models and magnitude on the others."""
    relu = model_dir.config.hidden_act in RELU_ACTS
    if sparsity == "oracle":
        warnings.warn("sparsity 'oracle' is deprecated: use exact (ReLU models) or magnitude",
                      DeprecationWarning, stacklevel=2)
        return "exact" if relu else "magnitude"
    if sparsity is None or sparsity == "auto":
        if mode != "flash":
            return "none"
        if SparsityStore(model_dir).has(PREDICTORS_FILE):
            return "predictor"
        return "exact" if relu else "magnitude"
    if sparsity.startswith("trace:") or sparsity in SELECTORS:
        if sparsity == "exact" and not relu:
            raise LLMFlashError(f"exact selection needs a ReLU/FATReLU model; {model_dir.path} uses "
                                f"{model_dir.config.hidden_act}: use magnitude or predictor")
        return sparsity
    raise LLMFlashError(f"unknown sparsity {sparsity!r}; choose one of {', '.join(SELECTORS)} or trace:PATH")


def make_selector(model_dir: FlashModelDir, sparsity: str, dtype: torch.dtype,
                  density: float | None = None, weights: list[LayerWeights] | None = None,
                  predictor_dtype: torch.dtype = torch.float16) -> NeuronSelector:
    """The selector named by `sparsity` (already resolved). `weights`: a provider's own rows in
    neuron order to decide from (DRAM runs) instead of copies (flash runs, charged)."""
    owned = weights is None
    if sparsity == "exact":
        return ExactSelector(weights or deciding_weights(model_dir, dtype, with_up=False), owned)
    if sparsity == "magnitude":
        gated = BundleSlices(model_dir.bundle).gate is not None
        return MagnitudeSelector(weights or deciding_weights(model_dir, dtype, with_up=gated),
                                 density or DEFAULT_DENSITY, owned=owned)
    if sparsity == "predictor":
        # Held at float16 by default, the precision they are stored in: half the DRAM of float32
        # for the same selections, which leaves that much more of the budget to the neuron caches.
        predictors = PredictorSet.load(model_dir, predictor_dtype)
        if density is not None:
            predictors.use_budget(density)
        return PredictorSelector(predictors)
    if sparsity.startswith("trace:"):
        from llmflash.runtime.trace_selector import TraceSelector

        return TraceSelector.load(model_dir, sparsity[len("trace:"):])
    raise LLMFlashError(f"sparsity {sparsity!r} has no selector")
