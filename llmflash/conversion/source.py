"""What an importer reads: a model checkpoint seen as HF-named tensors plus a config and a tokenizer.

Both importers (Hugging Face safetensors directories and GGUF files) present the same interface,
so the writer of the flash layout never needs to know where the weights came from. Tensors are
read one at a time, which is what keeps conversion's peak memory at one tensor, not one model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class TokenizerSpec:
    """Everything the runtime needs to tokenize without transformers.

    tokenizer_json is the text of a `tokenizers` library tokenizer.json; chat_template is a Jinja
    template as in tokenizer_config.json. Token strings (not ids) for bos/eos, as HF stores them.
    """

    tokenizer_json: str | None = None
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    extra: dict = field(default_factory=dict)


class ModelSource(Protocol):
    """A checkpoint to import. Tensor names follow Hugging Face transformers' naming."""

    path: Path

    def hf_config(self) -> dict:
        """The model's config.json as a dict (must contain `model_type`)."""

    def tensor_names(self) -> list[str]:
        """All tensor names, in a stable order."""

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor without reading its data."""

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor, in HF orientation (Linear weights are [out_features, in_features])."""

    def tokenizer(self) -> TokenizerSpec:
        """The tokenizer and chat template, if the checkpoint carries them."""
