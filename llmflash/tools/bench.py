"""`llmflash bench`: ours and every baseline on the same prompt, one process per mode.

Each mode runs as its own `llmflash generate --json` child so that its peak RSS and page-cache
state are its own. Before each child the model's files are dropped from the page cache
(posix_fadvise DONTNEED, which really empties it on these machines; docs/STORAGE.md §6), so no mode is
served from memory another mode filled. Modes with a budget (flash, naive, hybrid, mmap) run under
a cgroup-v1 memory limit of budget + the measured runtime overhead + FIXED_OVERHEAD_BYTES where the
machine allows it, so
mmap's page cache cannot grow past what the others may use.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


from llmflash.runtime.memory_plan import model_weight_bytes, parse_budget
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.runtime.read_planner import load_default_profile
from llmflash.runtime import quant_kernels

BENCH_TEXT = (
    "The history of computing is a history of memory. Early machines kept their programs on "
    "punched cards and paper tape, and every generation since has traded speed for size: "
    "registers, caches, main memory, disks and now flash. A language model is a large program "
    "of numbers, and running one means moving those numbers to where the arithmetic happens. "
    "When the model is larger than the memory it may use, the question becomes which numbers to "
    "move, when to move them, and how to move them in pieces large enough that the storage "
    "device can deliver them quickly. Sparse models help, because most of their neurons stay "
    "silent for any given word, and the silent ones need not be read at all. "
)
MODES_ORDER = ("flash", "naive", "hybrid", "mmap", "dense")
PEER_MODES = ("llamacpp",)  # not in the default list: it needs --gguf and llama-cpp-python
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def drop_page_cache(path: Path) -> None:
    """Evict a model directory's files (or one file) from the page cache so the next run reads from disk."""
    for file in (path.iterdir() if path.is_dir() else [path]):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# Memory a run needs beyond the imports and the budget: KV cache, the reader's staging buffer and
# thread stacks, 4 MiB prompt chunks, allocator slack from transient copies. Measured on the
# project's models at 40-60 MiB; this is the allowance bench limits and the tests assert.
FIXED_OVERHEAD_BYTES = 96 << 20


