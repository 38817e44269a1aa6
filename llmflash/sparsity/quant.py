"""Low-bit copies of the gate / up projections, quantized with GPTQ, packed into bytes.

Used by the "quant" predictor kind (predictor.py): a neuron's score is computed from low-bit
estimates of its own gate and up rows, g^ = Q_g x and u^ = Q_u x, so the score |act(g^) * u^| has
the same nonlinear form as the true magnitude |act(g) * u| (a low-rank linear map + sigmoid
cannot express it: |u| is sign-symmetric in x).

Quantization: per output row, symmetric uniform levels (c - (L - 1) / 2) * step, c in 0..L-1,
L = 2^bits, the row's step chosen (grid search) to minimise the row's squared error; then GPTQ
(Frantar et al. 2022): columns are quantized one at a time in decreasing order of the input
second moment and the rounding error of each is pushed onto the columns not yet quantized through
the inverse of H = E[x x^T] of the calibration inputs, so the error of Q x (not of Q itself) is
what is minimised.

Packing: `bits` is split into fields of 4, 2 and 1 bits (3 = 2 + 1); each field is packed
8 / width codes per byte along the input dimension, so a row of d codes takes ceil(d * bits / 8)
bytes (d a multiple of 8). Dequantizing is one table lookup per packed byte and field per call.
"""

from __future__ import annotations

import torch

STEP_GRID = torch.linspace(0.5, 3.5, 13)


def fields(bits: int) -> tuple[int, ...]:
    """Bit widths (4, 2, 1 each at most once, high first) that add up to bits (1..7), or (8,)."""
    if bits == 8:
        return (8,)
    if not 1 <= bits <= 7:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return tuple(w for w in (4, 2, 1) if bits & w)


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
    mean_diag = float(torch.diag(H).mean())
    for attempt in range(6):
        try:
            Hd = H + (damp * 10 ** attempt) * mean_diag * torch.eye(d, dtype=H.dtype)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except RuntimeError:  # not positive definite: more damping
            continue
    else:  # pragma: no cover - H is a damped Gram matrix
        Hinv = torch.eye(d, dtype=H.dtype)
    Hinv = Hinv.float()
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


def pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """uint8 codes [N, d] (values < 2^bits) -> one packed uint8 tensor per field of fields(bits)."""
    N, d = codes.shape
    c = codes.to(torch.int32)
    out, shift = [], bits
    for w in fields(bits):
        shift -= w
        part = (c >> shift) & ((1 << w) - 1)
        per = 8 // w
        pad = (-d) % per
        if pad:
            part = torch.cat([part, torch.zeros(N, pad, dtype=part.dtype)], 1)
        part = part.reshape(N, -1, per)
        shifts = torch.arange(per, dtype=torch.int32) * w
        out.append((part << shifts).sum(-1).to(torch.uint8))
    return out


def unpack(packed: list[torch.Tensor], bits: int, d: int) -> torch.Tensor:
    """Inverse of pack: int32 codes [N, d]."""
    c = None
    for w, p in zip(fields(bits), packed):
        per = 8 // w
        shifts = torch.arange(per, dtype=torch.uint8) * w
        part = ((p[..., None] >> shifts) & ((1 << w) - 1)).reshape(p.shape[0], -1)[:, :d].to(torch.int32)
        c = part if c is None else (c << w) | part
    return c


_LUTS: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}


def _luts(bits: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per field: byte value -> the 8 / width codes it holds, shifted into place, as dtype [256, per]."""
    key = (bits, dtype)
    if key not in _LUTS:
        out, shift, b = [], bits, torch.arange(256)
        for w in fields(bits):
            shift -= w
            per = 8 // w
            out.append((((b[:, None] >> (torch.arange(per) * w)) & ((1 << w) - 1)) << shift).to(dtype))
        _LUTS[key] = out
    return _LUTS[key]


def dequantize(packed: list[torch.Tensor], step: torch.Tensor, bits: int, d: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The low-bit weights [N, d] in dtype (a table lookup per packed byte and field)."""
    w = None
    for lut, p in zip(_luts(bits, dtype), packed):
        v = torch.nn.functional.embedding(p.to(torch.int32), lut).reshape(p.shape[0], -1)[:, :d]
        w = v if w is None else w.add_(v)
    return w.sub_((2 ** bits - 1) / 2).mul_(step.to(dtype)[:, None])


def packed_bytes(n: int, d: int, bits: int) -> int:
    return sum(n * -(-d // (8 // w)) for w in fields(bits))
