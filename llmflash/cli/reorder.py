"""`llmflash reorder MODEL --text F`: co-activation layout and hot-neuron list."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "reorder"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="co-activation layout: rewrite the FFN bundles so neurons that fire "
                                  "together are adjacent on flash; record hot neurons")
    p.add_argument("model", type=Path)
    p.add_argument("--text", type=Path, required=True, help="calibration text (not your eval text)")
    p.add_argument("--tokens", type=int, default=4096)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools.reorder import reorder

    model = reorder(args.model, args.text, args.tokens)
    print(f"reordered {len(model.layers)} layers of {model.path}; bundles now in {model.ffn_path.name}")
    return 0
