"""FFN providers that keep the FFN on flash: ours (flash) and the baselines (naive, hybrid, mmap).

flash (PAPER.md §3-§6), per layer and token:
    selector(x) -> neuron set S_t  (predictor, or an oracle for exactness tests)
    cache.step(S_t) -> neurons the window does not hold yet; evictions happen here
    reader.read_bundles(...) -> only those bundles, coalesced, O_DIRECT, many in flight
    cache.fill(...) ; FFN over the cache's used rows
Prompts (more than one token at once) stream each layer's bundles through the cache's rows in
chunks, which computes the exact dense FFN without exceeding the budget, then seed the cache with
the last prompt token's neurons.

Every provider logs per-token I/O and memory-management time, bytes and reads in `log`; the
engine turns the rest of a step's wall time into compute time.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from llmflash.runtime.neuron_cache import NeuronCache
from llmflash.runtime.ffn import BundleSlices, activate, ffn_from_rows
from llmflash.runtime.memory_plan import MemoryPlan
from llmflash.errors import LLMFlashError
from llmflash.runtime.reader import FlashFile, FlashReader, aligned_empty
from llmflash.format.layout import NUMPY_VIEW, FlashModelDir
from llmflash.models.base import FFNProvider

PREFILL_CHUNK_BYTES = 4 << 20  # bundles streamed per read while processing a prompt


class NeuronSelector(Protocol):
    """Chooses the neurons a token needs, before the FFN runs (PAPER.md §3)."""

    name: str

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """Neuron ids (original index space), most important first, union over x's rows."""

    def nbytes(self) -> int:
        """Resident bytes this selector holds."""


class OracleSelector:
    """The truly needed neurons, computed from resident copies of the weights that decide them.

    ReLU/FATReLU: the non-zero neurons, from a copy of the gate (or OPT's fc1) rows; exact, since
    every neuron left out is exactly zero. SiLU: the `density` share of neurons with the largest
    |silu(gate)·up| for each token (PAPER.md's magnitude criterion; measured +2-3% perplexity at
    50% on SmolLM2), from copies of the gate and up rows. It is an instrument, not a method: it
    holds `nbytes()` of weights in DRAM that a real deployment would not have, and stats say so.
    """

    name = "oracle"

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, density: float = 0.5):
        cfg = model_dir.config
        s = BundleSlices(model_dir.bundle)
        self.exact = cfg.hidden_act in ("relu", "fatrelu")
        self.act, self.threshold, self.density = cfg.hidden_act, cfg.act_threshold, density
        # Which bundle parts decide a neuron: the gate (fc1 for OPT) with its bias; for SiLU the
        # up part too. Only those columns are copied, and `self.local` locates them in the copy.
        wanted = ["gate", "gate_bias"] if s.gate is not None else ["up", "up_bias"]
        if not self.exact:
            wanted += ["up", "up_bias"]
        columns, self.local = [], {}
        for name in dict.fromkeys(wanted):
            span = getattr(s, name)
            if span is not None:
                self.local[name] = slice(len(columns), len(columns) + span.stop - span.start)
                columns += range(span.start, span.stop)
        index = torch.tensor(columns)
        self.layers = []
        for layer, region in enumerate(model_dir.layers):
            rows = model_dir.read_layer_bundles(layer)
            by_neuron = rows[torch.from_numpy(np.argsort(region.permutation()))]
            self.layers.append(by_neuron[:, index].to(dtype).contiguous())

    def _part(self, layer: int, x: torch.Tensor, name: str) -> torch.Tensor:
        rows = self.layers[layer]
        out = x @ rows[:, self.local[name]].t()
        bias = self.local.get(name + "_bias")
        return out if bias is None else out + rows[:, bias].reshape(-1)

    def select(self, layer: int, x: torch.Tensor) -> np.ndarray:
        key = "gate" if "gate" in self.local else "up"
        act = activate(self._part(layer, x, key), self.act, self.threshold)
        if self.exact:
            strength = act.abs().amax(dim=0)
        else:
            mag = (act * self._part(layer, x, "up")).abs()
            k = max(1, int(round(self.density * mag.shape[1])))
            cut = torch.topk(mag, k, dim=1).values[:, -1:]
            strength = torch.where(mag >= cut, mag, torch.zeros(())).amax(dim=0)
        ids = torch.nonzero(strength > 0).reshape(-1)
        order = torch.argsort(strength[ids], descending=True)
        return ids[order].numpy()

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.layers)


