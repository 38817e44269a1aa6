"""Shared pieces of the sparsity tools: text windows, FFN-input capture, neuron activity criteria.

Neuron index spaces: a converted model stores neuron `perm[j]` in bundle slot j
(`model_dir.layers[l].permutation()`). Everything the sparsity tools store or return (statistics,
predictor outputs, selections) is in the *original* neuron index space; `LayerWeights.rows` are in
that order too (the slots are permuted back when loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmflash.engine.ffn import BundleSlices, activate, ffn_from_rows
from llmflash.errors import LLMFlashError
from llmflash.storage.layout import FlashModelDir
from llmflash.tokenizer import Tokenizer

RELU_ACTS = ("relu", "fatrelu")
CRITERIA = ("glu", "cats")  # non-ReLU: |act(gate) * up| (default) or |act(gate)| (CATS)


def is_relu(model_dir: FlashModelDir) -> bool:
    return model_dir.config.hidden_act in RELU_ACTS


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


# -- weights -----------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One layer's FFN bundles in original neuron order, float32."""

    rows: torch.Tensor  # [neurons, elements]
    slices: BundleSlices
    act: str
    threshold: float

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Gate pre-activation (gated FFN) or fc1 pre-activation (OPT): [T, neurons]."""
        s = self.slices
        part, bias = (s.gate, s.gate_bias) if s.gate is not None else (s.up, s.up_bias)
        return torch.nn.functional.linear(x, self.rows[:, part],
                                          None if bias is None else self.rows[:, bias].reshape(-1))

    def up(self, x: torch.Tensor) -> torch.Tensor:
        s = self.slices
        return torch.nn.functional.linear(x, self.rows[:, s.up],
                                          None if s.up_bias is None else self.rows[:, s.up_bias].reshape(-1))

    def scores(self, x: torch.Tensor, criterion: str = "glu") -> torch.Tensor:
        """Non-negative per-neuron magnitudes that the criterion thresholds: [T, neurons]."""
        pre = self.pre_activation(x)
        a = activate(pre, self.act, self.threshold)
        if self.slices.gate is None or criterion == "cats":
            return a.abs()
        return (a * self.up(x)).abs()

    def active(self, x: torch.Tensor, criterion: str = "glu", threshold: float | None = None) -> torch.Tensor:
        """Boolean [T, neurons]: which neurons count as active for x.

        ReLU/FATReLU: the activation is not exactly zero (the neuron's output is exactly zero
        otherwise, so dropping it changes nothing). Other activations: the criterion's magnitude
        is above the calibrated threshold.
        """
        if self.act in RELU_ACTS:
            return activate(self.pre_activation(x), self.act, self.threshold) != 0
        if threshold is None:
            raise LLMFlashError("a non-ReLU model needs a calibrated threshold; run `llmflash calibrate`")
        return self.scores(x, criterion) > threshold

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return ffn_from_rows(x, self.rows, self.slices, self.act, self.threshold)


def slot_order(model_dir: FlashModelDir, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, slot_of): slot j holds neuron perm[j]; neuron n sits in slot slot_of[n]."""
    perm = model_dir.layers[layer].permutation()
    slot_of = np.empty_like(perm)
    slot_of[perm] = np.arange(len(perm), dtype=np.int64)
    return perm, slot_of


def layer_weights(model_dir: FlashModelDir, layer: int, dtype: torch.dtype = torch.float32) -> LayerWeights:
    rows = model_dir.read_layer_bundles(layer).to(dtype)
    _, slot_of = slot_order(model_dir, layer)
    if not np.array_equal(slot_of, np.arange(len(slot_of))):
        rows = rows[torch.from_numpy(slot_of)]
    c = model_dir.config
    return LayerWeights(rows, BundleSlices(model_dir.bundle), c.hidden_act, c.act_threshold)


# -- FFN input capture -------------------------------------------------------------------------------
class CapturingFFN:
    """Wraps an FFN provider and keeps a copy of every layer's FFN input (float16 by default)."""

    def __init__(self, inner, num_layers: int, store_dtype: torch.dtype = torch.float16):
        self.inner = inner
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.store_dtype = store_dtype
        self.enabled = True

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
