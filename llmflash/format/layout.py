"""The on-flash model directory: manifest, resident tensors, FFN bundles (bytes in docs/FORMAT.md).

This module is the only place that knows file names and the manifest schema. Opening a directory
checks that every file exists with the size the manifest promises, so a truncated or half-copied
model fails at open with the file's name, not later with garbage logits. Checksums are checked
where the bytes are read anyway (resident tensors at load, a layer's bundles when read whole) and
for everything by `verify()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llmflash.models.config import ModelConfig
from llmflash.errors import LLMFlashError
from llmflash.format import schema
from llmflash.format.integrity import LayerVerifier
from llmflash.format import quantized

FORMAT_NAME = "llmflash"
FORMAT_VERSION = 2  # 2: manifest_sha256 and per-bundle checks (ffn.checks); version 1 is still read
MAX_MANIFEST_BYTES = 64 << 20
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
TOKENIZER_FILE = "tokenizer.json"
ALIGNMENT = 4096
HASH_CHUNK = 8 << 20

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8}
NUMPY_VIEW = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
# Storage dtypes of the weights: the float ones above and the block formats of format/quantized.py
STORAGE_DTYPES = (*DTYPES, *quantized.KINDS)
# Held dtype meaning "FFN rows as stored, block-quantized bytes" (runtime.engine.weight_dtype)
QUANTIZED_ROWS = torch.uint8


def down_scales_name(layer: int) -> str:
    """Resident tensor holding a quantized model's down-projection block scales for `layer`."""
    return f"ffn.layers.{layer}.down_scales"


def down_mins_name(layer: int) -> str:
    """Resident tensor holding an int4m model's down-projection block minimums for `layer`."""
    return f"ffn.layers.{layer}.down_mins"


