"""Train activation predictors offline (docs/PAPER.md §3, docs/SPARSITY.md): the low-rank kind by
balanced BCE from an SVD start, the quant kind by GPTQ; per-layer decision thresholds tuned on
held-out calibration tokens. What runs at inference time is llmflash.runtime.predictors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.format.sparsity_store import PREDICTORS_FILE, STATS_FILE, SparsityStore
from llmflash.runtime import lowbit as quant
from llmflash.runtime.layer_weights import LayerWeights, is_relu, layer_weights
from llmflash.runtime.predictors import (AUTO_BITS, BUDGET_GRID, KINDS, LAYOUT, STORE_DTYPE, QuantLayer,
                                         int4_kernel_available, quant_score)
from llmflash.tools import gptq

# quant predictors by default: a 4-bit gate copy and a 3-bit up copy (gated non-ReLU models; ReLU
# models need only the gate). Measured on SmolLM2 at half the neurons: +4.4% perplexity, against
# +10-14% for the 2/2 bits that fit 5% of the float16 model (docs/SPARSITY.md).
DEFAULT_BITS = (4, 3)
LOWRANK_SIZE = 0.05  # low-rank predictors: raise ranks while they stay under this share of the model

@dataclass
class TrainOptions:
    rank: int | None = None  # fixed rank for every layer; None = chosen per layer from recall
    start_rank: int | None = None  # auto mode: first rank tried (default min(d, N) / 8, power of two)
    max_rank: int | None = None  # auto mode: highest rank (default min(d, N) / 2)
    target_recall: float = 0.99  # ReLU: decision threshold keeps this recall of truly active neurons
    max_selected_ratio: float = 3.0  # ReLU: raise the rank while selected > ratio x active
    density: float | None = None  # non-ReLU: share of neurons selected (default: calibrate's density)
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
    # predictors as stored at most this share of the model's float16 bytes; None: quant at DEFAULT_BITS
    # (what meets +5% perplexity on SmolLM2, docs/SPARSITY.md), lowrank within LOWRANK_SIZE
    predictor_size: float | None = None
    criterion: str = "glu"
    seed: int = 0
    kind: str = "auto"  # "lowrank", "quant", or auto (resolve_kind): quant unless a rank is given
    bits: int | None = None  # quant: gate (fc1) bits; None = DEFAULT_BITS, or the most that fit predictor_size
    up_bits: int | None = None  # quant: up bits (default: bits)


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


def resolve_kind(model_dir: FlashModelDir, opts: TrainOptions) -> str:
    """"auto": quant unless a rank option is given, or, where torch lacks the packed-int4 kernel
    (quant selection then costs ~6x more), quant only for gated non-ReLU models, whose magnitude a
    low-rank map cannot rank. Measured on the relufied SmolLM2, quant selects 1.29x the active set
    at recall 0.992 against 2.4x at 0.982 for rank 128, in fewer bytes (docs/SPARSITY.md)."""
    if opts.kind not in ("auto",) + KINDS:
        raise LLMFlashError(f"unknown predictor kind {opts.kind!r}; choose auto, {', '.join(KINDS)}")
    if opts.kind != "auto":
        return opts.kind
    if opts.rank is not None or opts.start_rank is not None or opts.max_rank is not None:
        return "lowrank"
    if int4_kernel_available():
        return "quant"
    gated = model_dir.bundle.part("gate") is not None
    return "quant" if gated and not is_relu(model_dir) else "lowrank"


def _uses_up(model_dir: FlashModelDir, criterion: str) -> bool:
    """The quant kind estimates the up projection too (gated non-ReLU model, glu criterion)."""
    return model_dir.bundle.part("gate") is not None and not is_relu(model_dir) and criterion == "glu"


def _quant_layer_bytes(n: int, d: int, bits: tuple[int, int], biases: tuple[bool, bool]) -> int:
    total = quant.packed_bytes(n, d, bits[0]) + 2 * n * (1 + biases[0])
    if bits[1]:
        total += quant.packed_bytes(n, d, bits[1]) + 2 * n * (1 + biases[1])
    return total


def _size_limit(opts: TrainOptions) -> float:
    return LOWRANK_SIZE if opts.predictor_size is None else opts.predictor_size


def resolve_bits(model_dir: FlashModelDir, opts: TrainOptions) -> tuple[int, int]:
    """(gate bits, up bits; 0 = no up estimate): the options', or the most that fit the size budget."""
    up = _uses_up(model_dir, opts.criterion)
    s = model_dir.bundle
    biases = (s.part("gate_bias" if s.part("gate") is not None else "up_bias") is not None,
              s.part("up_bias") is not None)
    for b in (opts.bits, opts.up_bits):
        if b is not None and not 1 <= b <= 8:
            raise LLMFlashError(f"--bits / --up-bits must be 1..8, got {b}")
    if opts.bits is not None:
        return opts.bits, ((opts.up_bits or opts.bits) if up else 0)
    if opts.predictor_size is None:
        return DEFAULT_BITS if up else (DEFAULT_BITS[0], 0)
    limit = opts.predictor_size * model_bytes_f16(model_dir)
    d = model_dir.config.hidden_size
    candidates = AUTO_BITS if up else tuple((g, 0) for g in sorted({g for g, _ in AUTO_BITS}, reverse=True))
    for bits in candidates:
        total = sum(_quant_layer_bytes(model_dir.layers[l].neurons, d, bits, biases)
                    for l in range(model_dir.config.num_layers))
        if total <= limit:
            return bits
    return candidates[-1]


