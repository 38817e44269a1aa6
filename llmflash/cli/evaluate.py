"""`llmflash eval`: perplexity dense / reference / predictor, predictor recall, window statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmflash.cli.options import deprecated, density_type
from llmflash.cli.calibrate import add_text_options

NAME = "eval"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity dense / reference / predictor, predictor recall, window statistics")
    p.add_argument("model", type=Path)
    add_text_options(p, 4096)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=Path, default=None, help="write per-layer and per-window curves to this PNG")
    p.add_argument("--runs", default="none,reference,predictor",
                   help="comma-separated runs among none (dense), reference (exact on ReLU models, else the "
                        "magnitude criterion at the calibrated thresholds), predictor (default all three)")
    deprecated(p, "--modes", "--runs", "runs")
    p.add_argument("--density", type=density_type, default=None,
                   help="predictor: use the thresholds that selected this share of neurons on calibration "
                        "text instead of the trained threshold (0.1 .. 0.9 in steps of 0.1)")
    deprecated(p, "--budget", "--density", "density", density_type)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools.evaluate import evaluate, format_table, plot

    result = evaluate(args.model, args.text, tokens=args.tokens, window=args.context, progress=not args.quiet,
                      density=args.density, modes=tuple(args.runs.split(",")))
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0
