"""Every bad input gets an LLMFlashError that names the problem and the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.runtime.engine import Engine
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "llama"
    tiny_models.build("llama-gqa", d)
    return d


@pytest.fixture(scope="module")
def flash_dir(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flash") / "model"
    convert(hf_dir, out, dtype="float16", progress=False)
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMFlashError, match=r"unsupported architecture 'gpt2'.*config.json"):
        convert(d, tmp_path / "out", progress=False)


def test_unsupported_activation(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "gelu_new"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LLMFlashError, match="gelu_new"):
        convert(d, tmp_path / "out", progress=False)


def test_missing_shard(tmp_path):
    import transformers as tf

    d = tmp_path / "sharded"
    model = tiny_models.build("llama-gqa", tmp_path / "unsharded")
    model.save_pretrained(d, max_shard_size="100KB")
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").exists()
    shards[1].unlink()
    with pytest.raises(LLMFlashError, match=f"missing shard .*{shards[1].name}"):
        convert(d, tmp_path / "out", progress=False)
    del tf


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path)
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(LLMFlashError, match=f"truncated safetensors file .*{f.name}"):
        convert(d, tmp_path / "out", progress=False)


def test_corrupted_safetensors_header(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{{"
    f.write_bytes(bytes(data))
    with pytest.raises(LLMFlashError, match=f"corrupted safetensors file .*{f.name}"):
        convert(d, tmp_path / "out", progress=False)


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LLMFlashError, match="neither a Hugging Face model directory nor a GGUF"):
        convert(tmp_path / "notes.txt", tmp_path / "out", progress=False)
    with pytest.raises(LLMFlashError, match="missing config.json"):
        convert(tmp_path, tmp_path / "out", progress=False)


def test_existing_destination_needs_force(hf_dir, flash_dir):
    with pytest.raises(LLMFlashError, match="already exists"):
        convert(hf_dir, flash_dir, progress=False)


def test_missing_file_in_flash_dir(flash_dir, tmp_path):
    d = copy(flash_dir, tmp_path)
    (d / "ffn.bin").unlink()
    with pytest.raises(LLMFlashError, match=f"missing file .*ffn.bin"):
        FlashModelDir(d)


def test_truncated_bundle_file(flash_dir, tmp_path):
    d = copy(flash_dir, tmp_path)
    f = d / "ffn.bin"
    os.truncate(f, f.stat().st_size - 4096)
    with pytest.raises(LLMFlashError, match=f"truncated file .*ffn.bin"):
        Engine(d)


def test_checksum_mismatch_resident(flash_dir, tmp_path):
    d = copy(flash_dir, tmp_path)
    f = d / "resident.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(LLMFlashError, match=f"checksum mismatch: .*resident.safetensors"):
        Engine(d)


def test_checksum_mismatch_bundles_on_load(flash_dir, tmp_path):
    d = copy(flash_dir, tmp_path)
    model = FlashModelDir(d)
    f = d / "ffn.bin"
    data = bytearray(f.read_bytes())
    data[model.layers[1].offset + 100] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(LLMFlashError, match="checksum mismatch: .*ffn.bin layer 1"):
        Engine(d)


@pytest.mark.parametrize("seed", range(4))
def test_verify_finds_any_flipped_byte(flash_dir, tmp_path, seed):
    import random

    d = copy(flash_dir, tmp_path)
    assert FlashModelDir(d).verify() == []
    rng = random.Random(seed)
    files = sorted(p for p in d.iterdir() if p.name != "manifest.json")
    victim = rng.choice(files)
    data = bytearray(victim.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(data))
    problems = FlashModelDir(d).verify()
    assert problems and all(victim.name in p for p in problems), problems


def test_corrupted_manifest(flash_dir, tmp_path):
    d = copy(flash_dir, tmp_path)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(LLMFlashError, match="corrupted manifest .*manifest.json"):
        FlashModelDir(d)


def test_prompt_longer_than_context(flash_dir):
    engine = Engine(flash_dir)
    too_long = [5] * (engine.config.max_position_embeddings + 1)
    with pytest.raises(LLMFlashError, match=r"prompt of \d+ tokens is longer than the context"):
        engine.generate(too_long, 4)


def test_generation_stops_at_context(flash_dir):
    engine = Engine(flash_dir)
    ctx = engine.config.max_position_embeddings
    result = engine.generate([5] * (ctx - 3), 50, stop_at_eos=False)
    # positions ctx-3 .. ctx-1 are filled by generated tokens; the last one needs no KV slot
    assert result.finish_reason == "context" and len(result.token_ids) == 4


def _big_hf_model(d: Path) -> None:
    """A random Llama big enough (~200 MB of float32) that conversion takes a few seconds."""
    import transformers as tf
    import torch

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)


def test_killed_conversion_leaves_nothing_that_opens(tmp_path):
    src, dst = tmp_path / "hf", tmp_path / "out"
    _big_hf_model(src)
    proc = subprocess.Popen([sys.executable, "-m", "llmflash", "convert", str(src), str(dst),
                             "--dtype", "float32", "--quiet"])
    tmp_dir = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.time() + 60
    while time.time() < deadline:
        ffn = tmp_dir / "ffn.bin"
        if ffn.exists() and ffn.stat().st_size > 4096:
            break
        time.sleep(0.002)
    else:
        proc.kill()
        pytest.fail("conversion never started writing bundles")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    for leftover in [dst, tmp_dir]:
        with pytest.raises(LLMFlashError, match="not an llmflash model directory"):
            FlashModelDir(leftover)
