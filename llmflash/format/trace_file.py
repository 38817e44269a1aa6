"""Activation trace files: which FFN neurons are active, per layer and token.

Written by `llmflash trace record` (a real model on real text) and `llmflash trace synth`
(sets synthesised for another model's shape); read by `--sparsity trace:PATH`, which replays
them as the selection. Format (an .npz written by numpy.savez_compressed, no pickles):

    meta   0-d unicode array: JSON {"format": "llmflash-trace", "version": 1, "layers", "neurons",
           "tokens", "kind": "recorded" | "synthetic", "source", ...}
    bits   uint8 [layers, tokens, ceil(neurons / 8)]: the active sets as packed bits,
           numpy.packbits(bitorder="little") of each token's bool row; padding bits are zero.

Packed bits rather than id lists: a fixed size known from the header (so a damaged file is told
from a good one by its shape alone), O(1) access to token t of layer l, and the zip's deflate
shrinks sparse rows to about what id lists would take. Every way a file can be wrong (missing,
not a zip, CRC error, missing or mistyped member, wrong shape, padding bits set) is one
LLMFlashError naming the file.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmflash.errors import LLMFlashError

TRACE_FORMAT = "llmflash-trace"
TRACE_VERSION = 1
MAX_WINDOW = 8  # window sizes k = 1..8 in the statistics


@dataclass
class Trace:
    bits: np.ndarray  # uint8 [layers, tokens, bytes per row]
    neurons: int
    meta: dict

    @property
    def layers(self) -> int:
        return int(self.bits.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.bits.shape[1])

    @classmethod
    def from_active(cls, active: list[np.ndarray], meta: dict) -> "Trace":
        """From per-layer bool [tokens, neurons] matrices (all of the same shape)."""
        shapes = {a.shape for a in active}
        if len(shapes) != 1:
            raise ValueError(f"layers have different shapes: {shapes}")
        (_, neurons), = shapes
        return cls.from_packed([pack(a) for a in active], int(neurons), meta)

    @classmethod
    def from_packed(cls, rows: list[np.ndarray], neurons: int, meta: dict) -> "Trace":
        """From per-layer packed rows (`pack` of a bool [tokens, neurons] matrix)."""
        bits = np.stack(rows)
        return cls(bits, neurons, dict(meta, format=TRACE_FORMAT, version=TRACE_VERSION,
                                       layers=int(bits.shape[0]), neurons=neurons, tokens=int(bits.shape[1])))

    def active(self, layer: int) -> np.ndarray:
        """bool [tokens, neurons] of one layer."""
        return np.unpackbits(self.bits[layer], axis=1, count=self.neurons, bitorder="little").astype(bool)

    def ids(self, layer: int, token: int) -> np.ndarray:
        """Active neuron ids (ascending, int64) of one layer at one token."""
        row = np.unpackbits(self.bits[layer, token], count=self.neurons, bitorder="little")
        return np.flatnonzero(row).astype(np.int64)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        meta = dict(self.meta, format=TRACE_FORMAT, version=TRACE_VERSION, layers=self.layers,
                    neurons=self.neurons, tokens=self.tokens)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:  # a file object: numpy would append .npz to a bare name
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), bits=self.bits)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Trace":
        path = Path(path)

        def bad(problem: str) -> LLMFlashError:
            return LLMFlashError(f"bad trace file {path}: {problem}")

        if not path.is_file():
            raise LLMFlashError(f"trace file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if set(z.files) != {"meta", "bits"}:
                    raise bad(f"members {sorted(z.files)}, expected bits and meta")
                meta = json.loads(str(z["meta"][()]))
                bits = z["bits"]
        except LLMFlashError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, TypeError) as exc:
            raise bad(f"not a readable npz trace ({type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != TRACE_FORMAT:
            raise bad("not an llmflash trace (meta.format)")
        if meta.get("version") != TRACE_VERSION:
            raise bad(f"trace version {meta.get('version')!r}; this llmflash reads version {TRACE_VERSION}")
        try:
            layers, neurons, tokens = (int(meta[k]) for k in ("layers", "neurons", "tokens"))
        except (KeyError, TypeError, ValueError):
            raise bad("meta lacks layers / neurons / tokens") from None
        if min(layers, neurons, tokens) < 1:
            raise bad(f"empty trace ({layers} layers, {neurons} neurons, {tokens} tokens)")
        if bits.dtype != np.uint8 or bits.shape != (layers, tokens, -(-neurons // 8)):
            raise bad(f"bits are {bits.dtype} {bits.shape}, meta says uint8 "
                      f"{(layers, tokens, -(-neurons // 8))}")
        if neurons % 8 and (bits[..., -1] >> (neurons % 8)).any():
            raise bad("padding bits are set (a damaged or foreign file)")
        return cls(bits, neurons, meta)


def pack(active: np.ndarray) -> np.ndarray:
    """bool [tokens, neurons] -> the file's packed rows, uint8 [tokens, ceil(neurons / 8)]."""
    return np.packbits(active.astype(bool, copy=False), axis=1, bitorder="little")


def window_union(active: np.ndarray, max_window: int = MAX_WINDOW) -> list[float]:
    """Mean size, in neurons, of the union of k consecutive tokens' active sets, k = 1..max_window."""
    t = active.shape[0]
    out = []
    union = active.copy()
    for k in range(1, max_window + 1):
        if k > 1:
            union = union[:-1] | active[k - 1:]
        out.append(float(union[: max(t - k + 1, 1)].sum(axis=1).mean()) if t >= k else float("nan"))
    return out
