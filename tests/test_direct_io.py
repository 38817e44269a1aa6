"""FlashFile / FlashReader: bytes identical to numpy slicing, O_DIRECT really used, cold reads."""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash.errors import LLMFlashError
from llmflash.runtime import reader as direct_io
from llmflash.runtime.reader import (
    DirectIOFallbackWarning,
    FlashFile,
    FlashReader,
    aligned_empty,
    round_up,
)
from llmflash.runtime.kernel_aio import KernelAIO, kernel_aio_available
from llmflash.runtime.read_planner import DEFAULT_PROFILE, plan_reads

FILE_BYTES = 4 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
DIRECT_IO_FILESYSTEMS = {"ext4", "xfs", "btrfs", "ext3", "f2fs"}


def _filesystem_type(path: Path) -> str:
    """Type of the filesystem holding ``path`` (longest matching mount point in /proc/mounts)."""
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount_point, fs_type, *_ = line.split()
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def _write_random_file(path: Path, nbytes: int, seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def _process_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.fixture(scope="module")
def random_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("flash") / "bundles.bin"
    return path, _write_random_file(path, FILE_BYTES, seed=1234)


BACKENDS = [
    "threads",
    pytest.param("aio", marks=pytest.mark.skipif(not kernel_aio_available(), reason="kernel AIO unavailable")),
]


@pytest.fixture(scope="module", params=BACKENDS)
def reader(request: pytest.FixtureRequest) -> FlashReader:
    with FlashReader(
        threads=16, profile=DEFAULT_PROFILE, max_read_bytes=64 << 10, range_chunk_bytes=256 << 10,
        backend=request.param,
    ) as r:
        assert r.backend == request.param
        yield r


@pytest.fixture(scope="module")
def files(random_file: tuple[Path, np.ndarray]) -> dict[bool, FlashFile]:
    path, _ = random_file
    opened = {True: FlashFile(path, direct=None), False: FlashFile(path, direct=False)}
    yield opened
    for f in opened.values():
        f.close()


@pytest.fixture
def repo_fs_dir() -> Path:
    """A scratch folder on the filesystem that holds the repository (ext4 on these machines)."""
    with tempfile.TemporaryDirectory(prefix=".llmflash-test-", dir=REPO_ROOT) as d:
        yield Path(d)


# -- aligned buffers ---------------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [512, 4096, 1 << 16])
@pytest.mark.parametrize("nbytes", [0, 1, 3456, 1 << 20])
def test_aligned_empty_is_aligned_and_writable(alignment: int, nbytes: int) -> None:
    buf = aligned_empty(nbytes, alignment)
    assert buf.dtype == np.uint8 and buf.shape == (nbytes,)
    assert buf.ctypes.data % alignment == 0
    buf[:] = 7
    assert np.all(buf == 7)


def test_aligned_empty_rejects_bad_alignment() -> None:
    with pytest.raises(ValueError):
        aligned_empty(10, 1000)


# -- read_bundles correctness ------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(data=st.data(), bundle_bytes=st.integers(1, 70_000), base_pages=st.integers(0, 8), direct=st.booleans())
def test_read_bundles_matches_numpy_slicing(
    random_file: tuple[Path, np.ndarray], files: dict[bool, FlashFile], reader: FlashReader,
    data: st.DataObject, bundle_bytes: int, base_pages: int, direct: bool,
) -> None:
    _, known = random_file
    base = base_pages * 4096
    n_bundles = (FILE_BYTES - base) // bundle_bytes
    slots = np.array(
        data.draw(st.lists(st.integers(0, n_bundles - 1), min_size=0, max_size=150)), dtype=np.int64
    )
    got = reader.read_bundles(files[direct], base, bundle_bytes, slots)
    expected = known[base : base + n_bundles * bundle_bytes].reshape(n_bundles, bundle_bytes)[slots]
    assert got.shape == (slots.size, bundle_bytes)
    np.testing.assert_array_equal(got, expected)


def test_read_bundles_fills_out_rows_in_caller_order(
    random_file: tuple[Path, np.ndarray], files: dict[bool, FlashFile], reader: FlashReader
) -> None:
    _, known = random_file
    bb, base = 3456, 8192
    table = known[base : base + 1000 * bb].reshape(1000, bb)
    slots = np.array([999, 3, 4, 5, 500, 3, 0], dtype=np.int64)
    cache = np.zeros((20, bb), dtype=np.uint8)
    result = reader.read_bundles(files[True], base, bb, slots, out=cache[10:17])
    assert np.shares_memory(result, cache)
    np.testing.assert_array_equal(cache[10:17], table[slots])
    assert not cache[:10].any() and not cache[17:].any()
    with pytest.raises(ValueError):
        reader.read_bundles(files[True], base, bb, slots, out=np.zeros((6, bb), dtype=np.uint8))


def test_odd_bundle_sizes_and_duplicates(
    random_file: tuple[Path, np.ndarray], files: dict[bool, FlashFile], reader: FlashReader
) -> None:
    _, known = random_file
    for bb in (1, 3, 511, 513, 4097):
        n = FILE_BYTES // bb
        slots = np.random.default_rng(bb).integers(0, n, size=300)
        expected = known[: n * bb].reshape(n, bb)[slots]
        np.testing.assert_array_equal(reader.read_bundles(files[True], 0, bb, slots), expected)


def test_bundle_past_end_of_file_names_the_file(files: dict[bool, FlashFile], reader: FlashReader) -> None:
    with pytest.raises(LLMFlashError, match="bundles.bin"):
        reader.read_bundles(files[True], 0, 16384, np.array([FILE_BYTES // 16384]))


def test_stats_count_reads_and_bytes_and_reset(files: dict[bool, FlashFile]) -> None:
    slots = np.array([1, 2, 3, 40, 41, 90], dtype=np.int64)
    plan = plan_reads(slots, 16384, 4096, DEFAULT_PROFILE.with_threads(4), max_read_bytes=1 << 20)
    with FlashReader(threads=4, profile=DEFAULT_PROFILE) as reader:
        reader.read_bundles(files[True], 4096, 16384, slots)
        assert reader.stats.reads == plan.n_reads == 3
        assert reader.stats.bytes == plan.total_bytes
        assert reader.stats.wanted_bytes == 6 * 16384
        assert reader.stats.seconds > 0 and reader.stats.calls == 1
        reader.stats.reset()
        assert (reader.stats.reads, reader.stats.bytes, reader.stats.seconds) == (0, 0, 0.0)


def test_staging_buffer_is_reused_in_steady_state(files: dict[bool, FlashFile]) -> None:
    rng = np.random.default_rng(0)
    with FlashReader(threads=4, profile=DEFAULT_PROFILE) as reader:
        reader.read_bundles(files[True], 0, 3456, rng.choice(1000, 64, replace=False))
        staging = reader._staging
        for _ in range(5):
            reader.read_bundles(files[True], 0, 3456, rng.choice(1000, 64, replace=False))
            assert reader._staging is staging or reader._staging.size > staging.size
        assert reader._staging.ctypes.data % 4096 == 0


# -- read_range --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(0, FILE_BYTES - 1), length=st.integers(0, 2 << 20),
    direct=st.booleans(), mode=st.sampled_from(["none", "aligned_out", "odd_out"]),
)
def test_read_range_matches_numpy_slicing(
    random_file: tuple[Path, np.ndarray], files: dict[bool, FlashFile], reader: FlashReader,
    offset: int, length: int, direct: bool, mode: str,
) -> None:
    _, known = random_file
    length = min(length, FILE_BYTES - offset)
    out = None
    if mode == "aligned_out":
        out = aligned_empty(round_up(length, 512) + 512)
    elif mode == "odd_out":
        out = aligned_empty(length + 8)[3 : 3 + length + 2]
    got = reader.read_range(files[direct], offset, length, out=out)
    np.testing.assert_array_equal(got, known[offset : offset + length])
    if out is not None and length:
        assert np.shares_memory(got, out)


def test_read_range_past_end_names_the_file(files: dict[bool, FlashFile], reader: FlashReader) -> None:
    with pytest.raises(LLMFlashError, match="bundles.bin"):
        reader.read_range(files[True], FILE_BYTES - 10, 11)


# -- O_DIRECT, fallback, errors ----------------------------------------------------------------


def test_o_direct_is_used_on_the_repository_filesystem(repo_fs_dir: Path) -> None:
    fs_type = _filesystem_type(repo_fs_dir)
    if fs_type not in DIRECT_IO_FILESYSTEMS:
        pytest.skip(f"repository is on {fs_type}, which may refuse O_DIRECT")
    path = repo_fs_dir / "f.bin"
    _write_random_file(path, 1 << 20, seed=5)
    with FlashFile(path) as f:
        assert f.direct
        assert f.size == 1 << 20
        assert os.fstat(f.fd).st_size == f.size
        import fcntl

        assert fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_DIRECT


def _cold_read_bytes(
    path: Path, direct: bool, slots: np.ndarray, bb: int, backend: str = "auto"
) -> tuple[int, int, int]:
    """(process read_bytes delta, stats.bytes, stats.reads) for one read_bundles call."""
    with FlashFile(path, direct=direct) as f, FlashReader(threads=8, profile=DEFAULT_PROFILE, backend=backend) as reader:
        before = _process_read_bytes()
        reader.read_bundles(f, 0, bb, slots)
        return _process_read_bytes() - before, reader.stats.bytes, reader.stats.reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_cold_direct_read_moves_what_stats_report(repo_fs_dir: Path, backend: str) -> None:
    if _filesystem_type(repo_fs_dir) not in DIRECT_IO_FILESYSTEMS:
        pytest.skip("needs a disk-backed filesystem")
    path = repo_fs_dir / "cold.bin"
    _write_random_file(path, 8 << 20, seed=6)
    slots = np.random.default_rng(1).choice((8 << 20) // 3456, 200, replace=False)
    device, requested, _ = _cold_read_bytes(path, True, slots, 3456, backend)
    assert requested <= device <= requested + 4096  # + the 512-byte O_DIRECT probe at open


def test_buffered_fallback_stays_cold_across_repeated_reads(repo_fs_dir: Path) -> None:
    if _filesystem_type(repo_fs_dir) not in DIRECT_IO_FILESYSTEMS:
        pytest.skip("needs a disk-backed filesystem")
    path = repo_fs_dir / "buffered.bin"
    _write_random_file(path, 8 << 20, seed=7)
    slots = np.random.default_rng(2).choice((8 << 20) // 16384, 100, replace=False)
    for _ in range(2):  # the second pass would read nothing from disk if pages had stayed cached
        device, requested, reads = _cold_read_bytes(path, False, slots, 16384)
        assert requested <= device <= requested + reads * 2 * 4096


def test_auto_mode_falls_back_when_open_refuses_o_direct(
    random_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, known = random_file
    real_open = os.open

    def refusing_open(p, flags, *args):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    monkeypatch.setattr(direct_io, "_warned_devices", set())
    with pytest.warns(DirectIOFallbackWarning, match="bundles.bin"):
        first = FlashFile(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = FlashFile(path)  # same filesystem: warned once already
    with pytest.raises(LLMFlashError, match="O_DIRECT is not supported.*bundles.bin"):
        FlashFile(path, direct=True)
    with first, second, FlashReader(threads=2, profile=DEFAULT_PROFILE) as reader:
        assert not first.direct and not second.direct
        got = reader.read_bundles(first, 0, 3456, np.array([5, 1]))
        np.testing.assert_array_equal(got, known[: 6 * 3456].reshape(6, 3456)[[5, 1]])


def test_auto_mode_falls_back_when_reads_refuse_o_direct(
    random_file: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = random_file
    monkeypatch.setattr(FlashFile, "_direct_read_refused", lambda self, fd: "simulated EINVAL")
    monkeypatch.setattr(direct_io, "_warned_devices", set())
    with pytest.warns(DirectIOFallbackWarning, match="simulated"):
        with FlashFile(path) as f:
            assert not f.direct


def test_missing_file_and_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(LLMFlashError, match="nope.bin"):
        FlashFile(tmp_path / "nope.bin")
    with pytest.raises(LLMFlashError, match="not a regular file"):
        FlashFile(tmp_path)


def test_closed_file_refuses_reads(random_file: tuple[Path, np.ndarray]) -> None:
    f = FlashFile(random_file[0])
    f.close()
    f.close()
    with FlashReader(threads=2, profile=DEFAULT_PROFILE) as reader:
        with pytest.raises(LLMFlashError, match="closed"):
            reader.read_bundles(f, 0, 4096, np.array([0, 100]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_truncated_while_open_is_a_short_read_error(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "shrinks.bin"
    _write_random_file(path, 1 << 20, seed=9)
    with FlashFile(path) as f, FlashReader(threads=4, profile=DEFAULT_PROFILE, backend=backend) as reader:
        os.truncate(path, 4096)
        with pytest.raises(LLMFlashError, match="short read from .*shrinks.bin"):
            reader.read_bundles(f, 0, 16384, np.array([10, 40]))


# -- kernel AIO ---------------------------------------------------------------------------------


@pytest.mark.skipif(not kernel_aio_available(), reason="kernel AIO unavailable")
@pytest.mark.parametrize("in_flight", [1, 3, 64])
def test_kernel_aio_reads_more_ranges_than_its_depth(
    random_file: tuple[Path, np.ndarray], in_flight: int
) -> None:
    path, data = random_file
    rng = np.random.default_rng(in_flight)
    n, size = 100, 8192
    offsets = rng.integers(0, data.size // size, n).astype(np.int64) * size
    dest = aligned_empty(n * size)
    with FlashFile(path, direct=True) as f:
        aio = KernelAIO(depth=16)
        try:
            got = aio.read(f.fd, dest, offsets, np.full(n, size, np.int64), np.arange(n) * size, in_flight)
        finally:
            aio.close()
    assert (got == size).all()
    expected = np.stack([data[o : o + size] for o in offsets.tolist()])
    np.testing.assert_array_equal(dest.reshape(n, size), expected)


@pytest.mark.skipif(not kernel_aio_available(), reason="kernel AIO unavailable")
def test_kernel_aio_reports_errors_and_end_of_file(random_file: tuple[Path, np.ndarray]) -> None:
    path, data = random_file
    dest = aligned_empty(8192)
    aio = KernelAIO(depth=4)
    try:
        with FlashFile(path, direct=True) as f:
            last = (data.size // 4096 - 1) * 4096
            got = aio.read(f.fd, dest, np.array([last]), np.array([8192]), np.array([0]))
            assert got.tolist() == [4096]  # short only because the file ends
            with pytest.raises(OSError):  # misaligned offset: the kernel says EINVAL
                aio.read(f.fd, dest, np.array([100]), np.array([4096]), np.array([0]))
    finally:
        aio.close()
    with pytest.raises(LLMFlashError, match="closed"):
        aio.read(0, dest, np.array([0]), np.array([4096]), np.array([0]))


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        FlashReader(backend="uring")


@pytest.mark.parametrize("bundle_bytes,step", [(16386, 2), (6912, 4096), (24, 8), (13, 1), (20, 4), (4096, 16)])
def test_gather_bundles_copies_each_bundle_from_its_position(bundle_bytes, step):
    """The gather (one index_select over overlapping rows) against a plain per-bundle copy, for
    bundle sizes and staging offsets of every alignment the element size is chosen from."""
    from llmflash.runtime.reader import gather_bundles

    rng = np.random.default_rng(bundle_bytes)
    source = rng.integers(0, 256, 40 * bundle_bytes + 4 * 4096, dtype=np.uint8)
    room = (len(source) - bundle_bytes) // step
    positions = rng.choice(room + 1, size=25, replace=False) * step
    out = np.zeros((len(positions), bundle_bytes), dtype=np.uint8)
    gather_bundles(source, positions, bundle_bytes, out)
    for i, p in enumerate(positions):
        assert np.array_equal(out[i], source[p:p + bundle_bytes]), (i, p)
    strided = np.zeros((len(positions), 2 * bundle_bytes), dtype=np.uint8)[:, :bundle_bytes]  # not contiguous
    gather_bundles(source, positions, bundle_bytes, strided)
    assert np.array_equal(strided, out)
