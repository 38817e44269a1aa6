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
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from llmflash import __version__
from llmflash.models import ModelConfig, config_from_hf
from llmflash.conversion.source import ModelSource, TokenizerSpec
from llmflash.errors import LLMFlashError
from llmflash.models import ffn_tensor_names, normalise_name, resident_tensor_names
from llmflash.format.integrity import bundle_digests, checks_name, write_checks
from llmflash.format.tempfiles import remove_stale
from llmflash.format import quantized
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
    down_block_of,
    down_block_tensors,
    write_manifest,
)

_ST_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8"}


def open_source(src: Path) -> ModelSource:
    """Pick the importer from what SRC is: a directory (Hugging Face) or a .gguf file."""
    src = Path(src)
    if src.is_dir():
        from llmflash.conversion.hf_source import HFSource

        return _split_fused(HFSource(src))
    if src.is_file():
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or src.suffix == ".gguf":
            from llmflash.conversion.gguf_source import GGUFSource

            return _split_fused(GGUFSource(src))
        raise LLMFlashError(f"{src} is neither a Hugging Face model directory nor a GGUF file")
    raise LLMFlashError(f"no such file or directory: {src}")


def _split_fused(source: ModelSource) -> ModelSource:
    """Present fused projections (Phi-3's qkv_proj, gate_up_proj) as their parts, when the
    architecture module lists any (`fused_tensors`): convert/fused.py."""
    from llmflash.models import BY_MODEL_TYPE

    hf = source.hf_config()
    fused = getattr(BY_MODEL_TYPE.get(hf.get("model_type")), "fused_tensors", None)
    if fused is None:
        return source
    from llmflash.conversion.fused import SplitFused

    config = config_from_hf(hf, where=str(source.path))
    return SplitFused(source, fused(config), config.num_layers)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _byte_view(data) -> memoryview:
    """Any C-contiguous buffer (bytes, numpy array, CPU tensor) seen as raw bytes."""
    if isinstance(data, torch.Tensor):
        data = _tensor_bytes(data)
    return memoryview(data).cast("B")


class _HashingWriter:
    """A file opened for writing that hashes what passes through it.

    Bytes are gathered into 16 MiB page-aligned buffers that a background thread writes with
    O_DIRECT and hashes, while the caller produces the next ones: the page cache is bypassed
    (buffered writes of many GB crawl through dirty-page throttling here: 163 MB/s against
    1.4 GB/s direct, measured with dd) and hashing overlaps producing. Where O_DIRECT is
    refused (tmpfs) the same thread writes buffered. The tail that is not a multiple of 4096 bytes
    is written after O_DIRECT is switched off.
    """

    BUFFER = 16 << 20

    def __init__(self, path: Path):
        from concurrent.futures import ThreadPoolExecutor

        from llmflash.runtime.reader import aligned_empty

        self.sha = hashlib.sha256()
        self.size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
        except OSError:
            self.fd = os.open(path, flags, 0o644)
        self.buffers = [aligned_empty(self.BUFFER), aligned_empty(self.BUFFER)]
        self.fill = 0  # bytes in the current buffer
        self.pool = ThreadPoolExecutor(1)
        self.pending = None

    def _flush(self, tail: bool = False) -> None:
        buf, n = self.buffers[0], self.fill
        if self.pending is not None:
            self.pending.result()
        self.pending = self.pool.submit(self._write_out, buf[:n], tail)
        self.buffers.reverse()
        self.fill = 0

    def _write_out(self, view: np.ndarray, tail: bool) -> None:
        self.sha.update(view)
        if tail and len(view) % ALIGNMENT:
            import fcntl

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
        mv = memoryview(view)
        while len(mv):
            mv = mv[os.write(self.fd, mv):]

    def write(self, data) -> int:
        view = np.frombuffer(_byte_view(data), dtype=np.uint8)
        done = 0
        while done < len(view):
            k = min(len(view) - done, self.BUFFER - self.fill)
            self.buffers[0][self.fill:self.fill + k] = view[done:done + k]
            self.fill += k
            done += k
            if self.fill == self.BUFFER:
                self._flush()
        self.size += len(view)
        return len(view)

    def close(self) -> dict:
        try:
            self._flush(tail=True)
            self.pending.result()
            os.fsync(self.fd)
        finally:
            self.pool.shutdown()
            os.close(self.fd)
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def check_resident_dtype(resident_dtype: str | None) -> None:
    """Refuse a resident dtype that is none of the float dtypes, the block formats and auto."""
    if (resident_dtype is not None and resident_dtype not in DTYPES and resident_dtype != "auto"
            and not quantized.is_quantized(resident_dtype)):
        raise LLMFlashError(f"unsupported resident dtype {resident_dtype!r}; choose one of "
                            f"{sorted(DTYPES) + list(quantized.KINDS) + ['auto']}")


