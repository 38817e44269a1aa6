"""`llmflash chat` on the real SmolLM2: through a stdin pipe (history, /reset, /stats, /quit) and
through a real pseudo-terminal (Ctrl-C stops an answer and the chat goes on; Ctrl-D leaves)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST = "Name three colours."
SECOND = "And two more?"


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A tiny random llama with a real BPE tokenizer and a chat template (fast to answer)."""
    from llmflash import convert
    from tiny_models import build

    root = tmp_path_factory.mktemp("tiny-chat")
    build("llama-gqa", root / "hf")
    return convert(root / "hf", root / "model", dtype="float32", progress=False)


def test_chat_through_a_pipe(tiny_chat_model):
    flags = ["--max-new-tokens", "12", "--ignore-eos"]
    ref = subprocess.run([sys.executable, "-m", "llmflash", "generate", str(tiny_chat_model), FIRST, "--json",
                          *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    first = json.loads(ref.stdout)["text"]
    assert first

    script = f"{FIRST}\n/stats\n{SECOND}\n/reset\n{FIRST}\n/bogus\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "llmflash", "chat", str(tiny_chat_model), *flags],
                         cwd=ROOT, input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # the answer equals `llmflash generate` on the same prompt (chat template), and again after /reset
    assert out.stdout.count(first) == 2, out.stdout
    assert "per-token stats, mode dense" in out.stderr and "stop: length" in out.stderr
    assert "[conversation reset]" in out.stderr and "unknown command /bogus" in out.stderr

    # the second answer saw the first turn: it is what the API gives for the whole conversation
    import llmflash

    with llmflash.load(tiny_chat_model) as model:
        kw = dict(max_new_tokens=12, ignore_eos=True)
        second = model.chat([{"role": "user", "content": FIRST}, {"role": "assistant", "content": first},
                             {"role": "user", "content": SECOND}], **kw).text
        alone = model.chat([{"role": "user", "content": SECOND}], **kw).text
    assert second != alone
    assert second in out.stdout


class Terminal:
    """A child process on a real pseudo-terminal (its controlling terminal: Ctrl-C is SIGINT)."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.chdir(ROOT)
            # as on a user's terminal: a suite started in the background by a non-interactive shell
            # (`make test &`) ignores SIGINT, and an ignored SIGINT is inherited across exec, so the
            # chat would never see Ctrl-C
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(argv[0], argv)
        self.seen = ""

    def read_until(self, pattern: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        start = len(self.seen)
        while not re.search(pattern, self.seen[start:]):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # child gone
                    data = b""
                if not data:
                    assert re.search(pattern, self.seen[start:]), f"EOF before {pattern!r}: {self.seen[-2000:]!r}"
                    break
                self.seen += data.decode(errors="replace")
        return self.seen[start:]

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> int | None:
        """The child's exit code, or None if it is still running after `timeout` (never blocks longer)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # child gone: reaped on the next turn
                    time.sleep(0.1)
        return None

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            os.close(self.fd)
            self.pid = 0


def test_ctrl_c_stops_an_answer_not_the_chat(smollm2_dir):
    term = Terminal([sys.executable, "-m", "llmflash", "chat", str(smollm2_dir), "--max-new-tokens", "4000", "--context", "4096",
                     "--ignore-eos"])
    try:
        talk_through_the_terminal(term)
    finally:
        term.kill()  # a failed step must not leave a 4000-token answer running


def talk_through_the_terminal(term: Terminal) -> None:
    term.read_until(r"> ")
    term.send("Count from 1 to 1000, separated by commas.\r")
    term.read_until(r"\n5\. 5")  # the answer is streaming
    term.send("\x03")  # Ctrl-C
    term.read_until(r"\[stopped\][\s\S]*> ")
    term.send("/stats\r")
    stats = term.read_until(r"per-token stats[\s\S]*> ")
    generated = int(re.search(r"(\d+) generated", stats).group(1))
    assert 3 <= generated < 4000  # decoding ended when the answer was interrupted
    # Ctrl-C at the prompt does not leave. Sent again if the first arrived before the prompt's
    # readline was waiting (a loaded machine can be that slow); the chat must survive every one.
    for attempt in range(3):
        term.send("\x03")
        try:
            term.read_until(r"/quit or Ctrl-D leaves", timeout=8 if attempt < 2 else 120)
            break
        except AssertionError:
            if attempt == 2:
                raise
    term.send("/stats\r")
    term.read_until(r"per-token stats[\s\S]*> ")
    # Ctrl-D on an empty line leaves. One sent right after /stats's output was seen was not taken as
    # end of input (the chat waited at its prompt for ever; most likely it arrived before readline
    # had the terminal), and even after the prompt the first one is sometimes missed: so it is sent
    # after the prompt, and again (after a Ctrl-U clearing the line) while the chat is still there.
    for attempt in range(3):
        term.send("\x04")
        code = term.wait(timeout=10 if attempt < 2 else 120)
        if code is not None:
            assert code == 0, term.seen[-2000:]
            return
        term.send("\x15")
    raise AssertionError(f"Ctrl-D did not leave the chat: {term.seen[-2000:]!r}")
