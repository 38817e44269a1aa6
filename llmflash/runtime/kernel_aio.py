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
        n = int(offsets.size)
        got = np.zeros(n, dtype=np.int64)
        if n == 0:
            return got
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
        syscall = _syscall()
        ctx = self._ctx.value
        limit = self.depth if in_flight is None else max(1, min(int(in_flight), self.depth))
        submitted = completed = 0
        while completed < n:
            room = limit - (submitted - completed)
            if submitted < n and room > 0:
                batch = min(room, n - submitted)
                rc = syscall(
                    self._nr_submit, ctypes.c_ulong(ctx), ctypes.c_long(batch),
                    ctypes.c_void_p(pointers.ctypes.data + 8 * submitted),
                )
                if rc < 0:
                    err = ctypes.get_errno()
                    if err not in (errno.EAGAIN, errno.EINTR):
                        self._drain(submitted - completed)
                        raise OSError(err, f"io_submit: {os.strerror(err)}")
                    rc = 0
                submitted += rc
                if rc == batch and submitted < n and limit - (submitted - completed) > 0:
                    continue
            pending = submitted - completed
            if pending == 0:
                continue
            rc = self._getevents(pending)
            if rc < 0:
                err = -rc
                if err == errno.EINTR:
                    continue
                raise OSError(err, f"io_getevents: {os.strerror(err)}")
            done = self._events[:rc]
            res = done["res"]
            if (res < 0).any():
                err = int(-res[res < 0][0])
                self._drain(pending - rc)
                raise OSError(err, os.strerror(err))
            got[done["data"].astype(np.int64)] = res
            completed += rc
        return got

    def _getevents(self, pending: int) -> int:
        """Wait for at least one of ``pending`` reads; completions land in ``self._events``.
        Returns how many completed, or ``-errno``."""
        rc = _syscall()(
            self._nr_getevents, ctypes.c_ulong(self._ctx.value), ctypes.c_long(1),
            ctypes.c_long(min(pending, self._events.size)), ctypes.c_void_p(self._events.ctypes.data), None,
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
        """Destroy the context (idempotent)."""
        if self._ctx.value:
            _syscall()(self._nr_destroy, ctypes.c_ulong(self._ctx.value))
            self._ctx = ctypes.c_ulong(0)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
