"""`llmflash synth SHAPE DST`: a model with a real architecture's shapes and random weights."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "synth"
PRESET_NAMES = ("opt-1.3b", "opt-6.7b", "llama-2-7b", "prosparse-llama-2-7b", "mistral-7b")  # tools/synth.py


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="write a model in the flash layout with a real architecture's shapes and "
                                  "random weights (for measuring at 7B scale; its text is meaningless)")
    p.add_argument("shape", nargs="?", default=None,
                   help=f"preset: {', '.join(PRESET_NAMES)} (or give --config)")
    p.add_argument("dst", type=Path, help="output directory (the flash layout)")
    p.add_argument("--config", type=Path, default=None,
                   help="a Hugging Face config.json of a supported architecture instead of a preset")
    p.add_argument("--dtype", default="float16",
                   choices=["float16", "bfloat16", "float32", "int8", "int4", "int4m"],
                   help="storage dtype of the weights (default float16); int8/int4/int4m: bundles in "
                        "Q8_0/Q4_0/Q4_1 blocks, resident matrices at --resident-dtype (docs/FORMAT.md)")
    p.add_argument("--resident-dtype", default=None,
                   choices=["float16", "bfloat16", "float32", "int8", "int4", "int4m"],
                   help="int8/int4/int4m models: dtype of the resident matrices (default float16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.errors import LLMFlashError
    from llmflash.tools.synth import synth

    if (args.shape is None) == (args.config is None):
        raise LLMFlashError("give either a preset SHAPE or --config config.json")
    model = synth(args.shape, args.dst, dtype=args.dtype, seed=args.seed, config_path=args.config,
                  force=args.force, progress=not args.quiet, resident_dtype=args.resident_dtype)
    sizes = model.weights_nbytes()
    print(f"wrote {model.path}: synthetic {model.config.model_type}, {model.config.num_layers} layers, "
          f"resident {sizes['resident'] / 2**20:.1f} MiB, FFN bundles {sizes['ffn'] / 2**20:.1f} MiB "
          f"({model.bundle.nbytes} bytes per neuron), in {model.manifest['conversion_seconds']:.1f} s")
    return 0
