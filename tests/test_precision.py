"""Weights held at their stored precision (float16, bfloat16) with float32 activations.

Tolerances (documented in docs/FLASH.md, "Precision and compute"): against the float32 conversion of
the same tiny model, the largest logit difference is at most 1% of the largest |logit| for float16
and 4% for bfloat16 (measured 0.1-0.2% and 0.8-1.1%); prompt passes multiply float32 copies of the
stored weights, decode steps round the activation to the weight dtype for the half-precision
matrix-vector kernel (float32 accumulation).
"""

from __future__ import annotations

import time

import pytest
import torch

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.format.layout import FlashModelDir
from llmflash.runtime.engine import Engine
from llmflash.runtime.ffn import DenseFFN
from llmflash.runtime.memory_plan import model_weight_bytes, plan_memory, resident_bytes_at
from llmflash.runtime.modes import RunOptions, ffn_factory

PROMPT = [1, 17, 42, 99, 7, 250, 3, 18]
STEPS = [5, 77, 301, 12, 190, 64]
TOLERANCE = {"float16": 0.01, "bfloat16": 0.04}  # of the largest |logit|


@pytest.fixture(scope="module", params=["llama-relu", "opt", "llama-bias"])
def models(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"prec-{request.param}")
    tiny_models.build(request.param, base / "hf")
    paths = {}
    for dtype in ("float32", "float16", "bfloat16"):
        convert(base / "hf", base / dtype, dtype=dtype, progress=False)
        paths[dtype] = base / dtype
    return request.param, paths


def roomy(path) -> str:
    """A budget that holds everything of a tiny model (its KV cache is a large share of it)."""
    return f"{4 * model_weight_bytes(FlashModelDir(path))}B"


def run_logits(engine: Engine) -> list[torch.Tensor]:
    """Prompt logits, then one decode step per id of STEPS (the T == 1 path)."""
    cache = engine.model.new_cache(64)
    with torch.inference_mode():
        out = [engine.model.forward(torch.tensor(PROMPT), cache)]
        for t in STEPS:
            out.append(engine.model.forward(torch.tensor([t]), cache))
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weights_stay_half_and_logits_are_close(models, dtype):
    kind, paths = models
    ref = run_logits(Engine(paths["float32"]))
    engine = Engine(paths[dtype])
    held = getattr(torch, dtype)
    assert engine.dtype == held
    matrices = [t for t in engine.weights.values() if t.dim() >= 2]
    assert matrices and all(t.dtype == held for t in matrices)
    assert all(t.dtype == torch.float32 for t in engine.weights.values() if t.dim() < 2)
    gu, bias, down_blocks = engine.ffn.packed[0]
    assert gu.dtype == held and gu.is_contiguous()
    assert all(b.dtype == held and b.is_contiguous() for b in down_blocks)
    for got, want in zip(run_logits(engine), ref):
        assert got.dtype == torch.float32
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= TOLERANCE[dtype] * scale, kind


def test_float32_held_explicitly_is_what_float32_always_was(models):
    _, paths = models
    a = run_logits(Engine(paths["float32"]))
    b = run_logits(Engine(paths["float32"], dtype=torch.float32))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a float16 model held at float32 (forced) computes in float32 on the same rounded weights
    up = run_logits(Engine(paths["float16"], dtype=torch.float32))
    half = run_logits(Engine(paths["float16"]))
    torch.testing.assert_close(half[0], up[0], rtol=1e-5, atol=1e-5)  # prompts: float32 products


def test_dense_relayout_rebuilds_the_bundles(models):
    _, paths = models
    d = FlashModelDir(paths["float16"])
    rows = [d.read_layer_bundles(i) for i in range(d.config.num_layers)]
    ffn = DenseFFN(list(rows), d.bundle, d.config.hidden_act, d.config.act_threshold)
    assert ffn.packed is not None and len(ffn.layers) == len(rows)
    for i, r in enumerate(rows):
        assert torch.equal(ffn.layers[i], r)


@pytest.mark.parametrize("mode", ["flash", "naive", "mmap"])
def test_float16_flash_and_baselines_match_dense(models, mode):
    """Same float16 model: every mode holds its rows at float16; with exact selection (ReLU) flash
    computes the same neurons as dense, so logits agree to float16 rounding and greedy tokens match."""
    kind, paths = models
    if mode == "flash" and kind == "llama-bias":
        pytest.skip("SiLU: no exact selection")
    dense = Engine(paths["float16"])
    other = Engine(paths["float16"], ffn=ffn_factory(RunOptions(mode=mode, memory=roomy(paths["float16"]),
                                                                window=3)))
    if mode == "flash":
        assert all(c.rows.dtype == torch.float16 for c in other.ffn.caches)
        assert other.ffn.plan.row_bytes == FlashModelDir(paths["float16"]).bundle.nbytes
    for got, want in zip(run_logits(other), run_logits(dense)):
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 2e-3 * scale
    assert (other.generate(PROMPT, 10, stop_at_eos=False).token_ids
            == dense.generate(PROMPT, 10, stop_at_eos=False).token_ids)


