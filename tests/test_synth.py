"""`llmflash synth`: real shapes, the convert writer's layout and checks, sane random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmflash.models import config_from_hf
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.models.base import ObservedFFN
from llmflash.runtime.engine import Engine
from llmflash.runtime.ffn import ffn_intermediate
from llmflash.tools import synth as synth_mod
from llmflash.tools.synth import PRESETS, fit_tokenizer, resident_shapes, synth

TINY = {
    "opt": {"model_type": "opt", "activation_function": "relu", "hidden_size": 64, "ffn_dim": 512,
            "num_hidden_layers": 6, "num_attention_heads": 4, "max_position_embeddings": 128,
            "vocab_size": 50272, "word_embed_proj_dim": 64, "do_layer_norm_before": True,
            "bos_token_id": 2, "eos_token_id": 2},
    "fatrelu": {"model_type": "llama", "hidden_act": "fatrelu", "hidden_act_param": 0.01,
                "hidden_size": 64, "intermediate_size": 512, "num_hidden_layers": 6,
                "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
                "vocab_size": 320, "bos_token_id": 1, "eos_token_id": 2},
    "gqa-silu": {"model_type": "mistral", "hidden_act": "silu", "hidden_size": 64,
                 "intermediate_size": 192, "num_hidden_layers": 6, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 128, "sliding_window": 32,
                 "vocab_size": 320, "bos_token_id": 1, "eos_token_id": 2},
}
TEXT = "Flash memory is larger than DRAM but slower to read, so the model streams its FFN."


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return synth_mod.default_tokenizer()


@pytest.fixture(scope="module", params=list(TINY))
def model(request, tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp(request.param)
    cfg = base / "config.json"
    cfg.write_text(json.dumps(TINY[request.param]))
    return synth(None, base / "m", dtype="float16", seed=3, config_path=cfg, progress=False,
                 tokenizer=tokenizer), request.param


def test_shapes_match_transformers(model):
    """Every resident tensor has the shape transformers gives the same config."""
    import transformers as tf

    d, kind = model
    hf = dict(TINY[kind])
    cls = {"opt": tf.OPTConfig, "llama": tf.LlamaConfig, "mistral": tf.MistralConfig}[hf["model_type"]]
    hf_cfg = cls(**{k: v for k, v in hf.items() if k not in ("model_type", "hidden_act_param")})
    if kind == "fatrelu":
        hf_cfg.hidden_act = "relu"  # transformers has no FATReLU; shapes are the same
    ref = {k: tuple(v.shape) for k, v in tf.AutoModelForCausalLM.from_config(hf_cfg).state_dict().items()}
    from safetensors import safe_open

    with safe_open(str(d.resident_path), framework="pt") as f:
        for name in f.keys():
            assert tuple(f.get_slice(name).get_shape()) == ref[name], name
    assert d.bundle.elements == (3 if d.config.gated else 2) * d.config.hidden_size + (
        1 if kind == "opt" else 0)


def test_layout_checksums_and_manifest(model):
    d, kind = model
    assert d.verify() == []
    assert d.manifest["synthetic"]["seed"] == 3
    assert d.manifest["source"]["kind"] == "synthetic"
    assert d.config == config_from_hf(TINY[kind])
    for r in d.layers:
        assert r.offset % 4096 == 0 and r.neurons == d.config.intermediate_size
    assert not list(d.path.parent.glob(".*tmp*"))


def _layer_stats(path):
    """Per layer: FFN output RMS and share of neurons with a non-zero activation; last logits."""
    engine = Engine(path)
    dense = engine.ffn
    rms, active = [], []

    def observe(layer, x):
        h = ffn_intermediate(x, dense.layers[layer], dense.slices, dense.act, dense.threshold)
        active.append(float((h != 0).float().mean()))
        rms.append(float(dense(layer, x).float().pow(2).mean().sqrt()))

    engine.model.ffn = ObservedFFN(dense, observe)
    ids = engine.tokenizer.encode(TEXT)
    logits = engine.logits(ids)
    return np.array(rms), np.array(active), logits


def test_hidden_states_finite_and_sensible(model):
    d, kind = model
    rms, active, logits = _layer_stats(d.path)
    assert torch.isfinite(logits).all()
    assert 0.2 < float(logits.std()) < 5
    assert np.isfinite(rms).all() and (rms > 1e-3).all() and (rms < 3).all(), rms
    if kind == "opt":  # fc1 bias set for the paper's 3.3 % of neurons per token
        assert 0.015 < active.mean() < 0.06, active
    elif kind == "fatrelu":  # FFN norm weight set for ProSparse's ~10 %
        assert 0.06 < active.mean() < 0.15, active


def test_bytes_do_not_depend_on_chunking(tmp_path, tokenizer, monkeypatch):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY["gqa-silu"]))
    a = synth(None, tmp_path / "a", config_path=cfg, progress=False, tokenizer=tokenizer)
    monkeypatch.setattr(synth_mod, "CHUNK_BYTES", 4096)
    b = synth(None, tmp_path / "b", config_path=cfg, progress=False, tokenizer=tokenizer)
    c = synth(None, tmp_path / "c", config_path=cfg, seed=1, progress=False, tokenizer=tokenizer)
    assert a.files == b.files
    assert a.files["ffn.bin"]["sha256"] != c.files["ffn.bin"]["sha256"]


def test_tokenizer_fits_any_vocab(tokenizer):
    from tokenizers import Tokenizer

    small = Tokenizer.from_str(fit_tokenizer(tokenizer, 32000).tokenizer_json)
    ids = small.encode(TEXT + " Ünïcödé 12345 {}").ids
    assert max(ids) < 32000 and small.get_vocab_size() == 32000
    assert small.decode(ids) == TEXT + " Ünïcödé 12345 {}"
    large = Tokenizer.from_str(fit_tokenizer(tokenizer, 50272).tokenizer_json)
    assert large.get_vocab_size() == 50272
    assert large.encode(TEXT).ids == Tokenizer.from_str(tokenizer.tokenizer_json).encode(TEXT).ids
    assert large.decode([50000]) == "<synth_50000>"


def test_presets_map_to_real_shapes():
    sizes = {}
    for name, hf in PRESETS.items():
        cfg = config_from_hf(hf)
        params = sum(int(np.prod(s)) for _, s in resident_shapes(cfg))
        params += cfg.num_layers * cfg.intermediate_size * (3 if cfg.gated else 2) * cfg.hidden_size
        sizes[name] = params / 1e9
    # published parameter counts
    assert abs(sizes["opt-1.3b"] - 1.32) < 0.02 and abs(sizes["opt-6.7b"] - 6.66) < 0.03
    assert abs(sizes["llama-2-7b"] - 6.74) < 0.02 and abs(sizes["mistral-7b"] - 7.24) < 0.02
    assert config_from_hf(PRESETS["prosparse-llama-2-7b"]).hidden_act == "fatrelu"
    assert config_from_hf(PRESETS["mistral-7b"]).num_kv_heads == 8


def test_engine_says_synthetic_once(model, capsys, monkeypatch):
    from llmflash.runtime import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_NOTED_SYNTHETIC", set())
    d, _ = model
    Engine(d.path)
    Engine(d.path)
    err = capsys.readouterr().err
    assert err.count("synthetic") == 1 and "meaningless" in err


def test_bad_input(tmp_path, tokenizer):
    with pytest.raises(LLMFlashError, match="unknown synth shape"):
        synth("opt-9b", tmp_path / "x", tokenizer=tokenizer)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LLMFlashError, match="bad.json"):
        synth(None, tmp_path / "x", config_path=bad, tokenizer=tokenizer)
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LLMFlashError, match="unsupported architecture"):
        synth(None, tmp_path / "x", config_path=bad, tokenizer=tokenizer)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LLMFlashError, match="already exists"):
        synth("opt-1.3b", tmp_path / "exists", tokenizer=tokenizer)


def test_cli_lists_the_presets():
    from llmflash.cli.synth import PRESET_NAMES

    assert PRESET_NAMES == tuple(PRESETS)