def down_block_tensors(config, kind: str) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the resident down-projection block scales (and int4m's minimums) a
    quantized model of `config` stores, layer by layer: float16 [hidden, intermediate / 32]."""
    shape = (config.hidden_size, config.intermediate_size // quantized.BLOCK)
    out = []
    for i in range(config.num_layers):
        out.append((down_scales_name(i), shape))
        if quantized.has_mins(kind):
            out.append((down_mins_name(i), shape))
    return out


def down_block_of(name: str) -> tuple[int, bool]:
    """(layer, whether it holds minimums) of a tensor named by down_block_tensors."""
    return int(name.split(".")[2]), name.endswith(".down_mins")


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise LLMFlashError(f"unsupported storage dtype {dtype}")


def sha256_file(path: Path, start: int = 0, length: int | None = None) -> str:
    """Streamed sha256 of a byte range: never holds more than HASH_CHUNK in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length if length is not None else float("inf")
        while remaining > 0:
            chunk = f.read(int(min(HASH_CHUNK, remaining)))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BundlePart:
    """One piece of a neuron's bundle, e.g. its gate row: `length` elements from `offset`."""

    name: str
    offset: int
    length: int


@dataclass(frozen=True)
class BundleLayout:
    """How one neuron's weights sit inside its bundle (all parts share one dtype)."""

    parts: tuple[BundlePart, ...]
    dtype: str

    @property
    def elements(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def quantized(self) -> bool:
        return quantized.is_quantized(self.dtype)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def nbytes(self) -> int:
        """Stored bytes of one bundle (quantized parts: format/quantized.py's byte layout)."""
        if self.quantized:
            return sum(quantized.part_bytes(self.dtype, p.name, p.length) for p in self.parts)
        return self.elements * self.itemsize

    def part_cuts(self) -> tuple[int, ...]:
        """Byte offsets in a bundle where its second and later weight matrices start (gate | up | down;
        fc1 | fc2): where an unbundled layout's requests would split a bundle (bench --reads part).
        Per-neuron biases (one element) ride with the matrix before them."""
        cuts, at = [], 0
        for i, p in enumerate(self.parts):
            if i and p.length > 1:
                cuts.append(at)
            at += quantized.part_bytes(self.dtype, p.name, p.length) if self.quantized else p.length * self.itemsize
        return tuple(cuts)

    def part(self, name: str) -> BundlePart | None:
        for p in self.parts:
            if p.name == name:
                return p
        return None

    def to_dict(self) -> dict:
        return {
            "dtype": self.dtype,
            "elements": self.elements,
            "bytes": self.nbytes,
            "parts": [{"name": p.name, "offset": p.offset, "length": p.length} for p in self.parts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BundleLayout":
        return cls(tuple(BundlePart(**p) for p in d["parts"]), d["dtype"])


def bundle_layout_for(config: ModelConfig, dtype: str) -> BundleLayout:
    """Weights first (gate row, up row, down column), then the per-neuron biases."""
    d = config.hidden_size
    if quantized.is_quantized(dtype):
        quantized.check_width(d, "hidden_size")
        quantized.check_width(config.intermediate_size, "intermediate_size")
    names = ["gate", "up", "down"] if config.gated else ["up", "down"]
    parts, offset = [], 0
    for name in names:
        parts.append(BundlePart(name, offset, d))
        offset += d
    if config.mlp_bias:
        for name in (["gate_bias", "up_bias"] if config.gated else ["up_bias"]):
            parts.append(BundlePart(name, offset, 1))
            offset += 1
    return BundleLayout(tuple(parts), dtype)


@dataclass(frozen=True)
class LayerRegion:
    """Where one layer's bundles live in the FFN file. Slot j holds neuron order[j]."""

    offset: int
    neurons: int
    nbytes: int
    sha256: str
    order: tuple[int, ...] | None = None
    hot: tuple[int, ...] | None = None  # hottest neuron ids, most frequent first (reorder)
    window_union: tuple[float, ...] | None = None  # mean union size for windows 1..8 (reorder)

    def permutation(self) -> np.ndarray:
        if self.order is None:
            return np.arange(self.neurons, dtype=np.int64)
        return np.asarray(self.order, dtype=np.int64)


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


class FlashModelDir:
    """A converted model directory, opened and checked for completeness."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.exists():
            raise LLMFlashError(f"not an llmflash model directory: {self.path} does not exist")
        if not self.path.is_dir():
            hint = (f"; a {self.path.suffix} file is a source: `llmflash convert {self.path} DIR` first"
                    if self.path.suffix.lower() in (".gguf", ".safetensors") else "")
            raise LLMFlashError(f"not an llmflash model directory: {self.path} is a file, not a directory{hint}")
        if not manifest_path.exists():
            hint = " (an unfinished conversion?)" if ".tmp" in self.path.name else ""
            raise LLMFlashError(
                f"not an llmflash model directory: no {MANIFEST} in {self.path}{hint}; "
                "create one with `llmflash convert`"
            )
        try:
            raw = manifest_path.read_bytes()
        except OSError as exc:
            raise LLMFlashError(f"cannot read {manifest_path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise LLMFlashError(f"corrupted manifest {manifest_path}: {len(raw)} bytes, more than any "
                                f"model needs ({MAX_MANIFEST_BYTES})")
        self.manifest = schema.parse_manifest(raw, str(manifest_path))
        facts = schema.validate_manifest(self.manifest, self.path, str(manifest_path))
        self.format_version = facts["version"]
        self.config = facts["config"]
        ffn = self.manifest["ffn"]
        self.bundle = BundleLayout.from_dict(ffn["bundle"])
        self.layers = [
            LayerRegion(
                offset=r["offset"],
                neurons=r["neurons"],
                nbytes=r["bytes"],
                sha256=r["sha256"],
                order=tuple(r["order"]) if r.get("order") is not None else None,
                hot=tuple(r["hot"]) if r.get("hot") is not None else None,
                window_union=tuple(r["window_union"]) if r.get("window_union") else None,
            )
            for r in ffn["layers"]
        ]
        self._check_files_present()
        self.layer_verifier = LayerVerifier(self)
        self._down_scales: list[torch.Tensor] | None = None
        self._down_mins: list[torch.Tensor] | None = None
        self.codec = (quantized.BundleCodec(self.bundle, self.config.hidden_size)
                      if self.bundle.quantized else None)

    # -- files ---------------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    def contained(self, name: str, what: str = "file") -> Path:
        """A file of this model by its manifest name, checked to stay inside the directory."""
        return schema.contained_file(self.path, name, what)

    @property
    def resident_path(self) -> Path:
        return self.path / RESIDENT_FILE

    @property
    def ffn_path(self) -> Path:
        return self.path / self.manifest["ffn"].get("file", FFN_FILE)

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.json as the manifest names it (verified by `load_tokenizer_bytes`), or None."""
        name = (self.manifest.get("tokenizer") or {}).get("file")
        return None if name is None else self.path / name

    def read_verified(self, name: str, what: str = "file") -> bytes:
        """A small file read whole and checked against its sha256 in `files`."""
        path = self.contained(name, what)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[name]["sha256"]:
            raise LLMFlashError(f"checksum mismatch: {path}; run `llmflash verify`")
        return data

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def _check_files_present(self) -> None:
        for name, info in self.files.items():
            file = self.contained(name, "files entry")
            size = file.stat().st_size
            if size != info["bytes"]:
                kind = "truncated" if size < info["bytes"] else "oversized"
                raise LLMFlashError(
                    f"{kind} file {file}: {size} bytes, manifest says {info['bytes']}"
                )

    def verify(self, progress: bool = False) -> list[str]:
        """Check every file and every FFN layer against the manifest; return the problems found."""
        problems: list[str] = []
        try:
            self._check_files_present()
        except LLMFlashError as exc:
            return [str(exc)]
        items = list(self.files.items())
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="verify", unit="file")
        for name, info in items:
            if sha256_file(self.path / name) != info["sha256"]:
                problems.append(f"checksum mismatch: {self.path / name}")
        if any(self.ffn_path.name in p for p in problems):
            for i, region in enumerate(self.layers):
                if sha256_file(self.ffn_path, region.offset, region.nbytes) != region.sha256:
                    problems.append(f"checksum mismatch: {self.ffn_path} layer {i} "
                                    f"(bytes {region.offset}..{region.offset + region.nbytes})")
        return problems

    # -- resident part -------------------------------------------------------------------------
    def resident_names(self) -> list[str]:
        with safe_open(str(self.resident_path), framework="pt") as f:
            return list(f.keys())

    def load_resident(self, dtype: torch.dtype | None = torch.float32, verify: bool = True) -> dict[str, torch.Tensor]:
        """All resident tensors, cast to `dtype` (None: each as stored), read once and hashed on the way.

        Matrices stored in the resident block format (uint8 rows of blocks, `resident_blocks`) come
        as stored with dtype None (runtime.quant_matrix holds them), else dequantized to `dtype`.

        The file is read sequentially with plain reads straight into each tensor's memory (no
        mmap), so peak memory is the resident set itself, not file pages plus copies, and the
        checksum costs no second pass over the disk.
        """
        path = self.resident_path
        h = hashlib.sha256()
        out: dict[str, torch.Tensor] = {}
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                raw_len = f.read(8)
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file size {size}")
                header_raw = f.read(header_len)
                h.update(raw_len)
                h.update(header_raw)
                header = json.loads(header_raw)
                entries = schema.check_resident_header(header, size - 8 - header_len, self.config, str(path),
                                                       self.resident_blocks)
                pos = 0
                for name, info in entries:
                    begin, end = info["data_offsets"]
                    if begin != pos:
                        raise ValueError(f"gap before tensor {name}")
                    stored = _ST_DTYPES[info["dtype"]]
                    t = torch.empty(info["shape"], dtype=stored)
                    view = memoryview(t.view(torch.uint8).numpy().reshape(-1)) if t.numel() else memoryview(b"")
                    if len(view) != end - begin or f.readinto(view) != end - begin:
                        raise ValueError(f"tensor {name} is cut short")
                    h.update(view)
                    if dtype is None or stored == dtype:
                        out[name] = t
                    elif stored == torch.uint8:
                        out[name] = self.dequantize_resident(name, t).to(dtype)
                    else:
                        out[name] = t.to(dtype)
                    pos = end
                tail = f.read()
                h.update(tail)
        except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError,
                RecursionError) as exc:
            raise LLMFlashError(f"cannot read {path}: {str(exc)[:200]}") from None
        if verify and h.hexdigest() != self.files[RESIDENT_FILE]["sha256"]:
            raise LLMFlashError(f"checksum mismatch: {path}; run `llmflash verify`")
        return out

    @property
    def resident_blocks(self) -> dict[str, str]:
        """Resident matrices stored in blocks -> their block format (int8/int4/int4m); empty when
        every resident matrix is float (manifest `resident_blocks`)."""
        return dict(self.manifest.get("resident_blocks") or {})

    def dequantize_resident(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """Resident matrix `name` stored in blocks (uint8 [rows, row bytes]) -> float32 [rows, k]."""
        kind = self.resident_blocks[name]
        return quantized.dequantize_blocks(raw, kind, quantized.row_length(kind, raw.shape[1]))

    # -- FFN bundles ---------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """Bundles stored block-quantized (int8 / int4, format/quantized.py)."""
        return self.bundle.quantized

    def set_down_scales(self, weights: dict[str, torch.Tensor]) -> None:
        """Take a quantized model's down-projection scales (and int4m's minimums) out of the
        resident tensors just loaded (runtime.engine.load_weights), as float32 [hidden,
        intermediate / 32] per layer."""
        def take(name: str, shape: tuple) -> torch.Tensor:
            t = weights.pop(name, None)
            if t is None or tuple(t.shape) != shape:
                raise LLMFlashError(f"{self.resident_path}: tensor {name} "
                                    f"{'missing' if t is None else f'has shape {list(t.shape)}'}, a {self.dtype} "
                                    f"model needs {list(shape)}")
            # held neuron-group-major (contiguous [intermediate / 32, hidden]): the scales of any
            # set of neurons are then gathered as whole rows (quantized.BundleCodec.down_rows)
            return t.to(torch.float32).t().contiguous()

        scales, mins = [], []
        for name, shape in down_block_tensors(self.config, self.dtype):
            (mins if down_block_of(name)[1] else scales).append(take(name, shape))
        self._down_scales = scales
        self._down_mins = mins or None

    def down_scales(self, layer: int) -> torch.Tensor:
        """float32 [hidden, intermediate / 32]: the block scales of layer's down projection (a
        transposed view of the [intermediate / 32, hidden] tensor held)."""
        if self._down_scales is None:  # offline tools without an engine: read (and check) once
            self.set_down_scales(self.load_resident(None))
        return self._down_scales[layer].t()

    def down_mins(self, layer: int) -> torch.Tensor | None:
        """An int4m model's down-projection block minimums, as down_scales; None for int8/int4."""
        if not quantized.has_mins(self.dtype):
            return None
        if self._down_mins is None:
            self.set_down_scales(self.load_resident(None))
        return self._down_mins[layer].t()

    def dequantize_rows(self, raw: torch.Tensor | np.ndarray, layer: int, neurons) -> torch.Tensor:
        """Quantized bundle rows (uint8 [n, bundle bytes]) of `neurons` -> float32 [n, elements]."""
        raw = torch.as_tensor(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
        ids = torch.as_tensor(np.asarray(neurons, dtype=np.int64))
        return self.codec.dequantize(raw.reshape(len(ids), -1), ids, self.down_scales(layer), self.down_mins(layer))

    def bundles_from_bytes(self, raw: np.ndarray, layer: int | None = None, neurons=None) -> torch.Tensor:
        """View raw bundle bytes [n, bundle_bytes] as a [n, elements] tensor of the stored dtype.

        Quantized bundles are dequantized to float32 instead, which needs the layer and the neuron
        ids of the rows (the down columns' scales are per neuron group)."""
        if self.quantized:
            return self.dequantize_rows(raw, layer, neurons)
        flat = np.ascontiguousarray(raw).reshape(-1)
        t = torch.from_numpy(flat.view(NUMPY_VIEW[self.bundle.dtype]))
        if self.bundle.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.reshape(-1, self.bundle.elements)

    def read_layer_bundles(self, layer: int, verify: bool = True) -> torch.Tensor:
        """A whole layer's bundles in slot order, [neurons, elements], read with buffered I/O
        (a quantized model's dequantized to float32: what offline tools and instruments want)."""
        raw = self.read_layer_raw(layer, verify)
        if self.quantized:
            return self.dequantize_rows(raw, layer, self.layers[layer].permutation())
        return self.bundles_from_bytes(raw)

    def layer_rows(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """A whole layer's rows held at `dtype`: QUANTIZED_ROWS keeps a quantized model's bytes."""
        if dtype == QUANTIZED_ROWS and self.quantized:
            return torch.from_numpy(self.read_layer_raw(layer))
        return self.read_layer_bundles(layer).to(dtype)

    def read_layer_raw(self, layer: int, verify: bool = True) -> np.ndarray:
        """A whole layer's bundle bytes in slot order, uint8 [neurons, bundle bytes]."""
        region = self.layers[layer]
        raw = np.empty(region.nbytes, dtype=np.uint8)
        with open(self.ffn_path, "rb") as f:
            f.seek(region.offset)
            got = f.readinto(memoryview(raw))
        if got != region.nbytes:
            raise LLMFlashError(f"truncated file {self.ffn_path}: layer {layer} is cut short")
        if verify:
            self.layer_verifier.check(layer, raw)
        return raw.reshape(region.neurons, self.bundle.nbytes)

    def weights_nbytes(self) -> dict[str, int]:
        """Bytes of the stored weights: resident part and FFN bundles (without padding)."""
        ffn = sum(r.nbytes for r in self.layers)
        return {"resident": self.files[RESIDENT_FILE]["bytes"], "ffn": ffn}


def write_manifest(directory: Path, manifest: dict) -> None:
    """manifest.json, sealed with its own checksum, written to a temporary name, fsynced, renamed."""
    directory = Path(directory)
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(schema.manifest_text(manifest))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_model(path: Path | str, progress: bool = False) -> tuple["FlashModelDir | None", list[str]]:
    """`llmflash verify`: (the opened model or None, the problems found).

    A path that is not a model directory at all (missing, a file, no manifest) raises; a model
    whose manifest or files are damaged is reported as problems, like a checksum mismatch.
    """
    path = Path(path)
    if not path.is_dir() or not (path / MANIFEST).exists():
        FlashModelDir(path)  # raises the "not an llmflash model directory" error
    try:
        model = FlashModelDir(path)
    except LLMFlashError as exc:
        return None, [str(exc)]
    return model, model.verify(progress=progress)
