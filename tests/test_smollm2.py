"""The real default model: SmolLM2-135M-Instruct GGUF, against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_reference import plain_view
from llmflash.conversion.writer import convert
from llmflash.runtime.engine import Engine


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-f32"
    convert(smollm2_gguf, out, dtype="float32", progress=False)
    return out


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
