"""`llmflash bench MODEL`: flash against naive, hybrid, mmap and dense, one process each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmflash.cli.options import add_run_options, positive_int

NAME = "bench"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="flash against naive, hybrid, mmap and dense, one process each "
                                  "(page cache dropped, cgroup memory limit)")
    p.add_argument("model", type=Path, help="converted model directory")
    add_run_options(p, mode=False)
    p.add_argument("--tokens", type=positive_int, default=32, help="tokens generated per mode")
    p.add_argument("--prompt-tokens", type=positive_int, default=64, help="prompt length in tokens")
    p.add_argument("--modes", default="flash,naive,hybrid,mmap,dense",
                   help="comma-separated modes to run: flash, naive, hybrid, mmap, dense, and llamacpp (llama.cpp on "
                        "--gguf, memory-mapped, under the same limit; skipped with a note when llama-cpp-python is "
                        "not installed)")
    p.add_argument("--gguf", type=Path, default=None,
                   help="the same weights as a GGUF, for --modes ...,llamacpp (`llmflash export-gguf MODEL FILE`)")
    p.add_argument("--no-limit", action="store_true", help="do not run modes under a cgroup memory limit")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="stop a mode after the token during which S seconds of its process have passed; "
                        "its tokens so far are reported, marked as cut (so slow modes fit a 7B run)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="stacked latency-split bars (PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools import bench

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = bench.bench(args.model, memory=args.memory, window=args.window, tokens=args.tokens,
                         prompt_tokens=args.prompt_tokens, sparsity=args.sparsity or "auto", modes=modes,
                         dtype=args.dtype, limit_memory=not args.no_limit, pin=args.pin,
                         threads=args.threads, reader=args.reader, density=args.density,
                         max_seconds=args.max_seconds, predictor_cost=args.predictor_cost, context=args.context,
                         lookahead=args.lookahead, reads=args.reads, gguf=args.gguf, overlap=args.overlap,
                         progress=lambda msg: print(msg, file=sys.stderr))
    print(bench.table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        bench.plot(result, args.plot)
    return 0
