"""Linux kernel AIO (io_submit / io_getevents) through raw syscalls, for O_DIRECT reads.

Why: a token's FFN fetch is a handful of small reads per layer (about 9 reads of 8 KiB for SmolLM2),
layer after layer, so what it waits for is per-read latency, not bandwidth. Waking a pool of Python
threads for each layer costs more than the device itself (measured in docs/FLASH.md). Kernel AIO
submits every read of a layer in one system call and collects them in another, with no thread and
no GIL hand-off in between; with O_DIRECT the kernel really runs them concurrently. The structures
below are the kernel's ABI (``linux/aio_abi.h``), built as numpy structured arrays so that a whole
batch is filled with vector operations, not a Python loop per read.

Only x86-64 and aarch64 Linux are wired up (their syscall numbers); elsewhere, or where a sandbox
forbids ``io_setup``, :func:`kernel_aio_available` says no and the reader keeps its thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading

import numpy as np

from llmflash.errors import LLMFlashError

# (io_setup, io_destroy, io_getevents, io_submit) per machine.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}

IOCB_CMD_PREAD = 0

IOCB_DTYPE = np.dtype(
    [
        ("data", "<u8"),
        ("key", "<u4"),
        ("rw_flags", "<i4"),
        ("opcode", "<u2"),
        ("reqprio", "<i2"),
        ("fildes", "<u4"),
        ("buf", "<u8"),
        ("nbytes", "<u8"),
        ("offset", "<i8"),
        ("reserved2", "<u8"),
        ("flags", "<u4"),
        ("resfd", "<u4"),
    ]
)
"""``struct iocb`` (64 bytes, little-endian field order)."""

EVENT_DTYPE = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
"""``struct io_event`` (32 bytes)."""

assert IOCB_DTYPE.itemsize == 64 and EVENT_DTYPE.itemsize == 32

_libc: ctypes.CDLL | None = None
_probe_lock = threading.Lock()
_probe_result: bool | None = None


def _syscall_numbers() -> tuple[int, int, int, int] | None:
    if os.uname().sysname != "Linux":
        return None
    return _SYSCALLS.get(platform.machine())


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def kernel_aio_available() -> bool:
    """Whether this kernel and sandbox let us create an AIO context (probed once)."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            try:
                KernelAIO(depth=1).close()
                _probe_result = True
            except (LLMFlashError, OSError, AttributeError):
                _probe_result = False
        return _probe_result


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class PendingReads:
    """One batch of reads submitted by :meth:`KernelAIO.submit` and not yet reaped."""

    def __init__(self, n: int, dest: np.ndarray) -> None:
        self.n = n
        self.dest = dest  # referenced until reaped: the kernel writes into it
        self.got = np.zeros(n, dtype=np.int64)
        self.submitted = self.completed = 0
        self.limit = 1

    @property
    def done(self) -> bool:
        return self.completed >= self.n


