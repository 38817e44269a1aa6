"""Cost-model read planning: which byte ranges to read so that a set of bundles costs least.

A bundle read from flash pays a latency to first byte that overlaps across reads in flight (``a``),
a per-read cost that does not overlap (``s0``: syscall, interrupt, queue slot) and a transfer time
(``bytes / B``). Amortised over ``N`` reads in flight, one read costs ``a/N + s0 + bytes/B``
(docs/STORAGE.md §3 measured a = 54 us, s0 = 10.7 us, B = 1.19 GB/s on this project's machines). Reading
the gap between two wanted ranges costs ``gap/B``; a separate read costs ``a/N + s0``. So two
ranges are merged into one read when the gap between them is under ``B * (a/N + s0)`` (about 15 KB
at 32 threads): the budget is reads, not bytes.

``plan_reads`` turns a set of wanted bundle slots into aligned, non-overlapping reads plus, for
every wanted slot, where its bytes land in one contiguous staging buffer, so the reader can gather
all bundles with a single fancy-index operation. Everything is vectorised numpy: planning 1000
bundles must cost microseconds, not the milliseconds a Python loop per bundle would.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from llmflash.errors import LLMFlashError

PROFILE_ENV = "LLMFLASH_DEVICE_PROFILE"

READS = ("planned", "bundle", "part")
"""How bundles become reads: ``planned`` by the cost model (ours); ``bundle`` one read per bundle, nothing
merged (read planning off); ``part`` one read per weight matrix of each bundle (gate row, up row, down
column: the requests an unbundled layout would issue; bundling and read planning off). The last two exist
for the paper's I/O ablation (bench --reads); the bytes that land in staging are the same in all three."""
"""Environment variable that overrides where the measured device profile lives."""


@dataclass(frozen=True)
class DeviceProfile:
    """Per-read cost model of a storage device: ``time per read = a/N + s0 + bytes/B``.

    ``a_us`` is the latency that overlaps across reads in flight, ``s0_us`` the per-read cost that
    does not (it caps IOPS at ``1/s0``), ``bandwidth_Bps`` the transfer rate, and ``threads`` the
    number of reads the reader keeps in flight (the ``N`` the merge rule assumes).
    """

    a_us: float
    s0_us: float
    bandwidth_Bps: float
    threads: int = 32
    source: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        for name in ("a_us", "s0_us", "bandwidth_Bps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"DeviceProfile.{name} must be finite and >= 0, got {value!r}")
        if self.bandwidth_Bps <= 0:
            raise ValueError("DeviceProfile.bandwidth_Bps must be > 0")
        if int(self.threads) < 1:
            raise ValueError(f"DeviceProfile.threads must be >= 1, got {self.threads!r}")

    def per_read_seconds(self, in_flight: int | None = None) -> float:
        """Amortised fixed cost of one read (no transfer) with ``in_flight`` reads overlapping."""
        n = self.threads if in_flight is None else max(1, int(in_flight))
        return (self.a_us / n + self.s0_us) * 1e-6

    def read_seconds(self, n_reads: int, total_bytes: int) -> float:
        """Predicted wall time of ``n_reads`` reads moving ``total_bytes`` with this reader.

        Fewer reads than threads cannot overlap ``a`` more than ``n_reads`` ways, so the overlap
        factor is ``min(threads, n_reads)``; with that, n reads cost ``a + n*s0 + bytes/B`` when
        they all fit in flight at once, which is what a single wave of reads really costs.
        """
        if n_reads <= 0:
            return 0.0
        in_flight = min(int(self.threads), int(n_reads))
        return n_reads * self.per_read_seconds(in_flight) + total_bytes / self.bandwidth_Bps

    def merge_gap_bytes(self) -> float:
        """Gap below which reading the gap costs less than issuing a separate read: B·(a/N + s0)."""
        return self.bandwidth_Bps * self.per_read_seconds()

    def with_threads(self, threads: int) -> DeviceProfile:
        """The same device driven by a reader with a different number of reads in flight."""
        return DeviceProfile(self.a_us, self.s0_us, self.bandwidth_Bps, int(threads), self.source)

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain JSON-able dict (what ``save`` writes)."""
        return asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON, atomically (temp file + rename), creating parent folders."""
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(tmp, target)
        except OSError as exc:
            raise LLMFlashError(f"cannot write device profile {target}: {exc.strerror or exc}") from exc
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceProfile:
        """Read a profile written by ``save`` (or by ``llmflash probe-disk``)."""
        source = Path(path).expanduser()
        try:
            raw = json.loads(source.read_text())
        except FileNotFoundError as exc:
            raise LLMFlashError(f"device profile not found: {source}") from exc
        except (OSError, ValueError) as exc:
            raise LLMFlashError(f"device profile {source} is unreadable or not JSON: {exc}") from exc
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"a_us", "s0_us", "bandwidth_Bps"} <= raw.keys():
            raise LLMFlashError(
                f"device profile {source} lacks a_us, s0_us or bandwidth_Bps; "
                "re-run `llmflash probe-disk`"
            )
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.setdefault("source", str(source))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise LLMFlashError(f"device profile {source} has invalid values: {exc}") from exc


