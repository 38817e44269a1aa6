"""End to end through the command line, as a user runs it (subprocess, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_models
from llmflash.format.layout import FlashModelDir


def llmflash(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "llmflash", *args], capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"llmflash {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    tiny_models.build("llama-relu", base / "hf")
    llmflash("convert", str(base / "hf"), str(base / "flash"), "--quiet")
    return base / "flash"


def test_generate_json(model):
    out = json.loads(llmflash("generate", str(model), "The quick brown", "--max-new-tokens", "8",
                              "--json").stdout)
    assert out["prompt_ids"][0] == 1  # BOS added by the tokenizer's post-processor
    assert len(out["token_ids"]) <= 8
    assert set(out["timing"]) >= {"prefill_s", "decode_s", "tokens_per_s"}
    assert isinstance(out["text"], str)


def test_generate_streams_text_and_reports_speed(model):
    proc = llmflash("generate", str(model), "Flash memory", "--max-new-tokens", "6")
    assert "tokens/s" in proc.stderr


def test_generate_sampling_is_seeded(model):
    args = ["generate", str(model), "--ids", "1,5,9", "--max-new-tokens", "10", "--temperature",
            "1.0", "--top-p", "0.9", "--json"]
    a = json.loads(llmflash(*args, "--seed", "3").stdout)["token_ids"]
    b = json.loads(llmflash(*args, "--seed", "3").stdout)["token_ids"]
    assert a == b


def test_chat_template(model):
    out = json.loads(llmflash("generate", str(model), "hello", "--chat", "--max-new-tokens", "2",
                              "--json").stdout)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert tok.decode(out["prompt_ids"], skip_special_tokens=False).startswith("<s>user: hello")


def test_verify_ok_and_corrupt(model, tmp_path):
    assert "ok:" in llmflash("verify", str(model)).stdout
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    f = bad / "tokenizer.json"
    f.write_text(f.read_text().replace("<unk>", "<unK>"))
    proc = llmflash("verify", str(bad), check=False)
    assert proc.returncode == 1 and "tokenizer.json" in proc.stderr


def test_errors_are_one_line(model, tmp_path):
    proc = llmflash("generate", str(tmp_path / "nope"), "hi", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmflash: error:") and "Traceback" not in proc.stderr
    long_prompt = ",".join(["5"] * 200)
    proc = llmflash("generate", str(model), "--ids", long_prompt, check=False)
    assert proc.returncode == 2 and "longer than the context" in proc.stderr


def test_flash_mode_stats_json(tmp_path):
    tiny_models.build("llama-relu", tmp_path / "hf")
    llmflash("convert", str(tmp_path / "hf"), str(tmp_path / "flash"), "--dtype", "float32", "--quiet")
    out = json.loads(llmflash("generate", str(tmp_path / "flash"), "The quick", "--mode", "flash",
                              "--sparsity", "exact", "--memory", "90%", "--window", "3",
                              "--max-new-tokens", "6", "--ignore-eos", "--json").stdout)
    stats = out["stats"]
    assert len(out["token_ids"]) == 6
    for key in ("io_ms", "mem_ms", "compute_ms"):
        assert len(stats[key]) == 5
    assert stats["bytes_read"] > 0 and stats["reads"] > 0
    assert stats["memory_plan"]["planned_bytes"] <= stats["memory_plan"]["budget_bytes"]
    proc = llmflash("generate", str(tmp_path / "flash"), "The quick", "--mode", "flash",
                    "--sparsity", "exact", "--memory", "90%", "--max-new-tokens", "3", "--stats")
    assert "per-token stats, mode flash" in proc.stderr


def test_bench_writes_table_and_json(tmp_path):
    tiny_models.build("llama-relu", tmp_path / "hf")
    llmflash("convert", str(tmp_path / "hf"), str(tmp_path / "flash"), "--dtype", "float32", "--quiet")
    proc = llmflash("bench", str(tmp_path / "flash"), "--memory", "90%", "--sparsity", "exact",
                    "--tokens", "4", "--prompt-tokens", "8", "--modes", "flash,naive,mmap,dense",
                    "--json", str(tmp_path / "bench.json"))
    assert "flash/naive" in proc.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    for mode in ("flash", "naive", "mmap", "dense"):
        entry = result["modes"][mode]
        for key in ("tokens_per_s", "bytes_read_per_token", "io_ms", "mem_ms", "compute_ms",
                    "peak_rss_bytes"):
            assert key in entry, (mode, key)
    # naive reads the whole FFN every token; flash only the selected bundles the window lacks. (This
    # tiny random ReLU model activates over half its neurons, so flash need not read fewer bytes.)
    ffn_bytes = FlashModelDir(tmp_path / "flash").weights_nbytes()["ffn"]
    assert result["modes"]["naive"]["bytes_read_per_token"] >= ffn_bytes
    assert 0 < result["modes"]["flash"]["bytes_read_per_token"]
    assert result["ratios"]["flash_tokens_equal_dense"] is True


def test_probe_disk_quick(tmp_path):
    out = tmp_path / "probe.json"
    proc = llmflash("probe-disk", str(tmp_path), "--quick", "--no-save", "--json", str(out))
    data = json.loads(out.read_text())
    assert proc.returncode == 0 and data
