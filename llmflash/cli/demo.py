"""`llmflash demo`: the main job. Converts the built-in SmolLM2-135M-Instruct once, answers a
prompt in flash mode, then compares flash with the baselines in separate processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmflash.cli.generate import add_prompt_options, print_generation
from llmflash.cli.options import add_run_options, add_sampling_options, load_options

NAME = "demo"
DEFAULT_PROMPT = "What is the capital of France, and why is it famous?"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="the main job: convert the built-in SmolLM2-135M-Instruct once, answer in "
                                  "flash mode, compare with the baselines")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where converted models are cached (default $LLMFLASH_HOME/models or "
                        "~/.cache/llmflash/models)")
    p.add_argument("--bench-tokens", type=int, default=16,
                   help="tokens per mode in the comparison (0 skips it)")
    add_prompt_options(p, prompt=False)
    add_sampling_options(p)
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the answer as one JSON object, no comparison")
    p.add_argument("--stats", action="store_true", help="print the per-token I/O / memory / compute table")
    # a short context: the demo prompt and answer take ~110 tokens, and the KV cache is charged to --memory
    p.set_defaults(func=run, ids=None, mode="flash", context=256)


def run(args: argparse.Namespace) -> int:
    import llmflash.api as api
    from llmflash.defaults import calibrate_default_model, default_model_dir
    from llmflash.tools import bench

    path = default_model_dir(args.models_dir)
    print(f"model: {path}", file=sys.stderr)
    if args.mode == "flash" and args.sparsity in (None, "auto", "predictor"):
        calibrate_default_model(path, log=lambda *a, **k: print(*a, **k, file=sys.stderr))
    model = api.load(path, **load_options(args))
    print(f"prompt: {args.prompt}  [mode {args.mode}, memory {args.memory}, window {args.window}, "
          f"selector {model.engine.ffn.summary().get('selector', 'none')}]", file=sys.stderr)
    status = print_generation(model, args.prompt, args)
    model.close()
    del model
    if status or args.bench_tokens <= 0 or args.json:
        return status
    print(f"\ncomparing flash with the baselines at {args.memory} ({args.bench_tokens} tokens each, "
          "one process per mode, page cache dropped) ...", file=sys.stderr)
    result = bench.bench(path, memory=args.memory, window=args.window, tokens=args.bench_tokens,
                         prompt_tokens=32, sparsity=args.sparsity or "auto", dtype=args.dtype,
                         density=args.density, progress=lambda msg: print(msg, file=sys.stderr))
    print(bench.table(result))
    return 0
