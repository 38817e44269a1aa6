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

from llmflash.runtime.memory_plan import plan_memory
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir

MODES = ("dense", "flash", "naive", "hybrid", "mmap")
PREDICTOR_DTYPE = torch.float16
SCRATCH_SHARE = 1 / 8  # of the cache rows, for streaming selections that overflow a layer's cache
SPARSITY = ("none", "oracle", "predictor")


@dataclass
class RunOptions:
    mode: str = "dense"
    memory: str = "50%"
    window: int = 5
    sparsity: str = "predictor"
    threads: int = 32
    pin: float = 0.0  # share of each layer's neurons pinned in DRAM (hottest first)
    sparsity_budget: float | None = None  # predictor thresholds that selected this share
    reader: str = "auto"  # auto (kernel AIO where allowed) | aio | threads


def make_selector(model_dir: FlashModelDir, dtype: torch.dtype, sparsity: str,
                  budget: float | None = None):
    if sparsity == "oracle":
        from llmflash.runtime.providers import OracleSelector

        return OracleSelector(model_dir, dtype)
    if sparsity == "predictor":
        try:
            from llmflash.runtime.predictors import PredictorSet
        except ImportError:  # pragma: no cover - the sparsity package ships with llmflash
            raise LLMFlashError("predictors are not available in this build") from None
        # Held at float16, the precision they are stored in: half the DRAM of float32 for the
        # same selections, which leaves that much more of the budget to the neuron caches.
        predictors = PredictorSet.load(model_dir, PREDICTOR_DTYPE)
        if budget is not None:
            predictors.use_budget(budget)
        return predictors
    if sparsity == "none":
        raise LLMFlashError("flash mode reads only selected neurons: use --sparsity predictor or oracle "
                            "(or --mode naive/hybrid to read every neuron)")
    raise LLMFlashError(f"unknown --sparsity {sparsity!r}; choose one of {SPARSITY}")


def ffn_factory(options: RunOptions):
    """A factory(model_dir, dtype) -> FFN provider for Engine, per the options."""
    if options.mode not in MODES:
        raise LLMFlashError(f"unknown --mode {options.mode!r}; choose one of {', '.join(MODES)}")
    if options.window < 1:
        raise LLMFlashError("--window must be at least 1")

    def build(model_dir: FlashModelDir, dtype: torch.dtype):
        from llmflash.runtime import providers as flash
        from llmflash.runtime.engine import dense_ffn
        from llmflash.runtime.reader import FlashReader

        if options.mode == "dense":
            return dense_ffn(model_dir, dtype)
        if options.mode == "mmap":
            return flash.MmapFFN(model_dir, dtype)
        reader = FlashReader(threads=options.threads, backend=options.reader)
        if options.mode == "naive":
            return flash.NaiveFFN(model_dir, dtype, reader)
        if options.mode == "hybrid":
            plan = plan_memory(model_dir, options.memory, dtype)
            return flash.NaiveFFN(model_dir, dtype, reader, resident_layers=plan.resident_ffn_layers)
        selector = make_selector(model_dir, dtype, options.sparsity, options.sparsity_budget)
        # The oracle's resident gate copy is an instrument, reported but not charged to the budget.
        charged = 0 if options.sparsity == "oracle" else selector.nbytes()
        plan = plan_memory(model_dir, options.memory, dtype, extra_resident_bytes=charged,
                           window=options.window, scratch_share=SCRATCH_SHARE)
        return flash.FlashFFN(model_dir, dtype, selector, plan, options.window, reader, pin=options.pin)

    return build
