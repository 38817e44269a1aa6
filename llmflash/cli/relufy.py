"""`llmflash relufy SRC DST`: swap the FFN activation to ReLU and distil against the original."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmflash.cli.calibrate import log_for

NAME = "relufy"


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools.relufy import RelufyOptions, relufy

    opts = RelufyOptions(steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch=args.batch,
                         threshold=args.fatrelu, refit=not args.no_refit, l1=args.l1, ce_weight=args.ce_weight,
                         checkpoint_every=args.checkpoint_every, eval_tokens=args.eval_tokens,
                         train_tokens=args.tokens, seed=args.seed)
    report = relufy(args.src, args.dst, args.text, opts, eval_text=args.eval_text, resume=not args.restart,
                    force=args.force, progress=not args.quiet, log=log_for(args))
    if args.json:
        print(json.dumps(report))
    else:
        b, a = report["before"], report["after"]
        print(f"relufied {args.src} -> {args.dst}: exact-zero FFN activations {b['exact_zero_fraction']:.3f} -> "
              f"{a['exact_zero_fraction']:.3f}; perplexity {b['perplexity']:.3f} -> {a['perplexity']:.3f} "
              f"(plain ReLU swap before training: {report['swapped']['perplexity']:.3f}) on {report['eval_text']}")
    return 0
