"""CLI subcommands of the sparsity tools: calibrate, train-predictors, eval, relufy.

`register(sub)` adds them to llmflash's parser; `python -m llmflash.cli.sparsity ...` runs
them standalone. Each command returns an int exit code; failures the user can act on are
LLMFlashError (printed as one line by llmflash's main).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predictor training")
    g.add_argument("--rank", type=int, default=None,
                   help="fixed predictor rank for every layer (default: chosen per layer from measured recall)")
    g.add_argument("--start-rank", type=int, default=None, help="first rank tried per layer (default min(d,N)/8)")
    g.add_argument("--max-rank", type=int, default=None, help="highest rank tried per layer (default min(d,N)/2)")
    g.add_argument("--target-recall", type=float, default=0.99,
                   help="ReLU models: decision threshold keeps this recall of active neurons (default 0.99)")
    g.add_argument("--max-selected-ratio", type=float, default=3.0,
                   help="ReLU models: raise the rank while the selection exceeds this x the active set (default 3)")
    g.add_argument("--budget", type=float, default=None,
                   help="non-ReLU models: fraction of neurons selected (default 1 - --sparsity)")
    g.add_argument("--min-recall", type=float, default=0.85,
                   help="non-ReLU models: raise the rank while recall of the top set is below this (default 0.85)")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--min-steps", type=int, default=2000, help="at least this many optimiser steps per layer")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--hidden-act", choices=["none", "relu"], default="none",
                   help="nonlinearity between the two low-rank factors (default none)")
    g.add_argument("--size-budget", type=float, default=0.05,
                   help="predictors as stored stay under this fraction of the model's float16 size: "
                        "lowrank raises ranks only while they fit, quant picks the most bits that fit (default 0.05)")
    g.add_argument("--kind", choices=["auto", "lowrank", "quant"], default="auto",
                   help="predictor kind: lowrank (d -> r -> N, sigmoid) or quant (GPTQ low-bit gate/up "
                        "estimates, scored like the true magnitude); auto: quant unless a rank option is given "
                        "(where torch lacks its packed-int4 CPU kernel: quant only for gated non-ReLU models)")
    g.add_argument("--bits", type=int, default=None,
                   help="quant: bits per gate weight (default: the most that fit --size-budget)")
    g.add_argument("--up-bits", type=int, default=None, help="quant: bits per up weight (default --bits)")
    g.add_argument("--criterion", choices=["glu", "cats"], default="glu",
                   help="non-ReLU models: what 'active' means: |act(gate)*up| (glu) or |act(gate)| (cats)")


def _train_options(args: argparse.Namespace):
    from llmflash.tools.train_predictors import TrainOptions

    return TrainOptions(rank=args.rank, start_rank=args.start_rank, max_rank=args.max_rank,
                        target_recall=args.target_recall, max_selected_ratio=args.max_selected_ratio,
                        budget=args.budget, min_recall=args.min_recall, epochs=args.epochs,
                        min_steps=args.min_steps, lr=args.lr, hidden_act=args.hidden_act,
                        size_budget=args.size_budget, criterion=args.criterion, kind=args.kind,
                        bits=args.bits, up_bits=args.up_bits)


def _add_text_args(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    p.add_argument("--tokens", type=int, default=tokens, help=f"tokens of text to use (default {tokens})")
    p.add_argument("--window", type=int, default=512, help="tokens per window, BOS included (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _log(args):
    return (lambda *a, **k: None) if getattr(args, "json", False) else (lambda *a, **k: print(*a, **k, file=sys.stderr))


def cmd_calibrate(args: argparse.Namespace) -> int:
    from llmflash.tools.calibrate import calibrate

    summary = calibrate(args.model, args.text, tokens=args.tokens, window=args.window, sparsity=args.sparsity,
                        train=not args.no_predictors, train_options=_train_options(args),
                        progress=not args.quiet, log=_log(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"calibrated {args.model} in {summary['seconds']} s: {summary['stats_file']}")
    return 0


def cmd_train_predictors(args: argparse.Namespace) -> int:
    import hashlib

    from llmflash.tools.calibrate import capture_inputs
    from llmflash.tools.train_predictors import train_predictors

    engine, inputs, windows = capture_inputs(args.model, args.text, args.tokens, args.window, not args.quiet)
    key = f"{hashlib.sha256(Path(args.text).read_bytes()).hexdigest()}:{sum(map(len, windows))}:{args.window}"
    meta = train_predictors(engine.dir, inputs, _train_options(args), inputs_key=key,
                            progress=not args.quiet, log=_log(args))
    if args.json:
        print(json.dumps(meta))
    else:
        sizes = f"ranks {meta['ranks']}" if meta["kind"] == "lowrank" else f"bits {meta['bits'][0]}"
        print(f"predictors ({meta['kind']}): {sizes}, {meta['stored_bytes'] / 2**20:.2f} MiB "
              f"({meta['size_fraction']:.2%} of the model's float16 size, "
              f"{meta['size_fraction_of_stored_model']:.2%} of its {meta['model_dtype']} files), "
              f"trained in {meta['train_seconds']} s")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llmflash.tools.evaluate import evaluate, format_table, plot

    result = evaluate(args.model, args.text, tokens=args.tokens, window=args.window, progress=not args.quiet,
                      budget=args.budget, modes=tuple(args.modes.split(",")))
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_relufy(args: argparse.Namespace) -> int:
    from llmflash.tools.relufy import RelufyOptions, relufy

    opts = RelufyOptions(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch=args.batch,
                         threshold=args.fatrelu, refit=not args.no_refit, l1=args.l1, ce_weight=args.ce_weight,
                         checkpoint_every=args.checkpoint_every, eval_tokens=args.eval_tokens,
                         train_tokens=args.tokens, seed=args.seed)
    report = relufy(args.src, args.dst, args.text, opts, eval_text=args.eval_text, resume=not args.restart,
                    force=args.force, progress=not args.quiet, log=_log(args))
    if args.json:
        print(json.dumps(report))
    else:
        b, a = report["before"], report["after"]
        print(f"relufied {args.src} -> {args.dst}: exact-zero FFN activations {b['exact_zero_fraction']:.3f} -> "
              f"{a['exact_zero_fraction']:.3f}; perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} "
              f"(plain ReLU swap before training: {report['swapped']['perplexity']:.3f}) on {report['eval_text']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="activation statistics, sparsity thresholds and predictors from text")
    p.add_argument("model", type=Path, help="converted model directory")
    _add_text_args(p, 16384)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="non-ReLU models: fraction of FFN neurons to drop per layer (default 0.5)")
    p.add_argument("--no-predictors", action="store_true", help="statistics and thresholds only")
    p.add_argument("--json", action="store_true")
    _add_train_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("train-predictors",
                       help="train predictors only (reuses stored calibration thresholds; `calibrate` also trains)")
    p.add_argument("model", type=Path)
    _add_text_args(p, 16384)
    p.add_argument("--json", action="store_true")
    _add_train_args(p)
    p.set_defaults(func=cmd_train_predictors)

    p = sub.add_parser("eval", help="perplexity dense / oracle / predictor, predictor recall, window statistics")
    p.add_argument("model", type=Path)
    _add_text_args(p, 4096)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, default=None, help="write per-layer and per-window curves to this PNG")
    p.add_argument("--modes", default="none,oracle,predictor",
                   help="comma-separated runs among none (dense), oracle, predictor (default all three)")
    p.add_argument("--budget", type=float, default=None,
                   help="predictor: select this fraction of neurons per layer instead of the trained "
                        "threshold (0.1 .. 0.9 in steps of 0.1)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("relufy", help="swap the FFN gate activation to ReLU and distil against the original")
    p.add_argument("src", type=Path, help="converted model directory (gated FFN, e.g. SiLU)")
    p.add_argument("dst", type=Path, help="output model directory")
    p.add_argument("--text", type=Path, required=True, help="training text")
    p.add_argument("--eval-text", type=Path, default=None,
                   help="held-out text for perplexity (default: the text's tail, not used for training)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--tokens", type=int, default=None, help="training tokens to draw from (default all, up to 2M)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="sequences per optimiser step")
    p.add_argument("--fatrelu", type=float, default=0.0, metavar="T",
                   help="use FATReLU with threshold T > 0 instead of ReLU")
    p.add_argument("--l1", type=float, default=0.0, help="L1 penalty on activations (more exact zeros)")
    p.add_argument("--ce-weight", type=float, default=0.1, help="weight of next-token cross-entropy")
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares down-projection refit")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint of DST")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_relufy)


def main(argv: list[str] | None = None) -> int:
    from llmflash.errors import LLMFlashError

    parser = argparse.ArgumentParser(prog="llmflash-sparsity")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMFlashError as exc:
        print(f"llmflash: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