def resident_format(name: str, resident_dtype: str, kinds: dict[str, str] | None) -> str:
    """The dtype or block format resident matrix `name` is stored at: `resident_dtype`, or under
    "auto" its format in `kinds` (float16 when it has none)."""
    return (kinds or {}).get(name, "float16") if resident_dtype == "auto" else resident_dtype


def resident_storage(name: str, shape: tuple[int, ...], resident_dtype: str,
                     kinds: dict[str, str] | None = None) -> tuple[torch.dtype, tuple]:
    """(stored torch dtype, stored shape) of one resident tensor.

    1-D tensors (norm weights, biases) are tiny: kept in float32 for accuracy. A quantized model's
    down-projection block scales are float16, as in the block format. Matrices are stored at
    `resident_dtype`; a block format (int8/int4/int4m) stores a [rows, k] matrix as uint8 [rows,
    row bytes], each row its k/32 blocks (GGUF's layout), and a matrix whose rows are not whole
    blocks at float16. "auto": each matrix in its block format in `kinds`, float16 if absent.
    """
    resident_dtype = resident_format(name, resident_dtype, kinds)
    if name.startswith("ffn.layers."):
        return torch.float16, tuple(shape)
    if len(shape) <= 1:
        return torch.float32, tuple(shape)
    if quantized.is_quantized(resident_dtype):
        if len(shape) == 2 and shape[1] % quantized.BLOCK == 0:
            return torch.uint8, (shape[0], quantized.row_bytes(resident_dtype, shape[1]))
        return torch.float16, tuple(shape)
    return DTYPES[resident_dtype], tuple(shape)


# What a model's tensors are made of, for write_model_dir: the resident tensors as (name, shape)
# in file order with a function giving each one's bytes in pieces (rows in order) at the dtype it
# is stored in (torch.uint8: rows of blocks of the model's resident block format, see
# resident_storage), and a function giving one FFN layer's bundles in pieces (neurons in order).
ResidentChunks = Callable[[str, tuple, torch.dtype], Iterable]
LayerChunks = Callable[[int], Iterable]


def _stored_plan(plan: list[tuple[str, tuple]], resident_dtype: str,
                 kinds: dict[str, str] | None) -> list[tuple[str, tuple, torch.dtype, tuple, int]]:
    """Each resident tensor as (name, shape, stored dtype, stored shape, bytes): resident_storage,
    priced once for the progress total, the manifest and the file's header."""
    out = []
    for name, shape in plan:
        tdtype, stored = resident_storage(name, shape, resident_dtype, kinds)
        nbytes = int(np.prod(stored, dtype=np.int64)) * torch.empty((), dtype=tdtype).element_size()
        out.append((name, tuple(shape), tdtype, stored, nbytes))
    return out


def _write_resident(path: Path, stored_plan: list[tuple[str, tuple, torch.dtype, tuple, int]],
                    chunks: ResidentChunks, bar: tqdm) -> dict:
    """A safetensors file written tensor by tensor (the header is computed from shapes first)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, _, tdtype, stored, nbytes in stored_plan:
        header[name] = {"dtype": _ST_NAMES[tdtype], "shape": list(stored),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", "writer": f"llmflash {__version__}"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    out = _HashingWriter(path)
    out.write(struct.pack("<Q", len(header_bytes)))
    out.write(header_bytes)
    for name, shape, tdtype, _, nbytes in stored_plan:
        written = 0
        for piece in chunks(name, shape, tdtype):
            n = out.write(piece)
            written += n
            bar.update(n)
        assert written == nbytes, (name, written, nbytes)
    return out.close()


def _write_ffn(path: Path, num_layers: int, neurons: int, bundle_bytes: int, layer_chunks: LayerChunks,
               bar: tqdm) -> tuple[dict, list[dict], list[np.ndarray]]:
    """ffn.bin: each layer's bundles in one 4096-aligned region, hashed per layer and whole, and
    each bundle's xxh3 digest taken as it goes by (every chunk holds whole bundles)."""
    out = _HashingWriter(path)
    regions, digests = [], []
    for layer in range(num_layers):
        offset = align_up(out.size)
        if offset > out.size:
            out.write(b"\0" * (offset - out.size))
        sha = hashlib.sha256()
        size = 0
        for piece in layer_chunks(layer):
            view = _byte_view(piece)
            out.write(view)
            sha.update(view)
            digests.append(bundle_digests(np.frombuffer(view, dtype=np.uint8).reshape(-1, bundle_bytes)))
            size += view.nbytes
            bar.update(view.nbytes)
        regions.append({"offset": offset, "neurons": neurons, "bytes": size,
                        "sha256": sha.hexdigest(), "order": None})
    out.write(b"\0" * (align_up(out.size) - out.size))
    return out.close(), regions, digests


