"""Memory planner: what stays resident, and how many neuron rows each layer's cache may hold.

The budget is given as a share of the converted model's weights as stored (`50%`) or as bytes
(`6GiB`). Selective persistence (docs/PAPER.md §2): embeddings, attention, norms and predictors are
resident; what is left of the budget goes to the per-layer neuron caches. Everything is counted
in the bytes DRAM really holds: weights at the dtype they are held at (as stored by default, so a
float16 model's resident part costs its stored size; forcing float32 doubles it), vectors as stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.models.base import KVCache
from llmflash.sizes import parse_memory

_LIBC_TRIM = None  # glibc's malloc_trim, looked up once (None: not looked up; False: not glibc)


def release_freed_heap() -> None:
    """Give the pages of freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere).

    Why: loading makes many short-lived tensors of a few MB (safetensors buffers, the predictors'
    unpacked codes). glibc serves them from its heap once its mmap threshold has grown past their
    size, and it keeps the freed pages: in about half of the runs measured, loading the default
    model's predictors left 130-240 MiB of freed heap in RSS on top of everything the memory plan
    charges (docs/SERVE.md). Called between loading stages, before the neuron caches are allocated,
    so the process's peak stays within the budget plus the runtime's own overhead.
    """
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _LIBC_TRIM = False
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


def resolve_context(config, context: int | None) -> int:
    """The longest sequence a run holds: `context` (or DEFAULT_CONTEXT), at most the model's."""
    if context is not None and context < 2:
        raise LLMFlashError(f"context must be at least 2 tokens, got {context}")
    return min(config.max_position_embeddings, context or DEFAULT_CONTEXT)


def parse_budget(spec: str, model_bytes: int) -> int:
    """The memory budget in bytes (llmflash.sizes.parse_memory: '50%' of the stored model or a size)."""
    return parse_memory(spec, model_bytes)


def model_weight_bytes(model_dir: FlashModelDir) -> int:
    """Stored weights: the resident file plus every FFN bundle (alignment padding excluded)."""
    sizes = model_dir.weights_nbytes()
    return sizes["resident"] + sizes["ffn"]


