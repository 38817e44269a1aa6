"""`llmflash verify MODEL`: every file against the manifest's checksums."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "verify"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="check every file of a converted model against its checksums")
    p.add_argument("model", type=Path)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.format.layout import verify_model

    # exit 1: the model is damaged (docs/FORMAT.md), one line per problem; exit 2 (the CLI's
    # one-line error): the path is not a model directory at all
    model, problems = verify_model(args.model, progress=sys.stderr.isatty())
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"ok: {len(model.files)} files and {len(model.layers)} FFN layers match {model.path / 'manifest.json'}")
    return 0