class KernelAIO:
    """One AIO context with room for ``depth`` reads in flight; not thread-safe (one per reader)."""

    def __init__(self, depth: int = 256) -> None:
        numbers = _syscall_numbers()
        if numbers is None:
            raise LLMFlashError(f"kernel AIO is not wired up for {platform.machine()} {os.uname().sysname}")
        self._nr_setup, self._nr_destroy, self._nr_getevents, self._nr_submit = numbers
        self.depth = int(depth)
        self._ctx = ctypes.c_ulong(0)
        rc = _syscall()(self._nr_setup, ctypes.c_uint(self.depth), ctypes.byref(self._ctx))
        if rc < 0:
            err = ctypes.get_errno()
            raise LLMFlashError(f"io_setup({self.depth}) failed: {os.strerror(err)}")
        self._iocbs = np.zeros(self.depth, dtype=IOCB_DTYPE)
        self._events = np.zeros(self.depth, dtype=EVENT_DTYPE)
        self._pointers = np.zeros(self.depth, dtype=np.uint64)
        self._pending: PendingReads | None = None
        self._zero = _Timespec(0, 0)  # io_getevents that does not wait (poll)

    def _grow(self, n: int) -> None:
        if n > self._iocbs.size:
            self._iocbs = np.zeros(n, dtype=IOCB_DTYPE)
            self._pointers = np.zeros(n, dtype=np.uint64)

    def read(
        self,
        fd: int,
        dest: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        buffer_offsets: np.ndarray,
        in_flight: int | None = None,
    ) -> np.ndarray:
        """Read ``lengths[i]`` bytes at file ``offsets[i]`` into ``dest[buffer_offsets[i]:]``.

        Keeps up to ``in_flight`` (default and at most ``depth``) reads in flight and returns the
        bytes each read got (short only at the end of the file; the caller decides whether that is
        an error). ``dest`` must stay alive and unmoved until this returns, and the O_DIRECT
        alignment rules apply to every read.
        """
        return self.reap(self.submit(fd, dest, offsets, lengths, buffer_offsets, in_flight))

    def submit(
        self,
        fd: int,
        dest: np.ndarray,
        offsets: np.ndarray,
        lengths: np.ndarray,
        buffer_offsets: np.ndarray,
        in_flight: int | None = None,
    ) -> "PendingReads":
        """Start the reads of :meth:`read` and return at once; :meth:`reap` waits for them.

        Why: the decode step submits the next layer's reads and computes while the kernel runs
        them (no thread involved). Up to ``in_flight`` reads are submitted now; the rest as earlier
        ones complete, during :meth:`poll` or :meth:`reap`. One batch per context at a time: its
        iocbs live in this context's arrays, so a second submit before the reap is refused.
        ``dest`` is kept referenced by the batch until it is reaped.
        """
        if self._pending is not None:
            raise LLMFlashError("kernel AIO: a batch is still in flight on this context; reap it first")
        n = int(offsets.size)
        batch = PendingReads(n, dest)
        if n == 0:
            return batch
        if self._ctx.value == 0:
            raise LLMFlashError("kernel AIO context is closed")
        self._grow(n)
        iocbs = self._iocbs[:n]
        iocbs[...] = 0
        iocbs["data"] = np.arange(n, dtype=np.uint64)
        iocbs["opcode"] = IOCB_CMD_PREAD
        iocbs["fildes"] = fd
        iocbs["buf"] = np.uint64(dest.ctypes.data) + buffer_offsets.astype(np.uint64)
        iocbs["nbytes"] = lengths.astype(np.uint64)
        iocbs["offset"] = offsets.astype(np.int64)
        pointers = self._pointers[:n]
        pointers[...] = np.uint64(iocbs.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(64)
        batch.limit = self.depth if in_flight is None else max(1, min(int(in_flight), self.depth))
        self._pending = batch
        try:
            self._submit_more(batch)
        except BaseException:
            self._pending = None
            raise
        return batch

    def _submit_more(self, batch: "PendingReads") -> None:
        """Submit as many of the batch's remaining reads as its in-flight limit allows."""
        while batch.submitted < batch.n:
            room = batch.limit - (batch.submitted - batch.completed)
            if room <= 0:
                return
            count = min(room, batch.n - batch.submitted)
            rc = _syscall()(
                self._nr_submit, ctypes.c_ulong(self._ctx.value), ctypes.c_long(count),
                ctypes.c_void_p(self._pointers.ctypes.data + 8 * batch.submitted),
            )
            if rc < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EINTR):
                    return  # the queue is full: retried after the next completions
                self._drain(batch.submitted - batch.completed)
                self._pending = None
                raise OSError(err, f"io_submit: {os.strerror(err)}")
            batch.submitted += rc
            if rc < count:
                return

    def _collect(self, batch: "PendingReads", wait: bool) -> None:
        """Take completions (at least one if ``wait``, else only those already done)."""
        pending = batch.submitted - batch.completed
        if pending == 0:
            return
        rc = self._getevents(pending, 1 if wait else 0, None if wait else self._zero)
        if rc < 0:
            if -rc == errno.EINTR:
                return
            self._drain(pending)
            self._pending = None
            raise OSError(-rc, f"io_getevents: {os.strerror(-rc)}")
        done = self._events[:rc]
        res = done["res"]
        if (res < 0).any():
            err = int(-res[res < 0][0])
            self._drain(pending - rc)
            self._pending = None
            raise OSError(err, os.strerror(err))
        batch.got[done["data"].astype(np.int64)] = res
        batch.completed += rc

    def poll(self, batch: "PendingReads") -> bool:
        """Collect what has completed without waiting, submit more; True when all are done."""
        if batch.done:
            return True
        self._collect(batch, wait=False)
        self._submit_more(batch)
        if batch.done:
            self._pending = None
        return batch.done

    def reap(self, batch: "PendingReads") -> np.ndarray:
        """Wait until every read of ``batch`` has completed; the bytes each read got."""
        while not batch.done:
            self._submit_more(batch)
            self._collect(batch, wait=True)
        self._pending = None
        return batch.got

    def _getevents(self, pending: int, min_nr: int = 1, timeout=None) -> int:
        """Wait for at least ``min_nr`` of ``pending`` reads (``timeout``: a timespec, None = no
        limit); completions land in ``self._events``. Returns how many completed, or ``-errno``."""
        rc = _syscall()(
            self._nr_getevents, ctypes.c_ulong(self._ctx.value), ctypes.c_long(min_nr),
            ctypes.c_long(min(pending, self._events.size)), ctypes.c_void_p(self._events.ctypes.data),
            None if timeout is None else ctypes.byref(timeout),
        )
        return rc if rc >= 0 else -ctypes.get_errno()

    def _drain(self, pending: int) -> None:
        """Wait out reads still in flight after an error, so none lands in a freed buffer."""
        while pending > 0:
            rc = self._getevents(pending)
            if rc < 0 and rc != -errno.EINTR:
                return
            pending -= max(rc, 0)

    def close(self) -> None:
        """Destroy the context (idempotent); reads still in flight are waited out first, so none
        lands in a buffer freed after this."""
        pending = getattr(self, "_pending", None)
        if pending is not None and self._ctx.value:
            self._drain(pending.submitted - pending.completed)
            self._pending = None
        if self._ctx.value:
            _syscall()(self._nr_destroy, ctypes.c_ulong(self._ctx.value))
            self._ctx = ctypes.c_ulong(0)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
