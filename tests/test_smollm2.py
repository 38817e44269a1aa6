"""The real default model: SmolLM2-135M-Instruct GGUF, against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_reference import plain_view
from llmflash.conversion.writer import convert
from llmflash.runtime.engine import Engine


@pytest.fixture(scope="module")
def converted(smollm2_dir) -> Path:
    """The GGUF converted at float32: the session's default model (conftest), not a second copy."""
    return smollm2_dir


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_gguf.name)
    with plain_view():
        tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    return tok, model.eval()


def test_32_greedy_tokens_identical(converted, reference):
    tok, ref = reference
    ours = Engine(converted)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected_prompt, dict) or hasattr(expected_prompt, "input_ids"):
        expected_prompt = expected_prompt["input_ids"]
    prompt = ours.tokenizer.encode_chat("What is the capital of France?")
    assert prompt == list(expected_prompt)
    plain = ours.tokenizer.encode("The history of the Roman Empire")
    assert plain == tok("The history of the Roman Empire")["input_ids"]
    for ids in (prompt, plain):
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=tok.eos_token_id)
        expected = out[0, len(ids):].tolist()
        got = ours.generate(ids, 32, stop_at_eos=False).token_ids
        assert got == expected


def test_logits_close(converted, reference):
    _, ref = reference
    ours = Engine(converted)
    ids = ours.tokenizer.encode("Water boils at a temperature of")
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = ours.logits(ids)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def test_resident_blocks_answer_as_the_float32_route(smollm2_gguf, tmp_path):
    """The GGUF's own blocks kept for the resident part too (`--resident-dtype auto`: Q4_1
    attention, Q8_0 tied embedding). The head's logits are refined exactly near the top: without
    that, bfloat16 output steps tied "The" (25.325) with "L" (25.243) and greedy decoding answered
    "L'Étoile, la Marseillaise,". The held model answers as the exact float32 route."""
    from llmflash.runtime.quant_matrix import QuantizedMatrix

    out = tmp_path / "auto"
    convert(smollm2_gguf, out, dtype="auto", resident_dtype="auto", progress=False)
    held, exact = Engine(out), Engine(out, dtype=torch.float32)
    assert isinstance(held.model.lm_head, QuantizedMatrix) and held.model.lm_head.head
    ids = held.tokenizer.encode_chat("What is the capital of France?")
    answer = held.generate(ids, 12).token_ids
    assert answer == exact.generate(ids, 12).token_ids
    assert held.tokenizer.decode(answer).startswith("The capital of France is Paris")