def resident_bytes_at(model_dir: FlashModelDir, dtype: torch.dtype) -> int:
    """DRAM bytes of the resident tensors as the engine holds them (runtime.engine.load_weights):
    matrices at the weights' dtype, vectors (norms, biases) as stored, a quantized model's down
    scales at float32 (FlashModelDir.set_down_scales widens them). Held as stored, matrices
    stored in blocks take what runtime.quant_matrix holds for their roles (packed for products,
    the stored rows for lookups, both for a tied embedding)."""
    from safetensors import safe_open

    from llmflash.format.quantized import row_length
    from llmflash.runtime.quant_matrix import held_bytes, roles

    as_stored = dtype == torch.uint8  # QUANTIZED_ROWS: an int8/int4 model's matrices as stored
    item = torch.empty((), dtype=dtype).element_size()
    kinds = model_dir.resident_blocks
    total = 0
    with safe_open(str(model_dir.resident_path), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            piece = f.get_slice(name)
            shape = piece.get_shape()
            n = 1
            for s in shape:
                n *= s
            if piece.get_dtype() == "U8":  # [rows, row bytes] of blocks
                kind = kinds[name]
                if as_stored:
                    total += held_bytes(kind, tuple(shape), *roles(name, names))
                else:
                    total += shape[0] * row_length(kind, shape[1]) * item
                continue
            if name.startswith("ffn."):  # down scales / minimums: held float32 (set_down_scales)
                total += n * 4
                continue
            stored = {"F16": 2, "BF16": 2, "F32": 4}.get(piece.get_dtype(), 4)
            total += n * (item if len(shape) >= 2 and not as_stored else stored)
    return total


def _held_name(dtype: torch.dtype) -> str:
    return "as stored" if dtype == torch.uint8 else str(dtype).replace("torch.", "")


def row_bytes_at(model_dir: FlashModelDir, dtype: torch.dtype) -> int:
    """DRAM bytes of one cached neuron: an int8/int4 model's bundle as stored (its rows stay
    quantized in the flash family whatever the held dtype: an int4 row is ~0.27x a float16 one, so
    the same budget caches ~3.7x the neurons), else its elements at the held dtype."""
    if model_dir.quantized:
        return model_dir.bundle.nbytes
    return model_dir.bundle.elements * torch.empty((), dtype=dtype).element_size()


def lookahead_row_bytes(bundle_bytes: int) -> int:
    """Staging bytes one prefetched bundle may take: the 512-byte sectors covering it at the worst
    alignment (reads are O_DIRECT; merged neighbours take less, a merged gap is capped by the
    buffer's size at run time)."""
    return -(-bundle_bytes // 512) * 512 + 512


DEFAULT_CONTEXT = 512  # tokens of one sequence (prompt + generated) a run holds, unless told
KV_DTYPE = torch.float32  # keys and values are activations (runtime.engine.ACTIVATIONS)
MIN_SCRATCH_ROWS = 64  # enough reads in flight to amortise the device latency (docs/STORAGE.md §3)


@dataclass
class MemoryPlan:
    budget_bytes: int
    model_bytes: int  # stored weights (the base of a percentage budget)
    resident_bytes: int  # embeddings, attention, norms at the compute dtype
    extra_resident_bytes: int  # predictors and other per-mode resident state
    row_bytes: int  # one cached neuron at the compute dtype
    neurons_per_layer: int
    layers: int
    capacity_per_layer: int  # neuron rows of the smallest layer cache (flash)
    resident_ffn_layers: int  # FFN layers kept whole in DRAM (hybrid)
    capacities: list[int] | None = None  # rows per layer, when sized from window statistics
    sized_from: str = "uniform"
    scratch_rows: int = 0  # one buffer shared by all layers for selected neurons over capacity
    kv_bytes: int = 0  # the KV cache for the longest sequence the run allows (its context)
    context: int = 0  # that sequence length in tokens
    # flash lookahead (docs/FLASH.md, "Overlap"): the staging buffer the next layer's predicted
    # bundles are read into while this layer computes, charged in full (stored bytes, aligned)
    lookahead_rows: int = 0
    lookahead_bytes: int = 0

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_rows * self.row_bytes

    def capacity(self, layer: int) -> int:
        return self.capacities[layer] if self.capacities else self.capacity_per_layer

    @property
    def cache_bytes(self) -> int:
        rows = sum(self.capacities) if self.capacities else self.capacity_per_layer * self.layers
        return rows * self.row_bytes

    @property
    def planned_bytes(self) -> int:
        return (self.resident_bytes + self.extra_resident_bytes + self.kv_bytes + self.cache_bytes
                + self.scratch_bytes + self.lookahead_bytes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(cache_bytes=self.cache_bytes, scratch_bytes=self.scratch_bytes,
                 planned_bytes=self.planned_bytes,
                 capacity_fraction=self.cache_bytes / self.row_bytes
                 / (self.neurons_per_layer * self.layers))
        return d


def _capacities_from_windows(model_dir: FlashModelDir, total_rows: int, window: int) -> list[int] | None:
    """Rows per layer proportional to the union a `window`-token window holds in that layer.

    Layers whose neurons are reused from token to token need fewer rows for the same window;
    giving every layer the same share of its union keeps the effective window equal across layers.
    """
    unions = [r.window_union for r in model_dir.layers]
    if any(u is None for u in unions):
        return None
    k = min(window, len(unions[0])) - 1
    weights = [max(u[k], 1.0) for u in unions]
    n = model_dir.config.intermediate_size
    scale = total_rows / sum(weights)
    caps = [min(n, max(1, int(w * scale))) for w in weights]
    # hand rows freed by layers capped at n to the others, largest union first
    spare = total_rows - sum(caps)
    for layer in sorted(range(len(caps)), key=lambda i: -weights[i]):
        if spare <= 0:
            break
        extra = min(spare, n - caps[layer])
        caps[layer] += extra
        spare -= extra
    return caps


def plan_memory(model_dir: FlashModelDir, budget: str, dtype: torch.dtype,
                extra_resident_bytes: int = 0, window: int | None = None,
                scratch_share: float = 0.0, context: int | None = None,
                lookahead_share: float = 0.0) -> MemoryPlan:
    """Split the budget: resident part first, the rest to neuron caches.

    Per-layer cache sizes follow the window statistics `llmflash reorder` records, where present
    and a window is given; otherwise every layer gets the same number of rows. `scratch_share` of
    the rows left (at least one wave of reads, at most a quarter of a layer) becomes the scratch buffer
    through which flash mode streams selected neurons that do not fit a layer's cache. The KV cache
    for `context` tokens (default: runtime.engine.DEFAULT_CONTEXT, at most the model's) is charged
    before the caches; RoPE holds no table (models.base.Rotary computes the positions in use).
    `lookahead_share` of the rows left (at least MIN_SCRATCH_ROWS, at most an eighth of a layer)
    sizes the staging buffer of flash mode's lookahead reads, charged at its real size.
    """
    cfg = model_dir.config
    model_bytes = model_weight_bytes(model_dir)
    budget_bytes = parse_budget(budget, model_bytes)
    resident = resident_bytes_at(model_dir, dtype)
    context = resolve_context(cfg, context)
    kv = KVCache.bytes_for(cfg, context, KV_DTYPE)
    need = resident + extra_resident_bytes + kv
    row_bytes = row_bytes_at(model_dir, dtype)
    if budget_bytes < need + row_bytes * cfg.num_layers:
        raise LLMFlashError(
            f"memory budget {budget} ({budget_bytes / 2**20:.1f} MiB) cannot hold the resident part "
            f"of {model_dir.path}: {need / 2**20:.1f} MiB (embeddings, attention, norms"
            f"{', selector' if extra_resident_bytes else ''} at {_held_name(dtype)}, "
            f"KV cache for a context of {context} tokens {kv / 2**20:.1f} MiB) "
            f"plus at least one neuron per layer; give at least "
            f"{(need + row_bytes * cfg.num_layers) / 2**20:.1f} MiB "
            f"({100 * (need + row_bytes * cfg.num_layers) / model_bytes:.1f}% of the stored model)")
    free = budget_bytes - need
    scratch = 0
    if scratch_share > 0:
        spare_rows = free // row_bytes - cfg.num_layers  # keep at least one cached row per layer
        wanted = min(cfg.intermediate_size // 4, spare_rows * scratch_share)  # a wave, not a layer
        scratch = int(min(cfg.intermediate_size, spare_rows, max(MIN_SCRATCH_ROWS, wanted)))
        free -= scratch * row_bytes
    lookahead_rows = lookahead_bytes = 0
    if lookahead_share > 0:
        spare_rows = free // row_bytes - cfg.num_layers
        wanted = min(cfg.intermediate_size // 8, spare_rows * lookahead_share)
        per_row = lookahead_row_bytes(model_dir.bundle.nbytes)
        lookahead_rows = int(max(0, min(cfg.intermediate_size, max(MIN_SCRATCH_ROWS, wanted),
                                        (free - row_bytes * cfg.num_layers) // per_row)))
        lookahead_bytes = lookahead_rows * per_row
        free -= lookahead_bytes
    capacity = min(cfg.intermediate_size, free // (row_bytes * cfg.num_layers))
    layer_bytes = row_bytes * cfg.intermediate_size
    caps = None
    if window is not None:
        caps = _capacities_from_windows(model_dir, int(free // row_bytes), window)
    return MemoryPlan(
        budget_bytes=budget_bytes, model_bytes=model_bytes, resident_bytes=resident,
        extra_resident_bytes=extra_resident_bytes, row_bytes=row_bytes,
        neurons_per_layer=cfg.intermediate_size, layers=cfg.num_layers,
        capacity_per_layer=int(min(caps)) if caps else int(capacity),
        resident_ffn_layers=int(min(cfg.num_layers, free // layer_bytes)),
        capacities=caps, sized_from=f"window statistics, k={window}" if caps else "uniform",
        scratch_rows=scratch, kv_bytes=kv, context=context,
        lookahead_rows=lookahead_rows, lookahead_bytes=lookahead_bytes,
    )