def oracle_nbytes(model_dir: FlashModelDir, dtype: torch.dtype) -> int:
    """Bytes the oracle's resident copies take, without building them (for memory limits)."""
    cfg = model_dir.config
    per_neuron = cfg.hidden_size * (1 if cfg.hidden_act in ("relu", "fatrelu") else 2) + 2
    item = torch.empty((), dtype=dtype).element_size()
    return per_neuron * item * cfg.intermediate_size * cfg.num_layers


@dataclass
class TokenLog:
    """Per-token counters of a flash-backed provider (one entry per forward pass)."""

    io_s: list[float] = field(default_factory=list)
    io_model_s: list[float] = field(default_factory=list)  # the device profile's time for the same reads
    mem_s: list[float] = field(default_factory=list)
    select_s: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    neurons_loaded: list[int] = field(default_factory=list)
    rows_used: list[int] = field(default_factory=list)
    window_shrunk: list[int] = field(default_factory=list)  # layers whose window shrank
    streamed: list[int] = field(default_factory=list)  # selected neurons over capacity, not cached

    def start(self) -> None:
        for values in self.__dict__.values():
            values.append(0)

    def add(self, **kw: float) -> None:
        for key, value in kw.items():
            getattr(self, key)[-1] += value


class _FlashBacked(FFNProvider):
    """Shared plumbing: the FFN file opened for direct I/O, a reader, a log, the bundle dtype."""

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, reader: FlashReader | None):
        self.dir = model_dir
        self.dtype = dtype
        cfg = model_dir.config
        self.slices = BundleSlices(model_dir.bundle)
        self.act, self.threshold = cfg.hidden_act, cfg.act_threshold
        self.file = FlashFile(model_dir.ffn_path)
        self.reader = reader or FlashReader()
        self.bundle_bytes = model_dir.bundle.nbytes
        self.log = TokenLog()

    def begin_pass(self, tokens: int) -> None:
        self.log.start()

    def begin_generation(self) -> None:
        self.log = TokenLog()

    def token_log(self) -> "TokenLog":
        return self.log

    def _as_rows(self, raw: np.ndarray) -> torch.Tensor:
        return self.dir.bundles_from_bytes(raw)

    def _read(self, fn, *args) -> np.ndarray:
        before = self.reader.stats.snapshot()
        t0 = time.perf_counter()
        out = fn(self.file, *args)
        after = self.reader.stats
        self.log.add(io_s=time.perf_counter() - t0, bytes=after.bytes - before.bytes,
                     reads=after.reads - before.reads,
                     io_model_s=after.model_seconds - before.model_seconds)
        return out

    def _layer_rows(self, layer: int, buffer: np.ndarray) -> torch.Tensor:
        """A whole layer read from flash into `buffer` and viewed as rows (the baselines' path)."""
        region = self.dir.layers[layer]
        raw = self._read(self.reader.read_range, region.offset, region.nbytes, buffer)
        rows = self._as_rows(raw[: region.nbytes].reshape(region.neurons, self.bundle_bytes))
        return rows.to(self.dtype)

    def close(self) -> None:
        self.reader.close()
        self.file.close()


