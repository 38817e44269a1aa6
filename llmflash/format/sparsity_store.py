"""Files the sparsity tools add to a converted model directory, with their own checksummed index.

Everything lives under `MODEL/sparsity/`:

    sparsity/index.json            format, version, the FFN checksum it was made for, and per file:
                                   bytes, sha256 and a small JSON `meta` (thresholds, ranks, ...)
    sparsity/stats.safetensors     calibration: per-layer neuron frequencies and threshold tables
    sparsity/predictors.safetensors low-rank predictors (A, B, bias per layer)

The converter's manifest.json is never touched. Every file is written to a temporary name, fsynced
and renamed; the index is rewritten the same way after the file it describes is in place, so a
crash leaves either the old entry or the new one. At load the sha256 of the file is checked against
the index and the index's FFN checksum against the manifest (a model converted again after
calibration has other weights: its statistics and predictors no longer apply).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FFN_FILE, FlashModelDir, sha256_file
from llmflash.format.schema import contained_dir, contained_file
from llmflash.format.tempfiles import remove_stale

SUBDIR = "sparsity"
INDEX = "index.json"
FORMAT = "llmflash-sparsity"
VERSION = 1
STATS_FILE = "stats.safetensors"
PREDICTORS_FILE = "predictors.safetensors"


def _fsync_write(path: Path, data: bytes) -> None:
    remove_stale(path.parent, f".{path.name}.")  # left by a killed run (format/tempfiles.py)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # full disk, SIGINT/SIGTERM: nothing half-written stays
        tmp.unlink(missing_ok=True)
        raise


class SparsityStore:
    """The `sparsity/` folder of one model directory."""

    def __init__(self, model_dir: FlashModelDir):
        self.model_dir = model_dir
        # a symlink leaving the model directory is refused (format/schema.py)
        self.path = contained_dir(model_dir.path, SUBDIR, "sparsity directory")
        self.index_path = self.path / INDEX
        # the bundle file in use: ffn.bin, or ffn-<sha>.bin after `llmflash reorder`
        self.model_ffn_sha = model_dir.files.get(model_dir.ffn_path.name, {}).get("sha256")

    def remove_leftovers(self) -> list[Path]:
        """Temporary files a killed `calibrate` left (dead processes only; format/tempfiles.py)."""
        removed: list[Path] = []
        for name in (INDEX, STATS_FILE, PREDICTORS_FILE):
            removed += remove_stale(self.path, f".{name}.")
        return removed

    # -- index -----------------------------------------------------------------------------------
    def index(self) -> dict:
        if not self.index_path.exists():
            return {"format": FORMAT, "version": VERSION, "ffn_sha256": self.model_ffn_sha, "files": {}}
        try:
            idx = json.loads(self.index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise LLMFlashError(f"corrupted sparsity index {self.index_path}: {str(exc)[:200]}") from None
        files = idx.get("files") if isinstance(idx, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                and isinstance(e.get("meta", {}), dict) for e in files.values()):
            raise LLMFlashError(f"corrupted sparsity index {self.index_path}: not an object with a files map "
                                "of {bytes, sha256, meta}; run `llmflash calibrate` again")
        if idx.get("format") != FORMAT or idx.get("version") != VERSION:
            raise LLMFlashError(f"{self.index_path} is not a version-{VERSION} llmflash sparsity index; "
                                "run `llmflash calibrate` again")
        if idx.get("ffn_sha256") != self.model_ffn_sha:
            raise LLMFlashError(
                f"{self.index_path} was made for other FFN weights than {self.model_dir.path / FFN_FILE} "
                "(the model was converted again?); run `llmflash calibrate` again")
        return idx

    def rekey(self, old_ffn_sha: str, new_ffn_sha: str) -> bool:
        """Point the index at a rewritten FFN file whose neuron ids did not change (`reorder`).

        Statistics and predictors are indexed by neuron id, so they stay valid when only the order
        of bundles on flash changes. Only an index made for `old_ffn_sha` is touched; returns
        whether there was one. Called after the manifest switch: a crash in between leaves an
        index that is refused with "calibrate again", never one that silently mismatches.
        """
        if not self.index_path.exists():
            return False
        try:
            idx = json.loads(self.index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if idx.get("ffn_sha256") != old_ffn_sha:
            return False
        idx["ffn_sha256"] = new_ffn_sha
        self._write_index(idx)
        return True

    def _write_index(self, idx: dict) -> None:
        self.path.mkdir(exist_ok=True)
        _fsync_write(self.index_path, json.dumps(idx, indent=1).encode())

    def has(self, name: str) -> bool:
        try:
            return name in self.index().get("files", {}) and (self.path / name).exists()
        except LLMFlashError:
            return False

    def meta(self, name: str) -> dict:
        return self._entry(name)["meta"]

    def _entry(self, name: str) -> dict:
        idx = self.index()
        entry = idx.get("files", {}).get(name)
        if entry is None:
            hint = "`llmflash calibrate`" if name == STATS_FILE else "`llmflash calibrate` (predictors)"
            raise LLMFlashError(f"{self.path / name} not found (no entry in {self.index_path}); run {hint}")
        return entry

    # -- files -----------------------------------------------------------------------------------
    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write a safetensors file atomically, then record its checksum and meta in the index."""
        self.path.mkdir(exist_ok=True)
        target = self.path / name
        remove_stale(self.path, f".{name}.")  # left by a killed run (format/tempfiles.py)
        tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:  # full disk, SIGINT/SIGTERM: nothing half-written stays
            tmp.unlink(missing_ok=True)
            raise
        idx = self.index()
        idx["files"][name] = {"bytes": target.stat().st_size, "sha256": sha256_file(target), "meta": meta}
        self._write_index(idx)
        return target

    def read_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and meta of a file, after checking its size and sha256 against the index."""
        entry = self._entry(name)
        file = self.path / name
        if not file.exists():
            raise LLMFlashError(f"missing file {file} (listed in {self.index_path}); run `llmflash calibrate`")
        contained_file(self.path, name, "sparsity file")
        if file.stat().st_size != entry["bytes"]:
            raise LLMFlashError(f"truncated or modified file {file}: {file.stat().st_size} bytes, "
                                f"{self.index_path} says {entry['bytes']}")
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise LLMFlashError(f"checksum mismatch: {file} (sha256 differs from {self.index_path}); "
                                "run `llmflash calibrate` again")
        try:
            from safetensors.torch import load

            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise LLMFlashError(f"cannot read {file}: {exc}") from None
        return tensors, entry["meta"]


__all__ = ["SparsityStore", "STATS_FILE", "PREDICTORS_FILE"]
