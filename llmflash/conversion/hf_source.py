"""Import from a Hugging Face model directory: config.json plus one or many *.safetensors files.

safetensors files are memory-mapped and read one tensor at a time (safe_open), so a 7B checkpoint
is never in RAM at once. Every problem a user can hit (missing shard, truncated file, header that
does not parse) becomes an LLMFlashError naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from llmflash.conversion.source import TokenizerSpec
from llmflash.errors import LLMFlashError

_ST_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def _check_safetensors_file(path: Path) -> dict:
    """Parse the header and check the file holds every byte the header promises.

    safetensors itself would fail later with a generic message (or a SIGBUS on mmap of a short
    file); checking up front turns a truncated download into a clear error.
    """
    if not path.exists():
        raise LLMFlashError(f"missing safetensors file: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LLMFlashError(f"corrupted safetensors file {path}: {exc}") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            n = 1
            for dim in info["shape"]:
                n *= dim
            if stop - begin != n * _ST_DTYPE_SIZES.get(info["dtype"], 0) and info["dtype"] in _ST_DTYPE_SIZES:
                raise ValueError(f"tensor {name} has {stop - begin} bytes for shape {info['shape']}")
        except (KeyError, TypeError) as exc:
            raise LLMFlashError(f"corrupted safetensors file {path}: bad entry for {name}: {exc}") from None
        except ValueError as exc:
            raise LLMFlashError(f"corrupted safetensors file {path}: {exc}") from None
        end = max(end, stop)
    if 8 + header_len + end > size:
        raise LLMFlashError(
            f"truncated safetensors file {path}: header promises {8 + header_len + end} bytes, "
            f"file has {size}"
        )
    return header


class HFSource:
    """A transformers checkpoint directory (sharded with model.safetensors.index.json or not)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise LLMFlashError(f"not a model directory: {self.path}")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise LLMFlashError(f"missing config.json in {self.path}")
        try:
            self._config = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise LLMFlashError(f"config.json does not parse: {cfg}: {exc}") from None
        self._files = self._shard_files()
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in self._files:
            header = _check_safetensors_file(file)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = file
                    self._shapes[name] = tuple(info["shape"])
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            expected = json.loads(index.read_text()).get("weight_map", {})
            missing = sorted(set(expected) - set(self._where))
            if missing:
                raise LLMFlashError(
                    f"{len(missing)} tensors listed in {index} are in no shard, e.g. {missing[0]} "
                    f"(expected in {self.path / expected[missing[0]]})"
                )
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise LLMFlashError(f"bad shard index {index}: {exc}") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise LLMFlashError(f"missing shard {f} (listed in {index})")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise LLMFlashError(
                f"no *.safetensors files in {self.path} (PyTorch .bin checkpoints are not supported;"
                " convert them to safetensors first)"
            )
        return files

    def hf_config(self) -> dict:
        return dict(self._config)

    def tensor_names(self) -> list[str]:
        return sorted(self._where)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read_tensor(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise LLMFlashError(f"tensor {name} not found in {self.path}")
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise LLMFlashError(f"cannot open safetensors file {file}: {exc}") from None
            self._handles[file] = handle
        return handle.get_tensor(name)

    def tokenizer(self) -> TokenizerSpec:
        spec = TokenizerSpec()
        tok_json = self.path / "tokenizer.json"
        if tok_json.exists():
            spec.tokenizer_json = tok_json.read_text()
        tok_cfg_path = self.path / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.exists() else {}
        template = tok_cfg.get("chat_template")
        jinja = self.path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        spec.chat_template = template
        spec.bos_token = _token_text(tok_cfg.get("bos_token"))
        spec.eos_token = _token_text(tok_cfg.get("eos_token"))
        return spec


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
