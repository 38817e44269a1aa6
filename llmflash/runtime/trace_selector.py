"""Replayed selections (`--sparsity trace:PATH`) and a charged stand-in predictor (`--predictor-cost`).

TraceSelector replays an activation trace (format/trace_file.py, from `llmflash trace record` or
`trace synth`): the set of layer l at the current token is the trace's set of layer l at token t.
It learns that a new token started from `begin_pass` (called once per forward pass by the flash
provider), never from the layer number: the prompt pass replays trace token 0 (the flash prompt
pass seeds the cache with it), and decode step i replays token i, cycling when a run is longer
than the trace. Everything else stays real: the bundles are read from flash into the cache and the
FFN is computed over the cached rows within the budget. Order among the selected (which matters
only when a set does not fit a layer's cache): most frequent in the trace first, so the neurons a
cache can reuse most are the ones it keeps. The packed trace is held in DRAM and charged.

Lookahead (flash mode's prefetch of layer l+1 during layer l): the trace's next-layer set degraded
to a stated recall and over-selection, synthetic and labelled so (`TraceSelector.lookahead`).

PredictorCost wraps any selector and, before it selects, runs a predictor of a given size on the
real FFN input (`lowrank:R`: d -> R -> N with a sigmoid, the paper's kind; `quant:BITS`: BITS-bit
copies of the gate (fc1) rows, and of the up rows for SiLU models, through the same kernels as
trained quant predictors), then discards its output. Its weights are random, of the right shape
and dtype; its bytes are charged to the memory plan and its time counts as selection time, so a
replayed run pays what a predicted run would.
"""

from __future__ import annotations

import numpy as np
import torch

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.format.trace_file import Trace
from llmflash.runtime.selectors import NeuronSelector, Selection


# What a replayed run's lookahead pretends to achieve (TraceSelector.lookahead): the relufied
# SmolLM2's layer l+1 quant predictor applied to layer l's FFN input recalled 0.84 of the selection
# while selecting 1.36x as many neurons (docs/FLASH.md, "Overlap").
LOOKAHEAD_RECALL = 0.84
LOOKAHEAD_RATIO = 1.36
# Share of those wrong guesses that were neurons of the recent window (already cached, never read),
# measured on the same model by experiments/lookahead_stats.py; the rest are drawn at random.
LOOKAHEAD_FP_RECENT = 0.07
LOOKAHEAD_RECENT_TOKENS = 5