DEFAULT_PROFILE = DeviceProfile(a_us=54.0, s0_us=10.7, bandwidth_Bps=1.19e9, threads=32, source="docs/STORAGE.md")
"""Consensus of all readers measured in docs/STORAGE.md §3 (virtio disk, ext4, 2 vCPU)."""


def default_profile_path() -> Path:
    """Where ``probe-disk`` saves the profile and the runtime looks for it."""
    override = os.environ.get(PROFILE_ENV)
    if override:
        return Path(override).expanduser()
    return Path("~/.cache/llmflash/device_profile.json").expanduser()


def load_default_profile() -> DeviceProfile:
    """The measured profile if ``probe-disk`` saved one, else the docs/STORAGE.md §3 defaults."""
    path = default_profile_path()
    if not path.exists():
        return DEFAULT_PROFILE
    return DeviceProfile.load(path)


@dataclass(frozen=True)
class ReadPlan:
    """Reads to issue and where each wanted bundle lands in the staging buffer.

    Reads are sorted, aligned, non-overlapping, and laid out back to back in the staging buffer (``buffer_offsets`` is the exclusive
    cumulative sum of ``lengths``). ``slot_positions[i]`` is the staging offset of the first byte of
    the caller's ``slots[i]``, so ``staging[slot_positions[i] : slot_positions[i] + bundle_bytes]``
    is that bundle; a bundle may straddle two reads only when they are contiguous on disk, and then
    they are contiguous in staging too.
    """

    offsets: np.ndarray
    lengths: np.ndarray
    buffer_offsets: np.ndarray
    slot_positions: np.ndarray
    bundle_bytes: int
    n_unique: int = 0

    @property
    def n_reads(self) -> int:
        """Number of preadv calls the plan issues."""
        return int(self.offsets.size)

    @property
    def total_bytes(self) -> int:
        """Bytes requested from disk, alignment padding and merged gaps included."""
        return int(self.lengths.sum())

    @property
    def staging_bytes(self) -> int:
        """Size of the staging buffer the reads fill."""
        return self.total_bytes

    @property
    def wanted_bytes(self) -> int:
        """Bytes of the distinct bundles asked for (what the caller actually needs)."""
        return self.n_unique * self.bundle_bytes

    def predicted_seconds(self, profile: DeviceProfile) -> float:
        """What the cost model says this plan takes."""
        return profile.read_seconds(self.n_reads, self.total_bytes)


def _empty_plan(bundle_bytes: int) -> ReadPlan:
    empty = np.zeros(0, dtype=np.int64)
    return ReadPlan(empty, empty.copy(), empty.copy(), empty.copy(), bundle_bytes)