def _write_tokenizer(directory: Path, tok: TokenizerSpec, files: dict) -> dict:
    """tokenizer.json (when there is one) and the manifest's tokenizer entry."""
    entry: dict = {"file": None, "chat_template": tok.chat_template,
                   "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    if tok.tokenizer_json is not None:
        (directory / TOKENIZER_FILE).write_text(tok.tokenizer_json)
        data = (directory / TOKENIZER_FILE).read_bytes()
        files[TOKENIZER_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        entry["file"] = TOKENIZER_FILE
    return entry


def check_destination(dst: Path, force: bool) -> None:
    if Path(dst).exists() and not force:
        raise LLMFlashError(f"{dst} already exists; convert with force=True (--force) to replace it")


def write_model_dir(dst: Path, config: ModelConfig, dtype: str, resident: list[tuple[str, tuple]],
                    resident_chunks: ResidentChunks, layer_chunks: LayerChunks,
                    tokenizer: TokenizerSpec, source: dict, extra: dict | None = None,
                    progress: bool = True, desc: str = "convert",
                    resident_dtype: str | None = None,
                    resident_kinds: dict[str, str] | None = None) -> FlashModelDir:
    """Write a model directory in the flash layout under a temporary name, renamed when complete.

    `resident` lists the resident tensors (HF names, shapes) in file order; `resident_chunks` and
    `layer_chunks` give their bytes piece by piece, so at most one piece is in memory at a time.
    `extra` adds fields to the manifest (e.g. "synthetic"). A quantized `dtype` (int8/int4) stores
    the bundles in blocks (format/quantized.py) and resident matrices at `resident_dtype` (default
    float16; a block format too, or "auto" with each matrix's block format in `resident_kinds`:
    resident_storage); `resident` must then list the down scales (layout.down_block_tensors) too.
    The manifest records `resident_dtype` and, for matrices stored in blocks, `resident_blocks`
    (name -> block format).
    """
    dst = Path(dst)
    check_resident_dtype(resident_dtype)
    if quantized.is_quantized(dtype):
        resident_dtype = resident_dtype or "float16"
    elif resident_dtype not in (None, dtype):
        raise LLMFlashError(f"a {dtype} model keeps its resident tensors at {dtype} (resident dtype is an "
                            "option of int8/int4/int4m models)")
    resident_dtype = resident_dtype or dtype
    bundle = bundle_layout_for(config, dtype)
    remove_stale(dst.parent, f".{dst.name}.")  # left by a killed conversion (format/tempfiles.py)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        stored_plan = _stored_plan(resident, resident_dtype, resident_kinds)
        # resident matrices stored in blocks -> their format
        blocks = {name: resident_format(name, resident_dtype, resident_kinds)
                  for name, _, tdtype, _, _ in stored_plan if tdtype == torch.uint8}
        total = sum(nbytes for *_, nbytes in stored_plan)
        total += config.num_layers * config.intermediate_size * bundle.nbytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)
        files: dict[str, dict] = {}
        files[RESIDENT_FILE] = _write_resident(tmp / RESIDENT_FILE, stored_plan, resident_chunks, bar)
        files[FFN_FILE], regions, digests = _write_ffn(tmp / FFN_FILE, config.num_layers,
                                                       config.intermediate_size, bundle.nbytes, layer_chunks, bar)
        # per-bundle digests for flash's scattered reads (format/integrity.py)
        checks_file, files[checks_file], checks = write_checks(tmp, checks_name(FFN_FILE), digests)
        bar.close()
        tokenizer_entry = _write_tokenizer(tmp, tokenizer, files)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": f"llmflash {__version__}",
            "source": source,
            "dtype": dtype,
            **({"resident_dtype": resident_dtype} if quantized.is_quantized(dtype) else {}),
            **({"resident_blocks": blocks} if blocks else {}),
            "config": config.to_dict(),
            "files": files,
            "ffn": {"file": FFN_FILE, "alignment": ALIGNMENT, "bundle": bundle.to_dict(),
                    "layers": regions, "checks": checks},
            "tokenizer": tokenizer_entry,
            **(extra or {}),
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


class _Quantizer:
    """A layer's bundles and down scales in a block format (format/quantized.py), from any source.

    A GGUF tensor already in the target block format (Q8_0 for int8, Q4_0 for int4, Q4_1 for int4m) is copied block
    for block; any other is dequantized and requantized, counted per source type in `requantized`
    (said on stderr once per type and recorded in the manifest)."""

    def __init__(self, source: ModelSource, config: ModelConfig, names: dict[str, str], kind: str):
        self.source, self.config, self.names, self.kind = source, config, names, kind
        self.requantized: dict[str, set[str]] = {}  # source type -> tensors requantized
        self.kept: set[str] = set()  # tensors copied block for block
        self._last_down: tuple[int, tuple] | None = None

    def _type(self, name: str) -> str | None:
        typ = getattr(self.source, "tensor_type", None)
        return None if typ is None else typ(name)

    def blocks(self, hf_name: str) -> np.ndarray:
        """uint8 [rows, row bytes]: the tensor's rows in the target block format."""
        name = self.names[hf_name]
        typ = self._type(name)
        if typ == quantized.GGUF_TYPE[self.kind] and hasattr(self.source, "read_blocks"):
            self.kept.add(name)
            return self.source.read_blocks(name)
        if typ is not None and typ not in ("F32", "F16", "BF16"):
            if typ not in self.requantized:
                print(f"llmflash: note: {self.source.path}: {typ} tensors are requantized to {self.kind} "
                      f"({quantized.GGUF_TYPE[self.kind]}), which rounds their weights a second time",
                      file=sys.stderr)
            self.requantized.setdefault(typ, set()).add(name)
        return quantized.quantize_rows(self.source.read_tensor(name).float().numpy(), self.kind)

    def down(self, layer: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(float16 scales [hidden, n/32], int4m's minimums or None, code values [n, hidden]) of the
        layer's down projection (the last layer's kept: its scales and minimums are written one
        after the other)."""
        if self._last_down is None or self._last_down[0] != layer:
            raw = self.blocks(ffn_tensor_names(self.config, layer)["down"])
            self._last_down = (layer, quantized.down_split(raw, self.kind, self.config.intermediate_size))
        return self._last_down[1]

    def layer(self, layer: int) -> np.ndarray:
        """uint8 [neurons, bundle bytes] in the layout's part order."""
        parts = ffn_tensor_names(self.config, layer)
        n = self.config.intermediate_size
        biases = [self.source.read_tensor(self.names[parts[b]]).float().numpy()
                  for b in ("gate_bias", "up_bias") if b in parts]
        gate = self.blocks(parts["gate"]) if "gate" in parts else None
        up = self.blocks(parts["up"])
        for part, t in (("gate", gate), ("up", up)):
            if t is not None and t.shape[0] != n:
                raise LLMFlashError(f"layer {layer} {part} tensor has {t.shape[0]} neurons, config says {n} "
                                    f"({self.source.path})")
        codes = self.down(layer)[2]
        return quantized.bundle_bytes_np(gate, up, codes, biases, self.kind)


def convert(src: Path | str, dst: Path | str, dtype: str = "float16", force: bool = False,
            progress: bool = True, resident_dtype: str | None = None) -> FlashModelDir:
    """Convert a Hugging Face directory or GGUF file at SRC into the flash layout at DST.

    dtype: float16, bfloat16, float32, or the block formats int8 / int4 / int4m (format/quantized.py),
    or "auto": a GGUF whose FFN tensors are quantized goes to the nearest block format (Q8_0, Q5_*,
    Q6_K -> int8; Q4_0 -> int4; Q4_1, Q4_K, Q2_K, Q3_K -> int4m), anything else to float16.
    resident_dtype: for int8/int4/int4m, the dtype of the resident matrices (default float16): a
    float dtype or a block format (a GGUF's tensors already in that format are kept block for
    block), or "auto": each matrix of a GGUF in the block format nearest its own type (as `dtype`
    auto does for the FFN), float ones at float16."""
    if dtype != "auto" and dtype not in DTYPES and not quantized.is_quantized(dtype):
        raise LLMFlashError(f"unsupported storage dtype {dtype!r}; choose one of "
                            f"{sorted(DTYPES) + list(quantized.KINDS) + ['auto']}")
    check_resident_dtype(resident_dtype)
    dst = Path(dst)
    check_destination(dst, force)
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
    if dtype == "auto":
        dtype = _auto_dtype(source, config, names)
    plan = [(n, tuple(source.tensor_shape(names[n]))) for n in resident]
    extra: dict = {}
    if quantized.is_quantized(dtype):
        bundle_layout_for(config, dtype)  # refuses sizes that are not whole blocks, before writing
        q = _Quantizer(source, config, names, dtype)
        plan += down_block_tensors(config, dtype)
        layer_chunks = lambda layer: [q.layer(layer)]  # noqa: E731
        extra["quantization"] = {"format": quantized.GGUF_TYPE[dtype], "block": quantized.BLOCK,
                                 "kept_tensors": 0, "requantized": {}}
    else:
        q = None
        torch_dtype = DTYPES[dtype]
        layer_chunks = lambda layer: [_layer_bundles(source, config, layer, names, torch_dtype)]  # noqa: E731

    resident_kinds = _resident_kinds(source, plan, names) if resident_dtype == "auto" else None
    resident_q: dict[str, _Quantizer] = {}  # block format -> the quantizer of resident matrices

    def resident_blocks(name: str) -> np.ndarray:
        kind = resident_format(name, resident_dtype, resident_kinds)
        rq = resident_q.setdefault(kind, _Quantizer(source, config, names, kind))
        out = rq.blocks(name)
        requantized: dict[str, int] = {}
        for one in resident_q.values():
            for typ, tensors in one.requantized.items():
                requantized[typ] = requantized.get(typ, 0) + len(tensors)
        extra["quantization"]["resident"] = {"kept_tensors": sum(len(r.kept) for r in resident_q.values()),
                                             "requantized": dict(sorted(requantized.items()))}
        return out

    def resident_chunks(name: str, shape: tuple, tdtype: torch.dtype):
        if q is not None and name.startswith("ffn.layers."):
            layer, is_mins = down_block_of(name)
            scales, mins, _ = q.down(layer)
            yield np.ascontiguousarray(mins if is_mins else scales)
            return
        if tuple(source.tensor_shape(names[name])) != shape:
            raise LLMFlashError(f"tensor {names[name]} in {source.path} has shape "
                                f"{tuple(source.tensor_shape(names[name]))}, header says {shape}")
        if tdtype == torch.uint8:  # a matrix in a resident block format
            yield resident_blocks(name)
            return
        yield _tensor_bytes(source.read_tensor(names[name]).to(tdtype))

    def chunks(layer: int):
        out = layer_chunks(layer)
        if q is not None:  # the counts are final once the last layer is written (manifest is last)
            extra["quantization"].update(kept_tensors=len(q.kept),
                                         requantized={t: len(v) for t, v in sorted(q.requantized.items())})
        return out

    return write_model_dir(
        dst, config, dtype, plan, resident_chunks, chunks, source.tokenizer(),
        {"path": str(Path(src).resolve()), "kind": "gguf" if Path(src).is_file() else "hf"},
        extra=extra, progress=progress, desc=f"convert {Path(src).name}", resident_dtype=resident_dtype,
        resident_kinds=resident_kinds)


def _resident_kinds(source: ModelSource, plan: list[tuple[str, tuple]], names: dict[str, str]) -> dict[str, str]:
    """Resident matrix -> the block format nearest its own GGUF type (NEAREST_KIND), for
    `--resident-dtype auto`; float tensors (and any source that is not a GGUF) are left out."""
    typ = getattr(source, "tensor_type", None)
    if typ is None:
        return {}
    from llmflash.conversion.gguf_source import NEAREST_KIND

    kinds = {}
    for name, shape in plan:
        if len(shape) == 2 and not name.startswith("ffn.") and shape[1] % quantized.BLOCK == 0:
            kind = NEAREST_KIND.get(typ(names[name]))
            if kind is not None:
                kinds[name] = kind
    return kinds


def _auto_dtype(source: ModelSource, config: ModelConfig, names: dict[str, str]) -> str:
    """The block format nearest the FFN tensors' own (GGUF), else float16; where they disagree,
    int4m for 4-bit kinds (its grid holds any Q4_0 block's range), else int8."""
    typ = getattr(source, "tensor_type", None)
    if typ is None:
        return "float16"
    from llmflash.conversion.gguf_source import NEAREST_KIND

    kinds = {NEAREST_KIND.get(typ(names[n])) for i in range(config.num_layers)
             for p, n in ffn_tensor_names(config, i).items() if p in ("gate", "up", "down")}
    if None in kinds:
        return "float16"
    if kinds <= {"int4", "int4m"}:
        return "int4" if kinds == {"int4"} else "int4m"
    return "int8"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
