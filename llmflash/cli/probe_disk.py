"""`llmflash probe-disk [PATH]`: random-read throughput and the fitted device profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmflash import sizes
from llmflash.errors import LLMFlashError

NAME = "probe-disk"


def size_arg(text: str) -> int:
    """An argparse type for sizes ('4K', '16MiB', '1G', '4096'; llmflash.sizes decides the units)."""
    try:
        return sizes.parse_size(text)
    except LLMFlashError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_list(text: str) -> list[int]:
    return [size_arg(part) for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=".", help="a folder (or file) on the disk to probe; default: .")
    parser.add_argument("--file", type=Path, help="probe this existing file instead of writing a scratch file")
    parser.add_argument("--file-size", type=size_arg, help="scratch file size (default 1G; quick: 8M)")
    parser.add_argument("--seconds", type=float, help="time per cell (default 0.5; quick: 0.03)")
    parser.add_argument("--max-reads", type=int, help="cap on reads per cell (default none; quick: 300)")
    parser.add_argument("--chunks", type=_size_list, help="chunk sizes, e.g. 4K,16K,64K (default 4K..1M)")
    parser.add_argument("--depths", type=_int_list, help="reads in flight, e.g. 1,8,32 (default 1..64)")
    parser.add_argument("--threads", type=int, help="reads in flight the runtime uses (default 32)")
    parser.add_argument("--reader", default="auto", choices=("auto", "aio", "threads"),
                        help="measure waves through kernel AIO or N threads calling preadv "
                             "(default auto: the runtime's reader, AIO where available)")
    parser.add_argument("--json", type=Path, help="write cells and the fitted profile to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a throughput plot (PNG; needs matplotlib)")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                        help="save the fitted profile where the runtime looks for it "
                             "($LLMFLASH_DEVICE_PROFILE, default ~/.cache/llmflash/device_profile.json)")
    parser.add_argument("--quick", action="store_true", help="tiny file, few cells, short cells (smoke test)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="measure random-read throughput and save the device profile")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmflash.tools import probe_disk

    return probe_disk.run(args)
