"""GPTQ (Frantar et al. 2022) for the quant predictors: per-row steps, then columns quantized in
decreasing order of the input second moment with the rounding error pushed onto the rest.
The packed format it produces is read at run time by llmflash.runtime.lowbit."""

from __future__ import annotations

import torch

STEP_GRID = torch.linspace(0.5, 3.5, 13)


def row_steps(W: torch.Tensor, bits: int, levels: int | None = None) -> torch.Tensor:
    """Per-row step [N] of the uniform symmetric grid with the least round-to-nearest error."""
    L = levels or 2 ** bits
    mean_abs = W.abs().mean(1, keepdim=True).clamp_min(1e-12)
    best, best_err = None, None
    for f in STEP_GRID.tolist():
        step = mean_abs * (f / (L / 2))
        err = ((_dequant(_codes(W, step, L), step, L) - W) ** 2).sum(1, keepdim=True)
        if best is None:
            best, best_err = step, err
        else:
            better = err < best_err
            best = torch.where(better, step, best)
            best_err = torch.minimum(err, best_err)
    return best.reshape(-1)


def _codes(w: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest of `levels` levels: at half-integer steps for an even count, at integers (0
    included) for an odd one."""
    return (torch.floor(w / step + (levels % 2) / 2) + levels // 2).clamp(0, levels - 1)


def _dequant(c: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    return (c - (levels - 1) / 2) * step


def damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, float32: what GPTQ pushes each column's error
    through. Damping starts at `damp` x the mean diagonal and grows tenfold while H + damping is not
    positive definite (identity after six tries: plain rounding)."""
    mean_diag = float(torch.diag(H).mean())
    for attempt in range(6):
        try:
            Hd = H + (damp * 10 ** attempt) * mean_diag * torch.eye(H.shape[0], dtype=H.dtype)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True).float()
        except RuntimeError:  # not positive definite: more damping
            continue
    return torch.eye(H.shape[0], dtype=torch.float32)  # pragma: no cover - H is a damped Gram matrix


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, damp: float = 0.01,
         act_order: bool = True, levels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W [N, d] against inputs with second moment H [d, d]: (codes uint8 [N, d], step [N]).

    Q = (codes - (L - 1) / 2) * step[:, None] approximates W so that Q x ~ W x for the inputs, with
    L = 2^bits levels, or `levels` (any count, e.g. 3 or 5, which the packing here does not store;
    experiments/silu_predictor_study.py compares them).
    """
    W = W.float().clone()
    N, d = W.shape
    L = levels or 2 ** bits
    step = row_steps(W, bits, L)
    H = H.double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d)
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv = damped_inverse_cholesky(H, damp)
    codes = torch.zeros(N, d)
    s = step[:, None]
    block = 64
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        Wb = W[:, i0:i1].clone()
        Eb = torch.zeros_like(Wb)
        Hb = Hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            w = Wb[:, j:j + 1]
            c = _codes(w, s, L)
            codes[:, i0 + j] = c[:, 0]
            e = (w - _dequant(c, s, L)) / Hb[j, j]
            Wb[:, j + 1:] -= e * Hb[j, j + 1:][None, :]
            Eb[:, j:j + 1] = e
        W[:, i1:] -= Eb @ Hinv[i0:i1, i1:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out.to(torch.uint8), step


