"""FFN products on block-quantized weights (int8 = Q8_0, int4 = Q4_0, int4m = Q4_1; format/quantized.py).

Two routes, chosen by measurement (docs/FLASH.md, "Quantized models"):

* **Whole layers (dense mode)**: torch's packed int4 CPU kernel (`_weight_int4pack_mm_for_cpu`,
  the one int4 weight-only quantization uses), which multiplies straight from 4-bit codes with one
  scale and zero per group of 32 inputs, w = (q - 8) * scale + zero: a Q4_0 block maps to one group
  exactly (scale d, zero 0), a Q4_1 block too (w = d * q + m: scale d, zero m + 8d).
  A Q8_0 code c is split into two nibbles of c + 128 = 16·hi + lo, laid side by side as a matrix
  twice as wide, [16·d on hi | d on lo, zero 8·d], multiplied by [x | x]: the same d·c, one call.
  The kernel is fast only at bfloat16 (activations, scales and its output are bfloat16; it
  accumulates in float32): measured 0.21 ms against 0.60 ms for the float16 kernel at SmolLM2's
  gate|up (3072 x 576) and 4.1 ms against 22 ms at a 7B down projection; float32 inputs take 8-20x
  longer than float16. Its results are within ~0.3% of the exact product (bfloat16 rounding).
* **Any set of rows (flash's cached and streamed rows, sparse runs, naive, mmap)**: the rows the
  token uses are dequantized exactly (d·q in float32, vectorised over rows, no per-neuron loop) and
  multiplied in float32: the float32 product of the stored weights. No float copy of a layer.
  One token over 4-bit rows runs the same arithmetic in two compiled kernels instead
  (runtime/quant_kernels.py, numba), which read the codes once: 3-4x faster at a 7B layer.

`--dtype float32` (or float16) instead dequantizes everything at load: the exact reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmflash.format.quantized import BLOCK, BundleCodec, block_codes, unpack_codes
from llmflash.runtime import quant_kernels
from llmflash.runtime.ffn import activate


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class BlockMatrix:
    """W [N, K] given as block scales (float32 [N, K/32]), int4m's minimums and code values (int8
    [N, K], as format/quantized.unpack_codes gives them), held in torch's packed int4 layout;
    `__call__(x)` = x @ W.T in float32."""

    def __init__(self, scales: torch.Tensor, codes: torch.Tensor, kind: str, mins: torch.Tensor | None = None):
        n, k = codes.shape
        self.k, self.kind, self.n = k, kind, n
        self.w, self.sz = self._pack(scales, codes, kind, mins)

    @classmethod
    def from_blocks(cls, raw: torch.Tensor, kind: str, k: int, chunk_rows: int = 4096) -> "BlockMatrix":
        """From stored block rows (uint8 [n, row bytes]), packed chunk_rows rows at a time, so
        unpacking a large embedding never holds its codes as int32 all at once. The kernel's layout
        interleaves rows within groups of 64 only, so chunks of a multiple of 64 rows pack to the
        same bytes as the whole (tested). Rows are padded with zeros to the kernel's multiple of 16."""
        if chunk_rows % 64:
            raise ValueError(f"chunk_rows must be a multiple of 64, not {chunk_rows}")
        n = raw.shape[0]
        pad = -n % 16
        if pad:
            raw = torch.cat([raw, torch.zeros(pad, raw.shape[1], dtype=raw.dtype)])
        self = cls.__new__(cls)
        self.k, self.kind, self.n = k, kind, n
        ws, szs = [], []
        for start in range(0, raw.shape[0], chunk_rows):
            scales, mins, codes = block_codes(raw[start:start + chunk_rows], kind, k)
            w, sz = cls._pack(scales, codes, kind, mins)
            ws.append(w)
            szs.append(sz)
        self.w = torch.cat(ws) if len(ws) > 1 else ws[0]
        self.sz = torch.cat(szs, 1).contiguous() if len(szs) > 1 else szs[0]
        return self

    @staticmethod
    def _pack(scales: torch.Tensor, codes: torch.Tensor, kind: str,
              mins: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = codes.shape
        s = scales.to(torch.float32)
        if kind == "int4":
            u = (codes.to(torch.int32) + 8)
            sz = torch.stack([s, torch.zeros_like(s)], -1)  # [N, K/32, 2]
        elif kind == "int4m":
            u = codes.to(torch.int32)  # w = d * q + m = (q - 8) * d + (m + 8d)
            sz = torch.stack([s, mins.to(torch.float32) + 8 * s], -1)
        else:
            u8 = codes.to(torch.int32) + 128
            u = torch.cat([u8 >> 4, u8 & 15], 1)  # [N, 2K]: hi nibbles, then lo nibbles
            sz = torch.cat([torch.stack([16 * s, torch.zeros_like(s)], -1),
                            torch.stack([s, 8 * s], -1)], 1)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        return w, sz.transpose(0, 1).to(torch.bfloat16).contiguous()  # [groups, N, 2]

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + self.sz.numel() * self.sz.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(-1, self.k).to(torch.bfloat16)
        if self.kind == "int8":
            xb = torch.cat([xb, xb], 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), self.w, BLOCK, self.sz)
        if y.shape[-1] != self.n:  # rows padded to a multiple of 16 (from_blocks)
            y = y[:, :self.n]
        return y.to(torch.float32).reshape(*x.shape[:-1], -1)


