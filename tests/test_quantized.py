"""int8 / int4 / int4m storage (issue 12): the block codec, conversion, GGUF blocks kept exactly, compute.

The reference for the byte layout is llama.cpp's own Python package (gguf.quants); the reference for
the logits is the same model at float32 (transformers for an HF model, gguf's dequantization for a
GGUF), and flash mode is compared with dense on the same quantized model.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import tiny_models
from llmflash.api import convert
from llmflash.errors import LLMFlashError
from llmflash.format import quantized as Q
from llmflash.format.layout import FlashModelDir
from llmflash.runtime.engine import Engine
from llmflash.runtime.modes import RunOptions, ffn_factory

GGML = {"int8": gguf.GGMLQuantizationType.Q8_0, "int4": gguf.GGMLQuantizationType.Q4_0,
        "int4m": gguf.GGMLQuantizationType.Q4_1}
IDS = [1, 5, 9, 33, 70, 100, 7, 12]


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize("kind", Q.KINDS)
def test_codec_bytes_equal_ggml_and_round_trip(kind):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    w[2, :32] = 0.0  # an all-zero block: scale 0
    w[3, 40] = 50.0  # an outlier
    raw = Q.quantize_rows(w, kind)
    ref = gguf.quants.quantize(w, GGML[kind])
    assert raw.shape == (64, Q.row_bytes(kind, 96)) == ref.shape
    assert np.array_equal(raw, ref)  # the same bytes as llama.cpp writes
    want = gguf.quants.dequantize(ref, GGML[kind])
    assert np.array_equal(Q.dequantize_rows_np(raw, kind, 96), want)
    assert torch.equal(Q.dequantize_blocks(torch.from_numpy(raw), kind, 96), torch.from_numpy(want))
    # quantizing the dequantized weights again gives the same weights (a stable round trip; an
    # all-zero block's scale may come back as +0 instead of -0)
    assert np.array_equal(Q.dequantize_rows_np(Q.quantize_rows(want, kind), kind, 96), want)
    # down columns: codes and per-32-neuron scales (and minimums) give back the same weights
    scales, mins, codes = Q.down_blocks(w, kind)
    assert codes.shape == (96, 64) and scales.shape == (64, 3)
    back = codes.T.astype(np.float32).reshape(64, 3, 32) * scales.astype(np.float32)[..., None]
    if kind == "int4m":
        assert mins.shape == (64, 3)
        back += mins.astype(np.float32)[..., None]
    else:
        assert mins is None
    assert np.array_equal(back.reshape(64, 96), want)
    # GPTQ's writer (blocks from scales, minimums and codes) gives back gguf's bytes
    s, m, c = Q.split_blocks(raw, kind, 96)
    assert np.array_equal(Q.blocks_np(s, Q.unpack_codes_np(c, kind, 96), kind, m), raw)
    packed = Q.pack_codes_np(codes, kind)
    assert packed.shape == (96, Q.code_bytes(kind, 64))
    assert torch.equal(Q.unpack_codes(torch.from_numpy(packed), kind, 64), torch.from_numpy(codes))


def test_exact_block_layout():
    """One block each, spelled out byte by byte (docs/FORMAT.md)."""
    w = np.arange(32, dtype=np.float32) - 16.0  # -16 .. 15: |max| 16 at index 0
    q8 = Q.quantize_rows(w[None], "int8")[0]
    d8 = np.float16(16.0 / 127)
    assert q8[:2].tobytes() == struct.pack("<e", d8)  # little-endian float16 scale first
    assert q8[2:].view(np.int8)[0] == -127 and q8[2:].view(np.int8)[16] == 0
    q4 = Q.quantize_rows(w[None], "int4")[0]
    assert q4[:2].tobytes() == struct.pack("<e", 2.0)  # d = (the weight of largest |w|) / -8 = -16 / -8
    # byte j: weight j in the low nibble, weight j + 16 in the high nibble; code = round(w / d) + 8
    assert q4[2] == 0 | (8 << 4)  # weight 0 = -16 -> code 0; weight 16 = 0 -> code 8
    assert q4[3] == 1 | (9 << 4)  # weight 1 = -15 -> trunc(-7.5 + 8.5) = 1; weight 17 = 1 -> trunc(9.0) = 9
    codes = np.concatenate([q4[2:] & 15, q4[2:] >> 4]).astype(np.float32)
    assert np.array_equal((codes - 8) * 2.0, gguf.quants.dequantize(q4[None], GGML["int4"])[0])
    # int4m (Q4_1): scale d = (max - min) / 15, then the minimum m, both float16; w = d * q + m
    q41 = Q.quantize_rows(w[None] + 100.0, "int4m")[0]  # 84 .. 115: far from zero, where Q4_0 is coarse
    assert len(q41) == 20 and q41[:4].tobytes() == struct.pack("<ee", 31 / 15, 84.0)
    codes = np.concatenate([q41[4:] & 15, q41[4:] >> 4]).astype(np.float32)
    assert codes[0] == 0 and codes[31] == 15
    assert np.array_equal(codes * np.float32(np.float16(31 / 15)) + 84.0,
                          gguf.quants.dequantize(q41[None], GGML["int4m"])[0])


def test_bundle_layout_bytes():
    from llmflash.format.layout import bundle_layout_for
    from llmflash.models.config import ModelConfig

    hidden, n = 64, 160
    c = ModelConfig(family="llama", model_type="llama", vocab_size=16, hidden_size=hidden,
                    intermediate_size=n, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                    max_position_embeddings=32, hidden_act="relu")
    f16 = bundle_layout_for(c, "float16").nbytes
    assert bundle_layout_for(c, "int8").nbytes == 2 * (hidden // 32) * 34 + hidden  # 200
    assert bundle_layout_for(c, "int4").nbytes == 2 * (hidden // 32) * 18 + hidden // 2  # 104
    assert bundle_layout_for(c, "int4m").nbytes == 2 * (hidden // 32) * 20 + hidden // 2  # 112
    assert bundle_layout_for(c, "int4").nbytes / f16 < 0.3
    import dataclasses

    odd = dataclasses.replace(c, hidden_size=48, head_dim=12)
    with pytest.raises(LLMFlashError, match="hidden_size is 48, not a multiple of 32"):
        bundle_layout_for(odd, "int4")


# ------------------------------------------------------------------ tiny HF models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for kind in ("llama-relu", "opt"):
        model = tiny_models.build(kind, root / kind)
        out[kind] = (root / kind, model)
        for dt in Q.KINDS:
            convert(root / kind, root / f"{kind}-{dt}", dtype=dt, progress=False)
    return root, out


def _budget(path, dtype, share: float) -> str:
    """A budget holding the resident part, the KV cache and `share` of the FFN as cached rows (the
    tiny models are mostly resident, so a percentage of the model says little)."""
    from llmflash.models.base import KVCache
    from llmflash.runtime.engine import weight_dtype
    from llmflash.runtime.memory_plan import KV_DTYPE, resident_bytes_at, resolve_context, row_bytes_at

    d = FlashModelDir(path)
    held = weight_dtype(d, dtype)
    c = d.config
    need = resident_bytes_at(d, held) + KVCache.bytes_for(c, resolve_context(c, None), KV_DTYPE)
    need += c.num_layers * c.intermediate_size * c.hidden_size * 4  # the exact selector's gate copy
    return str(need + int(share * c.num_layers * c.intermediate_size * row_bytes_at(d, held)))


def _logits(path, mode="dense", dtype=None, sparsity=None, memory="50%", density=None):
    """Prompt of 4 tokens then 4 single-token steps: the last position's logits of each pass."""
    if mode == "flash":
        memory = _budget(path, dtype, float(memory.rstrip("%")) / 100)
    e = Engine(path, dtype=dtype, ffn=ffn_factory(RunOptions(mode=mode, sparsity=sparsity, memory=memory,
                                                             density=density)))
    cache = e.model.new_cache(len(IDS))
    with torch.inference_mode():
        out = [e.model.forward(torch.tensor(IDS[:4]), cache)[-1:]]
        for t in IDS[4:]:
            out.append(e.model.forward(torch.tensor([t]), cache)[-1:])
    return torch.cat(out)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kind", ["llama-relu", "opt"])
