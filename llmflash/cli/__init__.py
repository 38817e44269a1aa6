"""`llmflash` command line: one module per verb, one parser, one error printer.

Every verb module has NAME, `add_parser(sub)` (which sets `func`) and imports nothing heavy at
module level, so `--help`, `--version` and argument errors answer at once; torch and the runtime
load inside the verb's `run`. Every user-facing failure (LLMFlashError, and OSError such as a full
disk or a read-only folder) is printed as one line, `llmflash: error: ...`, exit code 2;
`--debug` (or LLMFLASH_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from llmflash import __version__
from llmflash.cli import (bench, calibrate, chat, convert, demo, evaluate, export_gguf, generate, probe_disk, relufy,
                          reorder, serve, synth, trace, verify)
from llmflash.errors import LLMFlashError

# The order of `llmflash --help`. A new verb: a module with NAME, add_parser and run, listed here.
VERBS = [demo, convert, generate, chat, serve, verify, bench, reorder, probe_disk, calibrate, evaluate, relufy, synth,
         trace, export_gguf]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmflash", description="Run language models bigger than the memory they may use: FFN neurons "
                                     "streamed from flash (LLM in a flash, Alizadeh et al. 2023).")
    parser.add_argument("--version", action="version", version=f"llmflash {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed (ENOSPC, EROFS, EACCES...) and on which file."""
    import errno

    code = errno.errorcode.get(exc.errno or 0)
    what = (exc.strerror or str(exc)) + (f" [{code}]" if code else "")
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup (`finally`, temporary files) runs."""


def _terminate(signum, frame):  # noqa: ARG001
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("LLMFLASH_DEBUG") == "1"
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except LLMFlashError as exc:
        if debug:
            raise
        print(f"llmflash: error: {' '.join(str(exc).split(chr(10)))}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, read-only or forbidden destination, ... (BrokenPipe below)
        if isinstance(exc, BrokenPipeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        if debug:
            raise
        print(f"llmflash: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("llmflash: error: out of memory; give a smaller --memory budget or a smaller model", file=sys.stderr)
        return 2
    except Terminated:
        print("llmflash: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("llmflash: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
