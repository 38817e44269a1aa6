"""Our runtime against transformers on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.runtime.engine import Engine

KINDS = ["opt", "opt-proj", "llama-gqa", "llama-tied", "llama-relu", "llama-bias", "fatrelu",
         "qwen2", "mistral"]
PROMPT = [1, 17, 42, 99, 7, 250, 3, 18, 77, 5, 200, 11]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    ref = tiny_models.build(request.param, base / "hf")
    convert(base / "hf", base / "flash", dtype="float32", progress=False)
    return ref, Engine(base / "flash")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_prefill_logits_match(pair):
    ref, ours = pair
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT])).logits[0]
    got = ours.logits(PROMPT)
    assert rel_err(got, expected) < 1e-4


def test_decode_steps_match(pair):
    """Prefill then 16 single-token steps through the KV cache, against a full forward each time."""
    ref, ours = pair
    ids = list(PROMPT)
    cache = ours.model.new_cache(len(ids) + 16)
    ours.model.forward(torch.tensor(ids), cache)
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        nxt = int(torch.randint(3, tiny_models.VOCAB, (1,), generator=gen))
        ids.append(nxt)
        got = ours.model.forward(torch.tensor([nxt]), cache)[-1]
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        assert rel_err(got, expected) < 1e-4


def test_greedy_generation_identical(pair):
    ref, ours = pair
    with torch.no_grad():
        out = ref.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    got = ours.generate(PROMPT, 20, temperature=0.0, stop_at_eos=False).token_ids
    assert got == expected
