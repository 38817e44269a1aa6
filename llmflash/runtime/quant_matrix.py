"""Resident matrices held in a block format (int8 = Q8_0, int4 = Q4_0, int4m = Q4_1), for models
converted with `--resident-dtype int8|int4|int4m` (docs/FORMAT.md, "resident.safetensors").

Why: at 7B the resident part (attention, embeddings, head) is most of a 50 % budget at float16
(OPT-6.7B: 4.7 of 6.35 GB), so the FFN cache gets little room however small its bundles are. At
int4 the same matrices are about a quarter of that, and torch's packed int4 kernel multiplies them
faster than the float16 kernel multiplies float16 weights (measured at one token: 0.65 against
1.25 ms for 4096 x 4096, 4.5 against 15 ms for a 32000 x 4096 head).

A matrix plays one or two roles, and holds what each needs:

* products (attention projections, the head, a tied embedding): `linear(x)` = x @ W.T through
  quant_ffn.BlockMatrix (torch's packed int4 layout; bfloat16 activations and scales, float32
  accumulation: results within ~0.3 % of the exact product);
* lookups (token and position embeddings): `m[ids]` dequantizes those rows exactly (d·q (+ m) in
  float32) from the stored blocks.

A tied embedding does both, so it holds both copies (the packed layout cannot give rows back
exactly); `held_bytes` says what that costs, and the memory plan charges it.

The head keeps its stored rows too. The packed kernel writes bfloat16, whose steps at a logit of 25
are 0.125: two leading logits 0.08 apart came out equal on SmolLM2, and greedy decoding took the
wrong one. So the head's products are refined: every logit within HEAD_MARGIN of the largest is
recomputed exactly (d·q (+ m) in float32) from the stored rows, a few dozen rows a token, and the
choice among the leading tokens is the float32 one. The other logits keep the kernel's rounding.
"""

from __future__ import annotations

import torch

from llmflash.format.quantized import BLOCK, dequantize_blocks, row_length


def is_lookup(name: str) -> bool:
    """Embedding tables (token, and OPT's positions) are read by row; every other matrix is a product."""
    return "embed_" in name


# Logits within HEAD_MARGIN_ABS + HEAD_MARGIN_REL * |largest| of the largest are recomputed exactly:
# a generous bound on the packed kernel's error (bfloat16 output, activations and scales: each
# about 0.4 % relative, 0.1 at a logit of 25).
HEAD_MARGIN_ABS = 0.5
HEAD_MARGIN_REL = 0.02
REFINE_CHUNK = 4096  # (token, row) pairs recomputed per pass, to bound the float32 rows made


def roles(name: str, names) -> tuple[bool, bool, bool]:
    """(lookup, product, head) for resident matrix `name` among the model's resident `names`: a
    token embedding is also the head when the model has no lm_head (tied)."""
    lookup = is_lookup(name)
    tied = not any(n.endswith("lm_head.weight") for n in names)
    head = name.endswith("lm_head.weight") or ("embed_tokens" in name and tied)
    product = not lookup or head
    return lookup, product, head


def packed_bytes(kind: str, rows: int, k: int) -> int:
    """Bytes of a [rows, k] matrix in BlockMatrix's packed layout: 4-bit codes (int8: two nibble
    planes, twice as wide) and a bfloat16 scale and zero per group of 32, rows padded to 16."""
    rows += -rows % 16
    width = 2 * k if kind == "int8" else k
    return rows * width // 2 + width // BLOCK * rows * 2 * 2


def held_bytes(kind: str, raw_shape: tuple[int, int], lookup: bool, product: bool, head: bool = False) -> int:
    """DRAM bytes a QuantizedMatrix of stored blocks uint8 `raw_shape` holds for its roles: the
    stored rows for lookups and for the head's refinement, the packed copy for products."""
    rows, nbytes = raw_shape
    k = row_length(kind, nbytes)
    return (rows * nbytes if lookup or head else 0) + (packed_bytes(kind, rows, k) if product else 0)


class QuantizedMatrix:
    """W [rows, k] held as blocks (see the module docstring); float32 in, float32 out."""

    def __init__(self, raw: torch.Tensor, kind: str, lookup: bool, product: bool, head: bool = False):
        from llmflash.runtime.quant_ffn import BlockMatrix

        rows, nbytes = raw.shape
        self.kind = kind
        self.k = row_length(kind, nbytes)
        self.shape = torch.Size((rows, self.k))
        self.dtype = torch.float32  # what rows and products come out as
        self.head = head
        self.raw = raw if lookup or head else None
        self.packed = None
        if product:
            self.packed = BlockMatrix.from_blocks(raw, kind, self.k)

    @property
    def nbytes(self) -> int:
        return ((0 if self.raw is None else self.raw.numel())
                + (0 if self.packed is None else self.packed.nbytes))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), x [..., k] float32."""
        if self.packed is None:
            raise TypeError("this quantized matrix is held for lookups only")
        y = self.packed(x)
        if self.head:
            self._refine(x, y)
        return y if bias is None else y + bias.to(y.dtype)

    def _refine(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Recompute in place, exactly, the products within the head margin of each token's largest."""
        x2, y2 = x.reshape(-1, self.k), y.view(-1, y.shape[-1])
        top = y2.max(dim=-1, keepdim=True).values
        t_idx, r_idx = torch.nonzero(y2 >= top - (HEAD_MARGIN_ABS + HEAD_MARGIN_REL * top.abs()), as_tuple=True)
        for start in range(0, len(t_idx), REFINE_CHUNK):
            t, r = t_idx[start:start + REFINE_CHUNK], r_idx[start:start + REFINE_CHUNK]
            rows, inverse = torch.unique(r, return_inverse=True)
            w = dequantize_blocks(self.raw[rows], self.kind, self.k)
            y2[t, r] = (x2[t].to(torch.float32) * w[inverse]).sum(-1)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` dequantized exactly, float32 [len(ids), k]."""
        if self.raw is None:
            raise TypeError("this quantized matrix is held for products only")
        ids = torch.as_tensor(ids)
        rows = self.raw[ids.reshape(-1)]
        return dequantize_blocks(rows, self.kind, self.k).reshape(*ids.shape, self.k)


def hold(weights: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
    """Replace the stored block rows among resident `weights` (`kinds`: name -> block format) by
    QuantizedMatrix objects in place, one at a time (each packed copy is made before its stored
    rows are freed)."""
    names = list(weights)
    for name, kind in kinds.items():
        weights[name] = QuantizedMatrix(weights[name], kind, *roles(name, names))
