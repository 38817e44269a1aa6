"""Activation traces: the file format and its checks, recording, synthesis statistics, replay."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.errors import LLMFlashError
from llmflash.format.trace_file import Trace
from llmflash.runtime.engine import Engine
from llmflash.runtime.modes import RunOptions, ffn_factory
from llmflash.tools import trace as tr

PROMPT = [1, 17, 42, 99, 7, 250, 3, 18]


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    base = tmp_path_factory.mktemp("trace")
    tiny_models.build("llama-relu", base / "hf")
    convert(base / "hf", base / "flash", dtype="float32", progress=False)
    text = base / "text.txt"
    text.write_text(" ".join(tiny_models.TRAIN_TEXT) * 6)
    return base / "flash", text


@pytest.fixture(scope="module")
def recorded(relu_model, tmp_path_factory):
    model, text = relu_model
    out = tmp_path_factory.mktemp("rec") / "t.npz"
    return tr.record(model, text, tokens=600, out=out), out


def _target(tmp_path, layers, width):
    """A model directory stand-in for --like: only its config is read."""
    from llmflash.tools.synth import synth

    cfg = tmp_path / f"like-{layers}-{width}.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_act": "relu", "hidden_size": 32,
                               "intermediate_size": width, "num_hidden_layers": layers,
                               "num_attention_heads": 2, "vocab_size": 320, "max_position_embeddings": 64}))
    from llmflash.tools.synth import default_tokenizer

    return synth(None, tmp_path / f"like-{layers}-{width}", config_path=cfg, progress=False,
                 tokenizer=default_tokenizer()).path


def test_record_is_the_exact_nonzero_set(recorded, relu_model):
    trace, path = recorded
    model, _ = relu_model
    again = Trace.load(path)
    np.testing.assert_array_equal(again.bits, trace.bits)
    assert again.meta["kind"] == "recorded" and again.meta["criterion"] == "nonzero"
    engine = Engine(model)
    assert (trace.layers, trace.neurons) == (engine.config.num_layers, engine.config.intermediate_size)
    assert 8 <= trace.tokens <= 600
    # token 0 of layer 0 against the dense model's own activations
    from llmflash.runtime.ffn import ffn_intermediate

    dense = engine.ffn
    seen = {}

    def observe(layer, x):
        seen.setdefault(layer, ffn_intermediate(x, dense.layers[layer], dense.slices, dense.act,
                                                dense.threshold))

    from llmflash.models.base import ObservedFFN

    engine.model.ffn = ObservedFFN(dense, observe)
    ids = engine.tokenizer.encode(" ".join(tiny_models.TRAIN_TEXT) * 6)[:600]
    engine.logits(ids[:50])
    for layer, h in seen.items():
        np.testing.assert_array_equal(trace.active(layer)[:50], (h != 0).numpy())


@pytest.mark.parametrize("layers,width", [(3, 1024), (2, 96)])
def test_synth_from_recorded_keeps_statistics(recorded, tmp_path, layers, width):
    trace, path = recorded
    like = _target(tmp_path, layers, width)
    out = tr.synthesise(path, like, tokens=trace.tokens, seed=1, out=tmp_path / "s.npz")
    assert (out.layers, out.neurons, out.tokens) == (layers, width, trace.tokens)
    src, syn = tr.trace_stats(trace), tr.trace_stats(Trace.load(tmp_path / "s.npz"))
    assert tr.compare(src, syn) < 0.05, (src, syn)


def _mean_abs_corr(active: np.ndarray, pairs: int = 4000, seed: int = 0) -> float:
    a = active.astype(np.float64)
    keep = a.std(axis=0) > 0
    a = (a[:, keep] - a[:, keep].mean(0)) / a[:, keep].std(0)
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, a.shape[1], (2, pairs))
    ok = i != j
    return float(np.abs((a[:, i[ok]] * a[:, j[ok]]).mean(0)).mean())


def test_synth_adds_no_coactivation(recorded, tmp_path):
    trace, path = recorded
    like = _target(tmp_path, 2, 1024)
    syn = tr.synthesise(path, like, tokens=trace.tokens, seed=2)
    src_corr = _mean_abs_corr(trace.active(0))
    syn_corr = _mean_abs_corr(syn.active(0))
    # independent columns of this length: |corr| ~ sqrt(2 / (pi T))
    chance = np.sqrt(2 / (np.pi * trace.tokens))
    assert syn_corr <= max(src_corr, chance) * 1.15, (src_corr, syn_corr, chance)
    # neighbouring ids (neighbouring bundles on flash) are no more alike than random pairs
    a = syn.active(0).astype(np.float64)
    both = (a[:, :-1] * a[:, 1:]).mean(0)
    indep = a[:, :-1].mean(0) * a[:, 1:].mean(0)
    assert abs(both.sum() / indep.sum() - 1) < 0.1


@pytest.mark.parametrize("name", list(tr.PROFILES))
def test_named_profiles(name, tmp_path):
    prof = tr.PROFILES[name]
    # the fitted model reproduces the published figures within 5 %: a window of k tokens holds
    # union(k) and loads union(k + 1) - union(k) per token
    u = tr.profile_union(tr.profile_frequencies(prof["active"], prof["sigma"], 20000), prof["rho"], 9)
    for k, v in prof["window"].items():
        assert abs(u[k - 1] / v - 1) < 0.05
    for k, v in prof.get("load", {}).items():
        assert abs((u[k] - u[k - 1]) / v - 1) < 0.05
    expected = tr.profile_stats(prof)
    like = _target(tmp_path, 2, 4096)
    syn = tr.synthesise(name, like, tokens=1024, seed=0)
    assert tr.compare(expected, tr.trace_stats(syn)) < 0.05


def test_bad_trace_files(tmp_path, recorded):
    trace, path = recorded
    with pytest.raises(LLMFlashError, match="trace file not found"):
        Trace.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(LLMFlashError, match=f"bad trace file {bad}"):
        Trace.load(bad)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the compressed bits
    bad.write_bytes(bytes(data))
    with pytest.raises(LLMFlashError, match="bad trace file"):
        Trace.load(bad)
    with open(bad, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(dict(trace.meta, tokens=trace.tokens + 1))), bits=trace.bits)
    with pytest.raises(LLMFlashError, match="meta says"):
        Trace.load(bad)
    with open(bad, "wb") as f:
        np.savez(f, bits=trace.bits)
    with pytest.raises(LLMFlashError, match="members"):
        Trace.load(bad)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("meta.npy", b"\x93NUMPY garbage")
        z.writestr("bits.npy", b"garbage")
    with pytest.raises(LLMFlashError, match="bad trace file"):
        Trace.load(bad)
    with pytest.raises(LLMFlashError, match="neither a trace file nor a named profile"):
        tr.synthesise(tmp_path / "nope.npz", "opt-1.3b")


def test_replay_in_flash_mode(recorded, relu_model):
    """trace:PATH replays token t's sets at decode step t, through the real flash machinery."""
    trace, path = recorded
    model, _ = relu_model
    engine = Engine(model, ffn=ffn_factory(RunOptions(mode="flash", sparsity=f"trace:{path}",
                                                      memory="90%", window=2)))
    loaded = []
    inner = engine.ffn.selector
    original = inner.select

    def spy(layer, x):
        sel = original(layer, x)
        if layer == 0:
            loaded.append((inner.token, sel.ids()))
        return sel

    inner.select = spy
    result = engine.generate(PROMPT, 6, stop_at_eos=False)
    assert [t for t, _ in loaded] == list(range(len(loaded)))
    for t, ids in loaded:
        assert sorted(ids) == list(trace.ids(0, t))
    stats = result.stats
    assert stats["selector"] == "trace" and stats["selector_bytes"] > 0
    assert torch.isfinite(torch.tensor(result.token_ids, dtype=torch.float)).all()


