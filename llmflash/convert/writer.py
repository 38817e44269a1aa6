"""Write a checkpoint into the flash layout, one tensor (or one FFN layer) in memory at a time.

Everything is written into a temporary sibling directory and renamed into place only after the
manifest, the last file, is complete: a conversion killed at any point leaves no directory that
opens as a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmflash import __version__
from llmflash.config import ModelConfig, config_from_hf
from llmflash.convert.source import ModelSource
from llmflash.errors import LLMFlashError
from llmflash.models.names import ffn_tensor_names, normalise_name, resident_tensor_names
from llmflash.format.layout import (
    ALIGNMENT,
    DTYPES,
    FFN_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    RESIDENT_FILE,
    TOKENIZER_FILE,
    FlashModelDir,
    align_up,
    bundle_layout_for,
    write_manifest,
)

_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def open_source(src: Path) -> ModelSource:
    """Pick the importer from what SRC is: a directory (Hugging Face) or a .gguf file."""
    src = Path(src)
    if src.is_dir():
        from llmflash.convert.hf_source import HFSource

        return HFSource(src)
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or src.suffix == ".gguf":
            from llmflash.convert.gguf_source import GGUFSource

            return GGUFSource(src)
        raise LLMFlashError(f"{src} is neither a Hugging Face model directory nor a GGUF file")
    raise LLMFlashError(f"no such file or directory: {src}")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class _HashingWriter:
    """A file opened for writing that hashes what passes through it."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def _resident_dtype(shape: tuple[int, ...], dtype: torch.dtype) -> torch.dtype:
    # 1-D tensors (norm weights, biases) are tiny: keep them in float32 for accuracy.
    return torch.float32 if len(shape) <= 1 else dtype


def _write_resident(
    path: Path, source: ModelSource, names: dict[str, str], dtype: torch.dtype, bar: tqdm
) -> dict:
    """A safetensors file written tensor by tensor (the header is computed from shapes first)."""
    header: dict[str, dict] = {}
    offset = 0
    plan = []
    for ours, theirs in names.items():
        shape = tuple(source.tensor_shape(theirs))
        tdtype = _resident_dtype(shape, dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=tdtype).element_size()
        header[ours] = {"dtype": _ST_NAMES[tdtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        plan.append((ours, theirs, shape, tdtype, nbytes))
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "writer": f"llmflash {__version__}"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    out = _HashingWriter(path)
    out.write(struct.pack("<Q", len(header_bytes)))
    out.write(header_bytes)
    for ours, theirs, shape, tdtype, nbytes in plan:
        t = source.read_tensor(theirs)
        if tuple(t.shape) != shape:
            raise LLMFlashError(f"tensor {theirs} in {source.path} has shape {tuple(t.shape)}, header says {shape}")
        data = _tensor_bytes(t.to(tdtype))
        assert len(data) == nbytes
        out.write(data)
        bar.update(len(data))
        del t, data
    return out.close()


def _layer_bundles(source: ModelSource, config: ModelConfig, layer: int, names: dict[str, str],
                   dtype: torch.dtype) -> torch.Tensor:
    """[neurons, bundle elements] for one layer: gate row | up row | down column | biases."""
    parts = []
    for part, name in ffn_tensor_names(config, layer).items():
        t = source.read_tensor(names[name]).to(dtype)
        if part == "down":
            t = t.t()
        if t.dim() == 1:
            t = t.unsqueeze(1)
        parts.append(t)
    n = config.intermediate_size
    for part, t in zip(ffn_tensor_names(config, layer), parts):
        if t.shape[0] != n:
            raise LLMFlashError(
                f"layer {layer} {part} tensor has {t.shape[0]} neurons, config says {n} ({source.path})"
            )
    return torch.cat(parts, dim=1).contiguous()


def convert(src: Path | str, dst: Path | str, dtype: str = "float16", force: bool = False,
            progress: bool = True) -> FlashModelDir:
    """Convert a Hugging Face directory or GGUF file at SRC into the flash layout at DST."""
    if dtype not in DTYPES:
        raise LLMFlashError(f"unsupported --dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    dst = Path(dst)
    if dst.exists() and not force:
        raise LLMFlashError(f"{dst} already exists; pass --force to replace it")
    source = open_source(Path(src))
    config = config_from_hf(source.hf_config(), where=str(Path(src) / "config.json")
                            if Path(src).is_dir() else str(src))

    # Map our (normalised) names to the checkpoint's spelling, then check nothing is missing.
    names = {normalise_name(n, config): n for n in source.tensor_names()}
    if config.tie_word_embeddings is False and "lm_head.weight" not in names:
        raise LLMFlashError(f"lm_head.weight missing in {source.path} and embeddings are not tied")
    resident = resident_tensor_names(config)
    ffn_names = [n for i in range(config.num_layers) for n in ffn_tensor_names(config, i).values()]
    missing = [n for n in resident + ffn_names if n not in names]
    if missing:
        raise LLMFlashError(
            f"{len(missing)} tensors missing in {source.path}, e.g. {missing[:3]}; the checkpoint is "
            "incomplete or not a supported architecture"
        )

    bundle = bundle_layout_for(config, dtype)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        total = sum(
            int(np.prod(source.tensor_shape(names[n]))) * torch.empty((), dtype=_resident_dtype(
                tuple(source.tensor_shape(names[n])), torch_dtype)).element_size()
            for n in resident
        ) + config.num_layers * config.intermediate_size * bundle.nbytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {Path(src).name}",
                   disable=not progress)
        files: dict[str, dict] = {}
        files[RESIDENT_FILE] = _write_resident(
            tmp / RESIDENT_FILE, source, {n: names[n] for n in resident}, torch_dtype, bar)

        ffn_out = _HashingWriter(tmp / FFN_FILE)
        regions = []
        for layer in range(config.num_layers):
            offset = align_up(ffn_out.size)
            if offset > ffn_out.size:
                ffn_out.write(b"\0" * (offset - ffn_out.size))
            data = _tensor_bytes(_layer_bundles(source, config, layer, names, torch_dtype))
            regions.append({"offset": offset, "neurons": config.intermediate_size,
                            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "order": None})
            ffn_out.write(data)
            bar.update(len(data))
            del data
        pad = align_up(ffn_out.size) - ffn_out.size
        ffn_out.write(b"\0" * pad)
        files[FFN_FILE] = ffn_out.close()
        bar.close()

        tok = source.tokenizer()
        tokenizer_entry: dict = {"file": None, "chat_template": tok.chat_template,
                                 "bos_token": tok.bos_token, "eos_token": tok.eos_token}
        if tok.tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tok.tokenizer_json)
            data = (tmp / TOKENIZER_FILE).read_bytes()
            files[TOKENIZER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            tokenizer_entry["file"] = TOKENIZER_FILE

        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": f"llmflash {__version__}",
            "source": {"path": str(Path(src).resolve()), "kind": "gguf" if Path(src).is_file() else "hf"},
            "dtype": dtype,
            "config": config.to_dict(),
            "files": files,
            "ffn": {"file": FFN_FILE, "alignment": ALIGNMENT, "bundle": bundle.to_dict(),
                    "layers": regions},
            "tokenizer": tokenizer_entry,
            "conversion_seconds": round(time.perf_counter() - started, 3),
        }
        write_manifest(tmp, manifest)
        _fsync_dir(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FlashModelDir(dst)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