@pytest.mark.parametrize("dt", Q.KINDS)
def test_flash_equals_dense_on_the_quantized_model(tiny, kind, dt):
    root, _ = tiny
    path = root / f"{kind}-{dt}"
    d = FlashModelDir(path)
    assert d.dtype == dt and d.manifest["resident_dtype"] == "float16"
    # exact: both dequantize the stored weights to float32 (flash only the rows in use)
    dense32 = _logits(path, "dense", torch.float32)
    flash32 = _logits(path, "flash", torch.float32, "exact", memory="40%")
    assert _rel(flash32, dense32) < 1e-5
    # as stored: flash's cached rows stay quantized; the float16 resident part differs only by rounding
    flash = _logits(path, "flash", None, "exact", memory="40%")
    assert _rel(flash, dense32) < 3e-3
    # dense as stored runs torch's int4 kernel (bfloat16 activations): close, not bit-equal
    dense = _logits(path, "dense")
    assert _rel(dense, dense32) < 2e-2
    assert torch.equal(flash.argmax(-1), dense32.argmax(-1))


@pytest.mark.parametrize("kind", ["llama-relu", "opt"])
@pytest.mark.parametrize("dt,tol", [("int8", 0.02), ("int4", 0.3), ("int4m", 0.3)])
def test_logits_near_transformers(tiny, kind, dt, tol):
    """4-bit rounding of random hidden-64 weights moves logits visibly; the shape stays."""
    root, models = tiny
    _, model = models[kind]
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    ours = Engine(root / f"{kind}-{dt}", dtype=torch.float32).logits(IDS)
    assert _rel(ours, ref) < tol
    assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min()) > 1 - tol / 5