def _validate(bundle_bytes: int, base_offset: int, align: int, max_read_bytes: int) -> None:
    if bundle_bytes <= 0:
        raise ValueError(f"bundle_bytes must be > 0, got {bundle_bytes}")
    if base_offset < 0:
        raise ValueError(f"base_offset must be >= 0, got {base_offset}")
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    if max_read_bytes < align or max_read_bytes % align:
        raise ValueError(f"max_read_bytes must be a positive multiple of align, got {max_read_bytes}")


def _merge_runs(starts: np.ndarray, ends: np.ndarray, gap_limit: float) -> np.ndarray:
    """Group sorted aligned ranges into contiguous reads; returns the group index of each range.

    Ranges that touch or overlap after alignment are always merged (reads must not overlap and a
    touching merge costs no extra byte); others are merged when the gap is under ``gap_limit``.
    """
    gaps = starts[1:] - ends[:-1]
    new_group = (gaps > 0) & (gaps >= gap_limit)
    return np.concatenate(([0], np.cumsum(new_group)))


def _split_groups(
    group_start: np.ndarray, group_end: np.ndarray, max_read_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut each contiguous group where it crosses a multiple of ``max_read_bytes``.

    Cutting on a fixed grid (rather than every ``max_read_bytes`` from each group's start) keeps
    the read count monotone: merging two groups can only share grid cells, never add one, so a
    larger merge threshold never means more reads. It costs an extra read only for groups that
    happen to straddle a grid line (about span/max of them: 1.6% for 16 KiB groups at 1 MiB).
    The pieces of one group are contiguous on disk and, laid out back to back, contiguous in
    staging too, so a cut through a bundle is harmless.
    """
    first_cell = group_start // max_read_bytes
    pieces = (group_end - 1) // max_read_bytes - first_cell + 1
    if int(pieces.max()) == 1:  # the usual case: no group crosses a grid line
        return group_start, group_end - group_start
    group_of_piece = np.repeat(np.arange(group_start.size), pieces)
    first_piece = np.concatenate(([0], np.cumsum(pieces)[:-1]))
    cell = first_cell[group_of_piece] + np.arange(int(pieces.sum()), dtype=np.int64) - first_piece[group_of_piece]
    offsets = np.maximum(group_start[group_of_piece], cell * max_read_bytes)
    ends = np.minimum(group_end[group_of_piece], (cell + 1) * max_read_bytes)
    return offsets, ends - offsets


def plan_reads(
    slots: np.ndarray,
    bundle_bytes: int,
    base_offset: int,
    profile: DeviceProfile | None = None,
    align: int = 512,
    max_read_bytes: int = 1 << 20,
    merge_gap_bytes: float | None = None,
    reads: str = "planned",
    part_cuts: tuple[int, ...] = (),
) -> ReadPlan:
    """Plan aligned reads that cover the bundles at ``slots`` of a region of fixed-size bundles.

    Bundle ``k`` occupies ``[base_offset + k*bundle_bytes, base_offset + (k+1)*bundle_bytes)``.
    Wanted ranges are aligned outward to ``align``; ranges that touch or overlap after that are
    always one read, and ranges whose gap is under ``merge_gap_bytes`` (default:
    ``profile.merge_gap_bytes()``; 0 merges only touching ranges) are read as one, gap included.
    No read is longer than ``max_read_bytes`` or crosses a multiple of it. Duplicated slots are
    read once and gathered as often as asked.

    ``reads`` (see READS): ``bundle`` reads each distinct bundle's aligned range on its own (ranges of
    neighbours may overlap by the alignment padding and are then read twice, as separate requests would);
    ``part`` also cuts each such range at the aligned byte offsets ``part_cuts`` within a bundle (where its
    second and later weight matrices start), so one bundle costs one read per matrix. Each bundle's bytes
    stay contiguous in staging in every case.
    """
    if reads not in READS:
        raise ValueError(f"reads must be one of {READS}, got {reads!r}")
    _validate(bundle_bytes, base_offset, align, max_read_bytes)
    wanted = np.asarray(slots, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return _empty_plan(bundle_bytes)
    if int(wanted.min()) < 0:
        raise ValueError(f"slots must be >= 0, got {int(wanted.min())}")
    if merge_gap_bytes is None:
        merge_gap_bytes = (profile or load_default_profile()).merge_gap_bytes()

    if wanted.size == 1 or bool(np.all(wanted[1:] > wanted[:-1])):
        unique, inverse = wanted, None  # already sorted and distinct: skip the sort
    else:
        unique, inverse = np.unique(wanted, return_inverse=True)
    first_byte = base_offset + unique * bundle_bytes
    starts = first_byte // align * align
    ends = -(-(first_byte + bundle_bytes) // align) * align

    if reads != "planned":
        return _unplanned(unique, inverse, first_byte, starts, ends, bundle_bytes,
                          part_cuts if reads == "part" else (), align)

    # A gap of max_read_bytes or more could hold a whole grid cell; never worth reading anyway.
    group_of = _merge_runs(starts, ends, min(merge_gap_bytes, max_read_bytes))
    boundaries = np.flatnonzero(np.diff(group_of)) + 1
    group_first = np.concatenate(([0], boundaries))
    group_last = np.concatenate((boundaries - 1, [unique.size - 1]))
    group_start, group_end = starts[group_first], ends[group_last]

    span = group_end - group_start
    group_buffer = np.concatenate(([0], np.cumsum(span)[:-1]))
    positions = group_buffer[group_of] + (first_byte - group_start[group_of])

    offsets, lengths = _split_groups(group_start, group_end, max_read_bytes)
    return _plan(offsets, lengths, positions, inverse, bundle_bytes, unique.size)


def _unplanned(unique: np.ndarray, inverse: np.ndarray | None, first_byte: np.ndarray, starts: np.ndarray,
               ends: np.ndarray, bundle_bytes: int, part_cuts: tuple[int, ...], align: int) -> ReadPlan:
    """One read per bundle (or per part of one): the ablation's baselines, vectorised like the planner."""
    span = ends - starts
    bundle_buffer = np.concatenate(([0], np.cumsum(span)[:-1]))
    positions = bundle_buffer + (first_byte - starts)
    # Cut points inside each aligned bundle range, rounded to the alignment; a cut that falls on
    # the range's start or end (tiny parts) adds no read.
    rel = np.array(sorted(set(part_cuts)), dtype=np.int64).reshape(1, -1)
    cuts = (first_byte.reshape(-1, 1) + rel) // align * align if rel.size else np.zeros((unique.size, 0), np.int64)
    bounds = np.concatenate((starts.reshape(-1, 1), np.clip(cuts, starts.reshape(-1, 1), ends.reshape(-1, 1)),
                             ends.reshape(-1, 1)), axis=1)
    lengths = np.diff(bounds, axis=1)
    keep = lengths > 0
    offsets = bounds[:, :-1][keep]
    lengths = lengths[keep]
    return _plan(offsets, lengths, positions, inverse, bundle_bytes, unique.size)


def _plan(offsets: np.ndarray, lengths: np.ndarray, positions: np.ndarray, inverse: np.ndarray | None,
          bundle_bytes: int, n_unique: int) -> ReadPlan:
    """Reads laid back to back in staging; positions of the distinct bundles mapped to the caller's order."""
    return ReadPlan(
        offsets=offsets.astype(np.int64),
        lengths=lengths.astype(np.int64),
        buffer_offsets=np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64),
        slot_positions=(positions if inverse is None else positions[inverse.reshape(-1)]).astype(np.int64),
        bundle_bytes=int(bundle_bytes),
        n_unique=int(n_unique),
    )
