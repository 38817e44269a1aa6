"""Block-quantized storage (`int8`, `int4`, `int4m`): the codec and the byte layout of quantized bundles.

The block formats are GGUF's, byte for byte, so a GGUF's Q8_0 / Q4_0 / Q4_1 rows are copied, never
re-rounded (docs/FORMAT.md, "Quantized bundles"):

* `int8` = Q8_0: blocks of 32 weights, each a little-endian float16 scale d and 32 int8 codes q;
  w = d * q (34 bytes a block, 8.5 bits a weight).
* `int4` = Q4_0: blocks of 32 weights, each a float16 scale d and 16 bytes of nibbles: byte j holds
  weight j in its low nibble and weight j + 16 in its high nibble; w = d * (q - 8) (18 bytes a block,
  4.5 bits a weight).
* `int4m` = Q4_1: as Q4_0 with a float16 minimum m after the scale; w = d * q + m (20 bytes a block,
  5 bits a weight). The asymmetric grid fits a block whose weights are not centred on zero, and it
  is what Q4_1 files (SmolLM2's GGUF) and the 4-bit K-quants' 32-weight sub-blocks are made of.

A bundle (one neuron) of a quantized model is one contiguous run of bytes:

    gate row (K/32 blocks) | up row (K/32 blocks) | down column (K codes, no scales) | biases (float32)

with K = hidden size. The down column's scales (and int4m's minimums) are shared by 32 neighbouring
neurons: down_proj is [hidden, intermediate] and is quantized as GGUF quantizes it, in blocks along
the intermediate axis, so the scale of weight (h, n) is d[h, n // 32]. Those scales (float16 [hidden,
intermediate / 32] per layer, 1/16 of a float16 down matrix; int4m: the minimums too) stay resident;
the bundle carries the codes only, packed like a block's codes (4-bit: byte j of each group of 32
holds codes j and j + 16). This is what lets a GGUF's down_proj be kept exactly (its blocks run along
the intermediate axis, so a down *column* has no block of its own) while a bundle stays one read of
~0.27x (int4), ~0.3x (int4m) or ~0.5x (int8) the bytes of a float16 bundle.

Quantization from float follows ggml's reference rounding (the same numbers as
`gguf.quants.quantize`, which writes int4m); everything here is vectorised (numpy for writing,
torch for reading).
"""

from __future__ import annotations

import numpy as np
import torch

from llmflash.errors import LLMFlashError

