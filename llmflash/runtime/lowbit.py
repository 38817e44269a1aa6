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

def fields(bits: int) -> tuple[int, ...]:
    """Bit widths (4, 2, 1 each at most once, high first) that add up to bits (1..7), or (8,)."""
    if bits == 8:
        return (8,)
    if not 1 <= bits <= 7:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return tuple(w for w in (4, 2, 1) if bits & w)


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
