"""FFN providers that keep the FFN on flash: ours (flash) and the baselines (naive, hybrid, mmap).

flash (docs/PAPER.md §3-§6), per layer and token:
    selector.select(layer, x).ids() -> neuron set S_t  (runtime.selectors: predictor, exact, ...)
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

import hashlib
import mmap
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from llmflash.compute import matmul_rows
from llmflash.runtime.neuron_cache import AdmitPlan, NeuronCache
from llmflash.runtime.ffn import BundleSlices, ffn_from_rows, ffn_intermediate
from llmflash.runtime.quant_ffn import quant_rows_ffn
from llmflash.runtime.memory_plan import MemoryPlan
from llmflash.errors import LLMFlashError
from llmflash.runtime.reader import (PAGE_SIZE, FlashFile, FlashReader, PendingRead, aligned_empty,
                                     gather_bundles)
from llmflash.format.integrity import BundleChecks
from llmflash.format.layout import NUMPY_VIEW, FlashModelDir
from llmflash.models.base import FFNProvider
from llmflash.runtime.selectors import NeuronSelector

PREFILL_CHUNK_BYTES = 4 << 20  # bundles streamed per read while processing a prompt
LOOKAHEAD_OVER = 1.0  # a layer's lookahead reads at most this x the bundles it has been needing
LOOKAHEAD_EMA = 0.5  # weight of the latest token in that running figure


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
    neurons_selected: list[int] = field(default_factory=list)  # the selector's choice, summed over layers
    rows_used: list[int] = field(default_factory=list)
    window_shrunk: list[int] = field(default_factory=list)  # layers whose window shrank
    streamed: list[int] = field(default_factory=list)  # selected neurons over capacity, not cached
    # the pipeline (docs/FLASH.md, "Overlap"): io_s above is the time the step waited for reads;
    # io_hidden_s the time lookahead reads were in flight while the step computed instead
    io_hidden_s: list[float] = field(default_factory=list)
    la_needed: list[int] = field(default_factory=list)  # bundles a step needed from flash (lookahead layers)
    la_hits: list[int] = field(default_factory=list)  # of those, already read by the lookahead
    la_fetched: list[int] = field(default_factory=list)  # bundles the lookahead read
    la_wasted: list[int] = field(default_factory=list)  # ... that the exact selection did not use
    la_bytes: list[int] = field(default_factory=list)  # bytes the lookahead read (alignment included)

    def start(self) -> None:
        for values in self.__dict__.values():
            values.append(0)

    def add(self, **kw: float) -> None:
        for key, value in kw.items():
            getattr(self, key)[-1] += value


@dataclass
class _Prefetch:
    """One layer's lookahead batch: the neurons read (ascending) and which of them were used."""

    layer: int
    neurons: np.ndarray
    pending: PendingRead
    used: np.ndarray | None = None  # bool per neuron (set in __post_init__)
    reaped: bool = False

    def __post_init__(self) -> None:
        if self.used is None:
            self.used = np.zeros(len(self.neurons), dtype=bool)


class _Logged(FFNProvider):
    """A provider that counts each forward pass's reads, bytes and times in `self.log`."""

    log: "TokenLog"

    def begin_pass(self, tokens: int) -> None:
        self.log.start()

    def begin_generation(self) -> None:
        self.log = TokenLog()

    def token_log(self) -> "TokenLog":
        return self.log