class QuantDenseLayer:
    """One FFN layer held quantized for dense mode: gate|up as one BlockMatrix [2n, K], down as one
    [K, n] (blocks along the intermediate axis, as stored in the down scales), biases float32.

    `raw` is the layer's bundles (uint8 [n, bundle bytes]) in neuron order."""

    def __init__(self, raw: torch.Tensor, codec: BundleCodec, down_scales: torch.Tensor,
                 act: str, threshold: float, down_mins: torch.Tensor | None = None):
        k, kind = codec.k, codec.kind
        self.act, self.threshold = act, threshold
        self.gated = "gate" in codec.spans
        rows = torch.cat([raw[:, codec.spans[p]] for p in (("gate", "up") if self.gated else ("up",))])
        self.gu = BlockMatrix.from_blocks(rows, kind, k)  # the gate rows, then the up rows
        down = unpack_codes(raw[:, codec.spans["down"]], kind, k)  # [n, K]
        self.down = BlockMatrix(down_scales, down.t().contiguous(), kind, down_mins)  # W [K, n]
        biases = [codec.bias(raw, b) for b in ("gate_bias", "up_bias") if b in codec.spans]
        self.bias = torch.cat(biases).to(torch.float32) if biases else None

    @property
    def nbytes(self) -> int:
        return self.gu.nbytes + self.down.nbytes + (0 if self.bias is None else self.bias.numel() * 4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gu(x)
        if self.bias is not None:
            y = y + self.bias
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            h = activate(gate, self.act, self.threshold) * up
        else:
            h = activate(y, self.act, self.threshold)
        return self.down(h)


def quant_rows_ffn(x: torch.Tensor, raw: torch.Tensor, ids: torch.Tensor, codec: BundleCodec,
                   down_scales: torch.Tensor, act: str, threshold: float = 0.0,
                   down_mins: torch.Tensor | None = None) -> torch.Tensor:
    """FFN over quantized bundle rows `raw` (uint8 [n, bundle bytes]) of neurons `ids`: each part
    of these rows only is dequantized exactly to a contiguous float32 matrix and multiplied in
    float32 (no bundle-layout copy in between: 72 against 128 ms for 1690 OPT-6.7B rows)."""
    if raw.shape[0] == 0:
        return torch.zeros_like(x)
    if quant_kernels.usable(codec, x):
        return quant_kernels.rows_ffn(x, raw, ids, codec, down_scales, act, threshold, down_mins)
    up = F.linear(x, codec.block_rows(raw, "up"), codec.bias(raw, "up_bias"))
    if "gate" in codec.spans:
        gate = F.linear(x, codec.block_rows(raw, "gate"), codec.bias(raw, "gate_bias"))
        h = activate(gate, act, threshold) * up
    else:
        h = activate(up, act, threshold)
    return h @ codec.down_rows(raw, ids, down_scales, down_mins)