BLOCK = 32
KINDS = ("int8", "int4", "int4m")
# bytes before a block's codes: a float16 scale (and int4m's float16 minimum)
HEAD_BYTES = {"int8": 2, "int4": 2, "int4m": 4}
BLOCK_BYTES = {"int8": 2 + BLOCK, "int4": 2 + BLOCK // 2, "int4m": 4 + BLOCK // 2}
GGUF_TYPE = {"int8": "Q8_0", "int4": "Q4_0", "int4m": "Q4_1"}
# value = stored code - CODE_OFFSET (the weight is d * value, plus m for int4m)
CODE_OFFSET = {"int8": 0, "int4": 8, "int4m": 0}
BIAS_BYTES = 4  # per-neuron biases of a quantized bundle are float32


def is_quantized(dtype: str) -> bool:
    return dtype in KINDS


def has_mins(kind: str) -> bool:
    """Blocks with a minimum as well as a scale (int4m = Q4_1)."""
    return kind == "int4m"


def check_width(k: int, what: str) -> None:
    """Blocks need the quantized axis to be a multiple of 32."""
    if k % BLOCK:
        raise LLMFlashError(f"{what} is {k}, not a multiple of {BLOCK}: int8/int4/int4m storage quantizes it in "
                            f"blocks of {BLOCK}; convert this model at float16")


def row_bytes(kind: str, k: int) -> int:
    """Bytes of a row of k weights stored as blocks (scales included)."""
    return k // BLOCK * BLOCK_BYTES[kind]


def row_length(kind: str, nbytes: int) -> int:
    """Weights in a row of blocks of `nbytes` bytes (the inverse of row_bytes)."""
    return nbytes // BLOCK_BYTES[kind] * BLOCK


def code_bytes(kind: str, k: int) -> int:
    """Bytes of k codes without scales (a bundle's down column)."""
    return k if kind == "int8" else k // 2


def part_bytes(kind: str, name: str, length: int) -> int:
    """Stored bytes of one bundle part of `length` elements."""
    if name in ("gate", "up"):
        return row_bytes(kind, length)
    if name == "down":
        return code_bytes(kind, length)
    return BIAS_BYTES * length


# ------------------------------------------------------------------ writing (numpy, ggml-exact)

def quantize_rows(w: np.ndarray, kind: str) -> np.ndarray:
    """float [n, k] -> uint8 [n, row_bytes]: GGUF Q8_0 / Q4_0 / Q4_1 blocks, ggml's reference rounding."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    check_width(k, "the row length")
    if kind == "int4m":  # gguf's own Q4_1 quantizer (ggml's reference rounding, numpy)
        import gguf

        return np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)).reshape(
            n, row_bytes(kind, k))
    blocks = w.reshape(-1, BLOCK)
    if kind == "int8":
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        x = blocks * inv
        a = np.abs(x)  # ggml's roundf: halves away from zero
        q = (np.sign(x) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))).astype(np.int8).view(np.uint8)
    elif kind == "int4":
        imax = np.abs(blocks).argmax(axis=-1)[:, None]
        d = np.take_along_axis(blocks, imax, axis=-1) / -8
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, 0, 1 / d)
        q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        q = q[:, :16] | (q[:, 16:] << np.uint8(4))
    else:
        raise ValueError(f"unknown block format {kind}")
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q], axis=1)
    return out.reshape(n, row_bytes(kind, k))


def split_blocks(raw: np.ndarray, kind: str, k: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """uint8 [n, row_bytes] -> (float16 scales [n, k/32], float16 minimums [n, k/32] (int4m) or None,
    packed codes uint8 [n, code_bytes])."""
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // BLOCK, BLOCK_BYTES[kind])
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(n, k // BLOCK)
    mins = (np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(n, k // BLOCK)
            if has_mins(kind) else None)
    codes = np.ascontiguousarray(blocks[..., HEAD_BYTES[kind]:]).reshape(n, code_bytes(kind, k))
    return scales, mins, codes


def unpack_codes_np(packed: np.ndarray, kind: str, k: int) -> np.ndarray:
    """Packed codes [n, code_bytes] -> int8 values [n, k] (int8: q; int4: q - 8; int4m: q)."""
    n = packed.shape[0]
    if kind == "int8":
        return packed.view(np.int8).reshape(n, k)
    g = packed.reshape(n, k // BLOCK, BLOCK // 2)
    q = np.concatenate([g & 0x0F, g >> 4], axis=-1).astype(np.int8) - np.int8(CODE_OFFSET[kind])
    return q.reshape(n, k)


def pack_codes_np(values: np.ndarray, kind: str) -> np.ndarray:
    """int8 values [n, k] (int8: q; int4: q - 8; int4m: q) -> packed codes [n, code_bytes]."""
    n, k = values.shape
    if kind == "int8":
        return np.ascontiguousarray(values.astype(np.int8)).view(np.uint8)
    q = (values.astype(np.int16) + CODE_OFFSET[kind]).astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    return (q[..., :16] | (q[..., 16:] << np.uint8(4))).reshape(n, k // 2)


def blocks_np(scales: np.ndarray, values: np.ndarray, kind: str, mins: np.ndarray | None = None) -> np.ndarray:
    """float16 scales [n, k/32] (and int4m's minimums) and code values [n, k] -> block rows uint8 [n, row_bytes]."""
    n, k = values.shape
    packed = pack_codes_np(values, kind).reshape(n, k // BLOCK, -1)
    head = [np.ascontiguousarray(scales.astype(np.float16)).view(np.uint8).reshape(n, k // BLOCK, 2)]
    if has_mins(kind):
        head.append(np.ascontiguousarray(mins.astype(np.float16)).view(np.uint8).reshape(n, k // BLOCK, 2))
    return np.ascontiguousarray(np.concatenate([*head, packed], axis=2).reshape(n, -1))


def dequantize_rows_np(raw: np.ndarray, kind: str, k: int) -> np.ndarray:
    """uint8 blocks [n, row_bytes] -> float32 [n, k] (d * q (+ m) in float32, as gguf dequantizes)."""
    scales, mins, codes = split_blocks(raw, kind, k)
    v = unpack_codes_np(codes, kind, k).astype(np.float32).reshape(len(raw), k // BLOCK, BLOCK)
    w = v * scales.astype(np.float32)[..., None]
    if mins is not None:
        w += mins.astype(np.float32)[..., None]
    return w.reshape(len(raw), k)


def down_blocks(down: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """down_proj [hidden, n] (float) -> (float16 scales [hidden, n/32], minimums (int4m) or None,
    code values [n, hidden]): quantized in blocks along the intermediate axis (as GGUF does), codes
    transposed to neurons."""
    raw = quantize_rows(down, kind)
    return down_split(raw, kind, down.shape[1])


def down_split(raw: np.ndarray, kind: str, n: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """down_proj as GGUF blocks (uint8 [hidden, row_bytes(n)]) -> (scales [hidden, n/32] float16,
    minimums [hidden, n/32] float16 (int4m) or None, code values [n, hidden] int8): the bytes are
    not re-rounded."""
    scales, mins, packed = split_blocks(raw, kind, n)
    return scales, mins, np.ascontiguousarray(unpack_codes_np(packed, kind, n).T)


def bundle_bytes_np(gate: np.ndarray | None, up: np.ndarray, down_codes: np.ndarray,
                    biases: list[np.ndarray], kind: str) -> np.ndarray:
    """One layer's bundles [n, bundle bytes]: gate and up as block rows (uint8 [n, row_bytes]),
    the down codes (signed [n, hidden]) packed, the per-neuron biases as float32."""
    parts = ([gate] if gate is not None else []) + [up, pack_codes_np(down_codes, kind)]
    parts += [np.asarray(b, dtype=np.float32).reshape(-1, 1).view(np.uint8) for b in biases]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


# ------------------------------------------------------------------ reading (torch, vectorised)

class BundleCodec:
    """Reads quantized bundles: byte spans of each part and dequantization of any set of rows.

    `layout` is the model's BundleLayout (parts in elements, dtype int8/int4); the byte spans follow
    from it (part_bytes). Dequantizing rows of neurons `ids` needs the layer's resident down scales.
    """

    def __init__(self, layout, hidden: int):
        self.kind = layout.dtype
        self.k = hidden
        self.spans: dict[str, slice] = {}
        self.elements: dict[str, slice] = {}
        pos = 0
        for p in layout.parts:
            nb = part_bytes(self.kind, p.name, p.length)
            self.spans[p.name] = slice(pos, pos + nb)
            self.elements[p.name] = slice(p.offset, p.offset + p.length)
            pos += nb
        self.nbytes = pos
        self.width = layout.elements

    def block_rows(self, raw: torch.Tensor, name: str) -> torch.Tensor:
        """float32 [n, K] of the gate or up part of raw bundle rows (uint8 [n, nbytes])."""
        return dequantize_blocks(raw[:, self.spans[name]], self.kind, self.k)

    def down_rows(self, raw: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                  mins: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [n, K] down columns of raw rows of neurons `ids`; scales (and int4m's minimums)
        float [K, n_ffn/32]."""
        codes = unpack_codes(raw[:, self.spans["down"]], self.kind, self.k)
        # rows of the [n_ffn/32, K] scales (a contiguous gather where the caller holds them so,
        # as FlashModelDir does: 5.5 ms against 14 ms for 1690 7B rows, and the product below
        # then runs on two contiguous operands: 6.7 ms against 35)
        groups = torch.div(ids, BLOCK, rounding_mode="floor")
        s = scales.t().index_select(0, groups)  # [n, K]
        w = codes.to(torch.float32).mul_(s)
        return w if mins is None else w.add_(mins.t().index_select(0, groups))

    def bias(self, raw: torch.Tensor, name: str) -> torch.Tensor | None:
        span = self.spans.get(name)
        if span is None:
            return None
        return raw[:, span].contiguous().view(torch.float32).reshape(-1)

    def dequantize(self, raw: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                   mins: torch.Tensor | None = None) -> torch.Tensor:
        """Raw bundle rows -> float32 bundle rows [n, elements] in the float layout."""
        out = torch.empty(raw.shape[0], self.width, dtype=torch.float32)
        for name in self.elements:
            el = self.elements[name]
            if name in ("gate", "up"):
                out[:, el] = self.block_rows(raw, name)
            elif name == "down":
                out[:, el] = self.down_rows(raw, ids, scales, mins)
            else:
                out[:, el] = self.bias(raw, name).reshape(-1, 1)
        return out


def unpack_codes(packed: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """uint8 packed codes [n, code_bytes] -> int8 values [n, k] (torch; as unpack_codes_np)."""
    n = packed.shape[0]
    if kind == "int8":
        return packed.contiguous().view(torch.int8).reshape(n, k)
    g = packed.reshape(n, k // BLOCK, BLOCK // 2)
    q = torch.cat([g & 0x0F, g >> 4], dim=-1).view(torch.int8)
    if CODE_OFFSET[kind]:
        q = q - CODE_OFFSET[kind]
    return q.reshape(n, k)


def dequantize_blocks(raw: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    """uint8 block rows [n, row_bytes] -> float32 [n, k]: d * q (+ m) exactly (float16 d, m widened)."""
    n = raw.shape[0]
    d, m, codes = block_codes(raw, kind, k)
    w = codes.reshape(n, k // BLOCK, BLOCK).to(torch.float32).mul_(d[..., None])
    if m is not None:
        w.add_(m[..., None])
    return w.reshape(n, k)


def block_codes(raw: torch.Tensor, kind: str, k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """uint8 block rows [n, row_bytes] -> (float32 scales [n, k/32], float32 minimums [n, k/32]
    (int4m) or None, int8 code values [n, k])."""
    n = raw.shape[0]
    blocks = raw.reshape(n, k // BLOCK, BLOCK_BYTES[kind])
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(n, k // BLOCK).to(torch.float32)
    m = (blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, k // BLOCK).to(torch.float32)
         if has_mins(kind) else None)
    return d, m, unpack_codes(blocks[..., HEAD_BYTES[kind]:].reshape(n, -1), kind, k)
