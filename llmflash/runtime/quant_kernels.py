"""Compiled kernels (numba) for one token's FFN over 4-bit quantized bundle rows (int4, int4m).

Why: flash decode computes over the rows the token selected, a different set each token, so
torch's packed int4 kernel cannot run on them as stored (its scale groups run along a matrix's
input axis, and packing the rows per token costs as much as dequantizing them). The torch route
(quant_ffn.quant_rows_ffn) dequantizes each used row to float32 and multiplies: five passes over
memory per part. These kernels read the codes once, straight from the bundle bytes:

* `rows_dot`: each row's gate or up part against x, block by block (a block's 32 products summed,
  then times its float16 scale, plus its minimum times the block's sum of x for int4m);
* `down_acc`: the down columns weighted by the activations, accumulated per group of 32 neurons
  (they share a resident scale and minimum per output), each thread on its own slice of outputs.

Measured (experiments/quantized/numba_row_kernels.py, one token over 1690 rows of a 7B layer, two
threads): 14-31 against 50-93 ms, 3.0-3.6x; results equal the torch route's float32 products
within ~3e-6 (the sums are reassociated). numba compiles them on first use (a few seconds, then cached beside this file).
Each output is written by one thread in a fixed order, so results do not depend on timing.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from llmflash.format.quantized import BLOCK_BYTES, CODE_OFFSET, HEAD_BYTES, BundleCodec, row_bytes
from llmflash.runtime.ffn import activate

KINDS = ("int4", "int4m")  # 4-bit blocks; int8 rows take the torch route
ENABLED = True  # False: always the torch route (tests compare the two)


@functools.cache
def _kernels():
    """(rows_dot, down_acc, threads) compiled, or None where numba is missing (the torch route is used)."""
    try:
        import numba
        from numba import njit, prange
    except ImportError:  # pragma: no cover - numba is a dependency
        return None
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)

    @njit(inline="always")
    def half(lo, hi):
        """float16 (little-endian bytes lo, hi) -> float32."""
        u = np.int32(lo) | (np.int32(hi) << 8)
        e = (u >> 10) & 31
        f = u & 1023
        if e == 0:
            v = np.float32(f) * np.float32(5.960464477539063e-08)  # subnormal: f * 2^-24
        elif e == 31:
            v = np.float32(np.inf) if f == 0 else np.float32(np.nan)
        else:
            v = np.float32(1024 + f) * np.float32(math.ldexp(1.0, e - 25))
        return -v if u & 32768 else v

    @njit(parallel=True, cache=True, fastmath=True)
    def rows_dot(x, xs, raw, start, bb, hb, off, out):
        S = raw.shape[0]
        nb = xs.shape[0]
        for n in prange(S):
            acc = np.float32(0.0)
            row = raw[n]
            for b in range(nb):
                base = start + b * bb
                codes = row[base + hb: base + hb + 16]
                xb = x[32 * b: 32 * b + 32]
                s = np.float32(0.0)
                for i in range(16):  # the stored codes; their offset is taken off once below
                    byte = codes[i]
                    s += xb[i] * np.float32(byte & 15) + xb[16 + i] * np.float32(byte >> 4)
                s -= np.float32(off) * xs[b]
                acc += half(row[base], row[base + 1]) * s
                if hb == 4:  # int4m: + m * (sum of the block's x)
                    acc += half(row[base + 2], row[base + 3]) * xs[b]
            out[n] = acc

    @njit(parallel=True, cache=True, fastmath=True)
    def down_acc(a, raw, start, off, order, groups, s, m, parts, y):
        S = order.shape[0]
        nchunk = y.shape[0] // 32
        per = (nchunk + parts - 1) // parts
        for p in prange(parts):
            c0 = p * per
            c1 = min(nchunk, c0 + per)
            w = 32 * (c1 - c0)
            acc = np.zeros(max(w, 1), np.float32)
            i = 0
            while i < S:
                g = groups[order[i]]
                asum = np.float32(0.0)
                acc[:] = 0
                j = i
                while j < S and groups[order[j]] == g:
                    n = order[j]
                    an = a[n]
                    if an != 0:
                        asum += an
                        for c in range(c0, c1):
                            base = start + c * 16
                            o = 32 * (c - c0)
                            for k in range(16):
                                byte = raw[n, base + k]
                                acc[o + k] += an * np.float32((byte & 15) - off)
                                acc[o + 16 + k] += an * np.float32((byte >> 4) - off)
                    j += 1
                if asum != 0:
                    h0 = 32 * c0
                    for h in range(w):
                        y[h0 + h] += s[g, h0 + h] * acc[h]
                    if m.shape[0] > 0:
                        for h in range(w):
                            y[h0 + h] += m[g, h0 + h] * asum
                i = j

    return rows_dot, down_acc, threads


def usable(codec: BundleCodec, x: torch.Tensor) -> bool:
    """One token over 4-bit rows, with numba present."""
    return ENABLED and x.shape[0] == 1 and codec.kind in KINDS and _kernels() is not None


def rows_ffn(x: torch.Tensor, raw: torch.Tensor, ids: torch.Tensor, codec: BundleCodec,
             down_scales: torch.Tensor, act: str, threshold: float,
             down_mins: torch.Tensor | None = None) -> torch.Tensor:
    """quant_ffn.quant_rows_ffn for one token (x [1, K] float32) on 4-bit rows, compiled.

    down_scales / down_mins: [K, n_ffn/32] transposed views of contiguous [n_ffn/32, K] tensors
    (FlashModelDir.down_scales), so their .t() is contiguous and passed as it is."""
    rows_dot, down_acc, threads = _kernels()
    kind, k = codec.kind, codec.k
    rnp = raw.contiguous().numpy()
    xv = x.reshape(-1).to(torch.float32).contiguous().numpy()
    xs = xv.reshape(-1, 32).sum(1)
    bb, hb, off = BLOCK_BYTES[kind], HEAD_BYTES[kind], CODE_OFFSET[kind]

    def part(name: str) -> torch.Tensor:
        out = np.empty(rnp.shape[0], np.float32)
        rows_dot(xv, xs, rnp, codec.spans[name].start, bb, hb, off, out)
        y = torch.from_numpy(out)[None]
        bias = codec.bias(raw, name + "_bias")
        return y if bias is None else y + bias

    up = part("up")
    h = activate(part("gate"), act, threshold) * up if "gate" in codec.spans else activate(up, act, threshold)
    groups = torch.div(ids, 32, rounding_mode="floor").numpy()
    order = np.argsort(groups, kind="stable")
    s = down_scales.t().contiguous().numpy()
    m = down_mins.t().contiguous().numpy() if down_mins is not None else np.zeros((0, 0), np.float32)
    y = np.zeros(k, np.float32)
    parts = max(1, min(threads, k // 32))  # one slice of the outputs per thread
    down_acc(h.reshape(-1).contiguous().numpy(), rnp, codec.spans["down"].start, off, order, groups, s, m, parts, y)
    return torch.from_numpy(y)[None]


def warm(kind: str) -> None:
    """Compile (or load from numba's cache) the kernels before the first token, so that the first
    token's time is the model's, not the compiler's: one call on a tiny block of the same types."""
    if kind not in KINDS or _kernels() is None:
        return
    k = 32
    rows_dot, down_acc, _ = _kernels()
    raw = np.zeros((1, 2 * row_bytes(kind, k) + k // 2), np.uint8)
    x = np.zeros(k, np.float32)
    rows_dot(x, x[:1], raw, 0, BLOCK_BYTES[kind], HEAD_BYTES[kind], CODE_OFFSET[kind], np.zeros(1, np.float32))
    idx = np.zeros(1, np.int64)
    down_acc(np.zeros(1, np.float32), raw, 0, CODE_OFFSET[kind], idx, idx, np.zeros((1, k), np.float32),
             np.zeros((0, 0), np.float32), 1, np.zeros(k, np.float32))
