"""Arithmetic on weights held at their stored precision, with float32 activations.

Weights stay in DRAM as converted (float16, bfloat16 or float32); activations, the residual
stream, norms, attention and the KV cache are float32. When a weight's dtype differs from the
activations', products are computed by the fastest route measured on this project's CPU
(docs/FLASH.md, "Precision and compute"; AVX-512 with avx512_bf16, no AMX or avx512fp16):

* one token (decode): the activation is rounded to the weight dtype and torch's half-precision
  matrix-vector kernel runs on the weight as stored. That kernel accumulates in float32 and is the
  fastest of everything measured (float16: 14-16.5 GB/s of weights on one core, against 9-10 GB/s
  for float32 weights, which are twice the bytes) *when the weight is contiguous and used in
  dot-product form* (`x @ W.T` with W [out, in] row-major). The other orientation (`h @ W`) ran
  50-300x slower in float16 on earlier torch builds (about 1.3-1.7x slower with torch 2.13, see
  matmul_rows), so callers that can choose store such weights transposed;
* up to ROWWISE_TOKENS tokens: the same kernel once per token;
* more tokens (prompts) or the other orientation: the weight is converted to float32 in chunks
  of `UPCAST_CHUNK_ELEMENTS` (a buffer that stays in the L2 cache, reused) and multiplied in
  float32. float16 matrix-matrix products have no fast kernel here (338 ms for 64 x 4096 x 11008,
  against 108 ms chunked), and the result is the float32 product of the stored values.

With weights in the activations' dtype (a float32 model) every function here is the plain torch
call, so float32 results are bit for bit what they were before weights could be held in half
precision.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# float32 elements converted per chunk (at most 16 MiB, within the 32 MiB L3 cache; allocated only as
# large as the widest use needs): larger chunks mean fewer torch calls, each of which costs a
# thread hand-off, and on a shared 2-core machine a hand-off can wait for a core.
UPCAST_CHUNK_ELEMENTS = 1 << 22
# Up to this many tokens at once, each is multiplied by the one-token half kernel (4 x 12.6 ms
# for 11008 x 4096) rather than through float32 chunks (77 ms for 3 tokens, 509 ms for 64).
ROWWISE_TOKENS = 4

_scratch: list[torch.Tensor] = []  # one reusable float32 buffer per process


def _buffer(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    n = rows * width
    if not _scratch or _scratch[0].numel() < n or _scratch[0].dtype != dtype:
        _scratch[:] = []  # free the old buffer before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            _scratch[:] = [torch.empty(n, dtype=dtype)]
    return _scratch[0][:n].view(rows, width)


def chunk_rows(width: int) -> int:
    """Rows of a [*, width] weight converted per chunk."""
    return max(1, UPCAST_CHUNK_ELEMENTS // max(width, 1))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), x [T, in] at the activation dtype, weight [out, in] at any dtype (or
    an object with its own `linear`, e.g. a matrix held in blocks: runtime/quant_matrix.py); the
    result has x's dtype."""
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x, bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if x.dim() == 2 and x.shape[0] == 1:
        y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    elif x.dim() == 2 and x.shape[0] <= ROWWISE_TOKENS:
        xh = x.to(weight.dtype)
        y = torch.cat([F.linear(xh[i:i + 1], weight) for i in range(x.shape[0])]).to(x.dtype)
    else:
        out, width = weight.shape
        y = x.new_empty(*x.shape[:-1], out)
        step = chunk_rows(width)
        for start in range(0, out, step):
            stop = min(out, start + step)
            buf = _buffer(stop - start, width, x.dtype)
            buf.copy_(weight[start:stop])
            y[..., start:stop] = F.linear(x, buf)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


# Columns per block of a weight whose rows are long (e.g. a 7B down projection transposed,
# [4096, 11008]): the half-precision kernel converts the activation for every output row, and a
# 4 KiB slice of it stays in L1 while a 22-32 KiB one does not (measured 2-3x faster blocked).
SPLIT_COLUMNS = 2048


def split_columns(weight: torch.Tensor, block: int = SPLIT_COLUMNS) -> list[torch.Tensor]:
    """weight [out, in] as contiguous column blocks [out, <=block] (same bytes, no padding)."""
    if weight.shape[1] <= block:
        return [weight.contiguous()]
    return [weight[:, s:s + block].contiguous() for s in range(0, weight.shape[1], block)]


def linear_split(x: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """linear(x, torch.cat(blocks, 1)) from column blocks, partial products summed in x's dtype."""
    y, start = None, 0
    for b in blocks:
        part = linear(x[..., start:start + b.shape[1]], b)
        y = part if y is None else y.add_(part)
        start += b.shape[1]
    return y


@functools.cache
def native_float16() -> bool:
    """Whether this CPU multiplies float16 natively (oneDNN's float16 support), which decides how
    `matmul_rows` multiplies float16 rows."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def matmul_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h @ rows, h [T, n] at the activation dtype, rows [n, d] at any dtype (e.g. the down
    columns of n bundles, a strided view of the bundle rows).

    float16 rows, on a CPU with native float16 arithmetic (oneDNN's float16 support: AVX512-FP16
    or AMX): torch 2.13's half kernel on the rows as they are (h rounded to float16, the result
    rounded to float16, as `linear` does for one token), measured 2-2.9x faster there than the
    float32 chunks below for T = 1..64 (16384 x 4096 bundle columns, one core: 52 against 102 ms at
    T = 1; 2600 cached rows: 5.9 against 13.1 ms); relative error 3e-4, the float16 rounding. A
    result that overflows float16 is recomputed through the chunks. Elsewhere the same kernel is
    scalar: on an AVX2-only EPYC, 2600 cached rows took 164 ms against 18.6 ms for the chunks at
    T = 1, 5.2 s against 35 ms at T = 32 (two threads), so float16 goes through the chunks there.
    Other dtypes (bfloat16 measured slower direct) are converted to float32 chunk by chunk and
    accumulated in float32."""
    if rows.dtype == h.dtype:
        return h @ rows
    if rows.dtype == torch.float16 and native_float16():
        y = (h.to(torch.float16) @ rows).to(h.dtype)
        if bool(torch.isfinite(y).all()):
            return y
    n, width = rows.shape
    y = h.new_zeros(h.shape[0], width)
    step = chunk_rows(width)
    for start in range(0, n, step):
        stop = min(n, start + step)
        buf = _buffer(stop - start, width, h.dtype)
        buf.copy_(rows[start:stop])
        y.addmm_(h[:, start:stop], buf)
    return y


def scratch_bytes() -> int:
    """Bytes of the conversion buffer (part of the runtime's fixed overhead, not the budget)."""
    return sum(t.numel() * t.element_size() for t in _scratch)
