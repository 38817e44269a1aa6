"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import math

import torch

from llmflash.errors import LLMFlashError


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse values torch would turn into a crash or silently misuse (nan, negative, p outside (0, 1])."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise LLMFlashError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise LLMFlashError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits: [vocab] -> token id."""
    if not bool(torch.isfinite(logits).all()):  # never let argmax turn NaN into token 0
        raise LLMFlashError("the model produced non-finite logits (NaN or inf); its weights may be "
                            "corrupted: run `llmflash verify`")
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros(()))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
