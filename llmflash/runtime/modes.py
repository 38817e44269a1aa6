"""The run modes, each an FFN provider factory for Engine: ours and the paper's baselines.

    dense   whole model in DRAM (the ceiling when memory is plentiful)
    flash   ours: predicted neurons, windowed neuron cache, bundles read with direct I/O
    naive   every FFN weight read from flash for every token
    hybrid  as much of the FFN resident as the budget allows, the rest read whole every token
    mmap    ffn.bin memory-mapped, the OS page cache decides (llama.cpp's approach)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.runtime import providers, quant_kernels
from llmflash.runtime.engine import dense_ffn
from llmflash.runtime.memory_plan import plan_memory, release_freed_heap
from llmflash.runtime.read_planner import READS
from llmflash.runtime.reader import FlashReader
from llmflash.runtime.selectors import make_selector, resolve_sparsity
from llmflash.runtime.sparse_ffn import sparse_ffn_factory

MODES = ("dense", "flash", "naive", "hybrid", "mmap")
PREDICTOR_DTYPE = torch.float16
SCRATCH_SHARE = 1 / 8  # of the cache rows, for streaming selections that overflow a layer's cache
LOOKAHEAD_SHARE = 1 / 16  # of the rows left, for the staging buffer of lookahead reads (flash)
READERS = ("auto", "aio", "threads")


@dataclass
class RunOptions:
    """How a model runs: the mode, the memory budget, the selector and the reader."""

    mode: str = "dense"
    memory: str = "50%"  # the memory budget (flash, hybrid): a share of the stored model or a size
    window: int = 5  # tokens whose neurons stay cached (flash)
    sparsity: str | None = None  # selector name (runtime.selectors); None = auto for the mode
    density: float | None = None  # share of neurons a magnitude/predictor selector keeps per token
    threads: int = 32  # reads in flight
    pin: float = 0.0  # share of each layer's neurons pinned in DRAM (hottest first)
    reader: str = "auto"  # auto (kernel AIO where allowed) | aio | threads
    context: int | None = None  # longest sequence (prompt + generated) in tokens; its KV cache is charged
    predictor_cost: str | None = None  # flash: run and charge a stand-in predictor (runtime.trace_selector)
    lookahead: bool = False  # flash: read the next layer's predicted bundles while this one computes
    overlap: bool = True  # flash: read a token's new neurons while the FFN over the cached rows computes
    reads: str = "planned"  # flash: planned | bundle | part (read_planner.READS; the I/O ablation)

    def check(self) -> None:
        if self.mode not in MODES:
            raise LLMFlashError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.window < 1:
            raise LLMFlashError(f"window must be at least 1 token, got {self.window}")
        if self.density is not None and not 0 < self.density <= 1:
            raise LLMFlashError(f"density must be in (0, 1], got {self.density}")
        if self.threads < 1:
            raise LLMFlashError(f"threads must be at least 1, got {self.threads}")
        if not 0 <= self.pin < 1:
            raise LLMFlashError(f"pin must be in [0, 1), got {self.pin}")
        if self.reader not in READERS:
            raise LLMFlashError(f"unknown reader {self.reader!r}; choose one of {', '.join(READERS)}")
        if self.reads not in READS:
            raise LLMFlashError(f"unknown reads {self.reads!r}; choose one of {', '.join(READS)}")
        if self.predictor_cost is not None:
            from llmflash.runtime.trace_selector import parse_predictor_cost

            parse_predictor_cost(self.predictor_cost)


def selector_dtype(model_dir: FlashModelDir, dtype: torch.dtype) -> torch.dtype:
    """What a selector's weight copies (exact, magnitude) are held at: the held dtype, or float16
    for an int8/int4 model held quantized (their copies are float rows, charged at that size)."""
    return torch.float16 if dtype == torch.uint8 else dtype


def ffn_factory(options: RunOptions):
    """A factory(model_dir, dtype) -> FFN provider for Engine, per the options.

    The one place that decides what runs: dense without a selector is the whole FFN in DRAM, dense
    with one is a sparse run in DRAM (SparseFFN), flash reads the selected bundles, and the
    baselines read everything."""
    options.check()

    def build(model_dir: FlashModelDir, dtype: torch.dtype):
        sparsity = resolve_sparsity(model_dir, options.sparsity, options.mode)
        if options.mode == "dense" and sparsity == "none":
            return dense_ffn(model_dir, dtype)
        if model_dir.quantized:  # rows computed per token: their compiled kernels ready before the first
            quant_kernels.warm(model_dir.dtype)
        if options.mode == "dense":
            return sparse_ffn_factory(sparsity, options.density)(model_dir, dtype)
        if options.mode == "mmap":
            return providers.MmapFFN(model_dir, dtype)
        reader = FlashReader(threads=options.threads, backend=options.reader, reads=options.reads,
                             part_cuts=model_dir.bundle.part_cuts() if options.mode == "flash" else ())
        if options.mode == "naive":
            return providers.NaiveFFN(model_dir, dtype, reader)
        if options.mode == "hybrid":
            plan = plan_memory(model_dir, options.memory, dtype, context=options.context)
            return providers.NaiveFFN(model_dir, dtype, reader, resident_layers=plan.resident_ffn_layers)
        if sparsity == "none":
            raise LLMFlashError("flash mode reads only selected neurons: choose a selector (predictor, exact, "
                                "magnitude, trace:PATH), or mode naive/hybrid to read every neuron")
        selector = make_selector(model_dir, sparsity, selector_dtype(model_dir, dtype), options.density,
                                 predictor_dtype=PREDICTOR_DTYPE)
        if options.predictor_cost:
            from llmflash.runtime.trace_selector import PredictorCost, random_predictors

            selector = PredictorCost(selector, random_predictors(model_dir, options.predictor_cost, PREDICTOR_DTYPE),
                                     options.predictor_cost)
        release_freed_heap()  # what loading the selector freed, before the caches are allocated
        # Every selector's resident bytes are charged to the budget, instruments included.
        plan = plan_memory(model_dir, options.memory, dtype, extra_resident_bytes=selector.nbytes(),
                           window=options.window, scratch_share=SCRATCH_SHARE, context=options.context,
                           lookahead_share=LOOKAHEAD_SHARE if options.lookahead else 0.0)
        return providers.FlashFFN(model_dir, dtype, selector, plan, options.window, reader, pin=options.pin,
                                  lookahead=options.lookahead, overlap=options.overlap)

    def precheck(model_dir: FlashModelDir, dtype: torch.dtype) -> None:
        """Engine calls this before loading weights: the resident part alone must fit the budget."""
        if options.mode in ("flash", "hybrid"):
            plan_memory(model_dir, options.memory, dtype, context=options.context)

    build.precheck = precheck
    return build
