"""Low-rank activation predictors (PAPER.md §3): per layer d_model -> r -> d_ffn, sigmoid.

A layer's predictor sees that layer's FFN input x (the post-attention norm output) and scores every
neuron: z = B (A x + a) + b, p = sigmoid(z). It is trained on the dense model's own activations:

* labels: activation != 0 for ReLU / FATReLU (FATReLU's threshold is inside the activation), and
  for other activations (SwiGLU, GeGLU) the calibrated magnitude criterion: |act(gate) * up| > t_l
  (or |act(gate)| > t_l, the CATS variant), t_l reaching the requested sparsity in layer l;
* loss: binary cross-entropy with positives and negatives weighted to equal total weight
  (0.5 / p and 0.5 / (1 - p), p = the layer's positive rate);
* inputs are standardised per channel during training; the scaling is folded into A and a after.

The decision threshold is tuned per layer on held-out calibration tokens: the lowest score that
keeps `target_recall` of the truly active neurons (ReLU models), or the score that selects a
`budget` fraction of the neurons (non-ReLU models, where "active" is a top-fraction by magnitude
and what matters is how much is computed). The rank is raised (doubled) for a layer whose measured
result falls short: selection above `max_selected_ratio` x the active set (ReLU) or recall below
`min_recall` (budget mode), as long as the predictors stay within `size_budget` of the model size.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from llmflash.errors import LLMFlashError
from llmflash.sparsity.common import LayerWeights, is_relu, layer_weights
from llmflash.sparsity.store import PREDICTORS_FILE, STATS_FILE, SparsityStore
from llmflash.storage.layout import FlashModelDir

STORE_DTYPE = torch.float16
BUDGET_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class PredictorSet:
    """All layers' predictors, resident in DRAM, with their tuned decision thresholds."""

    def __init__(self, A: list[torch.Tensor], a: list[torch.Tensor], B: list[torch.Tensor],
                 b: list[torch.Tensor], z_threshold: list[float], meta: dict,
                 dtype: torch.dtype = torch.float32):
        self.A = [t.to(dtype) for t in A]
        self.a = [t.to(dtype) for t in a]
        self.B = [t.to(dtype) for t in B]
        self.b = [t.to(dtype) for t in b]
        self.z_threshold = list(z_threshold)
        self.meta = meta
        self.dtype = dtype
        self.hidden_act = meta.get("hidden_act", "none")

    # -- loading ---------------------------------------------------------------------------------
    def use_budget(self, budget: float) -> None:
        """Switch every layer's decision threshold to the one that selected `budget` of the neurons
        on held-out calibration tokens (budgets of BUDGET_GRID only)."""
        key = f"{budget:.2f}"
        try:
            self.z_threshold = [float(v["z_by_budget"][key]) for v in self.meta["validation"]]
        except KeyError:
            raise LLMFlashError(f"no thresholds for budget {budget}; choose one of "
                                f"{', '.join(f'{q:.1f}' for q in BUDGET_GRID)}") from None

    @classmethod
    def load(cls, model_dir: FlashModelDir, dtype: torch.dtype = torch.float32) -> "PredictorSet":
        store = SparsityStore(model_dir)
        tensors, meta = store.read_tensors(PREDICTORS_FILE)
        L = model_dir.config.num_layers
        try:
            parts = [[tensors[f"layers.{l}.{n}"] for l in range(L)] for n in ("A", "a", "B", "b")]
            thresholds = [float(t) for t in meta["z_threshold"]]
        except KeyError as exc:
            raise LLMFlashError(f"{store.path / PREDICTORS_FILE} lacks {exc}; run `llmflash calibrate`") from None
        for l in range(L):
            if parts[2][l].shape[0] != model_dir.layers[l].neurons or parts[0][l].shape[1] != model_dir.config.hidden_size:
                raise LLMFlashError(f"{store.path / PREDICTORS_FILE} layer {l} has the wrong shape for {model_dir.path}")
        return cls(*parts, thresholds, meta, dtype)

    @property
    def num_layers(self) -> int:
        return len(self.A)

    def ranks(self) -> list[int]:
        return [int(t.shape[0]) for t in self.A]

    # -- inference -------------------------------------------------------------------------------
    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.dtype), self.A[layer], self.a[layer])
        if self.hidden_act == "relu":
            h = F.relu(h)
        return F.linear(h, self.B[layer], self.b[layer])

    def probabilities(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Predicted probability that each neuron is active: [T, n_neurons] (neuron order)."""
        return torch.sigmoid(self.logits(layer, x))

    def mask(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Boolean [T, n_neurons]: the neurons selected for each input row."""
        return self.logits(layer, x) >= self.z_threshold[layer]

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """Neuron ids (original index space, int64) selected for any row of x, most confident first."""
        z = self.logits(layer, x.reshape(-1, x.shape[-1]))
        best = z.max(dim=0).values
        ids = torch.nonzero(best >= self.z_threshold[layer]).reshape(-1)
        ids = ids[torch.argsort(best[ids], descending=True, stable=True)]
        return ids.numpy().astype(np.int64, copy=False)

    def nbytes(self) -> int:
        """Bytes held resident (in the compute dtype the set was loaded with)."""
        return sum(t.numel() * t.element_size() for ts in (self.A, self.a, self.B, self.b) for t in ts)

    def stored_nbytes(self) -> int:
        """Bytes of the weights as stored (float16)."""
        return sum(t.numel() for ts in (self.A, self.a, self.B, self.b) for t in ts) * 2


# -- training ------------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    rank: int | None = None  # fixed rank for every layer; None = chosen per layer from recall
    start_rank: int | None = None  # auto mode: first rank tried (default min(d, N) / 8, power of two)
    max_rank: int | None = None  # auto mode: highest rank (default min(d, N) / 2)
    target_recall: float = 0.99  # ReLU: decision threshold keeps this recall of truly active neurons
    max_selected_ratio: float = 3.0  # ReLU: raise the rank while selected > ratio x active
    budget: float | None = None  # non-ReLU: fraction of neurons selected (default 1 - sparsity)
    min_recall: float = 0.85  # non-ReLU: raise the rank while recall of the top set is below this
    epochs: int = 4
    min_steps: int = 2000  # at least this many optimiser steps, whatever the data size
    batch: int = 256
    lr: float = 2e-3
    init: str = "svd"  # "svd" (from the layer's gate / fc1 weights) or "random"
    weighting: str = "magnitude"  # non-ReLU: positives weighted by |score| / threshold ("none": plain)
    max_weight: float = 8.0
    hidden_act: str = "none"  # between A and B: "none" (pure low rank) or "relu"
    val_fraction: float = 0.15
    size_budget: float = 0.05  # predictors (float16) at most this fraction of the model's bytes
    criterion: str = "glu"
    seed: int = 0


def _default_ranks(d: int, n: int, opts: TrainOptions) -> tuple[int, int]:
    m = min(d, n)
    start = opts.start_rank or max(8, 2 ** int(math.log2(max(8, m // 8))))
    top = opts.max_rank or max(start, m // 2)
    return min(start, m), min(top, m)


def model_bytes_f16(model_dir: FlashModelDir) -> int:
    """The model's weights in float16 bytes, whatever dtype it was converted to (sizes compare
    float16 predictors with a float16 model)."""
    item = {"float32": 4}.get(model_dir.dtype, 2)
    return sum(model_dir.weights_nbytes().values()) * 2 // item


def _layer_bytes(rank: int, d: int, n: int) -> int:
    return (rank * (d + n + 1) + n) * 2  # float16 A, a, B, b


def layer_labels(w: LayerWeights, X: torch.Tensor, criterion: str, threshold: float | None,
                 chunk: int = 4096) -> torch.Tensor:
    out = [w.active(X[i:i + chunk].float(), criterion, threshold) for i in range(0, len(X), chunk)]
    return torch.cat(out)


def _fit(X: torch.Tensor, Y: torch.Tensor, rank: int, opts: TrainOptions,
         w: LayerWeights | None = None, label_threshold: float | None = None,
         mag: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Train one layer's predictor; returns (A, a, B, b) with the input scaling folded in.

    With `w` (opts.init == "svd") A and B start as the best rank-r factorisation of the layer's own
    gate (fc1 for OPT) on standardised inputs, scaled so the logit starts near 4 x the
    standardised pre-activation; for a ReLU layer at full rank that already is an exact predictor.
    """
    gen = torch.Generator().manual_seed(opts.seed)
    d, n = X.shape[1], Y.shape[1]
    Xf = X.float()
    mu = Xf.mean(0)
    sigma = Xf.std(0).clamp_min(1e-4)
    del Xf
    p = float(Y.float().mean().clamp(1e-4, 1 - 1e-4))
    if w is not None and opts.init == "svd" and opts.hidden_act == "none":
        s = w.slices
        part, bias = (s.gate, s.gate_bias) if s.gate is not None else (s.up, s.up_bias)
        W = w.rows[:, part].float()
        bvec = (W @ mu) + (0 if bias is None else w.rows[:, bias].reshape(-1).float())
        Ws = W * sigma  # pre = Ws x_hat + bvec, x_hat standardised
        U, S, Vh = torch.linalg.svd(Ws, full_matrices=False)
        k = min(rank, S.numel())
        scale = 4.0 / float(torch.sqrt((S ** 2).sum() / n).clamp_min(1e-6))  # ~ 4 / std(pre)
        A0 = torch.zeros(rank, d)
        B0 = torch.zeros(n, rank)
        A0[:k] = S[:k, None].sqrt() * Vh[:k]
        B0[:, :k] = U[:, :k] * S[:k].sqrt() * scale
        thr = w.threshold if w.act == "fatrelu" else 0.0
        b0 = (bvec - thr) * scale
        if rank > k:
            A0[k:] = torch.randn(rank - k, d, generator=gen) / math.sqrt(d) * 0.01
    else:
        A0 = torch.randn(rank, d, generator=gen) / math.sqrt(d)
        B0 = torch.randn(n, rank, generator=gen) / math.sqrt(rank)
        b0 = torch.full((n,), math.log(p / (1 - p)))
    A = torch.nn.Parameter(A0)
    a = torch.nn.Parameter(torch.zeros(rank))
    B = torch.nn.Parameter(B0)
    b = torch.nn.Parameter(b0.clone())
    w_pos, w_neg = 0.5 / p, 0.5 / (1 - p)
    magnitude = mag is not None
    params = [A, a, B, b]
    opt = torch.optim.Adam(params, lr=opts.lr)
    steps_per_epoch = max(1, math.ceil(len(X) / opts.batch))
    total = max(steps_per_epoch * opts.epochs, opts.min_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    step = 0
    while step < total:
        order = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), opts.batch):
            if step >= total:
                break
            idx = order[i:i + opts.batch]
            xb = (X[idx].float() - mu) / sigma
            yb = Y[idx].float()
            if magnitude:
                # a missed neuron costs in proportion to its output magnitude (in threshold units)
                yb_w = w_pos * yb * mag[idx].float()
            else:
                yb_w = w_pos * yb
            h = F.linear(xb, A, a)
            if opts.hidden_act == "relu":
                h = F.relu(h)
            z = F.linear(h, B, b)
            loss = (yb_w * F.softplus(-z) + w_neg * (1 - yb) * F.softplus(z)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    with torch.no_grad():
        A_f = A / sigma  # A ((x - mu) / sigma) + a = (A / sigma) x + (a - (A / sigma) mu)
        a_f = a - A_f @ mu
    return A_f.detach(), a_f.detach(), B.detach(), b.detach()


def _z(X: torch.Tensor, A, a, B, b, hidden_act: str, chunk: int = 4096) -> torch.Tensor:
    out = []
    for i in range(0, len(X), chunk):
        h = F.linear(X[i:i + chunk].float(), A, a)
        if hidden_act == "relu":
            h = F.relu(h)
        out.append(F.linear(h, B, b))
    return torch.cat(out)


def _kth(values: torch.Tensor, q: float) -> float:
    """The value at quantile q of a 1-D tensor (subsampled above 8M values)."""
    if values.numel() > 8_000_000:
        idx = torch.randint(0, values.numel(), (8_000_000,), generator=torch.Generator().manual_seed(0))
        values = values[idx]
    k = min(max(int(q * values.numel()), 1), values.numel())
    return float(torch.kthvalue(values.float(), k).values)


def tune_threshold(z: torch.Tensor, Y: torch.Tensor, target_recall: float | None = None,
                   budget: float | None = None) -> float:
    """Decision threshold on the logit z: keep target_recall of positives, or select a budget fraction."""
    if budget is not None:
        return _kth(z.reshape(-1), 1.0 - budget)
    pos = z[Y]
    if pos.numel() == 0:
        return float(z.max()) + 1.0
    k = int(math.floor((1.0 - target_recall) * pos.numel()))
    if k <= 0:
        return float(pos.min())
    return float(torch.kthvalue(pos.float(), k).values) + 1e-6


def selection_metrics(selected: torch.Tensor, active: torch.Tensor) -> dict:
    tp = int((selected & active).sum())
    n_sel, n_act = int(selected.sum()), int(active.sum())
    return {"recall": tp / n_act if n_act else 1.0, "precision": tp / n_sel if n_sel else 1.0,
            "selected_fraction": n_sel / selected.numel(), "active_fraction": n_act / active.numel()}


def _options_key(opts: TrainOptions, stats_sha: str, inputs_key: str) -> str:
    raw = json.dumps([asdict(opts), stats_sha, inputs_key], sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def train_predictors(model_dir: FlashModelDir, inputs: list[torch.Tensor], opts: TrainOptions,
                     inputs_key: str = "", progress: bool = True, log=print) -> dict:
    """Train every layer's predictor on captured FFN inputs and store them in the model directory.

    Finished layers are kept in sparsity/.partial/ so an interrupted run resumes where it stopped
    (same options, statistics and calibration text); the final file replaces them when all are done.
    """
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    store = SparsityStore(model_dir)
    relu = is_relu(model_dir)
    thresholds: list[float | None] = [None] * model_dir.config.num_layers
    stats_sha = ""
    sparsity = None
    if not relu:
        stats_meta = store.meta(STATS_FILE)
        stats_sha = store.index()["files"][STATS_FILE]["sha256"]
        thresholds = stats_meta["thresholds"][opts.criterion]
        sparsity = stats_meta["sparsity"]
    budget = None if relu else (opts.budget if opts.budget is not None else 1.0 - sparsity)

    c = model_dir.config
    weights_bytes = model_bytes_f16(model_dir)
    used_bytes = 0
    key = _options_key(opts, stats_sha, inputs_key)
    partial = store.path / ".partial"
    if partial.exists() and (partial / "key").exists() and (partial / "key").read_text() != key:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "key").write_text(key)

    tensors: dict[str, torch.Tensor] = {}
    layers_meta: list[dict] = []
    bar = tqdm(range(c.num_layers), desc="train predictors", unit="layer", disable=not progress)
    started = time.perf_counter()
    for l in bar:
        done = partial / f"layer{l}.safetensors"
        if done.exists() and (partial / f"layer{l}.json").exists():
            saved = load_file(str(done))
            tensors.update({f"layers.{l}.{k}": v for k, v in saved.items()})
            layers_meta.append(json.loads((partial / f"layer{l}.json").read_text()))
            used_bytes += _layer_bytes(layers_meta[-1]["rank"], c.hidden_size, model_dir.layers[l].neurons)
            continue
        w = layer_weights(model_dir, l)
        X = inputs[l]
        Y = layer_labels(w, X, opts.criterion, thresholds[l])
        g = torch.Generator().manual_seed(opts.seed + l)
        order = torch.randperm(len(X), generator=g)
        n_val = max(1, int(len(X) * opts.val_fraction))
        val, tr = order[:n_val], order[n_val:]
        Xt, Yt, Xv, Yv = X[tr], Y[tr], X[val], Y[val]
        mag = None
        if opts.weighting == "magnitude" and thresholds[l]:
            mag = torch.cat([(w.scores(Xt[i:i + 4096].float(), opts.criterion) / thresholds[l])
                             .clamp(1.0, opts.max_weight).half() for i in range(0, len(Xt), 4096)])
        d, n = X.shape[1], Y.shape[1]
        r0, r_max = _default_ranks(d, n, opts)
        if opts.rank is not None:
            r0 = r_max = min(opts.rank, d, n)
        later = (c.num_layers - l - 1) * _layer_bytes(r0, d, n)
        r, best = r0, None
        while True:
            A, a, B, b = _fit(Xt, Yt, r, opts, w, thresholds[l], mag)
            z = _z(Xv, A, a, B, b, opts.hidden_act)
            thr = tune_threshold(z, Yv, opts.target_recall if budget is None else None, budget)
            m = selection_metrics(z >= thr, Yv)
            m.update(rank=r, z_threshold=thr)
            best = (A, a, B, b, m)
            if budget is None:
                ok = m["selected_fraction"] <= opts.max_selected_ratio * max(m["active_fraction"], 1e-9)
            else:
                ok = m["recall"] >= opts.min_recall
            fits = used_bytes + _layer_bytes(2 * r, d, n) + later <= opts.size_budget * weights_bytes
            if ok or 2 * r > r_max or not fits:
                break
            r *= 2
        A, a, B, b, m = best
        layer_t = {"A": A.to(STORE_DTYPE), "a": a.to(STORE_DTYPE), "B": B.to(STORE_DTYPE), "b": b.to(STORE_DTYPE)}
        # Retune the threshold with the stored (float16) weights, which the runtime will use.
        z = _z(Xv, *(t.float() for t in layer_t.values()), opts.hidden_act)
        thr = tune_threshold(z, Yv, opts.target_recall if budget is None else None, budget)
        m.update(selection_metrics(z >= thr, Yv), z_threshold=thr)
        # thresholds for other selection budgets, so a run can trade accuracy for compute later
        m["z_by_budget"] = {f"{q:.2f}": _kth(z.reshape(-1), 1.0 - q) for q in BUDGET_GRID}
        save_file(layer_t, str(done.with_suffix(".tmp")))
        done.with_suffix(".tmp").rename(done)
        (partial / f"layer{l}.json").write_text(json.dumps(m))
        tensors.update({f"layers.{l}.{k}": v for k, v in layer_t.items()})
        layers_meta.append(m)
        used_bytes += _layer_bytes(m["rank"], d, n)
        bar.set_postfix(rank=m["rank"], recall=f"{m['recall']:.3f}", sel=f"{m['selected_fraction']:.3f}")
    bar.close()
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {
        "hidden_act": opts.hidden_act,
        "labels": ("activation != 0" if relu else f"{opts.criterion} magnitude > calibrated threshold"),
        "criterion": None if relu else opts.criterion,
        "mode": "recall" if budget is None else "budget",
        "target_recall": opts.target_recall if budget is None else None,
        "budget": budget,
        "z_threshold": [m["z_threshold"] for m in layers_meta],
        "ranks": [m["rank"] for m in layers_meta],
        "validation": layers_meta,
        "options": asdict(opts),
        "stored_bytes": stored,
        "model_bytes": weights_bytes,
        "size_fraction": stored / weights_bytes,
        "train_seconds": round(time.perf_counter() - started, 1),
        "tokens": int(len(inputs[0])),
    }
    store.write_tensors(PREDICTORS_FILE, tensors, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return meta
