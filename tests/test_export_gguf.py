"""export-gguf and bench's llama.cpp peer, on tiny transformers models built here.

The round trip (flash layout -> GGUF -> our GGUF importer) must give back every tensor bit for bit;
llama.cpp itself (where llama-cpp-python is installed; CI does not build it) must compute the same
logits as our dense decoder on the exported file, which checks the q/k permutation and the metadata
against the real consumer of the format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from llmflash.conversion.gguf_source import GGUFSource
from llmflash.conversion.writer import convert
from llmflash.errors import LLMFlashError
from llmflash.tools.export_gguf import export_gguf
from llmflash.tools.llamacpp_peer import installed

needs_llamacpp = pytest.mark.skipif(installed() is None, reason="llama-cpp-python is not installed "
                                    "(optional: CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python, ~15 min)")


def llmflash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmflash", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, tiny_models.build(kind, root / kind))
            for kind in ("llama-gqa", "llama-relu", "opt")}


@pytest.fixture(scope="module")
def flash_models(hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flash")
    out = {}
    for kind, dtype in (("llama-gqa", "float32"), ("llama-gqa", "float16"), ("llama-gqa", "bfloat16"),
                        ("llama-gqa", "int8"), ("llama-relu", "float32"), ("opt", "float32")):
        out[f"{kind}-{dtype}"] = convert(hf_models[kind][0], root / f"{kind}-{dtype}", dtype=dtype, progress=False).path
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_gives_every_tensor_back_exactly(hf_models, flash_models, tmp_path, dtype):
    out = tmp_path / "m.gguf"
    done = export_gguf(flash_models[f"llama-gqa-{dtype}"], out, progress=False)
    assert done["tensors"] == 3 + 2 * 9 and out.stat().st_size == done["bytes"]
    source = GGUFSource(out)
    hf_dir, model = hf_models["llama-gqa"]
    ref = json.loads((hf_dir / "config.json").read_text())
    cfg = source.hf_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert cfg[key] == ref[key], key
    state = model.state_dict()
    assert sorted(source.tensor_names()) == sorted(n for n in state if "rotary" not in n)
    for name in source.tensor_names():
        expected = state[name].to(getattr(torch, dtype)).float()
        assert torch.equal(source.read_tensor(name), expected), name
    # the vocabulary round-trips too: our importer rebuilds the same tokenizer from the GGUF
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(source.tokenizer().tokenizer_json)
    theirs = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    text = "Flash memory is larger than DRAM. def add(a, b): return a + b"
    assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("model, why", [
    ("llama-relu-float32", "relu FFN and llama.cpp's llama architecture always applies SiLU"),
    ("opt-float32", "opt model"),
    ("llama-gqa-int8", "stored int8"),
])
def test_models_llama_cpp_would_compute_differently_are_refused(flash_models, tmp_path, model, why):
    with pytest.raises(LLMFlashError, match=why) as err:
        export_gguf(flash_models[model], tmp_path / "m.gguf", progress=False)
    assert str(flash_models[model]) in str(err.value)
    assert not list(tmp_path.iterdir())


def test_cli_refusal_is_one_line_exit_2(flash_models, tmp_path):
    out = tmp_path / "m.gguf"
    proc = llmflash("export-gguf", str(flash_models["llama-relu-float32"]), str(out), "--quiet")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "always applies SiLU" in proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_force(flash_models, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(LLMFlashError, match="already exists"):
        export_gguf(flash_models["llama-gqa-float16"], out, progress=False)
    assert out.read_bytes() == b"keep"
    export_gguf(flash_models["llama-gqa-float16"], out, force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF" and not [p for p in tmp_path.iterdir() if p != out]


def test_bench_llamacpp_needs_a_gguf(flash_models):
    from llmflash.tools.bench import bench

    with pytest.raises(LLMFlashError, match="needs --gguf FILE.*export-gguf"):
        bench(flash_models["llama-gqa-float32"], modes=("dense", "llamacpp"), tokens=2)


@needs_llamacpp
def test_llama_cpp_computes_our_logits_on_the_exported_file(flash_models, tmp_path):
    import llmflash
    from llmflash.tools.llamacpp_peer import LlamaCpp

    out = tmp_path / "m.gguf"
    export_gguf(flash_models["llama-gqa-float32"], out, progress=False)
    ids = [1, 17, 42, 99, 250, 7, 300, 5]
    with llmflash.load(flash_models["llama-gqa-float32"], mode="dense") as ours:
        expected = ours.logits(ids).numpy()
    llm = LlamaCpp(str(out), context=64, batch=len(ids), threads=1)
    try:
        got = [llm.step(ids[:4]).copy()]  # a prompt, then token by token as bench's peer does
        got += [llm.step([t]).copy() for t in ids[4:]]
    finally:
        llm.close()
    for row, want in zip(got, expected[3:]):
        assert np.argmax(row) == np.argmax(want)
        assert np.abs(row - want).max() < 2e-3 * np.abs(want).max()


def test_bench_runs_llama_cpp_as_a_peer_or_says_it_is_missing(flash_models, tmp_path):
    gguf = tmp_path / "m.gguf"
    export_gguf(flash_models["llama-gqa-float32"], gguf, progress=False)
    report = tmp_path / "bench.json"
    proc = llmflash("bench", str(flash_models["llama-gqa-float32"]), "--modes", "dense,llamacpp", "--gguf", str(gguf),
                    "--tokens", "6", "--prompt-tokens", "8", "--memory", "100%", "--no-limit", "--json", str(report))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    peer = result["modes"]["llamacpp"]
    if installed() is None:
        assert "not installed" in peer["skipped"] and "llamacpp: skipped" in proc.stdout
        return
    assert peer["decode_tokens"] == 5 and peer["split"] is False and peer["tokens_per_s"] > 0
    assert result["ratios"]["llamacpp_tokens_equal_dense"] is True  # greedy, float32, same weights
    assert "llama.cpp" in proc.stdout and result["llamacpp_version"]
