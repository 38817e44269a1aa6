"""Argument groups shared by several verbs, and deprecated spellings of renamed flags.

One meaning per word: --memory is the only budget (bytes of DRAM a run may hold); --window is the
neuron-cache window in tokens; --context is the tokens of one sequence (a run's longest, whose KV cache
--memory charges; the text windows of calibrate and eval); --density is
the share of a layer's neurons a selector keeps per token; --sparsity names the selector.
Old spellings still parse for one release and print a warning naming the new one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

SELECTOR_HELP = ("which FFN neurons a token uses: none (all), exact (ReLU models: the non-zero ones), "
                 "magnitude (top --density by |act(gate)*up|), predictor (trained by `llmflash calibrate`), "
                 "trace:PATH (replayed activations). Default: none in DRAM modes; in flash mode "
                 "predictor where calibrated, else exact (ReLU) or magnitude. Every selector is charged "
                 "to --memory")


def deprecated(parser: argparse.ArgumentParser, old: str, new: str, dest: str,
               convert: Callable[[str], object] = str, note: str = "") -> None:
    """Accept `old` as a spelling of `new` (same dest), warning once on stderr."""

    class Alias(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"llmflash: warning: {old} is deprecated; use {new}{note}", file=sys.stderr)
            try:
                setattr(namespace, dest, convert(values))
            except ValueError as exc:
                p.error(f"argument {old}: {exc}")

    parser.add_argument(old, action=Alias, help=argparse.SUPPRESS)


def density_type(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_run_options(p: argparse.ArgumentParser, mode: bool = True) -> None:
    """How a model runs: mode, memory budget, window, selector, reader (llmflash.load's arguments)."""
    g = p.add_argument_group("run options")
    if mode:
        g.add_argument("--mode", default="dense", choices=("dense", "flash", "naive", "hybrid", "mmap"),
                       help="dense (all in DRAM, default), flash (ours), naive, hybrid, mmap")
    g.add_argument("--memory", default="50%",
                   help="memory budget for flash/hybrid: a share of the stored model (50%%) or a size "
                        "(300MiB; K/M/G and KiB/MiB/GiB are powers of 1024, kB/MB/GB of 1000)")
    g.add_argument("--window", type=positive_int, default=5, help="tokens whose neurons stay cached (flash)")
    g.add_argument("--sparsity", default=None, metavar="SELECTOR", help=SELECTOR_HELP)
    g.add_argument("--density", type=density_type, default=None,
                   help="share of neurons kept per token: magnitude's top share (default 0.5), or the "
                        "calibrated predictor thresholds that kept that share (0.1 .. 0.9)")
    deprecated(g, "--sparsity-budget", "--density", "density", density_type)
    g.add_argument("--predictor-cost", default=None, metavar="KIND:SIZE",
                   help="flash: run a predictor of this size (lowrank:128, quant:4) on every layer's FFN "
                        "input and charge its memory and time, output unused (with --sparsity trace:PATH)")
    g.add_argument("--context", type=positive_int, default=None,
                   help="longest sequence (prompt + generated) in tokens; its KV cache is charged to "
                        "--memory (default 512, at most the model's)")
    g.add_argument("--threads", type=positive_int, default=32, help="reads in flight (flash, naive, hybrid)")
    g.add_argument("--reader", default="auto", choices=("auto", "aio", "threads"),
                   help="how reads are kept in flight: kernel AIO or a thread pool calling preadv "
                        "(auto: AIO for O_DIRECT files where the kernel allows it)")
    g.add_argument("--pin", type=float, default=0.0,
                   help="flash: share of each layer's hottest neurons kept pinned in the cache "
                        "(e.g. 0.03; needs `llmflash reorder`)")
    g.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=False,
                   help="flash: read the next layer's predicted neurons while this layer computes (same "
                        "results; off by default: it measured slower at 7B on 2 cores, docs/FLASH.md "
                        "\"Overlap\")")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="flash: read a token's new neurons in the background while the FFN over the neurons "
                        "already cached computes (same results; on by default; --no-overlap reads first, "
                        "then computes)")
    g.add_argument("--reads", default="planned", choices=("planned", "bundle", "part"),
                   help="flash: how bundles become reads - planned (default: the cost model merges "
                        "neighbours), bundle (one read each: read planning off), part (one read per weight "
                        "matrix of a bundle: bundling off too); for the paper's I/O ablation")
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="what weights are held at in DRAM: auto (default: as converted), or converted at "
                        "load; activations are float32 in every case")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence (benchmarks)")


def load_options(args: argparse.Namespace) -> dict:
    """llmflash.load keyword arguments from the run options."""
    if args.sparsity == "oracle":
        print("llmflash: warning: --sparsity oracle is deprecated; use --sparsity exact (ReLU models) "
              "or --sparsity magnitude", file=sys.stderr)
    return {"mode": args.mode, "memory": args.memory, "window": args.window, "sparsity": args.sparsity,
            "density": args.density, "dtype": args.dtype, "threads": args.threads, "reader": args.reader,
            "pin": args.pin, "predictor_cost": args.predictor_cost, "context": args.context,
            "lookahead": args.lookahead, "overlap": args.overlap, "reads": args.reads}