class FlashFFN(_FlashBacked):
    """Ours: predicted neurons only, windowed neuron cache, bundles read with direct I/O."""

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, selector: NeuronSelector,
                 plan: MemoryPlan, window: int, reader: FlashReader | None = None,
                 pin: float = 0.0):
        super().__init__(model_dir, dtype, reader)
        self.selector = selector
        self.plan = plan
        self.window = window
        n = model_dir.config.intermediate_size
        # neuron id -> slot on flash (identity unless the layout reordered neurons)
        self.slot_of = [np.argsort(r.permutation()) for r in model_dir.layers]
        self.pinned = [self._pinned(layer, pin) for layer in range(model_dir.config.num_layers)]
        self.caches = [
            NeuronCache(n, plan.capacity(layer), model_dir.bundle.elements, window, dtype,
                        pinned=self.pinned[layer], reuse_holes=True)
            for layer in range(model_dir.config.num_layers)
        ]
        # Selected neurons that do not fit a layer's cache even with the window shrunk to one
        # token are read into these rows wave by wave, computed and forgotten (charged to the plan).
        self.scratch = torch.empty(plan.scratch_rows, model_dir.bundle.elements, dtype=dtype)
        # When the compute dtype is the stored one, reads land in the scratch rows directly
        # (numpy has no bfloat16, so that dtype keeps the copy).
        direct = str(dtype) == f"torch.{model_dir.bundle.dtype}" and dtype != torch.bfloat16
        self._scratch_bytes = self.scratch.numpy().view(np.uint8) if direct else None
        self.log.start()  # the pinned rows' one-time load, reported apart from the tokens
        for layer, cache in enumerate(self.caches):
            self._load_plan(layer, cache.initial_plan())
        self.pinned_load = {"io_ms": self.log.io_s[0] * 1000, "bytes": self.log.bytes[0],
                            "reads": self.log.reads[0]}
        self.log = TokenLog()

    def _pinned(self, layer: int, pin: float) -> np.ndarray | None:
        """The layer's hottest neurons (from `llmflash reorder`), at most half the cache."""
        if pin <= 0:
            return None
        hot = self.dir.layers[layer].hot
        if hot is None:
            raise LLMFlashError(f"--pin needs neuron statistics: run `llmflash reorder {self.dir.path} "
                                "--text FILE` first")
        k = min(int(round(pin * self.dir.config.intermediate_size)), self.plan.capacity(layer) // 2,
                len(hot))
        return np.asarray(hot[:k], dtype=np.int64)

    def _load_plan(self, layer: int, plan) -> None:
        if len(plan):
            raw = self._read(self.reader.read_bundles, self.dir.layers[layer].offset,
                             self.bundle_bytes, self.slot_of[layer][plan.neurons])
            self.caches[layer].fill(plan, self._as_rows(raw))

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return self._prompt(layer, x)
        t0 = time.perf_counter()
        ids = self.selector.select(layer, x)
        self.log.add(select_s=time.perf_counter() - t0)
        overflow = self._admit(layer, ids)
        y = ffn_from_rows(x, self.caches[layer].used_rows(), self.slices, self.act, self.threshold)
        if len(overflow):
            y += self._stream(layer, x, overflow)
        return y

    def _stream(self, layer: int, x: torch.Tensor, neurons: np.ndarray) -> torch.Tensor:
        """FFN over neurons that fit no cache row: read through the scratch rows, not kept."""
        if len(self.scratch) == 0:
            raise LLMFlashError("flash: a layer's selection exceeds its cache and the plan has no scratch rows")
        neurons = np.sort(neurons)
        y = torch.zeros_like(x)
        for start in range(0, len(neurons), len(self.scratch)):
            part = neurons[start : start + len(self.scratch)]
            rows = self.scratch[: len(part)]
            direct = None if self._scratch_bytes is None else self._scratch_bytes[: len(part)]
            raw = self._read(self.reader.read_bundles, self.dir.layers[layer].offset,
                             self.bundle_bytes, self.slot_of[layer][part], direct)
            if direct is None:
                t0 = time.perf_counter()
                rows.copy_(self._as_rows(raw))
                self.log.add(mem_s=time.perf_counter() - t0)
            y += ffn_from_rows(x, rows, self.slices, self.act, self.threshold)
        return y

    def _admit(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Bring the selection into the cache; returns the selected neurons that did not fit."""
        cache = self.caches[layer]
        t0 = time.perf_counter()
        plan = cache.step(ids)
        mem = time.perf_counter() - t0
        if len(plan):
            raw = self._read(self.reader.read_bundles, self.dir.layers[layer].offset,
                             self.bundle_bytes, self.slot_of[layer][plan.neurons])
            t1 = time.perf_counter()
            cache.fill(plan, self._as_rows(raw))
            mem += time.perf_counter() - t1
        self.log.add(mem_s=mem, neurons_loaded=len(plan), rows_used=cache.n_used,
                     window_shrunk=int(plan.window_used < min(self.window, cache.t + 1)),
                     streamed=len(plan.dropped))
        return plan.dropped

    def _prompt(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Exact dense FFN for a prompt, streamed through the cache rows, then seed the window."""
        cache = self.caches[layer]
        cache.reset()  # pinned rows stay; the rest are scratch for streaming the layer
        scratch = cache.rows[cache.n_pinned:]
        if len(self.scratch) > len(scratch):
            scratch = self.scratch
        region = self.dir.layers[layer]
        chunk = max(1, min(len(scratch), PREFILL_CHUNK_BYTES // self.bundle_bytes))
        y = torch.zeros_like(x)
        for start in range(0, region.neurons, chunk):
            k = min(chunk, region.neurons - start)
            raw = self._read(self.reader.read_range, region.offset + start * self.bundle_bytes,
                             k * self.bundle_bytes)
            t0 = time.perf_counter()
            scratch[:k].copy_(self._as_rows(raw[: k * self.bundle_bytes].reshape(k, -1)))
            self.log.add(mem_s=time.perf_counter() - t0)
            y += ffn_from_rows(x, scratch[:k], self.slices, self.act, self.threshold)
        cache.reset()
        t0 = time.perf_counter()
        ids = self.selector.select(layer, x[-1:])
        self.log.add(select_s=time.perf_counter() - t0)
        self._admit(layer, ids)
        return y

    def summary(self) -> dict:
        return {"selector": getattr(self.selector, "name", "predictor"),
                "selector_bytes": self.selector.nbytes(),
                "window": self.window, "memory_plan": self.plan.to_dict(),
                "pinned_per_layer": [0 if p is None else len(p) for p in self.pinned],
                "pinned_load": self.pinned_load,
                "direct_io": self.file.direct}


class NaiveFFN(_FlashBacked):
    """Baseline: every FFN layer read whole from flash for every token (nothing cached)."""

    name = "naive"

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, reader: FlashReader | None = None,
                 resident_layers: int = 0):
        super().__init__(model_dir, dtype, reader)
        self.resident = {i: model_dir.read_layer_bundles(i).to(dtype) for i in range(resident_layers)}
        largest = max(r.nbytes for r in model_dir.layers)
        self.buffer = aligned_empty(largest + 4096)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        rows = self.resident.get(layer)
        if rows is None:
            rows = self._layer_rows(layer, self.buffer)
        return ffn_from_rows(x, rows, self.slices, self.act, self.threshold)

    def summary(self) -> dict:
        return {"resident_ffn_layers": len(self.resident), "direct_io": self.file.direct}


class MmapFFN(FFNProvider):
    """Baseline: ffn.bin memory-mapped and left to the OS page cache, as llama.cpp does.

    Settings: a plain read-only shared mapping with the kernel's default read-ahead and no
    madvise. Dense FFN over the mapped layer; when the compute dtype differs from the stored one
    the layer is converted on the fly (a copy per token, as a dequantizing runtime would do).
    """

    name = "mmap"

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype):
        self.dir = model_dir
        self.dtype = dtype
        cfg = model_dir.config
        self.slices = BundleSlices(model_dir.bundle)
        self.act, self.threshold = cfg.hidden_act, cfg.act_threshold
        self._file = open(model_dir.ffn_path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, prot=mmap.PROT_READ)
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self.layers = []
        for region in model_dir.layers:
            arr = raw[region.offset: region.offset + region.nbytes]
            arr = arr.view(NUMPY_VIEW[model_dir.bundle.dtype]).reshape(region.neurons, -1)
            self.layers.append(arr)
        self.log = TokenLog()

    def begin_pass(self, tokens: int) -> None:
        self.log.start()

    def begin_generation(self) -> None:
        self.log = TokenLog()

    def token_log(self) -> "TokenLog":
        return self.log

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mapping: we never write
            rows = torch.from_numpy(self.layers[layer])
        if self.dir.bundle.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        rows = rows.to(self.dtype)
        return ffn_from_rows(x, rows, self.slices, self.act, self.threshold)

    def summary(self) -> dict:
        return {"mmap": "MAP_SHARED read-only, default read-ahead, no madvise"}