def test_same_budget_caches_more_neurons(tiny, tmp_path):
    from llmflash.runtime.memory_plan import plan_memory

    root, _ = tiny
    convert(root / "llama-relu", tmp_path / "f16", dtype="float16", progress=False)
    f16 = FlashModelDir(tmp_path / "f16")
    q4 = FlashModelDir(root / "llama-relu-int4")
    budget = "1MiB"
    p16 = plan_memory(f16, budget, torch.float16)
    p4 = plan_memory(q4, budget, torch.uint8)
    assert p4.row_bytes == q4.bundle.nbytes and p4.row_bytes / p16.row_bytes < 0.3
    assert p4.capacity_per_layer >= 3 * p16.capacity_per_layer or p4.capacity_per_layer == 160


# ------------------------------------------------------------------ GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, hf_model, ffn_type, bad_type=None, attn_type=None) -> None:
    """A tiny llama as llama.cpp writes it, FFN tensors in `ffn_type` blocks (attention matrices in
    `attn_type` blocks when given), the rest float32."""
    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"] + [f"t{i}" for i in range(cfg.vocab_size - 6)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for g, t in (("attn_q", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)),
                     ("attn_k", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)),
                     ("attn_v", sd[p + "self_attn.v_proj.weight"]), ("attn_output", sd[p + "self_attn.o_proj.weight"])):
            if attn_type is None:
                w.add_tensor(b + g + ".weight", t)
            else:
                w.add_tensor(b + g + ".weight", gguf.quants.quantize(t, attn_type), raw_dtype=attn_type)
        for g, h in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
            t = sd[p + f"mlp.{h}.weight"]
            typ = bad_type if (bad_type is not None and i == 1 and g == "ffn_up") else ffn_type
            raw = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q4_0 if typ == gguf.GGMLQuantizationType.IQ4_NL
                                       else typ)  # IQ4_NL has Q4_0's block size: right byte count
            w.add_tensor(b + g + ".weight", raw, raw_dtype=typ)
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dt", Q.KINDS)
def test_gguf_blocks_kept_exactly(tiny, tmp_path, dt):
    root, models = tiny
    src = tmp_path / f"tiny-{dt}.gguf"
    _write_gguf(src, models["llama-relu"][1], GGML[dt])
    ours = convert(src, tmp_path / "q", dtype="auto", resident_dtype="float32", progress=False)
    ref_dir = convert(src, tmp_path / "f32", dtype="float32", progress=False)  # gguf's dequantization
    d = FlashModelDir(ours)
    assert d.dtype == dt
    assert d.manifest["quantization"]["kept_tensors"] == 6 and d.manifest["quantization"]["requantized"] == {}
    reader = gguf.GGUFReader(src)
    t = {x.name: x for x in reader.tensors}
    for layer in range(2):
        rows = d.read_layer_bundles(layer)  # float32, dequantized from the stored blocks
        s = (slice(0, 64), slice(64, 128), slice(128, 192))
        for part, name in zip(s, ("ffn_gate", "ffn_up", "ffn_down")):
            x = t[f"blk.{layer}.{name}.weight"]
            want = gguf.quants.dequantize(x.data, x.tensor_type).reshape(tuple(reversed([int(v) for v in x.shape])))
            got = rows[:, part].numpy()
            assert np.array_equal(got.T if name == "ffn_down" else got, want), (layer, name)
    ref = Engine(ref_dir, dtype=torch.float32).logits(IDS)
    assert _rel(_logits(ours, "dense", torch.float32), ref[3:]) < 1e-5
    # SiLU: every neuron selected (magnitude at density 1), through a cache of 60 % of the FFN
    assert _rel(_logits(ours, "flash", None, "magnitude", memory="60%", density=1.0), ref[3:]) < 1e-3
    # requantizing another type is said and recorded
    other = tmp_path / "other.gguf"
    _write_gguf(other, models["llama-relu"][1], gguf.GGMLQuantizationType.Q8_0 if dt != "int8"
                else gguf.GGMLQuantizationType.Q4_0)
    proc = subprocess.run([sys.executable, "-m", "llmflash", "convert", str(other), str(tmp_path / "re"),
                           "--dtype", dt, "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "requantized to " + dt in proc.stderr
    assert FlashModelDir(tmp_path / "re").manifest["quantization"]["requantized"]


def test_unsupported_gguf_type_is_one_line_exit_2(tiny, tmp_path):
    root, models = tiny
    src = tmp_path / "bad.gguf"
    _write_gguf(src, models["llama-relu"][1], GGML["int4"], bad_type=gguf.GGMLQuantizationType.IQ4_NL)
    proc = subprocess.run([sys.executable, "-m", "llmflash", "convert", str(src), str(tmp_path / "out"),
                           "--dtype", "int4"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "IQ4_NL" in lines[0] and "blk.1.ffn_up.weight" in lines[0] and str(src) in lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ end to end, integrity


def test_cli_and_api_end_to_end(tiny, tmp_path):
    import llmflash

    root, _ = tiny
    dst = tmp_path / "m"
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmflash", *a], capture_output=True, text=True)  # noqa: E731
    proc = run("convert", str(root / "llama-relu"), str(dst), "--dtype", "int4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "int4" in proc.stdout
    assert run("verify", str(dst)).returncode == 0
    budget = _budget(dst, None, 0.6)
    flash = run("generate", str(dst), "--ids", "1,5,9", "--max-new-tokens", "6", "--mode", "flash",
                "--sparsity", "exact", "--memory", budget, "--json", "--ignore-eos")
    assert flash.returncode == 0, flash.stderr
    tokens = json.loads(flash.stdout)["token_ids"]
    m = llmflash.load(dst, mode="dense", dtype="float32")  # the exact dequantized reference
    assert m.generate([1, 5, 9], max_new_tokens=6, ignore_eos=True).token_ids == tokens
    q = llmflash.load(dst, mode="flash", sparsity="exact", memory=budget)
    assert q.generate([1, 5, 9], max_new_tokens=6, ignore_eos=True).token_ids == tokens
    # a flipped byte in a bundle: verify names the layer, a flash read refuses it
    ffn = dst / FlashModelDir(dst).manifest["ffn"]["file"]
    data = bytearray(ffn.read_bytes())
    at = FlashModelDir(dst).layers[1].offset + 5
    data[at] ^= 0xFF
    ffn.write_bytes(bytes(data))
    bad = run("verify", str(dst))
    assert bad.returncode == 1 and "layer 1" in bad.stderr
    broken = run("generate", str(dst), "--ids", "1,5,9", "--max-new-tokens", "3", "--mode", "flash",
                 "--sparsity", "exact", "--memory", budget)
    assert broken.returncode == 2 and "checksum" in broken.stderr.lower()


def test_synth_int4_runs(tmp_path):
    from llmflash.tools.synth import synth

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "model_type": "opt", "activation_function": "relu", "num_attention_heads": 4,
        "max_position_embeddings": 64, "vocab_size": 50272, "do_layer_norm_before": True,
        "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 2, "word_embed_proj_dim": 64,
        "enable_bias": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}))
    outs = {}
    for dt in ("float16", "int4", "int4m"):
        synth(None, tmp_path / dt, dtype=dt, config_path=cfg, progress=False)
        outs[dt] = Engine(tmp_path / dt, dtype=torch.float32).logits([5, 6, 7])
    d = FlashModelDir(tmp_path / "int4")
    assert d.dtype == "int4" and d.bundle.nbytes == 36 + 32 + 4  # OPT: up blocks, down codes, up bias
    assert FlashModelDir(tmp_path / "int4m").bundle.nbytes == 40 + 32 + 4  # Q4_1: 20-byte blocks
    # the same statistics as the float preset (random values differ)
    for dt in ("int4", "int4m"):
        assert 0.7 < float(outs[dt].std() / outs["float16"].std()) < 1.4, dt
    dense = _logits(tmp_path / "int4", "dense", torch.float32)
    flash = _logits(tmp_path / "int4", "flash", torch.float32, "exact", memory="95%")
    assert _rel(flash, dense) < 1e-5


@pytest.mark.parametrize("kind", Q.KINDS)
def test_gptq_blocks_beat_rounding_on_the_layer_outputs(kind):
    """`convert --gptq`'s block choice (tools/quantize.py): valid blocks of the kind whose products
    with correlated inputs are closer to the float ones than ggml's round-to-nearest blocks."""
    from llmflash.tools.quantize import gptq_blocks

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    W = torch.randn(48, 64, generator=g) + (2.0 if kind == "int4m" else 0.0)  # int4m: off-centre rows
    H = (X.T @ X / len(X)).double()

    def output_error(raw: np.ndarray) -> float:
        Wq = torch.from_numpy(Q.dequantize_rows_np(raw, kind, 64))
        return float(((X @ (Wq - W).T) ** 2).mean())

    raw = gptq_blocks(W, H, kind)
    assert raw.shape == (48, Q.row_bytes(kind, 64)) and raw.dtype == np.uint8
    assert output_error(raw) < 0.8 * output_error(Q.quantize_rows(W.numpy(), kind))


def test_gptq_convert_with_resident_blocks(tiny, tmp_path):
    """`convert --gptq` end to end, its resident matrices in blocks: the FFN blocks chosen by GPTQ,
    the resident ones rounded to nearest; the model runs and stays close to its float source."""
    from llmflash.tools.quantize import gptq_convert

    root, _ = tiny
    src = convert(root / "llama-relu", tmp_path / "f32", dtype="float32", progress=False)
    text = Path(__file__).resolve().parents[1] / "llmflash" / "data" / "calibration.txt"
    out = gptq_convert(src, tmp_path / "g", "int4", text, tokens=256, window=64, progress=False,
                       resident_dtype="int4")
    d = FlashModelDir(out.path)
    assert d.manifest["quantization"]["method"] == "gptq"
    assert set(d.resident_blocks.values()) == {"int4"} and len(d.resident_blocks) == 10
    ref = Engine(src, dtype=torch.float32).logits(IDS)
    ours = Engine(out.path, dtype=torch.float32).logits(IDS)
    assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min()) > 0.8
    assert _rel(_logits(out.path, "dense"), _logits(out.path, "dense", torch.float32)) < 2e-2


@pytest.mark.parametrize("kind", ["int4", "int4m"])
@pytest.mark.parametrize("family,act,threshold", [("llama", "silu", 0.0), ("llama", "fatrelu", 0.1),
                                                  ("opt", "relu", 0.0)])
def test_compiled_row_kernels_equal_the_torch_route(kind, family, act, threshold, monkeypatch):
    """One token over 4-bit rows goes through numba kernels (runtime/quant_kernels.py): the same
    float32 arithmetic as dequantizing the rows (reassociated sums), on scattered neuron ids with
    several rows per down-scale group, biases (OPT), negative and subnormal float16 scales."""
    from llmflash.format.layout import bundle_layout_for
    from llmflash.models.config import ModelConfig
    from llmflash.runtime import quant_kernels
    from llmflash.runtime.quant_ffn import quant_rows_ffn

    K, N, S = 96, 320, 70
    c = ModelConfig(family=family, model_type=family, vocab_size=16, hidden_size=K, intermediate_size=N,
                    num_layers=1, num_heads=4, num_kv_heads=4, head_dim=24, max_position_embeddings=32,
                    hidden_act=act, act_threshold=threshold, mlp_bias=family == "opt")
    layout = bundle_layout_for(c, kind)
    codec = Q.BundleCodec(layout, K)
    rng = np.random.default_rng(3)
    parts = [Q.quantize_rows(rng.standard_normal((S, K)).astype(np.float32) * 0.1 + 0.05, kind)
             for _ in range(2 if "gate" in codec.spans else 1)]
    parts[0][5, :2] = np.array([np.float16(-3e-6)]).view(np.uint8)  # a negative subnormal scale
    codes = rng.integers(0, 16, (S, K)).astype(np.int8) - Q.CODE_OFFSET[kind]
    biases = [rng.standard_normal(S).astype(np.float32)] if family == "opt" else []
    raw = torch.from_numpy(Q.bundle_bytes_np(parts[0] if len(parts) == 2 else None, parts[-1], codes, biases, kind))
    ids = torch.from_numpy(rng.choice(N, S, replace=False))
    scales = torch.rand(N // 32, K).t()  # as FlashModelDir holds them: a transposed view
    mins = (torch.rand(N // 32, K) - 0.5).t() if kind == "int4m" else None
    x = torch.randn(1, K)
    assert quant_kernels.usable(codec, x)
    got = quant_rows_ffn(x, raw, ids, codec, scales, act, threshold, mins)
    monkeypatch.setattr(quant_kernels, "ENABLED", False)
    want = quant_rows_ffn(x, raw, ids, codec, scales, act, threshold, mins)
    assert _rel(got, want) < 1e-5


# ------------------------------------------------------------------ resident matrices in blocks


def _held_bytes(engine) -> int:
    """What an engine holds of the resident part: its weights and the down scales (float32)."""
    total = sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                for w in engine.weights.values())
    d = engine.dir
    total += sum(t.numel() * 4 for t in d._down_scales + (d._down_mins or []))
    return total


@pytest.mark.parametrize("dt", Q.KINDS)
def test_resident_blocks_kept_from_a_gguf_and_charged_as_held(tiny, tmp_path, dt):
    """--resident-dtype in a GGUF's own block format: its attention blocks are kept (the q/k rows
    put back in HF order as for float tensors), the memory plan charges what the engine holds, and
    flash equals dense on the model as stored and dequantized."""
    from llmflash.runtime.memory_plan import resident_bytes_at
    from llmflash.runtime.quant_matrix import QuantizedMatrix

    _, models = tiny
    src = tmp_path / "attn.gguf"
    _write_gguf(src, models["llama-relu"][1], GGML[dt], attn_type=GGML[dt])
    q = convert(src, tmp_path / "q", dtype="auto", resident_dtype=dt, progress=False)
    ref = FlashModelDir(convert(src, tmp_path / "f32", dtype="float32", progress=False))  # gguf's dequantization
    d = FlashModelDir(q)
    assert d.manifest["resident_dtype"] == dt and set(d.resident_blocks.values()) == {dt}
    assert len(d.resident_blocks) == 10  # 8 attention matrices, the embedding, the head
    assert d.manifest["quantization"]["resident"] == {"kept_tensors": 8, "requantized": {}}
    ours, want = d.load_resident(torch.float32), ref.load_resident(torch.float32)
    for layer in range(2):
        for proj in ("q", "k", "v", "o"):
            name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
            assert torch.equal(ours[name], want[name]), name
    # float32 embeddings are quantized as the rows of any matrix
    embed = want["model.embed_tokens.weight"]
    assert torch.equal(ours["model.embed_tokens.weight"],
                       Q.dequantize_blocks(torch.from_numpy(Q.quantize_rows(embed.numpy(), dt)), dt, embed.shape[1]))
    e = Engine(q)
    assert all(isinstance(e.weights[n], QuantizedMatrix) for n in ours if ours[n].dim() == 2 and n in e.weights)
    assert sum(isinstance(w, QuantizedMatrix) for w in e.weights.values()) == 10  # 8 attention, embedding, head
    assert resident_bytes_at(d, torch.uint8) == _held_bytes(e)
    assert resident_bytes_at(d, torch.uint8) < (0.8 if dt == "int8" else 0.5) * resident_bytes_at(ref, torch.float16)
    # auto: each matrix at its own GGUF type's format (attention kept), float ones at float16
    auto = FlashModelDir(convert(src, tmp_path / "auto", dtype="auto", resident_dtype="auto", progress=False))
    assert auto.resident_blocks == {n: dt for n in d.resident_blocks if "self_attn" in n}
    assert auto.manifest["quantization"]["resident"] == {"kept_tensors": 8, "requantized": {}}
    mixed = auto.load_resident(torch.float32)
    for n in (n for n in want if not n.startswith("ffn.")):  # blocks kept; float32 matrices at float16
        assert torch.equal(mixed[n], want[n] if n in auto.resident_blocks or want[n].dim() == 1
                           else want[n].half().float()), n
    dense32 = _logits(q, "dense", torch.float32)
    # SiLU: every neuron selected (magnitude at density 1; its gate and up copies are charged too)
    flash = lambda dtype: _logits(q, "flash", dtype, "magnitude", memory="400%", density=1.0)  # noqa: E731
    assert _rel(flash(torch.float32), dense32) < 1e-5
    # as stored: products on torch's int4 kernel (bfloat16 activations), lookups exact
    dense = _logits(q, "dense")
    assert _rel(dense, dense32) < 2e-2
    assert _rel(flash(None), dense) < 2e-2


@pytest.mark.parametrize("kind", ["llama-relu", "opt"])
def test_resident_blocks_from_float_weights(tiny, tmp_path, kind):
    """From an HF checkpoint: every resident matrix rounded to int4 blocks. OPT ties its head to the
    token embedding (held packed for the head and as blocks for lookups) and looks up positions."""
    from llmflash.runtime.memory_plan import resident_bytes_at

    root, models = tiny
    q = convert(root / kind, tmp_path / "q", dtype="int4", resident_dtype="int4", progress=False)
    d = FlashModelDir(q)
    e = Engine(q)
    assert resident_bytes_at(d, torch.uint8) == _held_bytes(e)
    embed = e.weights[e.model.embed_name]
    assert (embed.raw is not None, embed.packed is not None) == (True, kind == "opt")
    _, model = models[kind]
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    # 4-bit rounding of every matrix of hidden 64 moves logits (0.88-0.96 cosine measured); a
    # misplaced row or block would leave them unrelated (near 0)
    ours = Engine(q, dtype=torch.float32).logits(IDS)
    assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min()) > 0.8
    dense32 = _logits(q, "dense", torch.float32)
    assert _rel(_logits(q, "flash", torch.float32, "exact", memory="40%"), dense32) < 1e-5
    assert _rel(_logits(q, "flash", None, "exact", memory="40%"), dense32) < 2e-2


def test_block_matrix_from_blocks_pads_and_chunks():
    """Rows packed in chunks of 64 equal rows packed at once (the kernel interleaves rows within
    groups of 64); a row count that is not a multiple of 16 is padded and cut back; the product is
    the stored weights' within bfloat16 rounding."""
    from llmflash.runtime.quant_ffn import BlockMatrix

    rng = np.random.default_rng(3)
    w = rng.standard_normal((136, 96)).astype(np.float32)  # chunks of 64, 64, 8 (+8 rows of padding)
    x = torch.from_numpy(rng.standard_normal((3, 96)).astype(np.float32))
    for kind in Q.KINDS:
        raw = torch.from_numpy(Q.quantize_rows(w, kind))
        whole, chunked = BlockMatrix.from_blocks(raw, kind, 96), BlockMatrix.from_blocks(raw, kind, 96, chunk_rows=64)
        assert torch.equal(whole.w, chunked.w) and torch.equal(whole.sz, chunked.sz)
        y = whole(x)
        assert y.shape == (3, 136) and torch.equal(y, chunked(x))
        exact = x @ Q.dequantize_blocks(raw, kind, 96).t()
        assert _rel(y, exact) < 1e-2, kind


def test_head_refinement_gives_the_exact_leading_logits():
    """The head's packed products are bfloat16; every logit within the margin of the largest is
    recomputed from the stored rows: those equal the exact float32 product, so the leading token
    is the exact one even where the kernel's rounding tied or swapped it."""
    from llmflash.runtime.quant_matrix import HEAD_MARGIN_ABS, QuantizedMatrix

    rng = np.random.default_rng(5)
    # rows close to one another: their logits crowd near the top, as a head's leading tokens do
    w = (rng.standard_normal(64) + 0.002 * rng.standard_normal((512, 64))).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    for kind in Q.KINDS:
        raw = torch.from_numpy(Q.quantize_rows(w, kind))
        exact = x @ Q.dequantize_blocks(raw, kind, 64).t()
        x_big = x * (25.0 / exact.max(-1, keepdim=True).values)  # logits near 25: bfloat16 steps of 0.125
        exact = x_big @ Q.dequantize_blocks(raw, kind, 64).t()
        plain = QuantizedMatrix(raw, kind, lookup=False, product=True).linear(x_big)
        head = QuantizedMatrix(raw, kind, lookup=False, product=True, head=True).linear(x_big)
        near = exact >= exact.max(-1, keepdim=True).values - HEAD_MARGIN_ABS
        assert torch.allclose(head[near], exact[near], rtol=1e-5, atol=1e-5), kind
        assert not torch.allclose(plain[near], exact[near], rtol=1e-5, atol=1e-5)  # what it fixes
        assert int(near.sum()) > 10 and torch.equal(head.argmax(-1), exact.argmax(-1))
        assert _rel(head, exact) < 2e-2  # the rest keeps the kernel's rounding


def test_resident_blocks_cli_and_a_manifest_that_lies(tiny, tmp_path):
    root, _ = tiny
    dst = tmp_path / "m"
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmflash", *a], capture_output=True, text=True)  # noqa: E731
    proc = run("convert", str(root / "opt"), str(dst), "--dtype", "int4m", "--resident-dtype", "int4m", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert run("verify", str(dst)).returncode == 0
    gen = run("generate", str(dst), "--ids", "1,5,9", "--max-new-tokens", "4", "--mode", "flash",
              "--sparsity", "exact", "--memory", _budget(dst, None, 0.6), "--json", "--ignore-eos")
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["token_ids"]) == 4
    # a manifest that says a matrix is int8 while its blocks are int4m: an edit breaks its seal;
    # sealed again (write_manifest), the tensor's size disagrees with what the config implies
    from llmflash.format.layout import write_manifest

    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["resident_blocks"]["model.decoder.layers.1.self_attn.v_proj.weight"] = "int8"
    for reseal, says in ((False, "corrupted manifest"), (True, "the config implies")):
        if reseal:
            manifest.pop("manifest_sha256", None)
            write_manifest(dst, manifest)
        else:
            (dst / "manifest.json").write_text(json.dumps(manifest))
        bad = run("generate", str(dst), "--ids", "1,5,9", "--max-new-tokens", "2")
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert says in lines[0] and str(dst) in lines[0], lines[0]
