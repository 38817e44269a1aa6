"""`llmflash export-gguf MODEL OUT.gguf`: a flash-layout model written as a llama.cpp GGUF."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export-gguf"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="write a converted (or synth) Llama-family model as a llama.cpp GGUF, "
                                  "e.g. to run llama.cpp on the same weights (bench --modes ...,llamacpp)")
    p.add_argument("model", type=Path, help="converted model directory")
    p.add_argument("out", type=Path, help="the GGUF file to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools.export_gguf import export_gguf

    done = export_gguf(args.model, args.out, force=args.force, progress=not args.quiet)
    print(f"wrote {done['path']}: {done['tensors']} tensors at {done['dtype']}, {done['bytes'] / 2**20:.1f} MiB "
          f"(tokenizer pre-split: {done['tokenizer_pre']})")
    return 0