def test_memory_plan_charges_what_is_held(models):
    """The plan counts matrices at the held dtype: a float16 model's resident part is half its
    float32 size (vectors stay float32), and flash runs in a budget where float32 would not fit."""
    kind, paths = models
    d16, d32 = FlashModelDir(paths["float16"]), FlashModelDir(paths["float32"])
    r16, r32 = resident_bytes_at(d16, torch.float16), resident_bytes_at(d32, torch.float32)
    vectors = sum(t.numel() * 4 for t in Engine(paths["float16"]).weights.values() if t.dim() < 2)
    assert r16 - vectors == (r32 - vectors) // 2
    assert resident_bytes_at(d16, torch.float32) == r32
    engine = Engine(paths["float16"])
    held = sum(t.numel() * t.element_size() for t in engine.weights.values())
    assert held == r16
    if kind == "llama-bias":
        return
    plenty = plan_memory(d16, roomy(paths["float16"]), torch.float16)
    flash = Engine(paths["float16"], ffn=ffn_factory(RunOptions(mode="flash", memory=roomy(paths["float16"]))))
    selector = flash.ffn.selector.nbytes()
    budget = plenty.resident_bytes + selector + plenty.kv_bytes + plenty.row_bytes * (plenty.layers * 4 + 64)
    assert budget < r32 + selector + plenty.kv_bytes  # would not hold the resident part at float32
    small = Engine(paths["float16"], ffn=ffn_factory(RunOptions(mode="flash", memory=f"{budget}B")))
    plan = small.ffn.plan
    assert plan.planned_bytes <= budget and plan.resident_bytes == r16
    cached = sum(c.rows.numel() * c.rows.element_size() for c in small.ffn.caches)
    assert cached == plan.cache_bytes
    small.generate(PROMPT, 4, stop_at_eos=False)


def test_deadline_stops_generation_and_says_so(models):
    import llmflash.api as api

    _, paths = models
    model = api.load(paths["float16"])
    g = model.generate(PROMPT, 20, ignore_eos=True, deadline=time.monotonic())
    assert g.finish_reason == "time" and len(g.token_ids) == 1
    g = model.generate(PROMPT, 3, ignore_eos=True, deadline=time.monotonic() + 600)
    assert g.finish_reason == "length" and len(g.token_ids) == 3


def test_bench_reports_cut_modes():
    from llmflash.tools import bench

    killed = bench.summarise({"killed_after_s": 90.0, "memory_limit_bytes": None}, 30.0)
    assert killed["cut_at_s"] == 30.0 and killed["tokens_per_s"] is None
    bw = bench.copy_bandwidth(8 << 20, repeats=2)
    assert bw["copy_Bps"] > 0
    result = {"model": "m", "memory": "50%", "budget_bytes": 1 << 20, "window": 5, "sparsity": "auto",
              "prompt_tokens": 8, "tokens": 4, "modes": {"mmap": killed}, "ratios": {},
              "runtime_overhead_bytes": 1 << 20, "memory_bandwidth": bw}
    text = bench.table(result)
    assert "mmap*" in text and "cut at --max-seconds 30" in text


def test_split_columns_is_the_same_product():
    from llmflash.compute import linear, linear_split, split_columns

    w = torch.randn(48, 300).half()
    blocks = split_columns(w, 64)
    assert len(blocks) == 5 and torch.equal(torch.cat(blocks, 1), w)
    for T in (1, 4, 9):  # partial products are rounded to float16 (one token) before the sum
        x = torch.randn(T, 300)
        torch.testing.assert_close(linear_split(x, blocks), linear(x, w), rtol=1e-2, atol=3e-2)


def test_few_tokens_use_the_one_token_kernel_and_many_the_float32_chunks():
    from llmflash.compute import ROWWISE_TOKENS, linear

    w = torch.randn(40, 24).half()
    few = torch.randn(ROWWISE_TOKENS, 24)
    rows = torch.cat([linear(few[i:i + 1], w) for i in range(len(few))])
    assert torch.equal(linear(few, w), rows)
    many = torch.randn(ROWWISE_TOKENS + 3, 24)
    torch.testing.assert_close(linear(many, w), many @ w.float().t(), rtol=1e-6, atol=1e-6)


def test_half_rows_product_by_the_route_this_cpu_does_fast():
    """matmul_rows multiplies float16 rows with torch's half kernel only where the CPU has native
    float16 (elsewhere that kernel is scalar, ~9x slower than the float32 chunks): both routes give
    the float32 product of the stored rows, up to float16 rounding, and a product that overflows
    float16 comes back finite."""
    from llmflash.compute import matmul_rows, native_float16

    bundles = torch.randn(300, 130).half()
    down = bundles[:, 64:128]  # a strided view, as the down columns of cached bundles are
    for T in (1, 5):
        h = torch.randn(T, 300)
        exact = h @ down.float()
        got = matmul_rows(h, down)
        if native_float16():
            torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-2)
        else:
            torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-5)
    h = torch.full((1, 300), 300.0)
    big = torch.full((300, 64), 60.0).half()  # 300 * 300 * 60 overflows float16's 65504
    torch.testing.assert_close(matmul_rows(h, big), h @ big.float())
