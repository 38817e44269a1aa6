"""Checks on the bytes the runtime reads, at a cost that stays small next to a token.

Two granularities (docs/INTEGRITY.md has the policy and the measured cost):

* **Whole layers** (dense load, naive, hybrid, mmap, flash's prompt pass) are checked the first
  time a process reads them (`LayerVerifier`): bundle by bundle against the digests below where
  the model has them, else against the layer's sha256 in the manifest; the bytes on disk do not
  change under a running model, so later reads of the same layer are trusted unless
  `LLMFLASH_VERIFY_READS=all`.
* **Scattered bundles** (flash decode reads) are checked one by one against a per-bundle xxh3-64
  digest stored beside the bundles (`ffn.checks` in the manifest: a file of little-endian uint64,
  one per slot, layer after layer), on every read. `LLMFLASH_VERIFY_READS=0` turns this off
  (for measuring its cost); models converted before the checks file existed (format version 1)
  have no per-bundle digests and their scattered reads are not checked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from llmflash.errors import LLMFlashError

ALGORITHM = "xxh3_64"
ENV = "LLMFLASH_VERIFY_READS"


def verify_mode() -> str:
    """'bundles' (default), 'all' (also re-check whole layers on every read) or 'off'."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "off", "no", "false"):
        return "off"
    if value == "all":
        return "all"
    return "bundles"


def _xxh3():
    try:
        import xxhash
    except ImportError:  # pragma: no cover - a core dependency
        raise LLMFlashError("the xxhash package is missing: pip install xxhash") from None
    return xxhash.xxh3_64_intdigest


def bundle_digests(rows: np.ndarray) -> np.ndarray:
    """xxh3-64 of each row of a uint8 [n, bundle_bytes] array, as uint64 [n]."""
    h = _xxh3()
    return np.fromiter((h(r) for r in rows), dtype=np.uint64, count=len(rows))


def checks_name(ffn_name: str) -> str:
    stem = ffn_name[:-4] if ffn_name.endswith(".bin") else ffn_name
    return f"{stem}.xxh3"


def write_bundle_checks(directory: Path, ffn_name: str, regions: list[dict], bundle_bytes: int,
                        name: str | None = None) -> tuple[str, dict, dict]:
    """Read the written bundle file back layer by layer and store each bundle's digest.

    Returns (file name, its `files` entry, the manifest's `ffn.checks` entry).
    """
    digests = []
    with open(Path(directory) / ffn_name, "rb") as src:
        for r in regions:
            src.seek(r["offset"])
            raw = np.frombuffer(src.read(r["bytes"]), dtype=np.uint8)
            if raw.size != r["bytes"]:
                raise LLMFlashError(f"{Path(directory) / ffn_name} is shorter than its layer table")
            digests.append(bundle_digests(raw.reshape(-1, bundle_bytes)))
    return write_checks(directory, name or checks_name(ffn_name), digests)


def write_checks(directory: Path, name: str, digests: list[np.ndarray]) -> tuple[str, dict, dict]:
    """Store per-bundle digests (slot order, layer after layer) as the checks file `name`.

    Returns (file name, its `files` entry, the manifest's `ffn.checks` entry)."""
    data = np.concatenate(digests).astype("<u8").tobytes() if digests else b""
    with open(Path(directory) / name, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, \
        {"file": name, "algorithm": ALGORITHM}


class BundleChecks:
    """Per-bundle digests of one model, held in DRAM (8 bytes per neuron), checked per read."""

    def __init__(self, table: np.ndarray, ffn_path: Path, permutations: list[np.ndarray]):
        self.table = table  # [layers, neurons] uint64, by slot
        self.ffn_path = ffn_path
        self.permutations = permutations
        self.hash = _xxh3()

    @classmethod
    def load(cls, model_dir) -> "BundleChecks | None":
        """The model's checks, sha256-verified, or None (no checks file, or checks turned off)."""
        checks = model_dir.manifest["ffn"].get("checks")
        if checks is None or verify_mode() == "off":
            return None
        path = model_dir.contained(checks["file"], "ffn.checks.file")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != model_dir.files[checks["file"]]["sha256"]:
            raise LLMFlashError(f"checksum mismatch: {path}; run `llmflash verify`")
        cfg = model_dir.config
        table = np.frombuffer(data, dtype="<u8").reshape(cfg.num_layers, cfg.intermediate_size)
        return cls(table, model_dir.ffn_path, [r.permutation() for r in model_dir.layers])

    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def verify(self, layer: int, slots: np.ndarray, raw: np.ndarray) -> None:
        """raw: uint8 [len(slots), bundle_bytes], the bundles at `slots` of `layer`."""
        expected = self.table[layer]
        h = self.hash
        for i, slot in enumerate(np.asarray(slots).tolist()):
            if h(raw[i]) != expected[slot]:
                raise LLMFlashError(
                    f"checksum mismatch: {self.ffn_path} layer {layer}, bundle slot {slot} "
                    f"(neuron {int(self.permutations[layer][slot])}); run `llmflash verify`")


class LayerVerifier:
    """Whole layers checked once per layer and process by default: against the per-bundle digests
    where the model has them (xxh3, 3-5x faster than sha256), else against the layer's sha256."""

    _UNLOADED = object()

    def __init__(self, model_dir):
        self.dir = model_dir
        self.done: set[int] = set()
        self.every_read = verify_mode() == "all"
        self._checks = self._UNLOADED

    def needed(self, layer: int) -> bool:
        return self.every_read or layer not in self.done

    def bundle_checks(self) -> "BundleChecks | None":
        if self._checks is self._UNLOADED:
            self._checks = BundleChecks.load(self.dir)
        return self._checks

    def check(self, layer: int, raw) -> None:
        """raw: the layer's bytes (any contiguous buffer, exactly the layer's region)."""
        data = memoryview(raw).cast("B")
        checks = self.bundle_checks()
        if checks is None:
            self.finish(layer, hashlib.sha256(data).hexdigest())
            return
        rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, self.dir.bundle.nbytes)
        checks.verify(layer, np.arange(len(rows)), rows)
        self.done.add(layer)

    def finish(self, layer: int, digest: str) -> None:
        if digest != self.dir.layers[layer].sha256:
            raise LLMFlashError(f"checksum mismatch: {self.dir.ffn_path} layer {layer}; run `llmflash verify`")
        self.done.add(layer)
