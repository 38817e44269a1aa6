"""``llmflash probe-disk [PATH]``: measure the disk's random-read behaviour and fit the cost model.

The read planner decides whether to merge neighbouring bundles from ``a/N + s0 + bytes/B``
(:class:`~llmflash.runtime.read_planner.DeviceProfile`). Those three numbers differ by machine (an M1
SSD, a cloud virtio disk and a laptop NVMe are worlds apart), so this command measures them where
the model will live: random O_DIRECT reads over chunk sizes 4 KiB..1 MiB and 1..64 reads in flight
(the paper's Figure 2b grid), a least-squares fit of time per read, and the fitted profile saved
where :func:`~llmflash.runtime.read_planner.load_default_profile` finds it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from llmflash.errors import LLMFlashError
from llmflash.runtime.reader import FlashFile, aligned_empty
from llmflash.runtime.kernel_aio import KernelAIO, kernel_aio_available
from llmflash.runtime.read_planner import DeviceProfile, default_profile_path

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

FULL_CHUNKS = [4 * KIB << i for i in range(9)]  # 4 KiB .. 1 MiB
FULL_DEPTHS = [1, 2, 4, 8, 16, 32, 64]


@dataclass(frozen=True)
class ProbeSettings:
    """What one probe run measures; ``quick`` shrinks everything so a test takes seconds."""

    file_size: int
    chunks: list[int]
    depths: list[int]
    seconds: float
    max_reads: int | None
    threads: int


FULL = ProbeSettings(GIB, FULL_CHUNKS, FULL_DEPTHS, 0.5, None, 32)
QUICK = ProbeSettings(8 * MIB, [4 * KIB, 32 * KIB, 256 * KIB], [1, 4, 16], 0.03, 300, 32)


@dataclass(frozen=True)
class Cell:
    """One (chunk size, reads in flight) measurement."""

    chunk_bytes: int
    in_flight: int
    reads: int
    seconds: float

    @property
    def us_per_read(self) -> float:
        """Amortised wall time per read: what the cost model predicts."""
        return self.seconds / self.reads * 1e6

    @property
    def mb_per_s(self) -> float:
        """Throughput in 10^6 bytes per second."""
        return self.reads * self.chunk_bytes / self.seconds / 1e6

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "us_per_read": self.us_per_read, "mb_per_s": self.mb_per_s}


# -- command-line ------------------------------------------------------------------------------

def settings_from_args(args: argparse.Namespace) -> ProbeSettings:
    """Explicit options win; the rest come from the full or the quick preset."""
    base = QUICK if args.quick else FULL

    def pick(name: str) -> object:
        value = getattr(args, name, None)
        return getattr(base, name) if value is None else value

    settings = ProbeSettings(
        file_size=int(pick("file_size")), chunks=sorted(set(pick("chunks"))),  # type: ignore[arg-type]
        depths=sorted(set(pick("depths"))), seconds=float(pick("seconds")),  # type: ignore[arg-type]
        max_reads=pick("max_reads"), threads=int(pick("threads")),  # type: ignore[arg-type]
    )
    _validate_settings(settings)
    return settings


def _validate_settings(s: ProbeSettings) -> None:
    if not s.chunks or any(c < 512 or c % 512 for c in s.chunks):
        raise LLMFlashError(f"chunk sizes must be multiples of 512 bytes, got {s.chunks}")
    if not s.depths or any(d < 1 for d in s.depths):
        raise LLMFlashError(f"reads in flight must be >= 1, got {s.depths}")
    if s.seconds <= 0 or (s.max_reads is not None and s.max_reads < 1):
        raise LLMFlashError("--seconds must be > 0 and --max-reads >= 1")
    if s.threads < 1:
        raise LLMFlashError("--threads must be >= 1")


# -- measuring ---------------------------------------------------------------------------------


def measure_cell(
    file: FlashFile, chunk: int, in_flight: int, seconds: float, max_reads: int | None, seed: int = 0
) -> Cell:
    """``in_flight`` threads each read random chunk-aligned chunks until time (or the cap) is up."""
    n_chunks = file.size // chunk
    cap = math.ceil(max_reads / in_flight) if max_reads else sys.maxsize
    counts = [0] * in_flight
    finished = [0.0] * in_flight
    start = threading.Barrier(in_flight + 1)
    deadline = [0.0]

    def reader(k: int) -> None:
        buf = memoryview(aligned_empty(chunk))
        pick = random.Random(seed * 7919 + k).randrange
        start.wait()
        n, stop = 0, deadline[0]
        while n < cap:
            file.pread_into(buf, pick(n_chunks) * chunk)
            n += 1
            if time.perf_counter() >= stop:
                break
        counts[k], finished[k] = n, time.perf_counter()

    workers = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(in_flight)]
    for w in workers:
        w.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    return Cell(chunk, in_flight, sum(counts), max(max(finished) - began, 1e-9))


def measure_cell_aio(
    file: FlashFile, chunk: int, in_flight: int, seconds: float, max_reads: int | None, seed: int = 0
) -> Cell:
    """Waves of ``in_flight`` random chunk-aligned reads through kernel AIO, each wave submitted at
    once and awaited whole: how the runtime's reader issues a layer's reads."""
    n_chunks = file.size // chunk
    cap = max_reads or sys.maxsize
    rng = np.random.default_rng(seed)
    buf = aligned_empty(chunk * in_flight)
    lengths = np.full(in_flight, chunk, dtype=np.int64)
    buffer_offsets = np.arange(in_flight, dtype=np.int64) * chunk
    aio = KernelAIO(depth=in_flight)
    try:
        n, began = 0, time.perf_counter()
        stop = began + seconds
        while n < cap:
            offsets = rng.integers(0, n_chunks, in_flight, dtype=np.int64) * chunk
            aio.read(file.fd, buf, offsets, lengths, buffer_offsets)
            n += in_flight
            if time.perf_counter() >= stop:
                break
        return Cell(chunk, in_flight, n, max(time.perf_counter() - began, 1e-9))
    finally:
        aio.close()


def measure_grid(file: FlashFile, settings: ProbeSettings, progress: bool = True,
                 reader: str = "threads") -> list[Cell]:
    """Every (chunk, in-flight) cell, with a progress bar; ``reader`` is ``threads`` or ``aio``."""
    measure = measure_cell_aio if reader == "aio" else measure_cell
    grid = list(itertools.product(settings.chunks, settings.depths))
    cells = []
    with tqdm(total=len(grid), desc=f"probe-disk ({reader})", unit="cell", disable=not progress) as bar:
        for i, (chunk, depth) in enumerate(grid):
            bar.set_postfix_str(f"{_fmt_size(chunk)} x{depth}")
            cells.append(measure(file, chunk, depth, settings.seconds, settings.max_reads, seed=i))
            bar.update()
    return cells


def pick_reader(requested: str, file: FlashFile) -> str:
    """The reader to measure with: the one the runtime will use unless told otherwise."""
    if requested == "aio" and not (file.direct and kernel_aio_available()):
        raise LLMFlashError("probe-disk: --reader aio needs O_DIRECT and kernel AIO, unavailable here")
    if requested == "auto":
        return "aio" if file.direct and kernel_aio_available() else "threads"
    return requested


# -- fitting -----------------------------------------------------------------------------------

_FLOOR_US = 0.01  # a zero coefficient would mean "free"; keep the profile usable and positive
_MAX_BANDWIDTH = 1e12


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: best feasible solution over all active sets.

    Three unknowns give eight subsets, so exhaustive search is exact and cheap (no scipy here).
    """
    n = design.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(target**2))
    for mask in itertools.product([False, True], repeat=n):
        cols = np.flatnonzero(mask)
        if cols.size == 0:
            continue
        coef, *_ = np.linalg.lstsq(design[:, cols], target, rcond=None)
        if np.any(coef < 0):
            continue
        residual = float(np.sum((design[:, cols] @ coef - target) ** 2))
        if residual < best_residual:
            best = np.zeros(n)
            best[cols] = coef
            best_residual = residual
    return best