def test_trace_shape_must_match(recorded, tmp_path):
    _, path = recorded
    like = _target(tmp_path, 2, 96)
    with pytest.raises(LLMFlashError, match="trace synth"):
        Engine(like, ffn=ffn_factory(RunOptions(mode="flash", sparsity=f"trace:{path}", memory="100%")))


@pytest.mark.parametrize("cost", ["lowrank:16", "quant:4"])
def test_predictor_cost_is_run_and_charged(recorded, relu_model, cost):
    trace, path = recorded
    model, _ = relu_model
    plain = Engine(model, ffn=ffn_factory(RunOptions(mode="flash", sparsity=f"trace:{path}", memory="90%")))
    costed = Engine(model, ffn=ffn_factory(RunOptions(mode="flash", sparsity=f"trace:{path}", memory="90%",
                                                      predictor_cost=cost)))
    a = plain.generate(PROMPT, 4, stop_at_eos=False)
    b = costed.generate(PROMPT, 4, stop_at_eos=False)
    assert a.token_ids == b.token_ids  # the stand-in predictor's output is discarded
    extra = b.stats["predictor_cost_bytes"]
    assert extra > 0 and b.stats["selector_bytes"] == a.stats["selector_bytes"] + extra
    assert b.stats["memory_plan"]["extra_resident_bytes"] == a.stats["memory_plan"]["extra_resident_bytes"] + extra


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmflash", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_synth_trace_generate(tmp_path):
    """The verbs end to end: synth a tiny model, synthesise a trace for it, replay it in flash mode
    with a charged predictor stand-in, read the trace's statistics."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "opt", "activation_function": "relu", "hidden_size": 64,
                               "ffn_dim": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "max_position_embeddings": 128, "vocab_size": 320, "bos_token_id": 2,
                               "eos_token_id": 2}))
    model, trace = tmp_path / "m", tmp_path / "t.npz"
    r = _cli("synth", "--config", cfg, model, "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("trace", "synth", "--profile", "paper-opt-6.7b", "--like", model, "--tokens", 64, "--out", trace)
    assert r.returncode == 0 and "window k=1..8" in r.stdout, r.stderr
    r = _cli("generate", model, "--ids", "1,2,3", "--max-new-tokens", 4, "--ignore-eos", "--mode", "flash",
             "--memory", "100%", "--sparsity", f"trace:{trace}", "--predictor-cost", "quant:4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 4 and out["stats"]["predictor_cost"] == "quant:4"
    assert "synthetic model" in r.stderr
    r = _cli("trace", "stats", trace, "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["layers"]) == 2
    trace.write_bytes(b"garbage")
    r = _cli("trace", "stats", trace)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"bad trace file {trace}" in r.stderr
    r = _cli("generate", model, "--ids", "1,2", "--mode", "flash", "--memory", "100%",
             "--sparsity", f"trace:{trace}", "--predictor-cost", "lowrank:x")
    assert r.returncode == 2 and "predictor cost" in r.stderr
