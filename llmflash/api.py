"""The public Python API: load a converted model in a run mode, generate, stream, chat, convert.

    import llmflash
    m = llmflash.load(path, mode="flash", memory="50%", window=5)
    print(m.generate("What is the capital of France?", max_new_tokens=32).text)

The CLI (`llmflash generate`, `demo`, `serve`, `chat`) is built on this module, so what a command
does a program can do too. Errors the user can act on raise `LLMFlashError` with messages in the
API's own terms (argument names as here); the CLI maps them to its flags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llmflash.conversion.writer import convert as _convert
from llmflash.errors import LLMFlashError
from llmflash.runtime.engine import Engine, GenerationResult, peak_rss_bytes
from llmflash.runtime.memory_plan import DEFAULT_CONTEXT
from llmflash.runtime.modes import RunOptions, ffn_factory
from llmflash.runtime.tokenizer import StreamDecoder, Tokenizer

# What weights are held at: as stored (auto), or converted at load. Activations are float32 always.
COMPUTE_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Generation:
    """What one call of `generate` or `chat` produced."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "eos", "length", "context" (context window full) or "stop" (a stop string)
    timing: dict  # prefill_s, decode_s, tokens_per_s, per_token_s ... (GenerationResult.timing)
    stats: dict = field(default_factory=dict)  # bytes read, latency split per token, memory plan
    mode: str = "dense"

    def to_dict(self) -> dict:
        """The `generate --json` object (documented in the README)."""
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "mode": self.mode, "timing": self.timing,
                "stats": self.stats, "peak_rss_bytes": peak_rss_bytes()}


