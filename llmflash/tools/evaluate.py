"""Accuracy of sparse execution on held-out text: perplexity, predictor quality, window statistics.

One engine with a `SparseFFN` runs the same windows three times: dense ("none"), reference-sparse
(the `exact` selector on ReLU models; on the others the `magnitude` criterion at the calibrated
per-layer thresholds) and predictor-sparse. During the dense run every layer's FFN input is also scored against the truth:

* per layer: recall and precision of the predictor's selection against the truly active neurons
  (ReLU: activation != 0; otherwise the calibrated magnitude criterion), the fraction selected and
  the fraction truly active;
* windows (docs/PAPER.md §4), pooled over layers, for k = 1..8, for the predictor's selections (what a
  flash runtime loads) and for the truly active sets: `held` = |S_t ∪ ... ∪ S_{t-k+1}| / N, the
  neurons a window of k tokens keeps in DRAM; `new` = |S_t minus (S_{t-1} ∪ ... ∪ S_{t-k})| / N,
  the neurons to read per token. The first 8 tokens of each text window are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from llmflash.runtime.engine import Engine
from llmflash.runtime.layer_weights import is_relu
from llmflash.runtime.selectors import ExactSelector, MagnitudeSelector, PredictorSelector
from llmflash.tools.text import text_windows, window_nll
from llmflash.runtime.sparse_ffn import SparseFFN
from llmflash.format.sparsity_store import PREDICTORS_FILE, STATS_FILE, SparsityStore
from llmflash.models.base import ObservedFFN

MAX_K = 8
SKIP = 8


class _Scorer:
    """Observer of the dense pass: per-layer selection metrics and window statistics."""

    def __init__(self, weights, reference, predictor, criterion):
        L = len(weights)
        self.w = weights
        self.reference = reference
        self.predictor = predictor
        self.criterion = criterion
        self.counts = np.zeros((L, 4), dtype=np.int64)  # tp, selected, active, total
        self.mags = np.zeros((L, 2))  # magnitude of truly active neurons: selected, all
        self.win = {"predictor": np.zeros((MAX_K, 3)), "active": np.zeros((MAX_K, 3))}  # held, new, rows

    def __call__(self, layer: int, x: torch.Tensor) -> None:
        active = self.reference.select(layer, x).mask
        sets = {"active": active}
        if self.predictor is not None:
            sel = self.predictor.select(layer, x).mask
            sets["predictor"] = sel
            self.counts[layer] += [int((sel & active).sum()), int(sel.sum()), int(active.sum()), sel.numel()]
            mag = self.w[layer].scores(x.float(), self.criterion) * active
            self.mags[layer] += [float((mag * sel).sum()), float(mag.sum())]
        else:
            self.counts[layer] += [0, 0, int(active.sum()), active.numel()]
        for name, m in sets.items():
            _window_counts(m, self.win[name])


def _window_counts(m: torch.Tensor, acc: np.ndarray) -> None:
    T = m.shape[0]
    if T <= SKIP:
        return
    cur = m[SKIP:]
    rows = cur.shape[0]
    union_prev = torch.zeros_like(cur)  # S_{t-1} ∪ ... ∪ S_{t-k}
    for k in range(1, MAX_K + 1):
        held = cur | union_prev  # before adding S_{t-k}: S_t ∪ ... ∪ S_{t-k+1}
        union_prev = union_prev | m[SKIP - k:T - k]
        new = cur & ~union_prev
        acc[k - 1] += [float(held.sum()), float(new.sum()), rows * m.shape[1]]


def evaluate(path: Path | str, text: Path | str, tokens: int = 4096, window: int = 512,
             progress: bool = True, modes: tuple[str, ...] = ("none", "reference", "predictor"),
             density: float | None = None) -> dict:
    from tqdm import tqdm

    from llmflash.runtime.predictors import PredictorSet

    from llmflash.errors import LLMFlashError

    modes = tuple("reference" if m == "oracle" else m for m in modes)  # the older name
    bad = [m for m in modes if m not in ("none", "reference", "predictor")]
    if bad:
        raise LLMFlashError(f"unknown eval run {bad[0]!r}; choose among none, reference, predictor")
    budget = density
    holder: dict = {}

    def factory(model_dir, dtype):
        store = SparsityStore(model_dir)
        predictors = PredictorSet.load(model_dir) if store.has(PREDICTORS_FILE) else None
        if predictors is not None and budget is not None:
            predictors.use_budget(budget)
        thresholds, criterion = None, "glu"
        if predictors is not None:
            criterion = predictors.meta.get("criterion") or "glu"
        if not is_relu(model_dir) and store.has(STATS_FILE):
            _, meta = store.read_tensors(STATS_FILE)
            thresholds = meta["thresholds"][criterion]
        holder.update(predictors=predictors, thresholds=thresholds, criterion=criterion)
        ffn = SparseFFN(model_dir, dtype)
        weights = ffn.neuron_weights()
        reference = None
        if is_relu(model_dir):
            reference = ExactSelector(weights, owned=False)
        elif thresholds is not None:
            reference = MagnitudeSelector(weights, thresholds=thresholds, criterion=criterion, owned=False)
        holder["selectors"] = {"none": None, "reference": reference,
                               "predictor": None if predictors is None else PredictorSelector(predictors)}
        holder["ffn"] = ffn
        return ffn

    engine = Engine(path, torch.float32, ffn=factory)
    ffn: SparseFFN = holder["ffn"]
    predictors, thresholds = holder["predictors"], holder["thresholds"]
    relu = is_relu(engine.dir)
    windows = text_windows(engine.dir, engine.tokenizer, text, tokens, window)
    selectors = holder["selectors"]
    scorer = _Scorer(ffn.neuron_weights(), selectors["reference"], selectors["predictor"], holder["criterion"])
    can_score = selectors["reference"] is not None

    perplexity: dict = {"dense": None, "reference": None, "predictor": None}
    run_selected: dict = {}
    for mode in modes:
        key = "dense" if mode == "none" else mode
        if mode != "none" and selectors[mode] is None:
            continue
        ffn.selector = selectors[mode]
        ffn.reset_stats()
        observe = mode == "none" and can_score
        engine.model.ffn = ObservedFFN(ffn, scorer) if observe else ffn
        nll, n = 0.0, 0
        for w in tqdm(windows, desc=f"eval {key}", unit="window", disable=not progress):
            s, c = window_nll(engine.logits(w), w)
            nll += s
            n += c
        engine.model.ffn = ffn
        perplexity[key] = math.exp(nll / n)
        run_selected[key] = ffn.selected_fraction().tolist()

    layers = []
    pmeta = predictors.meta if predictors is not None else {}
    for l, (tp, sel, act, total) in enumerate(scorer.counts):
        entry = {"layer": l, "active_fraction": act / total if total else None}
        if predictors is not None and total:
            kept, mag = scorer.mags[l]
            entry.update(recall=tp / act if act else 1.0, precision=tp / sel if sel else 1.0,
                         magnitude_recall=kept / mag if mag else 1.0,
                         selected_fraction=sel / total, rank=predictors.ranks()[l], size=predictors.describe(l))
        else:
            entry.update(recall=None, precision=None, magnitude_recall=None, selected_fraction=None)
        if "reference" in run_selected:
            entry["reference_selected_fraction_in_run"] = run_selected["reference"][l]
        if "predictor" in run_selected:
            entry["predictor_selected_fraction_in_run"] = run_selected["predictor"][l]
        layers.append(entry)

    def win_table(acc):
        return [{"k": k + 1, "held_fraction": acc[k, 0] / acc[k, 2], "new_fraction": acc[k, 1] / acc[k, 2]}
                for k in range(MAX_K) if acc[k, 2] > 0]

    from llmflash.tools.train_predictors import model_bytes_f16

    model_bytes = model_bytes_f16(engine.dir)

    def mean(key):
        vals = [e[key] for e in layers if e.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    dense = perplexity["dense"]
    return {
        "model": str(engine.dir.path),
        "activation": engine.config.hidden_act,
        "text": str(Path(text).resolve()),
        "tokens": sum(len(w) for w in windows),
        "windows": len(windows),
        "window": len(windows[0]),
        "perplexity": perplexity,
        "perplexity_increase": {k: (v / dense - 1.0 if v is not None and dense else None)
                                for k, v in perplexity.items() if k != "dense"},
        "mean": {k: mean(k) for k in ("recall", "precision", "magnitude_recall", "selected_fraction",
                                      "active_fraction")},
        "layers": layers,
        "window_stats": {"predictor": win_table(scorer.win["predictor"]) if predictors is not None else [],
                         "active": win_table(scorer.win["active"])},
        "predictors": None if predictors is None else {
            "kind": predictors.kind, "ranks": predictors.ranks(), "bits": pmeta.get("bits"),
            "stored_bytes": predictors.stored_nbytes(),
            "resident_bytes": predictors.nbytes(), "model_bytes": model_bytes,
            "size_fraction": predictors.stored_nbytes() / model_bytes,
            "mode": pmeta.get("mode") if budget is None else f"budget {budget}",
            "criterion": pmeta.get("criterion")},
        "sparsity": None if relu or thresholds is None else SparsityStore(engine.dir).meta(STATS_FILE)["sparsity"],
    }


def format_table(r: dict) -> str:
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    ppl = r["perplexity"]
    lines = [f"{r['model']} ({r['activation']}), {r['tokens']} tokens in {r['windows']} windows of {r['text']}"]
    lines.append("perplexity: dense {}  reference {} ({})  predictor {} ({})".format(
        f(ppl["dense"], "{:.3f}"), f(ppl["reference"], "{:.3f}"),
        f(r["perplexity_increase"].get("reference"), "{:+.1%}"), f(ppl["predictor"], "{:.3f}"),
        f(r["perplexity_increase"].get("predictor"), "{:+.1%}")))
    if r["predictors"]:
        p = r["predictors"]
        lines.append(f"predictors: {p['stored_bytes'] / 2**20:.2f} MiB stored = {p['size_fraction']:.2%} of the model "
                     f"({p['model_bytes'] / 2**20:.1f} MiB), mode {p['mode']}")
    lines.append(f"{'layer':>5} {'size':>6} {'recall':>7} {'mag.rec':>7} {'precis.':>7} {'selected':>8} {'active':>7}")
    for e in r["layers"]:
        lines.append(f"{e['layer']:>5} {e.get('size', '-')!s:>6} {f(e['recall']):>7} {f(e['magnitude_recall']):>7} "
                     f"{f(e['precision']):>7} {f(e['selected_fraction']):>8} {f(e['active_fraction']):>7}")
    m = r["mean"]
    lines.append(f"{'mean':>5} {'':>6} {f(m['recall']):>7} {f(m['magnitude_recall']):>7} {f(m['precision']):>7} "
                 f"{f(m['selected_fraction']):>8} {f(m['active_fraction']):>7}")
    for name, rows in r["window_stats"].items():
        if rows:
            lines.append(f"window ({name} sets), fraction of FFN neurons: k " + " ".join(f"{x['k']:>6}" for x in rows))
            lines.append("  held " + " ".join(f"{x['held_fraction']:>6.3f}" for x in rows))
            lines.append("  new per token " + " ".join(f"{x['new_fraction']:>6.3f}" for x in rows))
    return "\n".join(lines)


def plot(r: dict, path: Path | str) -> None:
    from llmflash.errors import LLMFlashError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LLMFlashError("--plot needs matplotlib: pip install matplotlib") from None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [e["layer"] for e in r["layers"]]
    for key in ("recall", "magnitude_recall", "precision", "selected_fraction", "active_fraction"):
        ys = [e[key] for e in r["layers"]]
        if any(y is not None for y in ys):
            a1.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=key)
    a1.set_xlabel("layer")
    a1.set_ylim(0, 1.02)
    a1.set_title("predictor per layer")
    a1.legend()
    for name, style in (("predictor", "-"), ("active", "--")):
        rows = r["window_stats"][name]
        if rows:
            ks = [x["k"] for x in rows]
            a2.plot(ks, [x["held_fraction"] for x in rows], style, marker="o", label=f"held ({name})")
            a2.plot(ks, [x["new_fraction"] for x in rows], style, marker="s", label=f"new per token ({name})")
    a2.set_xlabel("window k (tokens)")
    a2.set_ylabel("fraction of FFN neurons")
    a2.set_title("windowing")
    a2.legend()
    fig.suptitle(f"{Path(r['model']).name}: ppl dense {r['perplexity']['dense'] or float('nan'):.2f}, "
                 f"reference {r['perplexity']['reference'] or float('nan'):.2f}, "
                 f"predictor {r['perplexity']['predictor'] or float('nan'):.2f}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise LLMFlashError(f"cannot write plot {path}: {exc}") from None
    plt.close(fig)
