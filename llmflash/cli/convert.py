"""`llmflash convert SRC DST`: import a Hugging Face directory or GGUF file into the flash layout."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "convert"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="import a Hugging Face directory or GGUF file into the flash layout")
    p.add_argument("src", type=Path, help="Hugging Face model directory or .gguf file")
    p.add_argument("dst", type=Path, help="output directory (the flash layout)")
    p.add_argument("--dtype", default="float16",
                   choices=["float16", "bfloat16", "float32", "int8", "int4", "int4m", "auto"],
                   help="storage dtype of the weights (default float16): int8/int4/int4m store the FFN "
                        "bundles in GGUF's Q8_0/Q4_0/Q4_1 blocks (docs/FORMAT.md); auto: a quantized "
                        "GGUF's nearest block format (its Q8_0/Q4_0/Q4_1 blocks copied as they are), "
                        "else float16")
    p.add_argument("--resident-dtype", default=None,
                   choices=["float16", "bfloat16", "float32", "int8", "int4", "int4m", "auto"],
                   help="int8/int4/int4m models: dtype of the resident matrices (embeddings, attention, "
                        "head; default float16); int8/int4/int4m: GGUF blocks as for the bundles, a GGUF's "
                        "tensors already in that format kept as they are; auto: each GGUF matrix in the "
                        "block format nearest its own type, float ones at float16")
    p.add_argument("--gptq", type=Path, default=None, metavar="TEXT",
                   help="int8/int4/int4m: choose the blocks by GPTQ against the model's activations on this "
                        "UTF-8 text (calibration) instead of rounding to nearest (llmflash/tools/quantize.py)")
    p.add_argument("--gptq-tokens", type=int, default=4096, help="calibration tokens for --gptq (default 4096)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.conversion.writer import convert
    from llmflash.format.layout import FlashModelDir

    if args.gptq is not None:
        model = _gptq(args)
    else:
        model = convert(args.src, args.dst, dtype=args.dtype, force=args.force,
                        progress=not args.quiet, resident_dtype=args.resident_dtype)
    sizes = model.weights_nbytes()
    print(f"wrote {model.path}: {model.config.model_type}, {model.config.num_layers} layers, "
          f"resident {sizes['resident'] / 2**20:.1f} MiB, FFN bundles {sizes['ffn'] / 2**20:.1f} MiB "
          f"({model.bundle.nbytes} bytes per neuron, {model.dtype})")
    return 0


def _gptq(args: argparse.Namespace):
    """Convert to a float32 directory beside DST (removed after), then quantize it by GPTQ."""
    import os
    import shutil

    from llmflash.conversion.writer import check_destination, convert
    from llmflash.errors import LLMFlashError
    from llmflash.tools.quantize import gptq_convert

    if args.dtype not in ("int8", "int4", "int4m"):
        raise LLMFlashError(f"--gptq quantizes to int8, int4 or int4m, not {args.dtype}: give --dtype "
                            "int8|int4|int4m")
    check_destination(args.dst, args.force)
    tmp = args.dst.parent / f".gptq-{args.dst.name}-{os.getpid()}"
    try:
        convert(args.src, tmp, dtype="float32", force=True, progress=not args.quiet)
        return gptq_convert(tmp, args.dst, args.dtype, args.gptq, tokens=args.gptq_tokens, force=args.force,
                            progress=not args.quiet, resident_dtype=args.resident_dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
