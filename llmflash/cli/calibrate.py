"""`llmflash calibrate` and `llmflash train-predictors`: activation statistics, thresholds and
predictors from text (llmflash.tools.calibrate, llmflash.tools.train_predictors)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmflash.cli.options import deprecated, density_type, positive_int

NAME = "calibrate"


def add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("predictor training")
    g.add_argument("--rank", type=int, default=None,
                   help="fixed predictor rank for every layer (default: chosen per layer from measured recall)")
    g.add_argument("--start-rank", type=int, default=None, help="first rank tried per layer (default min(d,N)/8)")
    g.add_argument("--max-rank", type=int, default=None, help="highest rank tried per layer (default min(d,N)/2)")
    g.add_argument("--target-recall", type=float, default=0.99,
                   help="ReLU models: decision threshold keeps this recall of active neurons (default 0.99)")
    g.add_argument("--max-selected-ratio", type=float, default=3.0,
                   help="ReLU models: raise the rank while the selection exceeds this x the active set (default 3)")
    g.add_argument("--density", type=density_type, default=None,
                   help="non-ReLU models: share of neurons the predictors select (default 0.5)")
    deprecated(g, "--budget", "--density", "density", density_type)
    g.add_argument("--min-recall", type=float, default=0.85,
                   help="non-ReLU models: raise the rank while recall of the top set is below this (default 0.85)")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--min-steps", type=int, default=2000, help="at least this many optimiser steps per layer")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--hidden-act", choices=["none", "relu"], default="none",
                   help="nonlinearity between the two low-rank factors (default none)")
    g.add_argument("--predictor-size", type=float, default=None,
                   help="predictors as stored stay under this share of the model's float16 size: quant "
                        "picks the most bits that fit, lowrank raises ranks only while they fit (default: "
                        "quant at 4-bit gate / 3-bit up, what keeps SmolLM2 within +5%% perplexity at half "
                        "the neurons; lowrank within 0.05)")
    deprecated(g, "--size-budget", "--predictor-size", "predictor_size", float)
    g.add_argument("--kind", choices=["auto", "lowrank", "quant"], default="auto",
                   help="predictor kind: lowrank (d -> r -> N, sigmoid) or quant (GPTQ low-bit gate/up "
                        "estimates, scored like the true magnitude); auto: quant unless a rank option is given "
                        "(where torch lacks its packed-int4 CPU kernel: quant only for gated non-ReLU models)")
    g.add_argument("--bits", type=int, default=None,
                   help="quant: bits per gate weight (default 4, or the most that fit --predictor-size)")
    g.add_argument("--up-bits", type=int, default=None, help="quant: bits per up weight (default 3, or --bits when --bits is given)")
    g.add_argument("--criterion", choices=["glu", "cats"], default="glu",
                   help="non-ReLU models: what 'active' means: |act(gate)*up| (glu) or |act(gate)| (cats)")


def train_options(args: argparse.Namespace):
    from llmflash.tools.train_predictors import TrainOptions

    return TrainOptions(rank=args.rank, start_rank=args.start_rank, max_rank=args.max_rank,
                        target_recall=args.target_recall, max_selected_ratio=args.max_selected_ratio,
                        density=args.density, min_recall=args.min_recall, epochs=args.epochs,
                        min_steps=args.min_steps, lr=args.lr, hidden_act=args.hidden_act,
                        predictor_size=args.predictor_size, criterion=args.criterion, kind=args.kind,
                        bits=args.bits, up_bits=args.up_bits)


def add_text_options(p: argparse.ArgumentParser, tokens: int) -> None:
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    p.add_argument("--tokens", type=int, default=tokens, help=f"tokens of text to use (default {tokens})")
    p.add_argument("--context", type=positive_int, default=512,
                   help="tokens per text window, BOS included (default 512)")
    deprecated(p, "--window", "--context", "context", int, " (--window is the neuron-cache window)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def log_for(args: argparse.Namespace):
    """Progress lines to stderr, none with --json (stdout carries the JSON)."""
    return (lambda *a, **k: None) if getattr(args, "json", False) else (lambda *a, **k: print(*a, **k, file=sys.stderr))


def run_calibrate(args: argparse.Namespace) -> int:
    from llmflash.tools.calibrate import calibrate

    summary = calibrate(args.model, args.text, tokens=args.tokens, window=args.context, sparsity=1.0 - (args.density or 0.5),
                        train=not args.no_predictors, train_options=train_options(args),
                        progress=not args.quiet, log=log_for(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"calibrated {args.model} in {summary['seconds']} s: {summary['stats_file']}")
    return 0


def run_train_predictors(args: argparse.Namespace) -> int:
    import hashlib

    from llmflash.tools.calibrate import capture_inputs
    from llmflash.tools.train_predictors import train_predictors

    engine, inputs, windows = capture_inputs(args.model, args.text, args.tokens, args.context, not args.quiet)
    key = f"{hashlib.sha256(Path(args.text).read_bytes()).hexdigest()}:{sum(map(len, windows))}:{args.context}"
    meta = train_predictors(engine.dir, inputs, train_options(args), inputs_key=key,
                            progress=not args.quiet, log=log_for(args))
    if args.json:
        print(json.dumps(meta))
    else:
        sizes = f"ranks {meta['ranks']}" if meta["kind"] == "lowrank" else f"bits {meta['bits'][0]}"
        print(f"predictors ({meta['kind']}): {sizes}, {meta['stored_bytes'] / 2**20:.2f} MiB "
              f"({meta['size_fraction']:.2%} of the model's float16 size, "
              f"{meta['size_fraction_of_stored_model']:.2%} of its {meta['model_dtype']} files), "
              f"trained in {meta['train_seconds']} s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="activation statistics, sparsity thresholds and predictors from text")
    p.add_argument("model", type=Path, help="converted model directory")
    add_text_options(p, 16384)
    deprecated(p, "--sparsity", "--density", "density", lambda v: 1.0 - float(v),
               " (--density is the share kept: 1 - the old --sparsity)")
    p.add_argument("--no-predictors", action="store_true", help="statistics and thresholds only")
    p.add_argument("--json", action="store_true")
    add_train_options(p)
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("train-predictors",
                       help="train predictors only (reuses stored calibration thresholds; `calibrate` also trains)")
    p.add_argument("model", type=Path)
    add_text_options(p, 16384)
    p.add_argument("--json", action="store_true")
    add_train_options(p)
    p.set_defaults(func=run_train_predictors)

