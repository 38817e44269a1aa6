"""`llmflash generate MODEL "prompt"`: stream an answer (or print one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from llmflash.cli.options import add_run_options, add_sampling_options, load_options
from llmflash.errors import LLMFlashError

NAME = "generate"
STARTED = time.monotonic()  # --max-seconds counts from here (the CLI imports this module first thing)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="generate text from a converted model",
                       description="Generate text. The model's chat template is applied to a text prompt "
                                   "when the model has one (--no-chat-template to send the text as is).")
    p.add_argument("model", type=Path, help="converted model directory")
    add_prompt_options(p)
    add_sampling_options(p)
    add_run_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--stats", action="store_true", help="print the per-token I/O / memory / compute table")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="stop after the token during which S seconds have passed since the command "
                        "started (finish reason 'time'; bench uses it to bound slow modes)")
    p.set_defaults(func=run)


def add_prompt_options(p: argparse.ArgumentParser, prompt: bool = True) -> None:
    if prompt:
        p.add_argument("prompt", nargs="?", default=None, help="prompt text")
        p.add_argument("--ids", default=None,
                       help="comma-separated prompt token ids instead of text (models without a tokenizer)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                   help="send the prompt as plain text (default: the model's chat template when it has one)")
    g.add_argument("--chat", dest="chat_template", action="store_true",
                   help="require the chat template (an error when the model has none)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")


def prompt_of(args: argparse.Namespace) -> str | list[int]:
    if args.ids is not None:
        if args.prompt is not None:
            raise LLMFlashError("give either a prompt or --ids, not both")
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise LLMFlashError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        return ids
    if args.prompt is None:
        raise LLMFlashError("no prompt given")
    return args.prompt


def print_generation(model, prompt: str | list[int], args: argparse.Namespace) -> int:
    """Stream (or --json) one generation with the sampling options of args; timing to stderr."""
    kwargs = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "stop": args.stop,
              "chat_template": args.chat_template, "ignore_eos": args.ignore_eos}
    if getattr(args, "max_seconds", None) is not None:
        kwargs["deadline"] = STARTED + args.max_seconds
    if args.json:
        print(json.dumps(model.generate(prompt, args.max_new_tokens, **kwargs).to_dict()))
        return 0
    for piece in model.stream(prompt, args.max_new_tokens, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    result = model.last
    if model.tokenizer is None:
        print(" ".join(map(str, result.token_ids)))
    else:
        print()
    timing = result.timing
    tps = timing["tokens_per_s"]
    print(f"[{len(result.prompt_ids)} prompt tokens, prefill {timing['prefill_s'] * 1000:.0f} ms; "
          f"{len(result.token_ids)} generated, {'n/a' if tps is None else f'{tps:.1f}'} tokens/s decode; "
          f"stop: {result.finish_reason}]", file=sys.stderr)
    if args.stats:
        from llmflash.cli.report import stats_table

        print(stats_table(result.stats, model.mode), file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    import llmflash.api as api  # torch: loaded only when a command runs

    model = api.load(args.model, **load_options(args))
    return print_generation(model, prompt_of(args), args)
