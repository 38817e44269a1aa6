"""transformers, the reference, reading a GGUF with the same gguf parser but a faster file view.

transformers parses a GGUF with gguf.GGUFReader two or three times per model or tokenizer it builds
(config, weights, tokenizer). The stock reader slices a np.memmap once per metadata value, which
took 23 s per parse on Gemma-3-270M's 262k-token vocabulary: about 100 s of the suite. Inside
`plain_view()` transformers gets gguf_source.plain_view_reader() instead, the same parser over a
plain ndarray view of the same file map; test_gguf_source.py's
test_open_gguf_reads_what_the_stock_reader_reads shows that it reads every field and tensor the
stock reader reads, so the reference's inputs are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def plain_view() -> Iterator[None]:
    import gguf

    from llmflash.conversion.gguf_source import plain_view_reader

    fast = plain_view_reader()  # subclassed from the stock reader before it is replaced
    stock = gguf.GGUFReader
    gguf.GGUFReader = fast
    try:
        yield
    finally:
        gguf.GGUFReader = stock
