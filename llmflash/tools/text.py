"""Calibration and evaluation text: token windows, FFN-input capture, window likelihoods."""

from __future__ import annotations

from pathlib import Path

import torch

from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.runtime.tokenizer import Tokenizer
from llmflash.models.base import FFNProvider


# -- text --------------------------------------------------------------------------------------------
def read_text(path: Path | str, max_chars: int | None = None) -> str:
    path = Path(path)
    if not path.is_file():
        raise LLMFlashError(f"text file not found: {path}")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(max_chars) if max_chars else f.read()
    except OSError as exc:
        raise LLMFlashError(f"cannot read text file {path}: {exc}") from None
    if not text.strip():
        raise LLMFlashError(f"text file {path} is empty")
    return text


def text_windows(model_dir: FlashModelDir, tokenizer: Tokenizer | None, path: Path | str,
                 tokens: int, window: int, skip_tokens: int = 0) -> list[list[int]]:
    """Consecutive windows of BOS + (window - 1) text tokens, `tokens` tokens in all at most.

    skip_tokens drops that many text tokens first (to hold part of one text out of another use).
    """
    if tokenizer is None:
        raise LLMFlashError(f"{model_dir.path} has no tokenizer; calibration and evaluation need text")
    window = min(window, model_dir.config.max_position_embeddings - 1)
    bos = model_dir.config.bos_token_id
    body = window - 1 if bos is not None else window
    # ~4 characters per token in English; read generously but not a whole corpus.
    text = read_text(path, max_chars=max(64_000, (tokens + skip_tokens) * 12))
    ids = tokenizer.encode(text, add_special_tokens=False)[skip_tokens:]
    windows = []
    used = 0
    for start in range(0, len(ids), body):
        chunk = ids[start:start + body]
        if len(chunk) < max(8, body // 4):
            break
        w = ([bos] if bos is not None else []) + chunk
        if used + len(w) > tokens and windows:
            break
        windows.append(w[: max(2, tokens - used)] if used + len(w) > tokens else w)
        used += len(windows[-1])
    if not windows:
        raise LLMFlashError(f"text file {path} gives no tokens for {model_dir.path}'s tokenizer")
    return windows


# -- FFN input capture -------------------------------------------------------------------------------
class CapturingFFN(FFNProvider):
    """Wraps an FFN provider and keeps a copy of every layer's FFN input (float16 by default)."""

    def __init__(self, inner, num_layers: int, store_dtype: torch.dtype = torch.float16):
        self.inner = inner
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.store_dtype = store_dtype
        self.enabled = True

    def begin_pass(self, tokens: int) -> None:
        self.inner.begin_pass(tokens)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self.inputs[layer].append(x.detach().to(self.store_dtype).clone())
        return self.inner(layer, x)

    def take(self, layer: int) -> torch.Tensor:
        xs = self.inputs[layer]
        self.inputs[layer] = []
        return torch.cat(xs) if xs else torch.empty(0)


def window_nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a window and the number of predicted tokens."""
    target = torch.tensor(ids[1:], dtype=torch.long)
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return float(-logp.gather(1, target[:, None]).sum()), len(ids) - 1
