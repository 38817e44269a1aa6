"""Load a converted model and generate: prefill in one pass, then one token at a time.

`Engine` owns the decode loop and its timing; which FFN provider it plugs into the model decides
the mode (dense here; sparse and flash providers come from their own modules).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from llmflash.runtime.ffn import DenseFFN
from llmflash.runtime.checked_ffn import FiniteCheckedFFN
from llmflash.runtime.memory_plan import release_freed_heap, resolve_context
from llmflash.runtime.process_stats import peak_rss_bytes, process_read_bytes  # noqa: F401 (re-exported)
from llmflash.runtime.sampling import check_sampling, sample
from llmflash.errors import LLMFlashError
from llmflash.models import build_model
from llmflash.models.base import FFNProvider, KVCache
from llmflash.format.layout import DTYPES, QUANTIZED_ROWS, FlashModelDir
from llmflash.runtime.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "length" (max_new_tokens), "context" (context full) or "stop" (a stop string)
    prefill_s: float
    decode_s: list[float] = field(default_factory=list)  # seconds per generated token
    stats: dict = field(default_factory=dict)  # bytes, reads, latency split per token

    def timing(self) -> dict:
        decode_total = sum(self.decode_s[1:]) if len(self.decode_s) > 1 else 0.0
        decoded = max(len(self.decode_s) - 1, 0)
        return {
            "prefill_s": self.prefill_s,
            "prefill_tokens": len(self.prompt_ids),
            "decode_s": decode_total,
            "decode_tokens": decoded,
            # The first generated token comes out of prefill; later ones each cost one step.
            "tokens_per_s": decoded / decode_total if decode_total > 0 else None,
            "per_token_s": self.decode_s[1:],
        }


def token_stats(ffn, prefill_s: float, decode_s: list[float]) -> dict:
    """Per-token split: I/O, memory management, compute (the rest of each step's wall time).

    Entry 0 of a provider's log is the prompt pass; entries 1.. are the decode steps. Providers
    without a log (dense) did no I/O after loading: all of a step is compute.
    """
    steps = [prefill_s] + list(decode_s)
    log = ffn.token_log()
    if log is None or not log.io_s:
        zeros = [0.0] * len(steps)
        io, mem, sel, nbytes, reads = zeros, zeros, zeros, [0] * len(steps), [0] * len(steps)
        extra: dict = {}
    else:
        io, mem, sel, nbytes, reads = log.io_s, log.mem_s, log.select_s, log.bytes, log.reads
        extra = {"io_model_ms": [round(v * 1000, 4) for v in log.io_model_s[1:]],
                 "neurons_loaded": log.neurons_loaded[1:], "neurons_selected": log.neurons_selected[1:],
                 "rows_used": log.rows_used[1:],
                 "window_shrunk_layers": log.window_shrunk[1:],
                 "streamed_neurons": log.streamed[1:]}
        if hasattr(ffn, "lookahead_requested"):  # flash: the pipeline (docs/FLASH.md, "Overlap")
            extra.update({
                # io_ms is what the step waited for reads; hidden: lookahead reads in flight meanwhile
                "io_wait_ms": [round(v * 1000, 4) for v in log.io_s[1:]],
                "io_hidden_ms": [round(v * 1000, 4) for v in log.io_hidden_s[1:]],
                # share of the bundles a step needed from flash that the lookahead had read
                "lookahead_recall": [round(h / n, 4) if n else None
                                     for h, n in zip(log.la_hits[1:], log.la_needed[1:])],
                "lookahead_bundles": log.la_fetched[1:],
                "lookahead_bytes": log.la_bytes[1:],
                "lookahead_wasted_bytes": [w * ffn.bundle_bytes for w in log.la_wasted[1:]],
            })
    n = min(len(steps), len(io))
    ms = lambda values: [round(v * 1000, 4) for v in values[1:n]]  # noqa: E731
    out = {
        "io_ms": ms(io), "mem_ms": ms(mem),
        "compute_ms": ms([steps[i] - io[i] - mem[i] for i in range(n)]),
        "select_ms": ms(sel),
        "bytes_per_token": list(nbytes[1:n]), "reads_per_token": list(reads[1:n]),
        "prefill": {"io_ms": round(io[0] * 1000, 3), "mem_ms": round(mem[0] * 1000, 3),
                    "bytes": nbytes[0], "reads": reads[0],
                    **({"io_hidden_ms": round(log.io_hidden_s[0] * 1000, 3)}
                       if hasattr(ffn, "lookahead_requested") and log.io_hidden_s else {})},
        "ffn_bytes_read": int(sum(nbytes[:n])), "reads": int(sum(reads[:n])),
    }
    out.update({k: v[: n - 1] for k, v in extra.items()})
    out.update(ffn.summary())
    return out


def load_tokenizer(model_dir: FlashModelDir) -> Tokenizer | None:
    entry = model_dir.manifest.get("tokenizer") or {}
    if not entry.get("file"):
        return None
    # read once, checked against the manifest's sha256 (a same-size edit must not pass)
    data = model_dir.read_verified(entry["file"], "tokenizer.file")
    return Tokenizer(model_dir.path / entry["file"], chat_template=entry.get("chat_template"),
                     bos_token=entry.get("bos_token"), eos_token=entry.get("eos_token"),
                     eos_ids=model_dir.config.eos_token_id, data=data)


def dense_ffn(model_dir: FlashModelDir, dtype: torch.dtype) -> DenseFFN:
    """Every FFN layer read from the bundle file into DRAM (checksums checked on the way)."""
    ffn = DenseFFN([], model_dir.bundle, model_dir.config.hidden_act, model_dir.config.act_threshold,
                   activations=ACTIVATIONS)
    if dtype == QUANTIZED_ROWS:  # int8/int4 held as stored: torch's int4 kernel (runtime/quant_ffn.py)
        ffn.quantized(model_dir)
    for i in range(model_dir.config.num_layers):  # packed as read: no second copy of the FFN
        ffn.append(model_dir.layer_rows(i, dtype))
    return ffn


# Activations, norms, attention scores and the KV cache are float32 whatever the weights' dtype.
ACTIVATIONS = torch.float32


def weight_dtype(model_dir: FlashModelDir, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype weights are held at: as stored (None), or the one asked for. An int8/int4 model
    held as stored is QUANTIZED_ROWS: FFN rows stay block-quantized bytes, resident matrices stay
    at the dtype they were stored in (manifest `resident_dtype`)."""
    if dtype is None:
        return QUANTIZED_ROWS if model_dir.quantized else DTYPES[model_dir.dtype]
    return dtype


def load_weights(model_dir: FlashModelDir, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Resident tensors: matrices at `dtype` (QUANTIZED_ROWS: as stored; matrices stored in blocks
    are then held by runtime.quant_matrix), vectors (norms, biases) as stored (float32). A
    quantized model's down scales go to model_dir (down_scales)."""
    weights = model_dir.load_resident(None)
    if model_dir.quantized:
        model_dir.set_down_scales(weights)
    if dtype == QUANTIZED_ROWS:
        if model_dir.resident_blocks:
            from llmflash.runtime.quant_matrix import hold

            hold(weights, model_dir.resident_blocks)
        return weights
    for name, t in weights.items():
        if t.dtype == torch.uint8:  # blocks, dequantized exactly, then cast
            weights[name] = model_dir.dequantize_resident(name, t).to(dtype)
        elif t.dim() >= 2 and t.dtype != dtype:
            weights[name] = t.to(dtype)
    return weights


_NOTED_SYNTHETIC: set[str] = set()


def note_if_synthetic(model_dir: FlashModelDir) -> None:
    """Say once per process and model that a model from `llmflash synth` has random weights."""
    synthetic = model_dir.manifest.get("synthetic")
    key = str(model_dir.path.resolve())
    if synthetic and key not in _NOTED_SYNTHETIC:
        _NOTED_SYNTHETIC.add(key)
        print(f"llmflash: note: {model_dir.path} is a synthetic model (random weights, "
              f"{synthetic.get('preset')}, seed {synthetic.get('seed')}): its text is meaningless; "
              "use it to measure speed and memory", file=sys.stderr)


class Engine:
    """A model ready to run: config, tokenizer, resident weights and an FFN provider."""

    def __init__(self, path: Path | str, dtype: torch.dtype | None = None,
                 ffn: Callable[[FlashModelDir, torch.dtype], FFNProvider] | None = None,
                 context: int | None = None):
        """dtype: what weights are held at (None: as stored, float16/bfloat16/float32); the FFN
        provider factory gets the same. Activations are float32 (ACTIVATIONS) in every case.
        context: the longest sequence (prompt + generated) this engine runs, in tokens, at most the
        model's (None: the model's, for offline tools); llmflash.load passes the one its memory plan
        charged the KV cache for."""
        self.read_bytes_at_start = process_read_bytes()
        self.dir = FlashModelDir(path)
        self.config = self.dir.config
        dtype = weight_dtype(self.dir, dtype)
        self.dtype = dtype
        note_if_synthetic(self.dir)
        # a budget the plan shows cannot hold is refused before any weight is loaded
        precheck = getattr(ffn, "precheck", None)
        if precheck is not None:
            precheck(self.dir, dtype)
        self.tokenizer = load_tokenizer(self.dir)
        self.weights = load_weights(self.dir, dtype)
        self.ffn = (ffn or dense_ffn)(self.dir, dtype)
        # offline tools (calibrate, eval...) run dense with no plan: the model's whole context; runs
        # built by llmflash.load pass the context their memory plan charged
        self.context = self.config.max_position_embeddings if context is None else resolve_context(self.config, context)
        # non-finite FFN outputs are an error naming the layer, not NaN logits (checked_ffn.py)
        self.model = build_model(self.config, self.weights, FiniteCheckedFFN(self.ffn, f" in {self.dir.path}"),
                                 self.context, ACTIVATIONS)
        release_freed_heap()  # what loading freed (memory_plan.release_freed_heap says why)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise LLMFlashError(f"{self.dir.path} has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise LLMFlashError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.context:
            raise LLMFlashError(
                f"prompt of {len(prompt_ids)} tokens is longer than the context of {self.context} tokens "
                f"({self.dir.path}; the model allows {self.config.max_position_embeddings}: raise context)")
        bad = [i for i in prompt_ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise LLMFlashError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")

    @torch.inference_mode()
    def logits(self, ids: list[int], cache: KVCache | None = None) -> torch.Tensor:
        """Logits for every position of ids (appended to cache if given). For tests and eval."""
        self.check_prompt(ids)
        cache = cache or self.model.new_cache(len(ids))
        return self.model.forward(torch.tensor(ids, dtype=torch.long), cache)

    def decode(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
               result: GenerationResult | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time; `result` is filled in as they come.

        A generator so that a caller (a stream, a server whose client went away) can stop early:
        closing it ends the decode loop at once, and `result` then holds what was generated with
        its stats. The caller decides what else ends generation (stop strings); eos, length and a
        full context end it here.
        """
        self.check_prompt(prompt_ids)
        check_sampling(temperature, top_p)
        if max_new_tokens < 1:
            raise LLMFlashError("max_new_tokens must be at least 1")
        result = result if result is not None else GenerationResult(list(prompt_ids), [], "", "length", 0.0)
        result.prompt_ids = list(prompt_ids)
        return self._decode(result, max_new_tokens, temperature, top_p, seed, stop_at_eos)

    def _decode(self, result: GenerationResult, max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None, stop_at_eos: bool) -> Iterator[int]:
        prompt_ids = result.prompt_ids
        max_len = min(self.context, len(prompt_ids) + max_new_tokens)
        cache = self.model.new_cache(max_len)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(self.tokenizer.eos_ids if self.tokenizer else self.config.eos_token_id)
        self.ffn_begin_generation()
        try:
            with torch.inference_mode():
                started = time.perf_counter()
                logits = self.model.forward(torch.tensor(prompt_ids, dtype=torch.long), cache, last_only=True)
                token = sample(logits[-1], temperature, top_p, generator)
                result.prefill_s = time.perf_counter() - started
                result.decode_s = [result.prefill_s]
                while True:
                    result.token_ids.append(token)
                    yield token
                    if stop_at_eos and token in eos:
                        result.finish_reason = "eos"
                        break
                    if len(result.token_ids) >= max_new_tokens:
                        break
                    if cache.length >= cache.max_len:
                        result.finish_reason = "context"
                        break
                    t0 = time.perf_counter()
                    logits = self.model.forward(torch.tensor([token], dtype=torch.long), cache)
                    token = sample(logits[-1], temperature, top_p, generator)
                    result.decode_s.append(time.perf_counter() - t0)
        finally:
            if self.tokenizer is not None:
                result.text = self.tokenizer.decode(result.token_ids)
            result.stats = token_stats(self.ffn, result.prefill_s, result.decode_s[1:])
            # Everything this process read from storage since the engine started, resident load included.
            result.stats["bytes_read"] = process_read_bytes() - self.read_bytes_at_start

    def ffn_begin_generation(self) -> None:
        """Tell the FFN provider a new sequence starts (its per-token log restarts)."""
        self.ffn.begin_generation()

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None,
                 on_token: Callable[[int], None] | None = None,
                 stop_at_eos: bool = True) -> GenerationResult:
        """Generate to the end (eos, length or context), calling on_token for each token."""
        result = GenerationResult(list(prompt_ids), [], "", "length", 0.0)
        for token in self.decode(prompt_ids, max_new_tokens, temperature, top_p, seed, stop_at_eos, result):
            if on_token:
                on_token(token)
        return result
