"""bench's llama.cpp peer: greedy decoding with llama-cpp-python on a GGUF, timed like `generate --json`.

`bench --modes ...,llamacpp --gguf FILE` runs this module as its own process, under the same cgroup
memory limit as flash, naive, hybrid and mmap, after dropping FILE from the page cache. llama.cpp
memory-maps the weights (its default, what users run when a model does not fit), so under the
limit the kernel pages them in and out as the tokens need them.

Same prompt ids, greedy (argmax of the logits) as `generate --ignore-eos`; one `llama_decode` per
token; weight repacking off (llama.cpp's `--no-repack`, see `LlamaCpp`). Per token: its wall time, and the bytes this process caused to be read from storage
(/proc/self/io, which counts mmap page faults). llama.cpp's page faults happen inside its compute,
so its token is reported as one number (`split: false`): bench shows no I/O/compute split for it.

Imports no torch: the process holds llama.cpp, numpy and the weights it maps, nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from llmflash.runtime.process_stats import peak_rss_bytes, process_read_bytes


def installed() -> str | None:
    """llama-cpp-python's version, or None when it is not importable."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "unknown"


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C bindings: one model, one context, greedy steps.

    The C API, not the `Llama` class, because the class cannot turn off llama.cpp's extra buffer
    types: on a CPU with AMX (this machine) llama.cpp by default copies every float16 weight into
    an AMX-packed anonymous buffer (12.6 GB for a 7B model), which needs the whole model in RAM and
    is killed under a half-size memory limit. `repack=False` is llama.cpp's `--no-repack`: the
    weights are used in place from the mapping, the setup that can run in less memory than the model.
    """

    def __init__(self, gguf: str, context: int, batch: int, threads: int, repack: bool = False):
        import llama_cpp

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        mp.use_extra_bufts = repack
        self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = context, batch, batch
        cp.n_threads, cp.n_threads_batch = threads, threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {context} tokens for {gguf}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def step(self, ids: list[int]):
        """Decode `ids` (appended to the sequence); the logits after the last one (float32 view)."""
        import numpy as np

        lib = self.lib
        tokens = (lib.llama_token * len(ids))(*ids)
        rc = lib.llama_decode(self.ctx, lib.llama_batch_get_one(tokens, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def run(gguf: str, prompt_ids: list[int], tokens: int, threads: int, context: int,
        max_seconds: float | None, repack: bool = False) -> dict:
    import numpy as np

    started = time.perf_counter()
    read0 = process_read_bytes()
    llm = LlamaCpp(gguf, context, max(len(prompt_ids), 1), threads, repack)
    load_s = time.perf_counter() - started
    read_load = process_read_bytes()
    t0 = time.perf_counter()
    out = [int(np.argmax(llm.step(prompt_ids)))]
    prefill_s = time.perf_counter() - t0
    read_prev = process_read_bytes()
    prefill_bytes = read_prev - read_load
    step_ms, step_bytes = [], []
    finish = "length"
    while len(out) < tokens:
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            finish = "time"
            break
        t0 = time.perf_counter()
        nxt = int(np.argmax(llm.step([out[-1]])))
        step_ms.append(round((time.perf_counter() - t0) * 1000, 4))
        now = process_read_bytes()
        step_bytes.append(now - read_prev)
        read_prev = now
        out.append(nxt)
    llm.close()
    decode_s = sum(step_ms) / 1000
    zeros = [0.0] * len(step_ms)
    return {
        "prompt_ids": prompt_ids, "token_ids": out, "finish_reason": finish, "mode": "llamacpp",
        "timing": {"load_s": load_s, "prefill_s": prefill_s, "prefill_tokens": len(prompt_ids),
                   "decode_s": decode_s, "decode_tokens": len(step_ms),
                   "tokens_per_s": len(step_ms) / decode_s if decode_s > 0 else None},
        # the whole token in compute_ms; split: false says io/mem are not measured apart
        "stats": {"io_ms": zeros, "mem_ms": zeros, "compute_ms": step_ms, "split": False,
                  "bytes_per_token": step_bytes, "reads_per_token": [0] * len(step_ms),
                  "bytes_read": process_read_bytes() - read0, "load_bytes": read_load - read0,
                  "prefill": {"bytes": prefill_bytes},
                  "llamacpp": {"version": installed(), "threads": threads, "context": context,
                               "use_mmap": True, "repack": repack, "gguf": gguf}},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmflash.tools.llamacpp_peer")
    p.add_argument("gguf")
    p.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--repack", action="store_true", help="llama.cpp's default weight repacking (AMX etc.): "
                                                          "copies the weights out of the mapping")
    args = p.parse_args(argv)
    ids = [int(t) for t in args.ids.split(",") if t]
    result = run(args.gguf, ids, args.max_new_tokens, args.threads, args.context, args.max_seconds, args.repack)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
