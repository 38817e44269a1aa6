"""Sizes as users write them, parsed one way everywhere (--memory, probe-disk's --file-size ...).

Units: a bare K, M, G, T and the IEC KiB, MiB, GiB, TiB are powers of 1024 (as llama.cpp and most
tools read "4K"); the SI kB/KB, MB, GB, TB are powers of 1000. "B" or nothing: bytes.
"""

from __future__ import annotations

import re

from llmflash.errors import LLMFlashError

_UNITS = {"": 1, "b": 1,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"([0-9]*\.?[0-9]+)\s*([a-z]*)")


def parse_size(text: str, what: str = "size") -> int:
    """'4096', '4K', '16MiB', '1.5GB' -> bytes."""
    m = _SIZE.fullmatch(str(text).strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise LLMFlashError(f"cannot read {what} {text!r}: use bytes or a unit, e.g. 4096, 64K, 300MiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_memory(spec: str, model_bytes: int) -> int:
    """A memory budget: a share of the stored model ('50%') or a size ('6GiB', '300MB')."""
    text = str(spec).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise LLMFlashError(f"cannot read memory budget {spec!r}; use e.g. 50% or 6GiB") from None
        if not 0 < share <= 100:
            raise LLMFlashError(f"memory budget {spec!r} must be more than 0% and at most 100% of the model")
        return int(model_bytes * share / 100)
    size = parse_size(text, "memory budget")
    if size <= 0:
        raise LLMFlashError(f"memory budget {spec!r} must be more than 0 bytes")
    return size
