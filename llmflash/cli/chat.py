"""`llmflash chat MODEL`: an interactive chat in the terminal.

The conversation is kept and sent whole through the model's chat template each turn; answers
stream as they are generated. Commands: /reset (forget the conversation), /stats (the flash
statistics of the last answer), /help, /quit (or Ctrl-D). Ctrl-C while an answer streams stops that
answer (the stream is closed, which ends decoding at once) and returns to the prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmflash.cli.options import add_run_options, add_sampling_options, load_options

NAME = "chat"
HELP = ("commands: /reset forgets the conversation, /stats shows the flash statistics of the last answer, "
        "/quit (or Ctrl-D) leaves; Ctrl-C stops an answer")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(NAME, help="chat with a converted model in the terminal",
                       description="Interactive chat with history and the model's chat template. " + HELP)
    p.add_argument("model", type=Path, help="converted model directory")
    p.add_argument("--system", default=None, help="a system message starting the conversation")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop an answer when it contains TEXT (repeatable)")
    add_sampling_options(p)
    add_run_options(p)
    p.set_defaults(func=run, max_new_tokens=512)


class Chat:
    """The conversation and one model; `answer` streams a reply to `out`."""

    def __init__(self, model, args: argparse.Namespace, out=sys.stdout, err=sys.stderr):
        self.model = model
        self.args = args
        self.out, self.err = out, err
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _fit(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns until an answer fits the context."""
        context = self.model.context_length
        room = min(self.args.max_new_tokens, max(context // 4, 1))
        while True:
            ids = self.model.encode_messages(self.system + messages)
            if len(ids) + room <= context or len(messages) <= 1:
                return ids
            messages[:] = messages[2:] if len(messages) > 2 else messages[1:]
            print("[oldest turn dropped to fit the context]", file=self.err)

    def answer(self, text: str) -> None:
        from llmflash.errors import LLMFlashError

        messages = self.history + [{"role": "user", "content": text}]
        try:
            ids = self._fit(messages)
        except LLMFlashError as exc:
            print(f"llmflash: error: {exc}", file=self.err)
            return
        a = self.args
        pieces = self.model.stream(ids, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                   stop=a.stop, ignore_eos=a.ignore_eos)
        reply: list[str] = []
        stopped = False
        try:
            for piece in pieces:
                reply.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            stopped = True
        except LLMFlashError as exc:
            print(f"\nllmflash: error: {exc}", file=self.err)
            return
        finally:
            pieces.close()  # ends decoding at once when the answer was interrupted
        self.out.write("\n")
        if stopped:
            print("[stopped]", file=self.err)
        self.out.flush()
        self.history = messages + [{"role": "assistant", "content": "".join(reply)}]

    def stats(self) -> None:
        from llmflash.cli.report import stats_table

        last = self.model.last
        if last is None:
            print("no answer yet", file=self.err)
            return
        timing = last.timing
        tps = timing.get("tokens_per_s")
        print(f"[{len(last.prompt_ids)} prompt tokens, prefill {timing['prefill_s'] * 1000:.0f} ms; "
              f"{len(last.token_ids)} generated, {'n/a' if tps is None else f'{tps:.1f}'} tokens/s decode; "
              f"stop: {last.finish_reason}]", file=self.err)
        print(stats_table(last.stats, self.model.mode), file=self.err)


def read_line(prompt: str) -> str | None:
    """One line of input; None at end of input (Ctrl-D)."""
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    import llmflash.api as api
    from llmflash.errors import LLMFlashError

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    model = api.load(args.model, **load_options(args))
    tok = model.require_tokenizer()
    if not tok.chat_template:
        raise LLMFlashError(f"{args.model} has no chat template; use `llmflash generate` instead")
    chat = Chat(model, args)
    print(f"llmflash chat: {model.path.name}, {model.mode} mode, context {model.context_length} tokens. {HELP}",
          file=sys.stderr, flush=True)
    try:
        while True:
            try:
                line = read_line("> ")
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
                print("\n(/quit or Ctrl-D leaves)", file=sys.stderr)
                continue
            if line is None:
                print(file=sys.stderr)
                break
            text = line.strip()
            if not text:
                continue
            command = text.lower()
            if command in ("/quit", "/exit", "/q"):
                break
            if command == "/reset":
                chat.reset()
                print("[conversation reset]", file=sys.stderr)
            elif command == "/stats":
                chat.stats()
            elif command in ("/help", "/?"):
                print(HELP, file=sys.stderr)
            elif text.startswith("/") and " " not in text:
                print(f"unknown command {text}; {HELP}", file=sys.stderr)
            else:
                chat.answer(line)
    finally:
        model.close()
    return 0