def _second_moment(X: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64)
    for i in range(0, len(X), chunk):
        x = X[i:i + chunk].double()
        H += x.T @ x
    return (H / max(1, len(X))).float()


def _fit_quant(w: LayerWeights, Xt: torch.Tensor, bits: tuple[int, int]) -> dict[str, torch.Tensor]:
    """GPTQ copies of the layer's gate (fc1 for OPT) and, with bits[1], up rows: stored tensors."""
    s = w.slices
    H = _second_moment(Xt)
    part, bias = (s.gate, s.gate_bias) if s.gate is not None else (s.up, s.up_bias)
    out: dict[str, torch.Tensor] = {}
    todo = [("g", part, bias, bits[0])]
    if bits[1]:
        todo.append(("u", s.up, s.up_bias, bits[1]))
    for name, rows, b, nb in todo:
        codes, step = gptq.gptq(w.rows[:, rows].float(), H, nb)
        for i, t in enumerate(quant.pack(codes, nb)):
            out[f"q{name}.{i}"] = t
        out[f"s{name}"] = step.to(STORE_DTYPE)
        if b is not None:
            out[f"b{name}"] = w.rows[:, b].reshape(-1).to(STORE_DTYPE)
    return out


def _quant_z(ql: "QuantLayer", X: torch.Tensor, act: str, act_threshold: float, criterion: str,
             chunk: int = 4096) -> torch.Tensor:
    return torch.cat([quant_score(ql.estimates(X[i:i + chunk].float()), act, act_threshold, criterion)
                      for i in range(0, len(X), chunk)])