def fit_profile(cells: Sequence[Cell], threads: int = 32) -> tuple[DeviceProfile, dict[str, float]]:
    """Fit ``us per read = a/N + s0 + bytes/B`` to the cells, minimising relative error.

    Relative (not absolute) error, so 1 MiB reads (~1 ms) do not drown out 4 KiB ones (~20 us):
    the planner's decisions hinge on the small-read end.
    """
    if len(cells) < 3:
        raise LLMFlashError("need at least 3 probe cells to fit a, s0 and bandwidth")
    t = np.array([c.us_per_read for c in cells])
    design = np.array([[1.0 / c.in_flight, 1.0, float(c.chunk_bytes)] for c in cells])
    coef = _nonnegative_lstsq(design / t[:, None], np.ones_like(t))
    a_us, s0_us = max(coef[0], _FLOOR_US), max(coef[1], _FLOOR_US)
    bandwidth = min(1e6 / coef[2], _MAX_BANDWIDTH) if coef[2] > 0 else _MAX_BANDWIDTH
    profile = DeviceProfile(a_us=float(a_us), s0_us=float(s0_us), bandwidth_Bps=float(bandwidth),
                            threads=threads, source="llmflash probe-disk")
    predicted = design @ np.array([a_us, s0_us, 1e6 / bandwidth])
    rel = np.abs(predicted - t) / t
    quality = {"median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.quantile(rel, 0.9))}
    return profile, quality


# -- scratch file ------------------------------------------------------------------------------


def _probe_folder(path: Path) -> Path:
    if not path.exists():
        raise LLMFlashError(f"probe-disk: {path} does not exist")
    return path if path.is_dir() else path.parent


def write_scratch_file(folder: Path, size: int, progress: bool = True) -> Path:
    """Random (incompressible) data, synced and dropped from the page cache so reads are cold."""
    free = shutil.disk_usage(folder).free
    if free < size + 64 * MIB:
        raise LLMFlashError(
            f"probe-disk: {folder} has {free / GIB:.1f} GiB free, the scratch file needs "
            f"{size / GIB:.1f} GiB; use --file-size or --file"
        )
    path = folder / f".llmflash-probe-{os.getpid()}.bin"
    rng = np.random.default_rng()
    block = 8 * MIB
    try:
        with open(path, "wb") as f, tqdm(total=size, desc="scratch file", unit="B", unit_scale=True,
                                         disable=not progress) as bar:
            for done in range(0, size, block):
                n = min(block, size - done)
                f.write(rng.bytes(n))
                bar.update(n)
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise LLMFlashError(f"probe-disk: cannot write scratch file {path}: {exc.strerror or exc}") from exc
    return path


# -- reporting ---------------------------------------------------------------------------------


def _fmt_size(n: int) -> str:
    return f"{n // MIB}M" if n >= MIB and n % MIB == 0 else f"{n // KIB}K" if n % KIB == 0 else f"{n}B"


def format_table(cells: Sequence[Cell]) -> str:
    """MB/s by chunk size (rows) x reads in flight (columns), like the paper's Figure 2b."""
    chunks = sorted({c.chunk_bytes for c in cells})
    depths = sorted({c.in_flight for c in cells})
    by_key = {(c.chunk_bytes, c.in_flight): c for c in cells}
    lines = ["MB/s    " + "".join(f"{f'x{d}':>8}" for d in depths)]
    for chunk in chunks:
        row = [by_key.get((chunk, d)) for d in depths]
        lines.append(f"{_fmt_size(chunk):>6}  " + "".join(f"{c.mb_per_s:8.0f}" if c else f"{'-':>8}" for c in row))
    return "\n".join(lines)


def format_profile(profile: DeviceProfile, quality: dict[str, float]) -> str:
    """The fitted model in words, with what it implies for the planner."""
    b = profile.bandwidth_Bps
    chunk90 = 9 * b * profile.per_read_seconds()
    return (
        f"fit: time per read = {profile.a_us:.1f} us / N + {profile.s0_us:.1f} us + bytes / "
        f"{b / 1e9:.2f} GB/s   (median error {quality['median_rel_error']:.0%}, "
        f"p90 {quality['p90_rel_error']:.0%})\n"
        f"at N={profile.threads}: merge gaps under {profile.merge_gap_bytes() / 1e3:.1f} KB; "
        f"90% of bandwidth from {chunk90 / KIB:.0f} KiB reads; "
        f"at most {1e6 / profile.s0_us / 1e3:.0f}k reads/s"
    )


def write_plot(path: Path, cells: Sequence[Cell], profile: DeviceProfile) -> None:
    """Throughput against chunk size, one line per reads-in-flight, model dashed."""
    plt = _import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    chunks = sorted({c.chunk_bytes for c in cells})
    for depth in sorted({c.in_flight for c in cells}):
        row = sorted((c for c in cells if c.in_flight == depth), key=lambda c: c.chunk_bytes)
        line, = ax.plot([c.chunk_bytes for c in row], [c.mb_per_s for c in row], "o-", label=f"{depth} in flight")
        model = [ch / (profile.a_us / depth + profile.s0_us + ch / profile.bandwidth_Bps * 1e6) for ch in chunks]
        ax.plot(chunks, model, "--", color=line.get_color(), alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(chunks, [_fmt_size(c) for c in chunks])
    ax.set_xlabel("chunk size")
    ax.set_ylabel("random read MB/s")
    ax.set_title("random O_DIRECT reads (dashed: fitted a/N + s0 + bytes/B)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise LLMFlashError(f"probe-disk: cannot write plot {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)


def _import_pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LLMFlashError("--plot needs matplotlib, which is not installed: pip install matplotlib") from exc
    return plt


def report_dict(
    file: FlashFile, settings: ProbeSettings, cells: Sequence[Cell], profile: DeviceProfile,
    quality: dict[str, float], saved_to: Path | None,
) -> dict[str, object]:
    """Everything the run measured and fitted, JSON-able."""
    return {
        "version": 1,
        "path": str(file.path),
        "file_size": file.size,
        "direct": file.direct,
        "seconds_per_cell": settings.seconds,
        "max_reads_per_cell": settings.max_reads,
        "cells": [c.to_dict() for c in cells],
        "profile": profile.to_dict(),
        "fit": {**quality, "merge_gap_bytes": profile.merge_gap_bytes()},
        "saved_to": str(saved_to) if saved_to else None,
    }


# -- entry points ------------------------------------------------------------------------------


def _open_target(args: argparse.Namespace, settings: ProbeSettings, progress: bool) -> tuple[Path, bool]:
    """The file to probe and whether it is a scratch file to delete afterwards."""
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise LLMFlashError(f"probe-disk: --file {path} is not an existing file")
        return path, False
    return write_scratch_file(_probe_folder(Path(args.path)), settings.file_size, progress), True


def run(args: argparse.Namespace) -> int:
    """Measure, fit, print, and save/write what was asked; returns the exit status."""
    settings = settings_from_args(args)
    if args.plot is not None:
        _import_pyplot()  # fail before minutes of measuring, not after
    progress = True
    path, scratch = _open_target(args, settings, progress)
    try:
        with FlashFile(path) as file:
            if file.size < max(settings.chunks):
                raise LLMFlashError(f"probe-disk: {path} ({file.size} bytes) is smaller than a {max(settings.chunks)}-byte chunk")
            if not file.direct:
                print(f"note: O_DIRECT refused on {path}; measuring buffered reads with pages dropped after each read")
            reader = pick_reader(getattr(args, "reader", "auto"), file)
            cells = measure_grid(file, settings, progress, reader)
            profile, quality = fit_profile(cells, settings.threads)
            profile = replace(profile, source=f"{profile.source} ({reader})")
            saved_to = profile.save(default_profile_path()) if args.save else None
            report = report_dict(file, settings, cells, profile, quality, saved_to)
            report["reader"] = reader
    finally:
        if scratch:
            path.unlink(missing_ok=True)
    print(format_table(cells))
    print(format_profile(profile, quality))
    if saved_to:
        print(f"profile saved to {saved_to}")
    if args.json is not None:
        _write_json(Path(args.json), report)
    if args.plot is not None:
        write_plot(Path(args.plot), cells, profile)
    return 0


def _write_json(path: Path, report: dict[str, object]) -> None:
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise LLMFlashError(f"probe-disk: cannot write {path}: {exc.strerror or exc}") from exc