class _StopScanner:
    """Finds stop strings across token boundaries: text is released only once no stop string can
    still begin inside it (the held-back tail is at most the longest stop string minus one)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return "", False
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Model:
    """A converted model loaded in one run mode. Not thread-safe: one generation at a time."""

    def __init__(self, engine: Engine, options: RunOptions):
        self.engine = engine
        self.options = options
        self.last: Generation | None = None

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.engine.dir.path

    @property
    def config(self):
        return self.engine.config

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def context_length(self) -> int:
        return self.engine.context

    @property
    def stats(self) -> dict:
        """The statistics of the last generation (empty before the first)."""
        return self.last.stats if self.last is not None else {}

    # -- text in ------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat_template: bool | None = None) -> list[int]:
        """Token ids of a prompt. Text gets the model's chat template when it has one, unless
        chat_template=False (as mlx-lm does); ids are taken as they are."""
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            if not ids:
                raise LLMFlashError("empty prompt: give at least one token")
            return ids
        tok = self.require_tokenizer()
        use_template = bool(tok.chat_template) if chat_template is None else chat_template
        if use_template:
            return tok.encode_chat(prompt)
        return tok.encode(prompt)

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        if not messages:
            raise LLMFlashError("messages must hold at least one message")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LLMFlashError("each message must be an object with string 'role' and 'content'")
        tok = self.require_tokenizer()
        return tok.encode(tok.render_chat(list(messages)), add_special_tokens=False)

    def require_tokenizer(self) -> Tokenizer:
        return self.engine.require_tokenizer()

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 256, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
                 chat_template: bool | None = None, ignore_eos: bool = False,
                 stream: bool = False, deadline: float | None = None) -> Generation | Iterator[str]:
        """Generate from a prompt (text or token ids). With stream=True, an iterator of text pieces
        (see `stream`); otherwise the whole `Generation`. `deadline` (a time.monotonic() value):
        stop after the token during which it passes, with finish_reason "time" (benchmarks)."""
        ids = self.encode(prompt, chat_template)
        if stream:
            return self._stream(ids, max_new_tokens, temperature, top_p, seed, stop, ignore_eos, deadline)
        for _ in self._stream(ids, max_new_tokens, temperature, top_p, seed, stop, ignore_eos, deadline):
            pass
        assert self.last is not None
        return self.last

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Text pieces as they are generated (partial UTF-8 held back, stop strings cut). After the
        iterator ends (or is closed early), `last` holds the Generation."""
        return self.generate(prompt, max_new_tokens, stream=True, **kwargs)  # type: ignore[return-value]

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, *, stream: bool = False,
             **kwargs) -> Generation | Iterator[str]:
        """Answer a conversation ([{"role": "user", "content": ...}, ...]) with the chat template."""
        return self.generate(self.encode_messages(messages), max_new_tokens, stream=stream, **kwargs)

    def _stream(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                seed: int | None, stop: Sequence[str] | str | None, ignore_eos: bool,
                deadline: float | None = None) -> Iterator[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise LLMFlashError("stop must be a string or a list of strings")
        result = GenerationResult(ids, [], "", "length", 0.0)
        tokens = self.engine.decode(ids, max_new_tokens, temperature, top_p, seed, not ignore_eos, result)
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        scanner = _StopScanner(stops)
        text = ""
        stopped = timed_out = False
        try:
            for token in tokens:
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True  # this token counts; no further step starts
                if decoder is None:
                    if timed_out:
                        break
                    continue
                out, stopped = scanner.push(decoder.push(token))
                text += out
                if out:
                    yield out
                if stopped or timed_out:
                    break
            if not stopped and decoder is not None:
                rest = scanner.flush()
                text += rest
                if rest:
                    yield rest
        finally:
            tokens.close()  # ends the decode loop at once (a closed stream frees the model)
            if stopped:
                result.finish_reason = "stop"
            elif timed_out and result.finish_reason == "length" and len(result.token_ids) < max_new_tokens:
                result.finish_reason = "time"
            if decoder is not None:
                result.text = text
            self.last = Generation(result.text, result.token_ids, result.prompt_ids, result.finish_reason,
                                   result.timing(), result.stats, self.mode)

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits for every position of ids ([len(ids), vocab]), from an empty context."""
        return self.engine.logits(list(ids))

    def close(self) -> None:
        """Release file handles and readers (the model is unusable afterwards)."""
        close = getattr(self.engine.ffn, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(path: str | Path, mode: str = "dense", *, memory: str = "50%", window: int = 5,
         sparsity: str | None = None, density: float | None = None, dtype: str = "auto",
         threads: int = 32, reader: str = "auto", pin: float = 0.0,
         predictor_cost: str | None = None, context: int | None = None, lookahead: bool = False,
         overlap: bool = True, reads: str = "planned") -> Model:
    """Load a converted model (a directory written by `convert` or `synth`).

    mode: dense (all in DRAM), flash (ours), naive, hybrid, mmap (baselines).
    memory: the memory budget for flash and hybrid, a share of the stored model ("50%") or a size
        ("300MiB"); everything the run holds is charged to it (resident weights, selector, caches).
    window: tokens whose neurons stay cached in flash mode.
    sparsity: the selector - none, exact (ReLU models), magnitude, predictor, trace:PATH; None picks
        none in DRAM modes and, in flash mode, predictor where calibrated, else exact (ReLU) or
        magnitude.
    predictor_cost: flash with a replayed selector (trace:PATH): "lowrank:R" or "quant:BITS" runs a
        predictor of that size on every layer's FFN input and charges its bytes and time, output unused.
    density: share of neurons a magnitude selector keeps per token (default 0.5), or, for
        predictors, the calibrated thresholds that kept that share.
    context: the longest sequence (prompt + generated) in tokens; its KV cache is charged to the
        budget (default 512, at most the model's).
    dtype: what weights are held at in DRAM: auto (as stored: float16, bfloat16 or float32),
        float16, bfloat16 or float32 (converted at load). Activations are float32 in every case.
    lookahead: flash mode reads the next layer's predicted neurons while this layer computes (a
        prefetch: the same tokens and logits either way). Off by default: on two shared cores it made
        7B-shaped tokens slower (docs/FLASH.md, "Overlap").
    overlap: flash mode reads a token's new neurons in the background while the FFN over the
        neurons already cached computes (kernel AIO; same tokens and logits either way).
    reads: flash mode's read policy - planned (the cost model merges neighbouring bundles), bundle
        (one read per bundle) or part (one read per weight matrix of a bundle, as an unbundled layout
        would issue): the paper's I/O ablation (docs/SCALE.md); same results, different requests.
    """
    if dtype not in COMPUTE_DTYPES:
        raise LLMFlashError(f"unknown dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    context = context or DEFAULT_CONTEXT  # the engine and the memory plan agree on it
    options = RunOptions(mode=mode, memory=memory, window=window, sparsity=sparsity, density=density,
                         threads=threads, pin=pin, reader=reader, predictor_cost=predictor_cost,
                         context=context, lookahead=lookahead, overlap=overlap, reads=reads)
    engine = Engine(Path(path).expanduser(), dtype=COMPUTE_DTYPES[dtype], ffn=ffn_factory(options),
                    context=context)
    return Model(engine, options)


def convert(src: str | Path, dst: str | Path, dtype: str = "float16", *, force: bool = False,
            progress: bool = True, resident_dtype: str | None = None) -> Path:
    """Import a Hugging Face model directory or a GGUF file into the flash layout at dst
    (dtype float16/bfloat16/float32, int8/int4/int4m block formats, or auto: docs/FORMAT.md)."""
    return _convert(Path(src).expanduser(), Path(dst).expanduser(), dtype=dtype, force=force,
                    progress=progress, resident_dtype=resident_dtype).path