def runtime_overhead_bytes(quantized: bool = False) -> int:
    """Peak RSS of a process that imported the runtime but loaded no model (measured, not assumed).
    quantized: with the compiled kernels for 4-bit rows loaded too (numba, runtime/quant_kernels.py:
    about 60 MiB more), as a quantized model's flash run has them."""
    kernels = "from llmflash.runtime import quant_kernels as k; k._kernels(); " if quantized else ""
    code = ("import torch, numpy, safetensors, tokenizers, jinja2, tqdm, llmflash.cli, "
            "llmflash.runtime.tokenizer, llmflash.runtime.providers, llmflash.runtime.predictors, "
            f"llmflash.runtime.engine as r; {kernels}print(r.peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


class MemoryLimit:
    """A cgroup-v1 memory cgroup for one child, or nothing where the machine does not allow it."""

    def __init__(self, limit_bytes: int | None):
        self.path: Path | None = None
        self.limit = limit_bytes
        if limit_bytes is None or not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            return
        path = CGROUP_ROOT / f"llmflash-bench-{os.getpid()}"
        try:
            path.mkdir(exist_ok=True)
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            self.path = path
        except OSError:
            self.path = None

    def enter(self) -> None:  # runs in the child before exec
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def hard_timeout(max_seconds: float | None) -> float:
    """When bench kills a mode outright: its child stops itself after the token during which
    --max-seconds passes, so this only catches a mode whose load or single token overruns a lot."""
    return 3600.0 if max_seconds is None else max_seconds + max(60.0, max_seconds)


def run_mode(model: Path, mode: str, prompt_ids: list[int], tokens: int, memory: str, window: int,
             sparsity: str, limit: int | None, dtype: str, pin: float = 0.0,
             extra_args: tuple[str, ...] = (), max_seconds: float | None = None) -> dict:
    drop_page_cache(model)
    cmd = [sys.executable, "-m", "llmflash", "generate", str(model), "--ids",
           ",".join(map(str, prompt_ids)), "--max-new-tokens", str(tokens), "--mode", mode,
           "--memory", memory, "--window", str(window),
           "--sparsity", sparsity if mode == "flash" else "none", "--json",
           "--dtype", dtype, "--ignore-eos", "--pin", str(pin), *extra_args]
    if max_seconds is not None:
        cmd += ["--max-seconds", str(max_seconds)]
    return _run_child(cmd, mode, limit, max_seconds)


def run_llamacpp(gguf: Path, prompt_ids: list[int], tokens: int, limit: int | None, context: int,
                 max_seconds: float | None = None) -> dict:
    """The peer (tools/llamacpp_peer.py) on the GGUF, page cache dropped, under the same limit."""
    drop_page_cache(gguf)
    cmd = [sys.executable, "-m", "llmflash.tools.llamacpp_peer", str(gguf), "--ids", ",".join(map(str, prompt_ids)),
           "--max-new-tokens", str(tokens), "--threads", str(os.cpu_count() or 1), "--context", str(context)]
    if max_seconds is not None:
        cmd += ["--max-seconds", str(max_seconds)]
    # llama.cpp's OpenMP threads spin while they wait unless told not to; spinning on two shared
    # cores makes its timings collapse
    return _run_child(cmd, "llamacpp", limit, max_seconds, env={**os.environ, "OMP_WAIT_POLICY": "passive"})


def _run_child(cmd: list[str], mode: str, limit: int | None, max_seconds: float | None,
               env: dict | None = None) -> dict:
    cg = MemoryLimit(limit)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cg.enter,
                              timeout=hard_timeout(max_seconds), env=env)
    except subprocess.TimeoutExpired:
        return {"killed_after_s": hard_timeout(max_seconds),
                "memory_limit_bytes": limit if cg.path is not None else None}
    finally:
        cg.close()
    if proc.returncode in (-9, 137) and cg.path is not None:
        raise LLMFlashError(f"bench: mode {mode} was killed, most likely out of memory under its cgroup "
                            f"limit of {limit / 2**20:.0f} MiB; raise --memory or pass --no-limit")
    if proc.returncode != 0:
        raise LLMFlashError(f"bench: mode {mode} failed (exit {proc.returncode}):\n"
                            f"{proc.stderr.strip()[-2000:]}")
    out = json.loads(proc.stdout)
    out["memory_limit_bytes"] = limit if cg.path is not None else None
    return out


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> dict:
    """STREAM-like copy: numpy copy of `nbytes` into another buffer, best of `repeats`; bytes read
    plus bytes written per second, as STREAM counts its Copy kernel."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch: page faults outside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"copy_Bps": 2 * src.nbytes / best, "bytes": src.nbytes, "repeats": repeats,
            "method": "numpy.copyto, best of repeats, read + write bytes counted (STREAM Copy)"}


def dense_bytes_per_token(model_dir: FlashModelDir, dtype: str) -> int:
    """Weight bytes one dense decode step reads: every resident matrix at the dtype weights are
    held at (an untied input embedding and OPT's position table only by one row), every FFN bundle
    at that dtype, and the 1-D tensors as stored. The KV cache (a few MB) is left out."""
    from safetensors import safe_open

    from llmflash.format.layout import DTYPES
    from llmflash.format.quantized import row_length
    from llmflash.runtime.quant_matrix import packed_bytes

    as_stored = dtype == "auto" and model_dir.quantized  # int8/int4: bundles as stored
    blocks = model_dir.resident_blocks
    if as_stored:  # resident matrices at the dtype they were stored in
        held = DTYPES.get(model_dir.manifest.get("resident_dtype") or "float16") or DTYPES["float16"]
    else:
        held = DTYPES[model_dir.dtype] if dtype == "auto" else DTYPES[dtype]
    item = {"float16": 2, "bfloat16": 2, "float32": 4}[str(held).replace("torch.", "")]
    total = 0
    with safe_open(str(model_dir.resident_path), framework="pt") as f:
        names = set(f.keys())
        tied = not any(n.endswith("lm_head.weight") for n in names)
        for name in names:
            piece = f.get_slice(name)
            shape = piece.get_shape()
            n = 1
            for s in shape:
                n *= s
            if len(shape) < 2 or name.startswith("ffn."):  # vectors, int8/int4 down scales: as stored
                total += n * {"F16": 2, "BF16": 2, "F32": 4}.get(piece.get_dtype(), 4)
                continue
            one_row = "embed_positions" in name or ("embed_tokens" in name and not tied)
            if piece.get_dtype() == "U8":  # blocks: a looked-up row as stored, products packed
                kind = blocks[name]
                k = row_length(kind, shape[1])
                if not as_stored:
                    total += (k if one_row else shape[0] * k) * item
                else:
                    total += shape[1] if one_row else packed_bytes(kind, shape[0], k)
                continue
            total += (shape[-1] if one_row else n) * item
    row = model_dir.bundle.nbytes if as_stored else model_dir.bundle.elements * item
    ffn = sum(r.neurons for r in model_dir.layers) * row
    return total + ffn


def _p10_p90(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [_median(values)] * 2
    q = statistics.quantiles(values, n=10)
    return [float(q[0]), float(q[-1])]


def summarise(run: dict, max_seconds: float | None = None) -> dict:
    if "killed_after_s" in run:  # no output at all: report the mode as cut, not drop it
        return {"tokens_per_s": None, "ms_per_token": None, "decode_tokens": 0, "token_ids": [],
                "cut_at_s": max_seconds, "killed_after_s": run["killed_after_s"],
                "memory_limit_bytes": run["memory_limit_bytes"]}
    s, t = run["stats"], run["timing"]
    per_token = [a + b + c for a, b, c in zip(s["io_ms"], s["mem_ms"], s["compute_ms"])]
    io_s = sum(s["io_ms"]) / 1000
    reads, nbytes = sum(s["reads_per_token"]), sum(s["bytes_per_token"])
    # The profile's time for the same waves of reads the run issued (per call, not per token);
    # modes that read nothing after loading (dense, mmap) log none.
    predicted = sum(s.get("io_model_ms", [])) / 1000
    return {
        "tokens_per_s": t["tokens_per_s"],
        "ms_per_token": _median(per_token) if per_token else None,
        "finish_reason": run.get("finish_reason"),
        # stopped by --max-seconds after these tokens (reported, not dropped)
        "cut_at_s": max_seconds if run.get("finish_reason") == "time" else None,
        "ms_per_token_p10_p90": _p10_p90(per_token),
        "io_ms": _median(s["io_ms"]), "mem_ms": _median(s["mem_ms"]),
        "compute_ms": _median(s["compute_ms"]),
        "io_ms_p10_p90": _p10_p90(s["io_ms"]), "mem_ms_p10_p90": _p10_p90(s["mem_ms"]),
        "compute_ms_p10_p90": _p10_p90(s["compute_ms"]),
        "bytes_read_per_token": _median(s["bytes_per_token"]),
        "reads_per_token": _median(s["reads_per_token"]),
        "bytes_read_total": s["bytes_read"],
        "read_throughput_Bps": nbytes / io_s if io_s > 0 else None,
        "profile_throughput_Bps": nbytes / predicted if predicted > 0 else None,
        "mean_read_bytes": nbytes / reads if reads else None,
        "peak_rss_bytes": run["peak_rss_bytes"],
        "memory_limit_bytes": run["memory_limit_bytes"],
        "decode_tokens": t["decode_tokens"],
        "token_ids": run["token_ids"],
        "split": s.get("split", True),  # False: I/O, memory and compute not measured apart (llamacpp)
        **({"llamacpp": s["llamacpp"]} if "llamacpp" in s else {}),
        **(_pipeline(s) if "io_hidden_ms" in s else {}),
        **({"memory_plan": s["memory_plan"], "selector": s.get("selector"),
            "verify": s.get("verify"),  # per-bundle checks: bundles, total ms (docs/INTEGRITY.md)
            "rows_used_median": _median(s["rows_used"]),
            "neurons_loaded_median": _median(s["neurons_loaded"])} if "memory_plan" in s else {}),
    }


def _pipeline(s: dict) -> dict:
    """Flash's pipeline figures per decode token (medians; recall: mean over tokens that needed
    reads): time waited on I/O, lookahead I/O hidden behind compute, what the lookahead read."""
    recalls = [r for r in s["lookahead_recall"] if r is not None]
    return {"io_wait_ms": _median(s["io_wait_ms"]), "io_hidden_ms": _median(s["io_hidden_ms"]),
            "io_hidden_ms_p10_p90": _p10_p90(s["io_hidden_ms"]),
            "lookahead": s.get("lookahead"), "overlap": s.get("overlap"),
            "lookahead_recall": sum(recalls) / len(recalls) if recalls else None,
            "lookahead_bytes_per_token": _median(s["lookahead_bytes"]),
            "lookahead_wasted_bytes_per_token": _median(s["lookahead_wasted_bytes"])}


def bench(model: Path, memory: str = "50%", window: int = 5, tokens: int = 32,
          prompt_tokens: int = 64, sparsity: str = "auto", modes: tuple[str, ...] = MODES_ORDER,
          dtype: str = "auto", limit_memory: bool = True, pin: float = 0.0,
          threads: int = 32, reader: str = "auto", density: float | None = None,
          max_seconds: float | None = None, predictor_cost: str | None = None, context: int | None = None,
          lookahead: bool = False, reads: str = "planned", gguf: Path | None = None, overlap: bool = True,
          progress=print) -> dict:
    from llmflash.runtime.memory_plan import resolve_context
    from llmflash.tools.llamacpp_peer import installed

    unknown = [m for m in modes if m not in MODES_ORDER + PEER_MODES]
    if unknown:
        raise LLMFlashError(f"bench: unknown mode {unknown[0]!r}; modes: {', '.join(MODES_ORDER + PEER_MODES)}")
    if "llamacpp" in modes and gguf is None:
        raise LLMFlashError("bench: mode llamacpp needs --gguf FILE, the same weights as a GGUF "
                            f"(`llmflash export-gguf {model} FILE` writes one)")
    if gguf is not None and not Path(gguf).is_file():
        raise LLMFlashError(f"bench: --gguf {gguf} is not a file")
    peer = installed() if "llamacpp" in modes else None
    model_dir = FlashModelDir(model)
    from llmflash.runtime.engine import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is not None:
        ids = tok.encode(BENCH_TEXT * (1 + prompt_tokens // 100))[:prompt_tokens]
    else:
        ids = [1 + (i * 7919) % (model_dir.config.vocab_size - 1) for i in range(prompt_tokens)]
    if len(ids) + tokens > model_dir.config.max_position_embeddings:
        raise LLMFlashError("bench: --prompt-tokens + --tokens exceed the model's context")
    budget = parse_budget(memory, model_weight_bytes(model_dir))
    # int4/int4m rows (flash and the baselines keep them quantized) run the compiled kernels (numba):
    # their memory is the runtime's
    overhead = runtime_overhead_bytes(quantized=model_dir.bundle.dtype in quant_kernels.KINDS)
    profile = load_default_profile()
    result = {"model": str(model), "memory": memory, "budget_bytes": budget, "window": window,
              "pin": pin, "threads": threads, "reader": reader, "density": density,
              "sparsity": sparsity, "prompt_tokens": len(ids), "tokens": tokens, "dtype": dtype,
              "runtime_overhead_bytes": overhead, "device_profile": profile.to_dict(),
              "max_seconds": max_seconds, "predictor_cost": predictor_cost, "context": context,
              "lookahead": lookahead, "overlap": overlap, "reads": reads, "modes": {},
              **({"gguf": str(gguf), "llamacpp_version": peer} if "llamacpp" in modes else {})}
    bandwidth = result["memory_bandwidth"] = copy_bandwidth()
    for mode in modes:
        progress(f"bench: running {mode} ...")
        started = time.perf_counter()
        limit = budget + overhead + FIXED_OVERHEAD_BYTES if (limit_memory and mode != "dense") else None
        extra = ("--threads", str(threads), "--reader", reader)
        if context is not None:  # the KV cache for --context tokens is charged to the budget
            extra += ("--context", str(context))
        if mode == "flash" and density is not None:
            extra += ("--density", str(density))
        if mode == "flash" and predictor_cost:
            extra += ("--predictor-cost", predictor_cost)
        if mode == "flash" and lookahead:
            extra += ("--lookahead",)
        if mode == "flash" and not overlap:
            extra += ("--no-overlap",)
        if mode == "flash" and reads != "planned":  # the I/O ablation: read planning / bundling off
            extra += ("--reads", reads)
        if mode == "llamacpp":
            if peer is None:
                result["modes"][mode] = {"skipped": "llama-cpp-python is not installed "
                                                    "(CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python)"}
                progress(f"bench: {mode} skipped: {result['modes'][mode]['skipped']}")
                continue
            run = run_llamacpp(Path(gguf), ids, tokens, limit, resolve_context(model_dir.config, context),
                               max_seconds)
        else:
            run = run_mode(model, mode, ids, tokens, memory, window, sparsity, limit, dtype,
                           pin if mode == "flash" else 0.0, extra, max_seconds)
        result["modes"][mode] = summarise(run, max_seconds)
        if mode == "dense" and result["modes"][mode]["ms_per_token"]:
            r = result["modes"][mode]
            r["bytes_touched_per_token"] = dense_bytes_per_token(model_dir, dtype)
            r["bandwidth_floor_ms"] = 1000 * r["bytes_touched_per_token"] / bandwidth["copy_Bps"]
            r["vs_bandwidth"] = r["ms_per_token"] / r["bandwidth_floor_ms"]
        result["modes"][mode]["wall_s"] = time.perf_counter() - started
    m = {name: r for name, r in result["modes"].items() if "skipped" not in r}
    ratios = {}
    if "flash" in m:
        for other in ("naive", "hybrid", "mmap", "dense", "llamacpp"):
            if other in m and m[other]["tokens_per_s"] and m["flash"]["tokens_per_s"]:
                ratios[f"flash/{other}"] = m["flash"]["tokens_per_s"] / m[other]["tokens_per_s"]
    for other in ("flash", "llamacpp"):
        if other in m and "dense" in m:  # same greedy tokens as dense (flash: same arithmetic, see FLASH.md)
            ratios[f"{other}_tokens_equal_dense"] = m[other]["token_ids"] == m["dense"]["token_ids"]
    result["ratios"] = ratios
    return result


def table(result: dict) -> str:
    lines = [f"model {result['model']}  budget {result['memory']} "
             f"({result['budget_bytes'] / 2**20:.1f} MiB)  window {result['window']}  "
             f"sparsity {result['sparsity']}  prompt {result['prompt_tokens']} + {result['tokens']} tokens"
             + (f"  flash reads: {result['reads']} (I/O ablation)" if result.get("reads", "planned") != "planned"
                else ""),
             f"{'mode':8}{'tok/s':>8}{'ms/tok':>9}{'io ms':>8}{'mem ms':>8}{'comp ms':>9}"
             f"{'KiB/tok':>10}{'reads/tok':>10}{'MB/s':>8}{'model MB/s':>11}{'peak RSS':>10}"]
    notes = []
    for mode, r in result["modes"].items():
        if "skipped" in r:
            notes.append(f"{mode}: skipped: {r['skipped']}")
            lines.append(f"{mode:8}{'-':>8}{'-':>9}")
            continue
        if r.get("cut_at_s") is not None:
            how = (f"killed after {r['killed_after_s']:.0f} s with no output" if "killed_after_s" in r
                   else f"{r['decode_tokens'] + 1} of {result['tokens']} tokens")
            notes.append(f"{mode}: cut at --max-seconds {r['cut_at_s']:g} ({how})")
        if r["ms_per_token"] is None:
            lines.append(f"{mode + ('*' if r.get('cut_at_s') is not None else ''):8}{'-':>8}{'-':>9}")
            continue
        tps = r["tokens_per_s"] or 0.0
        thr = r["read_throughput_Bps"]
        model_thr = r["profile_throughput_Bps"]
        if r.get("split", True):
            split = f"{r['io_ms']:8.1f}{r['mem_ms']:8.2f}{r['compute_ms']:9.1f}"
            reads, rates = f"{r['reads_per_token']:10.0f}", f"{(thr or 0) / 1e6:8.0f}{(model_thr or 0) / 1e6:11.0f}"
        else:  # llama.cpp: page faults inside its compute, reads not counted apart
            split, reads, rates = f"{'-':>8}{'-':>8}{'-':>9}", f"{'-':>10}", f"{'-':>8}{'-':>11}"
            notes.append(f"{mode}: llama.cpp {result.get('llamacpp_version')} on {result.get('gguf')} (mmap, "
                         f"{(r.get('llamacpp') or {}).get('threads', '?')} threads); its page faults happen inside "
                         "its compute, so only the whole token and the bytes read (/proc/self/io) are measured")
        lines.append(
            f"{mode + ('*' if r.get('cut_at_s') is not None else ''):8}{tps:8.2f}{r['ms_per_token']:9.1f}{split}"
            f"{r['bytes_read_per_token'] / 1024:10.0f}{reads}{rates}{r['peak_rss_bytes'] / 2**20:9.0f}M")
    lines += [f"* {n}" for n in notes]
    flash = result["modes"].get("flash", {})
    if flash.get("io_wait_ms") is not None:
        la = flash.get("lookahead") or {}
        if la.get("on"):
            recall = flash["lookahead_recall"]
            lines.append(
                f"flash pipeline (lookahead on): per token waited on I/O {flash['io_wait_ms']:.1f} ms (the io ms "
                f"column), I/O hidden behind compute {flash['io_hidden_ms']:.1f} ms; lookahead read "
                f"{flash['lookahead_bytes_per_token'] / 1024:.0f} KiB/token, of which "
                f"{flash['lookahead_wasted_bytes_per_token'] / 1024:.0f} KiB not used by the exact selection "
                f"(wasted); recall {'-' if recall is None else f'{recall:.3f}'} of the bundles needed from flash; "
                f"guess: {la.get('guess')}")
        else:
            ov = flash.get("overlap") or {}
            why = la.get("off_because")
            line = "flash pipeline: lookahead off" + (f" ({why})" if why else " (the default; --lookahead turns it on)")
            if ov.get("on"):
                line = (f"flash pipeline: overlap on (a token's new neurons read while the cached rows compute): "
                        f"per token waited on I/O {flash['io_wait_ms']:.1f} ms (the io ms column), I/O hidden behind "
                        f"compute {flash['io_hidden_ms']:.1f} ms (estimated); " + line[len("flash pipeline: "):])
            else:
                line += "; overlap off" + (f" ({ov['off_because']})" if ov.get("off_because") else
                                           " (--no-overlap)" if ov else "")
            lines.append(line)
    bw = result.get("memory_bandwidth")
    dense = result["modes"].get("dense", {})
    if bw:
        lines.append(f"memory bandwidth (STREAM-like copy, read + write): {bw['copy_Bps'] / 1e9:.1f} GB/s"
                     + (f"; dense touches {dense['bytes_touched_per_token'] / 1e6:.0f} MB per token: "
                        f"floor {dense['bandwidth_floor_ms']:.1f} ms, measured {dense['ms_per_token']:.1f} ms "
                        f"= {dense['vs_bandwidth']:.2f}x the floor" if dense.get("vs_bandwidth") else ""))
    for name, value in result["ratios"].items():
        lines.append(f"{name}: {value:.2f}x" if isinstance(value, float) else f"{name}: {value}")
    lines.append(f"runtime overhead (python + torch (+ numba for 4-bit rows), no model): "
                 f"{result['runtime_overhead_bytes'] / 2**20:.0f} MiB"
                 f" + {FIXED_OVERHEAD_BYTES >> 20} MiB allowed for buffers;"
                 " page cache dropped before each mode; 'model MB/s' is what the device profile "
                 "predicts for the same reads")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LLMFlashError("--plot needs matplotlib: pip install matplotlib") from None
    modes = [m for m in result["modes"] if result["modes"][m].get("ms_per_token") is not None
             and result["modes"][m].get("split", True)]
    io = [result["modes"][m]["io_ms"] for m in modes]
    mem = [result["modes"][m]["mem_ms"] for m in modes]
    comp = [result["modes"][m]["compute_ms"] for m in modes]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(modes, io, label="flash I/O (waited)")
    ax.bar(modes, mem, bottom=io, label="memory management")
    ax.bar(modes, comp, bottom=[a + b for a, b in zip(io, mem)], label="compute")
    # flash's lookahead reads that ran while it computed: inside the compute bar, not added to it
    hidden = [min(result["modes"][m].get("io_hidden_ms") or 0.0, c) for m, c in zip(modes, comp)]
    if any(hidden):
        ax.bar(modes, hidden, bottom=[a + b for a, b in zip(io, mem)], fill=False, hatch="//",
               edgecolor="black", linewidth=0, label="flash I/O overlapped with compute (hidden)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title(f"latency split, budget {result['memory']}, window {result['window']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
