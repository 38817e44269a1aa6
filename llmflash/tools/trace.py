"""Activation traces: record a real model's active neurons, synthesise sets for another shape.

`record`: run a converted model densely over real text and keep, per layer and token, the active
neurons: the exact non-zeros for ReLU / FATReLU, and for SiLU the `density` share with the largest
|silu(gate)*up| of each token (what a magnitude predictor at that density keeps).

`synthesise`: sets for a target model's layer count and width (`--like`, a model directory or a
synth preset) that keep, per layer, the source's

* active fraction per token (mean over tokens of |S_t| / neurons),
* distribution of neuron frequencies (how often each neuron is active; compared as the share of
  all activations held by the hottest 1, 5, 10, 25 and 50 % of neurons),
* window-union curve (mean |S_t u ... u S_t+k-1| / neurons, k = 1..8),

and add no co-activation the source does not have. A source is a recorded trace or a named
published profile (PROFILES).

From a recorded trace, each target layer takes the source layer at the same relative depth; each
target neuron replays the whole on/off series of one source neuron (every source neuron replayed
by floor or ceil of width'/width target neurons, chosen by a random permutation; for a narrower
target, source neurons at evenly spaced frequency ranks), circularly shifted by its own random
offset. A neuron's frequency and its window unions depend only on its own series, which the shift
keeps (up to the one seam), so all three statistics carry over; independent shifts decorrelate
target neurons from each other, so co-activation between different neurons is at most the
source's (it is mostly removed), and copies of one source neuron do not fire together.

From a named profile (no per-neuron data), frequencies are log-normal (quantiles of exp(sigma*z),
scaled to the active fraction, capped at 1) and each neuron is a two-state Markov chain with that
stationary probability and lag-1 autocorrelation rho; sigma and rho are fitted to the published
window figures (PROFILES, fitted values and errors in docs/SYNTHETIC.md). Neurons are independent of
each other.

Ids: target neuron ids are assigned by a random permutation, so the hottest neurons are spread
uniformly over the id space and neighbouring ids (neighbouring bundles on flash) are unrelated:
reads merge only by chance, as on a model whose layout was not reordered (`llmflash reorder`).
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np

from llmflash.models import ModelConfig, config_from_hf
from llmflash.errors import LLMFlashError
from llmflash.format.trace_file import MAX_WINDOW, Trace, pack, window_union

HOT_SHARES = (0.01, 0.05, 0.10, 0.25, 0.50)
DEFAULT_DENSITY = 0.5

# Published figures (the paper) and the frequency spread / persistence fitted to them.
PROFILES: dict[str, dict] = {
    "paper-opt-6.7b": {
        # OPT-6.7B: 3.3 % truly active per token; the predictor selects 10.3 %; a window of 5
        # holds 24 % of the FFN and loads 2.4 % per token. The sets are the predictor's
        # selections, which is what flash mode loads. A window of k holds union(k) and loads
        # union(k+1) - union(k) per token (the neurons of the next token the last k did not use).
        "description": "OPT-6.7B predictor selections (the paper, sections 3-4)",
        "active": 0.103, "truly_active": 0.033,
        "window": {5: 0.24}, "load": {5: 0.024},
        "sigma": 1.70, "rho": 0.23,
    },
    "paper-falcon-7b": {
        # Falcon 7B (relufied), layer 10: window k holds this share of the FFN (the paper, section 4).
        "description": "Falcon-7B layer 10 window curve (the paper, section 4)",
        "active": 0.123,
        "window": {1: 0.123, 2: 0.162, 3: 0.192, 4: 0.218, 5: 0.240, 8: 0.293},
        "load": {1: 0.039, 2: 0.031, 3: 0.026, 4: 0.022, 5: 0.020, 8: 0.015},
        "sigma": 2.25, "rho": 0.21,
    },
}


# -- statistics ------------------------------------------------------------------------------------
def hot_share(freq: np.ndarray, shares=HOT_SHARES) -> list[float]:
    """Share of all activations held by the hottest `share` of neurons, for each share."""
    total = max(float(freq.sum()), 1e-12)
    cum = np.concatenate([[0.0], np.cumsum(np.sort(freq)[::-1])]) / total
    # the Lorenz curve read between ranks, so widths that are not multiples of 100 compare fairly
    return [float(np.interp(s * len(freq), np.arange(len(cum)), cum)) for s in shares]


def layer_stats(active: np.ndarray) -> dict:
    """Statistics of one layer's bool [tokens, neurons] matrix, as fractions of the neurons."""
    n = active.shape[1]
    freq = active.mean(axis=0)
    return {"active": float(active.sum(axis=1).mean() / n),
            "union": [u / n for u in window_union(active)],
            "hot_share": hot_share(freq)}