class TraceSelector(NeuronSelector):
    name = "trace"
    lookahead_recall = LOOKAHEAD_RECALL
    lookahead_ratio = LOOKAHEAD_RATIO
    lookahead_fp_recent = LOOKAHEAD_FP_RECENT

    def __init__(self, trace: Trace, path: str = ""):
        self.trace = trace
        self.path = path
        self.step = -1  # forward passes begun so far, minus one
        # per layer: every neuron's count of active tokens, the priority among the selected
        self.strength = [torch.from_numpy(trace.active(l).sum(axis=0).astype(np.float32) + 1.0)
                         for l in range(trace.layers)]

    @classmethod
    def load(cls, model_dir: FlashModelDir, path: str) -> "TraceSelector":
        trace = Trace.load(path)
        cfg = model_dir.config
        if (trace.layers, trace.neurons) != (cfg.num_layers, cfg.intermediate_size):
            raise LLMFlashError(
                f"trace {path} has {trace.layers} layers x {trace.neurons} neurons, {model_dir.path} has "
                f"{cfg.num_layers} x {cfg.intermediate_size}; make one with `llmflash trace synth "
                f"--like {model_dir.path}`")
        return cls(trace, str(path))

    @property
    def token(self) -> int:
        return max(self.step, 0) % self.trace.tokens

    def begin_pass(self, tokens: int) -> None:
        self.step += 1

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        row = np.unpackbits(self.trace.bits[layer, self.token], count=self.trace.neurons, bitorder="little")
        mask = torch.from_numpy(row.astype(bool))[None, :].expand(x.shape[0], -1)
        return Selection(mask, self.strength[layer])

    @property
    def lookahead_kind(self) -> str:
        return (f"synthetic: the trace's own next-layer set, {self.lookahead_recall:g} of it kept at random "
                f"plus others up to {self.lookahead_ratio:g}x its size ({self.lookahead_fp_recent:g} of them "
                f"from the last {LOOKAHEAD_RECENT_TOKENS} tokens' sets, the rest at random)")

    def lookahead(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """Synthetic: the trace's own set for `layer` at this token, degraded to the recall and
        over-selection a real lookahead predictor measured (LOOKAHEAD_RECALL of the set kept at
        random, plus other neurons up to LOOKAHEAD_RATIO x the set: LOOKAHEAD_FP_RECENT of them from
        the recent tokens' sets, as a real predictor's wrong guesses were, the rest at random). A replayed run has no
        predictor whose lookahead could be measured, and the undegraded set would be a perfect
        guess no predictor makes; `--predictor-cost` charges the predictor's time for it."""
        row = np.unpackbits(self.trace.bits[layer, self.token], count=self.trace.neurons, bitorder="little")
        true_ids = np.flatnonzero(row)
        rng = np.random.default_rng((self.step + 1) * 1_000_003 + layer)
        keep = true_ids[rng.random(len(true_ids)) < self.lookahead_recall]
        n_false = int(round((self.lookahead_ratio - self.lookahead_recall) * len(true_ids)))
        t, recent = self.token, np.zeros(self.trace.neurons, dtype=bool)
        for back in range(1, min(LOOKAHEAD_RECENT_TOKENS, max(self.step, 0)) + 1):
            recent |= np.unpackbits(self.trace.bits[layer, (t - back) % self.trace.tokens],
                                    count=self.trace.neurons, bitorder="little").astype(bool)
        recent &= row == 0
        pools = [np.flatnonzero(recent), np.flatnonzero((row == 0) & ~recent)]
        n_recent = min(int(round(self.lookahead_fp_recent * n_false)), len(pools[0]))
        false_ids = np.concatenate([rng.choice(pools[0], size=n_recent, replace=False),
                                    rng.choice(pools[1], size=min(n_false - n_recent, len(pools[1])), replace=False)])
        ids = np.concatenate([keep, false_ids]).astype(np.int64)
        order = torch.argsort(self.strength[layer][torch.from_numpy(ids)], descending=True, stable=True)
        return ids[order.numpy()]

    def nbytes(self) -> int:
        return int(self.trace.bits.nbytes) + sum(s.numel() * s.element_size() for s in self.strength)

    def summary(self) -> dict:
        return super().summary() | {"trace": self.path, "trace_tokens": self.trace.tokens,
                                    "trace_wrapped": self.step >= self.trace.tokens,
                                    "lookahead_synthetic": {"recall": self.lookahead_recall,
                                                            "ratio": self.lookahead_ratio,
                                                            "false_positives_recent": self.lookahead_fp_recent}}


PREDICTOR_COSTS = ("lowrank", "quant")


def parse_predictor_cost(spec: str) -> tuple[str, int]:
    kind, _, size = spec.partition(":")
    try:
        value = int(size)
    except ValueError:
        value = 0
    if kind not in PREDICTOR_COSTS or value < 1 or (kind == "quant" and value > 8):
        raise LLMFlashError(f"predictor cost {spec!r}: use lowrank:RANK (e.g. lowrank:128) or "
                            "quant:BITS (1..8)")
    return kind, value


def random_predictors(model_dir: FlashModelDir, spec: str, dtype: torch.dtype, seed: int = 0):
    """A PredictorSet of the kind and size `spec` names, with random weights (never trained)."""
    from llmflash.runtime import lowbit
    from llmflash.runtime.predictors import PredictorSet, QuantLayer

    kind, size = parse_predictor_cost(spec)
    cfg = model_dir.config
    d, L = cfg.hidden_size, cfg.num_layers
    g = torch.Generator().manual_seed(seed)
    meta = {"activation": cfg.hidden_act, "act_threshold": cfg.act_threshold, "kind": kind}
    if kind == "lowrank":
        A, a, B, b = [], [], [], []
        for layer in range(L):
            n = model_dir.layers[layer].neurons
            A.append(torch.randn(size, d, generator=g, dtype=dtype) / d ** 0.5)
            a.append(torch.zeros(size, dtype=dtype))
            B.append(torch.randn(n, size, generator=g, dtype=dtype) / size ** 0.5)
            b.append(torch.zeros(n, dtype=dtype))
        return PredictorSet(A, a, B, b, [0.0] * L, meta, dtype)
    up_bits = 0 if cfg.hidden_act in ("relu", "fatrelu") else size
    layers = []
    for layer in range(L):
        n = model_dir.layers[layer].neurons
        t = {}
        for key, bits in (("g", size), ("u", up_bits)):
            if bits:
                codes = torch.randint(0, 2 ** bits, (n, d), generator=g, dtype=torch.int32)
                for i, p in enumerate(lowbit.pack(codes, bits)):
                    t[f"q{key}.{i}"] = p
                t[f"s{key}"] = torch.full((n,), 0.02, dtype=torch.float16)
                del codes
        layers.append(QuantLayer(t, (size, up_bits), d, dtype))
    return PredictorSet([], [], [], [], [0.0] * L, meta, dtype, quant_layers=layers)


class PredictorCost(NeuronSelector):
    """`inner` selects; a predictor of the given size runs first on the same input, unused."""

    def __init__(self, inner: NeuronSelector, predictors, spec: str):
        self.inner = inner
        self.predictors = predictors
        self.spec = spec
        self.name = inner.name

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def select(self, layer: int, x: torch.Tensor) -> Selection:
        self.predictors.logits(layer, x)  # the cost of predicting; the answer comes from `inner`
        return self.inner.select(layer, x)

    @property
    def lookahead_kind(self) -> str:
        inner = getattr(self.inner, "lookahead_kind", "the layer's selector on the previous layer's FFN input")
        return f"{inner}; a {self.spec} predictor run for it (cost charged, output unused)"

    def lookahead(self, layer: int, x: torch.Tensor) -> np.ndarray:
        self.predictors.logits(layer, x)  # a lookahead predictor's cost, as for select
        return self.inner.lookahead(layer, x)

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.predictors.nbytes()

    def summary(self) -> dict:
        return self.inner.summary() | {"selector_bytes": self.nbytes(), "predictor_cost": self.spec,
                                       "predictor_cost_bytes": self.predictors.nbytes()}