class _FlashBacked(_Logged):
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
        # int8/int4 models: rows stay quantized in DRAM whatever the held dtype of the resident part
        # (the same budget caches 2-4x the neurons; memory_plan.row_bytes_at charges them so)
        self.quant = model_dir.quantized
        self.row_dtype = torch.uint8 if self.quant else dtype
        self.row_width = self.bundle_bytes if self.quant else model_dir.bundle.elements
        self.log = TokenLog()
        # per-bundle digests checked on every scattered read (format/integrity.py)
        self.checks = BundleChecks.load(model_dir)
        self.verify_s, self.verified_bundles = 0.0, 0
        self._sync_io_s = self._sync_model_s = 0.0  # on-demand reads so far (FlashFFN._hidden)
        self._la_need: list[float | None] = [None] * model_dir.config.num_layers  # bundles/token read, EMA

    def _as_rows(self, raw: np.ndarray) -> torch.Tensor:
        if self.quant:  # int8/int4: rows are the bundles' bytes, dequantized per token (quant_ffn)
            return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, self.bundle_bytes))
        return self.dir.bundles_from_bytes(raw)

    def _ffn(self, layer: int, x: torch.Tensor, rows: torch.Tensor, neurons) -> torch.Tensor:
        """FFN over bundle rows of `neurons` (their ids: quantized rows' down scales are per id)."""
        if self.quant:
            return quant_rows_ffn(x, rows, torch.as_tensor(np.asarray(neurons, dtype=np.int64)),
                                  self.dir.codec, self.dir.down_scales(layer), self.act, self.threshold,
                                  self.dir.down_mins(layer))
        return ffn_from_rows(x, rows, self.slices, self.act, self.threshold)

    def _read(self, fn, *args) -> np.ndarray:
        before = self.reader.stats.snapshot()
        t0 = time.perf_counter()
        out = fn(self.file, *args)
        after = self.reader.stats
        took = time.perf_counter() - t0
        self.log.add(io_s=took, bytes=after.bytes - before.bytes,
                     reads=after.reads - before.reads,
                     io_model_s=after.model_seconds - before.model_seconds)
        self._sync_io_s += took
        self._sync_model_s += after.model_seconds - before.model_seconds
        return out

    def _bundles(self, layer: int, slots: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The bundles at `slots` of `layer` (uint8 rows), each checked against its digest."""
        raw = self._read(self.reader.read_bundles, self.dir.layers[layer].offset, self.bundle_bytes,
                         slots, out)
        self._verify(layer, slots, raw)
        return raw

    def _verify(self, layer: int, slots: np.ndarray, raw: np.ndarray) -> None:
        """Check bundles read from `slots` against their digests (where the model has them), timed."""
        if self.checks is not None:
            t0 = time.perf_counter()
            self.checks.verify(layer, slots, raw)
            self.verify_s += time.perf_counter() - t0
            self.verified_bundles += len(slots)

    def _layer_rows(self, layer: int, buffer: np.ndarray) -> torch.Tensor:
        """A whole layer read from flash into `buffer` and viewed as rows (the baselines' path)."""
        region = self.dir.layers[layer]
        raw = self._read(self.reader.read_range, region.offset, region.nbytes, buffer)
        if self.dir.layer_verifier.needed(layer):  # once per layer and process (integrity.py)
            self.dir.layer_verifier.check(layer, raw[: region.nbytes])
        rows = self._as_rows(raw[: region.nbytes].reshape(region.neurons, self.bundle_bytes))
        return rows if self.quant else rows.to(self.dtype)

    def close(self) -> None:
        self.reader.close()
        self.file.close()


class FlashFFN(_FlashBacked):
    """Ours: predicted neurons only, windowed neuron cache, bundles read with direct I/O."""

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, selector: NeuronSelector,
                 plan: MemoryPlan, window: int, reader: FlashReader | None = None,
                 pin: float = 0.0, lookahead: bool = False, overlap: bool = True):
        super().__init__(model_dir, dtype, reader)
        self.selector = selector
        self.plan = plan
        self.window = window
        # In-layer overlap (docs/FLASH.md, "Overlap"): a token's new neurons are read by kernel AIO
        # into the reader's staging buffer while the FFN over the rows already cached computes.
        self.overlap = bool(overlap)
        self.can_overlap = self.reader.can_submit(self.file)
        self._in_layer: tuple[int, PendingRead] | None = None  # (layer, batch) of new neurons in flight
        # The pipeline (docs/FLASH.md, "Overlap"): layer l+1's predicted bundles are read into a
        # staging buffer (charged by the plan) while layer l computes, by kernel AIO, no thread.
        # Where reads cannot run in the background (no AIO, buffered file) it stays off.
        self.lookahead = bool(lookahead and plan.lookahead_bytes > 0 and self.can_overlap)
        self.lookahead_requested = bool(lookahead)
        # with the lookahead on, its batches take the one background turn (kernel_aio: a batch per context)
        self._overlap_on = self.overlap and self.can_overlap and not self.lookahead
        self._la_staging = aligned_empty(plan.lookahead_bytes, PAGE_SIZE) if self.lookahead else None
        self._prefetch: _Prefetch | None = None
        self._chunk: tuple[tuple[int, int, int], PendingRead] | None = None  # prompt chunk in flight
        self._chunk_buf: np.ndarray | None = None
        n = model_dir.config.intermediate_size
        # neuron id -> slot on flash (identity unless the layout reordered neurons)
        self.slot_of = [np.argsort(r.permutation()) for r in model_dir.layers]
        self.pinned = [self._pinned(layer, pin) for layer in range(model_dir.config.num_layers)]
        self.caches = [
            NeuronCache(n, plan.capacity(layer), self.row_width, window, self.row_dtype,
                        pinned=self.pinned[layer], reuse_holes=True)
            for layer in range(model_dir.config.num_layers)
        ]
        # Selected neurons that do not fit a layer's cache even with the window shrunk to one
        # token are read into these rows wave by wave, computed and forgotten (charged to the plan).
        self.scratch = torch.empty(plan.scratch_rows, self.row_width, dtype=self.row_dtype)
        # When weights are held as stored (the default), reads land in the scratch rows directly
        # (viewed as bytes, which works for bfloat16 too, which numpy lacks).
        direct = self.quant or str(dtype) == f"torch.{model_dir.bundle.dtype}"
        self._scratch_bytes = (self.scratch.view(torch.uint8).numpy().reshape(len(self.scratch), -1)
                               if direct else None)
        self.log.start()  # the pinned rows' one-time load, reported apart from the tokens
        for layer, cache in enumerate(self.caches):
            self._load_plan(layer, cache.initial_plan())
        self.pinned_load = {"io_ms": self.log.io_s[0] * 1000, "bytes": self.log.bytes[0],
                            "reads": self.log.reads[0]}
        self.log = TokenLog()

    def begin_pass(self, tokens: int) -> None:
        self._drop_pending()  # left by a pass that raised: waited out, never used
        super().begin_pass(tokens)
        self.selector.begin_pass(tokens)

    def _pinned(self, layer: int, pin: float) -> np.ndarray | None:
        """The layer's hottest neurons (from `llmflash reorder`), at most half the cache."""
        if pin <= 0:
            return None
        hot = self.dir.layers[layer].hot
        if hot is None:
            raise LLMFlashError(f"pin needs neuron statistics: run `llmflash reorder {self.dir.path} "
                                "--text FILE` first")
        k = min(int(round(pin * self.dir.config.intermediate_size)), self.plan.capacity(layer) // 2,
                len(hot))
        return np.asarray(hot[:k], dtype=np.int64)

    def _load_plan(self, layer: int, plan) -> None:
        if len(plan):
            raw = self._bundles(layer, self.slot_of[layer][plan.neurons])
            self.caches[layer].fill(plan, self._as_rows(raw))

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            return self._prompt(layer, x)
        t0 = time.perf_counter()
        ids = self.selector.select(layer, x).ids()
        self.log.add(select_s=time.perf_counter() - t0)
        plan, pending, new_rows = self._admit(layer, ids, overlap=self._overlap_on)
        overflow = plan.dropped
        streamed = None
        if len(overflow) and pending is None:
            # the first wave of the overflow (usually all of it) is fetched before the next
            # layer's lookahead reads start, so they do not queue in front of it (with the
            # overlap, after the new neurons' batch: that batch has the reader's staging buffer)
            streamed = self._stream_wave(layer, np.sort(overflow), 0)
        self._release(layer)
        if self.lookahead:
            need = self._last_loaded + len(overflow)  # bundles this token needed from flash
            old = self._la_need[layer]
            self._la_need[layer] = need if old is None else old + LOOKAHEAD_EMA * (need - old)
            if layer + 1 < len(self.caches):
                self._start_lookahead(layer + 1, x)
        cache = self.caches[layer]
        if self.quant:  # quantized rows: dequantize and compute only this token's own selection
            rows = cache.rows_of(ids)
            rows = rows[rows >= 0]  # the overflow is streamed below
            if len(plan):  # as below: the rows cached before this token, then the new ones
                rows = rows[~np.isin(rows, plan.rows)]
            y = self._ffn(layer, x, cache.rows.index_select(0, torch.from_numpy(rows)), cache.row_neuron[rows])
            if len(plan):
                if pending is not None:
                    new_rows = self._finish_admit(layer, cache, plan, pending)
                y += self._ffn(layer, x, new_rows, plan.neurons)
        elif len(plan):
            # The rows cached before this token first (the new rows' activations masked), while
            # the new rows' reads are in flight when they were submitted in the background; then
            # the new rows. The same arithmetic whether the reads overlapped or not (docs/FLASH.md,
            # "Overlap"), so --no-overlap and the lookahead give the same logits.
            y = self._ffn_cached_except(x, cache, plan.rows)
            if pending is not None:
                new_rows = self._finish_admit(layer, cache, plan, pending)
            y += self._ffn(layer, x, new_rows, plan.neurons)
        else:
            y = self._ffn(layer, x, cache.used_rows(), cache.row_neuron[: cache.n_used])
        new_rows = None  # a temporary copy of the new rows where they are scattered: freed before the stream
        if len(overflow):
            y += self._stream(layer, x, np.sort(overflow), streamed)
        if self._prefetch is not None and not self._prefetch.reaped:
            t0 = time.perf_counter()
            self.reader.progress(self._prefetch.pending)  # more of a large batch in flight
            self.log.add(io_s=time.perf_counter() - t0)
        return y

    def _ffn_cached_except(self, x: torch.Tensor, cache: NeuronCache, new_rows: np.ndarray) -> torch.Tensor:
        """FFN over the used rows with the activations of `new_rows` set to zero: the neurons
        cached before this step. The new rows may still hold an evicted neuron's bundle or the
        zeros they were allocated with (always finite), and their reads may be in flight into a
        staging buffer, never into these rows; a zero activation takes them out exactly."""
        rows = cache.rows[: cache.n_used]  # the new rows are admitted but not filled yet
        h = ffn_intermediate(x, rows, self.slices, self.act, self.threshold)
        h[:, torch.from_numpy(new_rows)] = 0
        return matmul_rows(h, rows[:, self.slices.down])

    def _stream_wave(self, layer: int, neurons: np.ndarray, start: int) -> torch.Tensor:
        """Wave `start` of the overflow `neurons` (sorted) read into the scratch rows."""
        part = neurons[start : start + len(self.scratch)]
        rows = self.scratch[: len(part)]
        direct = None if self._scratch_bytes is None else self._scratch_bytes[: len(part)]
        raw = self._fetch(layer, part, direct)
        if direct is None:
            t0 = time.perf_counter()
            rows.copy_(self._as_rows(raw))
            self.log.add(mem_s=time.perf_counter() - t0)
        return rows

    def _stream(self, layer: int, x: torch.Tensor, neurons: np.ndarray,
                first: torch.Tensor | None = None) -> torch.Tensor:
        """FFN over neurons that fit no cache row (sorted): read through the scratch rows, not
        kept, wave after wave (`first`: wave 0 already read)."""
        if len(self.scratch) == 0:
            raise LLMFlashError("flash: a layer's selection exceeds its cache and the plan has no scratch rows")
        y = torch.zeros_like(x)
        for start in range(0, len(neurons), len(self.scratch)):
            rows = first if start == 0 and first is not None else self._stream_wave(layer, neurons, start)
            y += self._ffn(layer, x, rows, neurons[start : start + len(rows)])
        return y

    # -- the pipeline: lookahead reads -------------------------------------------------------

    def _start_lookahead(self, layer: int, x: torch.Tensor) -> None:
        """Start reading what `layer` will probably need (guessed from the previous layer's FFN
        input `x`) that its cache does not hold, strongest first, as much as the charged staging
        buffer takes. Nothing read here is computed unless `layer`'s own selection asks for it."""
        t0 = time.perf_counter()
        guess = self.selector.lookahead(layer, x)
        t1 = time.perf_counter()
        self.log.add(select_s=t1 - t0)
        # at most LOOKAHEAD_OVER x what this layer has been needing from flash (its guesses are
        # ordered strongest first, so the surplus cut is the least likely): a guess much larger
        # than the layer's reads would spend the device on bundles nobody computes
        need = self._la_need[layer]
        cap = self.plan.lookahead_rows if need is None else min(self.plan.lookahead_rows,
                                                                 max(16, int(LOOKAHEAD_OVER * need) + 1))
        guess = guess[self.caches[layer].neuron_row[guess] < 0][:cap]
        if len(guess) == 0:
            return
        staging = self._la_staging
        offset = self.dir.layers[layer].offset
        while True:
            neurons = np.sort(guess)
            slots = self.slot_of[layer][neurons]
            plan = self._plan_reads(layer, slots)
            if plan.staging_bytes <= staging.size:
                break
            # merged gaps made it larger than the buffer: keep fewer, strongest first
            guess = guess[: int(len(guess) * staging.size / plan.staging_bytes * 0.9)]
            if len(guess) == 0:
                return
        pending = self.reader.submit_bundles(self.file, offset, self.bundle_bytes, slots, plan, staging)
        self._prefetch = _Prefetch(layer, neurons, pending)
        self.log.add(io_s=pending.submit_s, la_fetched=len(neurons), la_bytes=plan.total_bytes,
                     bytes=plan.total_bytes, reads=plan.n_reads, io_model_s=pending.model_s)

    def _reap(self, pf: "_Prefetch") -> None:
        """Wait for a lookahead batch (once); what the step waited and what stayed hidden."""
        if pf.reaped:
            return
        p = pf.pending
        self.reader.wait(p)
        pf.reaped = True
        waited = p.waited_s - p.submit_s  # the submit was logged when it happened
        self.log.add(io_s=waited, io_hidden_s=self._hidden(p, waited))

    def _hidden(self, p: PendingRead, waited: float) -> float:
        """I/O of a background batch that overlapped compute (an estimate: completions carry no
        time). What the batch would have cost read on demand, at the device profile's time for
        its reads scaled by how this run's on-demand reads compared with the profile, less what
        the step still waited for it, within the time it had before it was needed."""
        slowdown = max(1.0, self._sync_io_s / self._sync_model_s) if self._sync_model_s > 0 else 1.0
        had = p.in_flight_s if p.ready else max(0.0, p.in_flight_s - waited)
        return min(had, max(0.0, p.model_s * slowdown - waited))

    def _release(self, layer: int) -> None:
        """The layer has taken what it needed from its lookahead batch: count the rest as
        wasted and free the staging buffer for the next layer's batch."""
        pf = self._prefetch
        if pf is None or pf.layer != layer:
            return
        self._reap(pf)
        self.log.add(la_wasted=int(len(pf.neurons) - pf.used.sum()))
        self._prefetch = None

    def _drop_pending(self) -> None:
        """Wait out batches nobody will use (a pass that raised): the kernel must not write into
        a buffer that is reused or freed."""
        if self._prefetch is not None:
            if not self._prefetch.reaped:
                self.reader.wait(self._prefetch.pending)
            self._prefetch = None
        if self._in_layer is not None:  # its rows were admitted but never filled: start that layer over
            layer, pending = self._in_layer
            self.reader.wait(pending)
            self.caches[layer].reset()
            self._in_layer = None
        if self._chunk is not None:
            self.reader.wait(self._chunk[1])
            self._chunk = None

    def _fetch(self, layer: int, neurons: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The bundles of `neurons` of `layer` (uint8 rows, in that order, into `out` if given):
        from the layer's lookahead batch where it read them, the rest read now; all checked."""
        pf = self._prefetch if self._prefetch is not None and self._prefetch.layer == layer else None
        if pf is None:
            if self.lookahead and layer > 0:
                self.log.add(la_needed=len(neurons))
            return self._bundles(layer, self.slot_of[layer][neurons], out)
        self._reap(pf)
        n = len(neurons)
        out = np.empty((n, self.bundle_bytes), dtype=np.uint8) if out is None else out
        at = np.minimum(np.searchsorted(pf.neurons, neurons), len(pf.neurons) - 1)
        hit = pf.neurons[at] == neurons
        hits = int(hit.sum())
        self.log.add(la_needed=n, la_hits=hits)
        slots = self.slot_of[layer][neurons]
        if hits:
            pf.used[at[hit]] = True
            t0 = time.perf_counter()
            plan = pf.pending.plan
            source = pf.pending.dest[: plan.staging_bytes]
            positions = plan.slot_positions[at[hit]]
            if hits == n:
                gather_bundles(source, positions, self.bundle_bytes, out)
            else:
                part = np.empty((hits, self.bundle_bytes), dtype=np.uint8)
                gather_bundles(source, positions, self.bundle_bytes, part)
                out[hit] = part
            self.log.add(mem_s=time.perf_counter() - t0)
        if hits < n:
            miss = ~hit
            out[miss] = self._read(self.reader.read_bundles, self.dir.layers[layer].offset,
                                   self.bundle_bytes, slots[miss])
        self._verify(layer, slots, out)
        return out

    def _admit(self, layer: int, ids: np.ndarray, overlap: bool = False
               ) -> tuple[AdmitPlan, PendingRead | None, torch.Tensor | None]:
        """Bring the selection into the cache: the plan (its `dropped`: selected neurons that did
        not fit), and either the reads of its new neurons started in the background (`overlap`,
        kernel AIO; `_finish_admit` completes them) or the new neurons' rows, read and filled now."""
        cache = self.caches[layer]
        t0 = time.perf_counter()
        plan = cache.step(ids)
        mem = time.perf_counter() - t0
        self._last_loaded = len(plan)
        self.log.add(mem_s=mem, neurons_loaded=len(plan), neurons_selected=len(ids),
                     window_shrunk=int(plan.window_used < min(self.window, cache.t + 1)),
                     streamed=len(plan.dropped))
        pending, new_rows = None, None
        if overlap and len(plan):
            pending = self._submit(layer, plan.neurons)
        elif len(plan):
            run = self._run(cache, plan)
            raw = self._fetch(layer, plan.neurons, None if run is None else cache.rows[run].view(torch.uint8).numpy())
            new_rows = self._fill(cache, plan, run, raw)
        self.log.add(rows_used=cache.n_used)
        return plan, pending, new_rows

    def _plan_reads(self, layer: int, slots: np.ndarray):
        """The reads for `slots` of `layer` (background batches), planned as the reader plans its own."""
        return self.reader.plan_bundles(self.file, self.dir.layers[layer].offset, self.bundle_bytes, slots)

    def _submit(self, layer: int, neurons: np.ndarray) -> PendingRead:
        """Start reading `neurons`' bundles (ascending) into the overlap staging buffer."""
        slots = self.slot_of[layer][neurons]
        plan = self._plan_reads(layer, slots)
        # the reader's own staging buffer: no read of this reader runs before _finish_admit
        pending = self.reader.submit_bundles(self.file, self.dir.layers[layer].offset, self.bundle_bytes, slots,
                                             plan, self.reader.staging_for(plan.staging_bytes))
        self._in_layer = (layer, pending)
        self.log.add(io_s=pending.submit_s, bytes=plan.total_bytes, reads=plan.n_reads, io_model_s=pending.model_s)
        return pending

    def _run(self, cache: NeuronCache, plan: AdmitPlan) -> slice | None:
        """The plan's rows where bundles can be gathered straight into them: held as stored (or
        quantized bytes) and one contiguous run; else None (gathered into a temporary, then copied)."""
        return cache.run_of(plan) if self._scratch_bytes is not None else None

    def _fill(self, cache: NeuronCache, plan: AdmitPlan, run: slice | None, raw: np.ndarray) -> torch.Tensor:
        """Fill the plan's rows from `raw` (nothing to copy where raw is the rows themselves); the
        new rows, for the FFN over them."""
        t0 = time.perf_counter()
        rows = cache.rows[run] if run is not None else self._as_rows(raw).to(cache.rows.dtype)
        cache.fill(plan, rows)
        self.log.add(mem_s=time.perf_counter() - t0)
        return rows

    def _finish_admit(self, layer: int, cache: NeuronCache, plan: AdmitPlan, pending: PendingRead) -> torch.Tensor:
        """Wait for the new neurons' background reads, check them and fill their rows; the rows."""
        self.reader.wait(pending)
        self._in_layer = None
        waited = pending.waited_s - pending.submit_s  # the submit was logged when it happened
        self.log.add(io_s=waited, io_hidden_s=self._hidden(pending, waited))
        t0 = time.perf_counter()
        run = self._run(cache, plan)
        out = (cache.rows[run].view(torch.uint8).numpy() if run is not None
               else np.empty((len(plan), self.bundle_bytes), dtype=np.uint8))
        rp = pending.plan
        gather_bundles(pending.dest[: rp.staging_bytes], rp.slot_positions, self.bundle_bytes, out)
        self.log.add(mem_s=time.perf_counter() - t0)
        self._verify(layer, self.slot_of[layer][plan.neurons], out)
        return self._fill(cache, plan, run, out)

    def _prompt(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Exact dense FFN for a prompt, streamed through the cache rows, then seed the window.

        With the lookahead on, the next chunk (after a layer's last, the next layer's first) is read
        in the background while this one computes, into one chunk buffer: a chunk's bytes are
        copied into the rows before the next read reuses it."""
        cache = self.caches[layer]
        cache.reset()  # pinned rows stay; the rest are scratch for streaming the layer
        scratch = cache.rows[cache.n_pinned:]
        if len(self.scratch) > len(scratch):
            scratch = self.scratch
        region = self.dir.layers[layer]
        chunk = self._prompt_chunk(layer)
        y = torch.zeros_like(x)
        # first read of this layer in the process: checked as its chunks arrive, per bundle where the
        # model has digests (5x faster than sha256), else against the layer's sha256 (integrity.py)
        check = self.dir.layer_verifier.needed(layer)
        sha = hashlib.sha256() if check and self.checks is None else None
        for start in range(0, region.neurons, chunk):
            k = min(chunk, region.neurons - start)
            raw = self._prompt_read(layer, start, k)
            if sha is not None:
                sha.update(raw[: k * self.bundle_bytes])
            elif check:
                self.checks.verify(layer, np.arange(start, start + k), raw[: k * self.bundle_bytes].reshape(k, -1))
            t0 = time.perf_counter()
            scratch[:k].copy_(self._as_rows(raw[: k * self.bundle_bytes].reshape(k, -1)))
            self.log.add(mem_s=time.perf_counter() - t0)
            if self.lookahead or self._overlap_on:  # the bytes are in the rows: the buffer takes the next chunk
                if start + k < region.neurons:
                    self._submit_chunk(layer, start + k)
                elif layer + 1 < len(self.caches):
                    self._submit_chunk(layer + 1, 0)
            y += self._ffn(layer, x, scratch[:k], region.permutation()[start : start + k])
        if sha is not None:
            self.dir.layer_verifier.finish(layer, sha.hexdigest())
        elif check:
            self.dir.layer_verifier.done.add(layer)
        cache.reset()
        t0 = time.perf_counter()
        ids = self.selector.select(layer, x[-1:]).ids()
        self.log.add(select_s=time.perf_counter() - t0)
        self._admit(layer, ids)
        return y

    def _prompt_chunk(self, layer: int) -> int:
        """Bundles per prompt chunk of `layer`: what its rows (or the scratch rows) hold, <= 4 MiB."""
        cache = self.caches[layer]
        rows = max(len(cache.rows) - cache.n_pinned, len(self.scratch))
        return max(1, min(rows, PREFILL_CHUNK_BYTES // self.bundle_bytes))

    def _submit_chunk(self, layer: int, start: int) -> None:
        """Start reading the prompt chunk of `layer` from bundle `start` into the chunk buffer."""
        region = self.dir.layers[layer]
        k = min(self._prompt_chunk(layer), region.neurons - start)
        if self._chunk_buf is None:
            self._chunk_buf = aligned_empty(max(PREFILL_CHUNK_BYTES, self.bundle_bytes) + 2 * PAGE_SIZE, PAGE_SIZE)
        pending = self.reader.submit_range(self.file, region.offset + start * self.bundle_bytes,
                                           k * self.bundle_bytes, self._chunk_buf)
        self._chunk = ((layer, start, k), pending)
        self.log.add(io_s=pending.submit_s, bytes=pending.plan.total_bytes, reads=pending.plan.n_reads,
                     io_model_s=pending.model_s)

    def _prompt_read(self, layer: int, start: int, k: int) -> np.ndarray:
        """A prompt chunk's bytes: the chunk read in the background if it is this one, else now."""
        if self._chunk is not None:
            key, pending = self._chunk
            self._chunk = None
            self.reader.wait(pending)
            waited = pending.waited_s - pending.submit_s
            self.log.add(io_s=waited, io_hidden_s=self._hidden(pending, waited))
            if key == (layer, start, k):
                return pending.dest[pending.head : pending.head + k * self.bundle_bytes]
        return self._read(self.reader.read_range, self.dir.layers[layer].offset + start * self.bundle_bytes,
                          k * self.bundle_bytes)

    def summary(self) -> dict:
        return {**self.selector.summary(),
                "window": self.window, "memory_plan": self.plan.to_dict(),
                "pinned_per_layer": [0 if p is None else len(p) for p in self.pinned],
                "pinned_load": self.pinned_load,
                "direct_io": self.file.direct,
                "lookahead": self._lookahead_summary(),
                "overlap": {"on": self._overlap_on,
                            "requested": self.overlap,
                            "off_because": None if not self.overlap or self._overlap_on else
                            ("reads cannot run in the background here (needs kernel AIO and O_DIRECT)"
                             if not self.can_overlap else "the lookahead is on (one background batch at a time)")},
                "verify": {"bundles": self.verified_bundles, "ms": round(self.verify_s * 1000, 3),
                           "algorithm": None if self.checks is None else "xxh3_64"}}

    def _lookahead_summary(self) -> dict:
        """Whether the pipeline ran, and if asked for but off, why."""
        why = None
        if self.lookahead_requested and not self.lookahead:
            why = ("the plan left no staging buffer" if self.plan.lookahead_bytes <= 0 else
                   "reads cannot run in the background here (needs kernel AIO and O_DIRECT)")
        return {"on": self.lookahead, "requested": self.lookahead_requested, "off_because": why,
                "staging_rows": self.plan.lookahead_rows if self.lookahead else 0,
                "guess": getattr(self.selector, "lookahead_kind", "the layer's selector on the previous "
                                 "layer's FFN input")}


class NaiveFFN(_FlashBacked):
    """Baseline: every FFN layer read whole from flash for every token (nothing cached)."""

    name = "naive"

    def __init__(self, model_dir: FlashModelDir, dtype: torch.dtype, reader: FlashReader | None = None,
                 resident_layers: int = 0):
        super().__init__(model_dir, dtype, reader)
        self.resident = {i: model_dir.layer_rows(i, self.row_dtype) for i in range(resident_layers)}
        largest = max(r.nbytes for r in model_dir.layers)
        self.buffer = aligned_empty(largest + 4096)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        rows = self.resident.get(layer)
        if rows is None:
            rows = self._layer_rows(layer, self.buffer)
        return self._ffn(layer, x, rows, self.dir.layers[layer].permutation())

    def summary(self) -> dict:
        return {"resident_ffn_layers": len(self.resident), "direct_io": self.file.direct}


class MmapFFN(_Logged):
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
        self._raw_layers = []  # uint8 views, checked once each on first use (integrity.py)
        for region in model_dir.layers:
            arr = raw[region.offset: region.offset + region.nbytes]
            self._raw_layers.append(arr)
            if not model_dir.quantized:  # int8/int4: the bytes as they are (quant_ffn)
                arr = arr.view(NUMPY_VIEW[model_dir.bundle.dtype])
            arr = arr.reshape(region.neurons, -1)
            self.layers.append(arr)
        self.log = TokenLog()

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        import warnings

        if self.dir.layer_verifier.needed(layer):
            self.dir.layer_verifier.check(layer, self._raw_layers[layer])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mapping: we never write
            rows = torch.from_numpy(self.layers[layer])
        if self.dir.quantized:  # the mapped layer's quantized rows computed for this token (quant_ffn)
            return quant_rows_ffn(x, rows, torch.from_numpy(self.dir.layers[layer].permutation()),
                                  self.dir.codec, self.dir.down_scales(layer), self.act, self.threshold,
                                  self.dir.down_mins(layer))
        if self.dir.bundle.dtype == "bfloat16":
            rows = rows.view(torch.bfloat16)
        rows = rows.to(self.dtype)
        return ffn_from_rows(x, rows, self.slices, self.act, self.threshold)

    def summary(self) -> dict:
        return {"mmap": "MAP_SHARED read-only, default read-ahead, no madvise"}
