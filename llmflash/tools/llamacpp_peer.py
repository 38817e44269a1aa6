"""bench's llama.cpp peer: greedy decoding with llama-cpp-python on a GGUF, timed like `generate --json`.

`bench --modes ...,llamacpp --gguf FILE` runs this module as its own process, under the same cgroup
memory limit as flash, naive, hybrid and mmap, after dropping FILE from the page cache. llama.cpp
memory-maps the weights (its default, what users run when a model does not fit), so under the
limit the kernel pages them in and out as the tokens need them.

Same prompt ids, greedy (argmax of the logits) as `generate --ignore-eos`; one `llama_decode` per
token. Per token: its wall time, and the bytes this process caused to be read from storage
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


def run(gguf: str, prompt_ids: list[int], tokens: int, threads: int, context: int,
        max_seconds: float | None) -> dict:
    import numpy as np
    import llama_cpp

    started = time.perf_counter()
    read0 = process_read_bytes()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=context, n_batch=max(len(prompt_ids), 1),
                          n_threads=threads, n_threads_batch=threads, use_mmap=True, use_mlock=False,
                          logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    load_s = time.perf_counter() - started
    read_load = process_read_bytes()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    prefill_s = time.perf_counter() - t0
    out = [int(np.argmax(last_logits()))]
    read_prev = process_read_bytes()
    prefill_bytes = read_prev - read_load
    step_ms, step_bytes = [], []
    finish = "length"
    while len(out) < tokens:
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            finish = "time"
            break
        t0 = time.perf_counter()
        llm.eval([out[-1]])
        nxt = int(np.argmax(last_logits()))
        step_ms.append(round((time.perf_counter() - t0) * 1000, 4))
        now = process_read_bytes()
        step_bytes.append(now - read_prev)
        read_prev = now
        out.append(nxt)
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
                               "use_mmap": True, "gguf": gguf}},
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
    args = p.parse_args(argv)
    ids = [int(t) for t in args.ids.split(",") if t]
    result = run(args.gguf, ids, args.max_new_tokens, args.threads, args.context, args.max_seconds)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
