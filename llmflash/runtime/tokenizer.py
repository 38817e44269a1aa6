"""Text <-> token ids with the `tokenizers` library, and chat templates with Jinja2.

The runtime needs no transformers: the converted directory carries tokenizer.json and the chat
template, rendered here the way transformers renders it (sandboxed Jinja2, `raise_exception`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from llmflash.errors import LLMFlashError


class Tokenizer:
    """A converted model's tokenizer: encode, decode, chat template, end-of-sequence ids."""

    def __init__(self, path: Path, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, eos_ids: list[int] | None = None,
                 data: bytes | None = None):
        """`data`: the file's bytes, already read and checksummed by the caller (else read here)."""
        try:
            if data is not None:
                self.tk = HFTokenizer.from_str(data.decode("utf-8"))
            else:
                self.tk = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise LLMFlashError(f"cannot load tokenizer {path}: {str(exc)[:200]}") from None
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        ids = set(eos_ids or [])
        if eos_token is not None and self.tk.token_to_id(eos_token) is not None:
            ids.add(self.tk.token_to_id(eos_token))
        self.eos_ids = sorted(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")  # command-line bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError as exc:
            raise LLMFlashError(f"the text is not valid UTF-8 (byte {exc.start}); give UTF-8 text") from None
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise LLMFlashError("this model has no chat template: send the prompt as plain text (chat_template=False)")

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise LLMFlashError(f"chat template failed: {exc}") from None

    def encode_chat(self, user_text: str) -> list[int]:
        """Ids of a one-turn chat, as transformers' apply_chat_template(tokenize=True) gives."""
        return self.encode(self.render_chat([{"role": "user", "content": user_text}]),
                           add_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