def trace_stats(trace: Trace) -> list[dict]:
    return [layer_stats(trace.active(layer)) for layer in range(trace.layers)]


def _chain(p: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(off -> on), P(on -> on)) of two-state chains with stationary p and lag-1 correlation rho,
    rho raised per neuron where a rarely (or almost always) active neuron cannot be that
    anti-persistent (both probabilities must stay in [0, 1])."""
    safe = np.clip(p, 1e-12, 1 - 1e-12)
    r = np.maximum(rho, np.maximum(-safe / (1 - safe), 1 - 1 / safe))
    return np.clip(p * (1 - r), 0, 1), np.clip(p + r * (1 - p), 0, 1)


def profile_union(p: np.ndarray, rho: float, max_window: int = MAX_WINDOW) -> np.ndarray:
    """Expected window-union fractions k = 1..max_window of independent Markov neurons."""
    k = np.arange(1, max_window + 1)
    q = _chain(p, rho)[0][:, None]
    return (1 - (1 - p[:, None]) * (1 - q) ** (k - 1)).mean(axis=0)


def profile_frequencies(active: float, sigma: float, n: int) -> np.ndarray:
    """n neuron frequencies: log-normal quantiles scaled to mean `active`, capped at 1 (sorted)."""
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    w = np.exp(sigma * z)
    c = active / w.mean()
    for _ in range(200):  # the cap removes mass: rescale until the mean is right again
        c *= active / np.minimum(c * w, 1.0).mean()
    return np.minimum(c * w, 1.0)


def profile_stats(profile: dict, n: int = 20000) -> dict:
    """The statistics a named profile implies (expected values, as layer_stats gives them)."""
    p = profile_frequencies(profile["active"], profile["sigma"], n)
    return {"active": float(p.mean()), "union": [float(u) for u in profile_union(p, profile["rho"])],
            "hot_share": hot_share(p)}


def fit_profile(active: float, window: dict[int, float], load: dict[int, float] | None = None) -> tuple:
    """(sigma, rho, worst relative error) of the log-normal/Markov model closest to the figures:
    `window[k]` the share a window of k tokens holds, `load[k]` what it loads per token."""
    best = None
    for sigma in np.linspace(0, 4, 81):
        p = profile_frequencies(active, sigma, 4000)
        for rho in np.linspace(-0.5, 0.95, 146):
            u = profile_union(p, rho, MAX_WINDOW + 1)
            errs = [abs(u[k - 1] / v - 1) for k, v in window.items()]
            errs += [abs((u[k] - u[k - 1]) / v - 1) for k, v in (load or {}).items()]
            if best is None or max(errs) < best[2]:
                best = (float(sigma), float(rho), max(errs))
    return best


# -- record ----------------------------------------------------------------------------------------
def record(model: Path | str, text: Path | str, tokens: int = 1024, density: float = DEFAULT_DENSITY,
           out: Path | str | None = None) -> Trace:
    """Active sets of a real model on real text, token by token."""
    from llmflash.runtime.engine import Engine
    from llmflash.tools.reorder import activation_trace
    from llmflash.tools.text import read_text

    if not 0 < density <= 1:
        raise LLMFlashError(f"--density must be in (0, 1], got {density}")
    if tokens < MAX_WINDOW:
        raise LLMFlashError(f"--tokens must be at least {MAX_WINDOW}")
    engine = Engine(model)
    tok = engine.require_tokenizer()
    ids = tok.encode(read_text(text, max_chars=tokens * 16))[:tokens]
    if len(ids) < MAX_WINDOW:
        raise LLMFlashError(f"{text} has only {len(ids)} tokens; give at least a few hundred")
    active = activation_trace(engine, ids, sparsity=1 - density)
    cfg = engine.config
    exact = cfg.hidden_act in ("relu", "fatrelu")
    trace = Trace.from_active(active, {
        "kind": "recorded", "source": str(Path(model).resolve()), "text": Path(text).name,
        "model_type": cfg.model_type, "hidden_act": cfg.hidden_act,
        "criterion": "nonzero" if exact else f"top {density:g} by |act(gate)*up| per token",
        "density": None if exact else density})
    if out is not None:
        trace.save(out)
    return trace


# -- synthesise ------------------------------------------------------------------------------------
def target_config(like: str | Path) -> ModelConfig:
    """The shape to synthesise for: a converted model directory or a synth preset name."""
    from llmflash.format.layout import FlashModelDir
    from llmflash.tools.synth import PRESETS

    if Path(like).exists():
        return FlashModelDir(like).config
    if str(like) in PRESETS:
        return config_from_hf(PRESETS[str(like)])
    raise LLMFlashError(f"--like {like}: neither a model directory nor a synth preset "
                        f"({', '.join(PRESETS)})")


def _source_neurons(freq: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """Which source neuron each target neuron replays (see the module docstring)."""
    n = len(freq)
    if width >= n:
        reps = np.full(n, width // n)
        reps[rng.permutation(n)[: width - reps.sum()]] += 1
        return np.repeat(np.arange(n), reps)
    ranked = np.argsort(-freq, kind="stable")
    return ranked[((np.arange(width) + 0.5) * n / width).astype(np.int64)]


def _replay(source: np.ndarray, width: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """bool [tokens, width] replaying source columns with independent circular shifts."""
    T = source.shape[0]
    cols = _source_neurons(source.mean(axis=0), width, rng)
    shifts = rng.integers(0, T, size=width)
    t = (np.arange(tokens)[:, None] + shifts[None, :]) % T
    out = source[t, cols[None, :]]
    return out[:, rng.permutation(width)]


def _markov(p: np.ndarray, rho: float, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """bool [tokens, len(p)]: independent two-state chains, stationary p, lag-1 correlation rho."""
    up, stay = _chain(p, rho)
    out = np.empty((tokens, len(p)), dtype=bool)
    state = rng.random(len(p)) < p
    for t in range(tokens):
        out[t] = state
        u = rng.random(len(p))
        state = np.where(state, u < stay, u < up)
    return out


def synthesise(profile: str | Path, like: str | Path, tokens: int = 1024, seed: int = 0,
               out: Path | str | None = None) -> Trace:
    """Active sets for `like`'s shape with the statistics of `profile` (a trace file or a name)."""
    if tokens < MAX_WINDOW:
        raise LLMFlashError(f"--tokens must be at least {MAX_WINDOW}")
    cfg = target_config(like)
    L, N = cfg.num_layers, cfg.intermediate_size
    rng = np.random.default_rng(seed)
    layers = []
    if str(profile) in PROFILES:
        prof = PROFILES[str(profile)]
        base = profile_frequencies(prof["active"], prof["sigma"], N)
        for _ in range(L):  # packed as they come: a 7B trace's bool matrices would take GBs
            layers.append(pack(_markov(base[rng.permutation(N)], prof["rho"], tokens, rng)))
        source = {"profile": str(profile), **{k: v for k, v in prof.items() if k != "description"}}
    elif Path(profile).exists():
        src = Trace.load(profile)
        for layer in range(L):
            s = round(layer * (src.layers - 1) / max(L - 1, 1))
            layers.append(pack(_replay(src.active(s), N, tokens, rng)))
        source = {"trace": str(Path(profile).resolve()), "source_meta": src.meta}
    else:
        raise LLMFlashError(f"--profile {profile}: neither a trace file nor a named profile "
                            f"({', '.join(PROFILES)})")
    trace = Trace.from_packed(layers, N, {"kind": "synthetic", "like": str(like), "model_type": cfg.model_type,
                                          "seed": seed, **source})
    if out is not None:
        trace.save(out)
    return trace


def compare(a: list[dict] | dict, b: list[dict]) -> float:
    """Worst relative difference of the three statistics between a source (per layer, or one
    profile for every layer) and a synthesised trace's layers, mapped by relative depth."""
    worst = 0.0
    for layer, sb in enumerate(b):
        sa = a if isinstance(a, dict) else a[round(layer * (len(a) - 1) / max(len(b) - 1, 1))]
        pairs = [(sa["active"], sb["active"])] + list(zip(sa["union"], sb["union"])) + \
            list(zip(sa["hot_share"], sb["hot_share"]))
        worst = max(worst, max(abs(y / x - 1) for x, y in pairs if x > 0))
    return worst