def magnitude_recall(w: LayerWeights, X: torch.Tensor, selected: torch.Tensor, active: torch.Tensor,
                     criterion: str = "glu", chunk: int = 4096) -> float:
    """Share of the truly active neurons' summed magnitude (|act(g) * u|, or |act(g)| for cats / no
    up) that the selection keeps: sum over selected & active / sum over active."""
    kept = total = 0.0
    for i in range(0, len(X), chunk):
        sc = w.scores(X[i:i + chunk].float(), criterion) * active[i:i + chunk]
        kept += float((sc * selected[i:i + chunk]).sum())
        total += float(sc.sum())
    return kept / total if total else 1.0


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
    kind = resolve_kind(model_dir, opts)
    bits = resolve_bits(model_dir, opts) if kind == "quant" else None
    thresholds: list[float | None] = [None] * model_dir.config.num_layers
    stats_sha = ""
    sparsity = None
    if not relu:
        stats_meta = store.meta(STATS_FILE)
        stats_sha = store.index()["files"][STATS_FILE]["sha256"]
        thresholds = stats_meta["thresholds"][opts.criterion]
        sparsity = stats_meta["sparsity"]
    budget = None if relu else (opts.density if opts.density is not None else 1.0 - sparsity)
    criterion = "glu" if relu else opts.criterion

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
    bar = tqdm(range(c.num_layers), desc=f"train predictors ({kind})", unit="layer", disable=not progress)
    started = time.perf_counter()
    for l in bar:
        done = partial / f"layer{l}.safetensors"
        if done.exists() and (partial / f"layer{l}.json").exists():
            saved = load_file(str(done))
            tensors.update({f"layers.{l}.{k}": v for k, v in saved.items()})
            layers_meta.append(json.loads((partial / f"layer{l}.json").read_text()))
            used_bytes += layers_meta[-1]["stored_bytes"]
            continue
        w = layer_weights(model_dir, l)
        X = inputs[l]
        Y = layer_labels(w, X, opts.criterion, thresholds[l])
        g = torch.Generator().manual_seed(opts.seed + l)
        order = torch.randperm(len(X), generator=g)
        n_val = max(1, int(len(X) * opts.val_fraction))
        val, tr = order[:n_val], order[n_val:]
        Xt, Yt, Xv, Yv = X[tr], Y[tr], X[val], Y[val]
        d, n = X.shape[1], Y.shape[1]
        if kind == "quant":
            layer_t = _fit_quant(w, Xt, bits)
            ql = QuantLayer(layer_t, bits, d, torch.float32)
            z = _quant_z(ql, Xv, c.hidden_act, c.act_threshold, criterion)
            m = {"rank": None, "bits": list(bits), "stored_bytes": ql.stored_nbytes()}
        else:
            layer_t, m = _train_lowrank_layer(w, Xt, Yt, Xv, Yv, opts, thresholds[l], budget,
                                              used_bytes, c.num_layers - l - 1, weights_bytes)
            # the threshold is tuned with the stored (float16) weights, which the runtime will use
            z = _z(Xv, *(t.float() for t in layer_t.values()), opts.hidden_act)
            m["stored_bytes"] = _layer_bytes(m["rank"], d, n)
        thr = tune_threshold(z, Yv, opts.target_recall if budget is None else None, budget)
        sel = z >= thr
        m.update(selection_metrics(sel, Yv), z_threshold=thr,
                 magnitude_recall=magnitude_recall(w, Xv, sel, Yv, criterion))
        # thresholds for other selection budgets, so a run can trade accuracy for compute later
        m["z_by_budget"] = {f"{q:.2f}": _kth(z.reshape(-1), 1.0 - q) for q in BUDGET_GRID}
        save_file(layer_t, str(done.with_suffix(".tmp")))
        done.with_suffix(".tmp").rename(done)
        (partial / f"layer{l}.json").write_text(json.dumps(m))
        tensors.update({f"layers.{l}.{k}": v for k, v in layer_t.items()})
        layers_meta.append(m)
        used_bytes += m["stored_bytes"]
        bar.set_postfix(size=(f"r{m['rank']}" if kind == "lowrank" else f"q{bits[0]}/{bits[1]}"),
                        recall=f"{m['recall']:.3f}", mrec=f"{m['magnitude_recall']:.3f}",
                        sel=f"{m['selected_fraction']:.3f}")
    bar.close()
    stored = sum(m["stored_bytes"] for m in layers_meta)
    stored_model = sum(model_dir.weights_nbytes().values())
    if opts.predictor_size is not None and stored > opts.predictor_size * weights_bytes:
        log(f"note: predictors take {stored / weights_bytes:.2%} of the model's float16 size, more than "
            f"--predictor-size {opts.predictor_size:g} ({'the fewest bits' if kind == 'quant' else 'the smallest rank'})")
    meta = {
        "layout": LAYOUT,
        "kind": kind,
        "bits": [m.get("bits") for m in layers_meta] if kind == "quant" else None,
        "activation": c.hidden_act,
        "act_threshold": c.act_threshold,
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
        "model_bytes_stored": stored_model,
        "model_dtype": model_dir.dtype,
        "size_fraction_of_stored_model": stored / stored_model,
        "train_seconds": round(time.perf_counter() - started, 1),
        "tokens": int(len(inputs[0])),
    }
    store.write_tensors(PREDICTORS_FILE, tensors, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return meta


def _train_lowrank_layer(w: LayerWeights, Xt, Yt, Xv, Yv, opts: TrainOptions, label_threshold, budget,
                         used_bytes: int, layers_after: int, weights_bytes: int):
    """One layer of the low-rank kind, its rank raised (doubled) while it falls short."""
    mag = None
    if opts.weighting == "magnitude" and label_threshold:
        mag = torch.cat([(w.scores(Xt[i:i + 4096].float(), opts.criterion) / label_threshold)
                         .clamp(1.0, opts.max_weight).half() for i in range(0, len(Xt), 4096)])
    d, n = Xt.shape[1], Yt.shape[1]
    r0, r_max = _default_ranks(d, n, opts)
    if opts.rank is not None:
        r0 = r_max = min(opts.rank, d, n)
    later = layers_after * _layer_bytes(r0, d, n)
    r, best = r0, None
    while True:
        A, a, B, b = _fit(Xt, Yt, r, opts, w, label_threshold, mag)
        z = _z(Xv, A, a, B, b, opts.hidden_act)
        thr = tune_threshold(z, Yv, opts.target_recall if budget is None else None, budget)
        m = selection_metrics(z >= thr, Yv)
        m.update(rank=r, z_threshold=thr)
        best = (A, a, B, b, m)
        if budget is None:
            ok = m["selected_fraction"] <= opts.max_selected_ratio * max(m["active_fraction"], 1e-9)
        else:
            ok = m["recall"] >= opts.min_recall
        fits = used_bytes + _layer_bytes(2 * r, d, n) + later <= _size_limit(opts) * weights_bytes
        if ok or 2 * r > r_max or not fits:
            break
        r *= 2
    A, a, B, b, m = best
    layer_t = {"A": A.to(STORE_DTYPE), "a": a.to(STORE_DTYPE), "B": B.to(STORE_DTYPE), "b": b.to(STORE_DTYPE)}
    return layer_t, {"rank": m["rank"]}
