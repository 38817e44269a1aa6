"""Flash mode: exact mechanics against dense, honest byte counts, the memory budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.runtime.memory_plan import parse_budget, plan_memory
from llmflash.runtime.modes import RunOptions, ffn_factory
from llmflash.runtime.engine import Engine, process_read_bytes
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.runtime.selectors import make_selector, resolve_sparsity

PROMPT = [1, 17, 42, 99, 7, 250, 3, 18]


@pytest.fixture(scope="module", params=["llama-relu", "fatrelu", "opt", "llama-bias"])
def model(request, tmp_path_factory):
    if request.param == "llama-bias":  # SiLU: the magnitude selector, approximate by design
        base = tmp_path_factory.mktemp("silu")
        tiny_models.build("llama-bias", base / "hf")
        convert(base / "hf", base / "flash", dtype="float32", progress=False)
        return base / "flash", "silu"
    base = tmp_path_factory.mktemp(request.param)
    tiny_models.build(request.param, base / "hf")
    convert(base / "hf", base / "flash", dtype="float32", progress=False)
    return base / "flash", request.param


def room(path, ffn_share: float) -> str:
    """A budget holding the resident part, the KV cache, the selector's copy and `ffn_share` of the
    FFN (plus scratch rows): tiny test models are mostly resident, so a percentage of the stored
    model would not reach the FFN at all once the selector is charged."""
    d = FlashModelDir(path)
    plan = plan_memory(d, "100%", torch.float32)
    selector = make_selector(d, resolve_sparsity(d, None, "flash"), torch.float32)
    ffn = plan.row_bytes * plan.neurons_per_layer * plan.layers
    return f"{plan.resident_bytes + plan.kv_bytes + selector.nbytes() + int(ffn * ffn_share) + 64 * plan.row_bytes}B"


def engines(path, **kw):
    if str(kw.get("memory", "")).startswith("ffn:"):
        kw["memory"] = room(path, float(kw["memory"][4:]))
    dense = Engine(path)
    flash = Engine(path, ffn=ffn_factory(RunOptions(mode="flash", sparsity=None, **kw)))
    return dense, flash


@pytest.mark.parametrize("memory,window", [("ffn:1.0", 5), ("ffn:1.0", 1), ("ffn:0.8", 3)])
def test_oracle_flash_equals_dense(model, memory, window):
    path, kind = model
    if kind == "silu":  # magnitude oracle: half the neurons per token, approximate by design
        dense, flash = engines(path, memory=memory, window=window)
        result = flash.generate(PROMPT, 8, stop_at_eos=False)
        n = flash.config.intermediate_size * flash.config.num_layers
        assert result.stats["neurons_loaded"][0] <= n  # ran, within the cache
        selected = flash.ffn.selector.select(0, torch.randn(1, flash.config.hidden_size)).ids()
        assert len(selected) == flash.config.intermediate_size // 2
        return
    dense, flash = engines(path, memory=memory, window=window)
    cache_d = dense.model.new_cache(64)
    cache_f = flash.model.new_cache(64)
    ids = torch.tensor(PROMPT)
    torch.testing.assert_close(flash.model.forward(ids, cache_f), dense.model.forward(ids, cache_d),
                               rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(24):
        nxt = torch.randint(3, tiny_models.VOCAB, (1,), generator=gen)
        torch.testing.assert_close(flash.model.forward(nxt, cache_f), dense.model.forward(nxt, cache_d),
                                   rtol=1e-5, atol=1e-5)
    log = flash.ffn.log
    # the exact selector's gate copy is charged to the budget, so even at 100% part of a selection
    # may be streamed through the scratch rows; the logits above are exact either way
    assert flash.ffn.plan.planned_bytes <= flash.ffn.plan.budget_bytes
    if memory != "ffn:1.0":
        plan = flash.ffn.plan
        assert plan.capacity_per_layer < plan.neurons_per_layer
        assert max(log.rows_used) <= sum(plan.capacity(i) for i in range(plan.layers))


def test_selection_over_capacity_is_streamed_and_stays_exact(model):
    """A budget whose caches hold a few rows per layer: the rest of each selection goes through
    the scratch rows, so the logits still equal dense and the plan stays within the budget."""
    path, kind = model
    if kind == "silu":
        pytest.skip("magnitude oracle is approximate by design")
    d = FlashModelDir(path)
    roomy = plan_memory(d, "100%", torch.float32)
    selector = make_selector(d, resolve_sparsity(d, None, "flash"), torch.float32)
    budget = roomy.resident_bytes + roomy.kv_bytes + selector.nbytes() + roomy.row_bytes * (2 * roomy.layers + 70)
    dense, flash = engines(path, memory=f"{budget}B", window=3)
    plan = flash.ffn.plan
    assert plan.capacity_per_layer <= 5 and plan.scratch_rows >= 1
    assert plan.planned_bytes <= plan.budget_bytes
    cache_d, cache_f = dense.model.new_cache(64), flash.model.new_cache(64)
    ids = torch.tensor(PROMPT)
    torch.testing.assert_close(flash.model.forward(ids, cache_f), dense.model.forward(ids, cache_d),
                               rtol=1e-5, atol=1e-5)
    for nxt in [5, 77, 5, 301, 12]:
        t = torch.tensor([nxt])
        torch.testing.assert_close(flash.model.forward(t, cache_f), dense.model.forward(t, cache_d),
                                   rtol=1e-5, atol=1e-5)
    assert sum(flash.ffn.log.streamed) > 0


def test_cache_holds_window_and_reads_only_missing(model):
    path, kind = model
    if kind == "silu":
        pytest.skip("oracle needs a ReLU model")
    _, flash = engines(path, memory="ffn:1.0", window=2)
    result = flash.generate(PROMPT, 12, stop_at_eos=False)
    ffn = flash.ffn
    for cache in ffn.caches:
        cached = set(cache.row_neuron[: cache.n_used].tolist())
        assert len(cached) == cache.n_used
        assert all(cache.neuron_row[n] >= 0 for n in cached)
    loaded = result.stats["neurons_loaded"]
    assert len(loaded) == len(result.token_ids) - 1
    # the window of 2 keeps neurons: later tokens load fewer than all their active neurons
    assert sum(loaded) < sum(result.stats["rows_used"])


def test_reported_bytes_match_process_reads(tmp_path):
    """Cold O_DIRECT reads: the bytes the stats report are the bytes the kernel read."""
    tiny_models.build("llama-relu", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False)
    engine = Engine(tmp_path / "flash", ffn=ffn_factory(RunOptions(mode="flash", sparsity=None,
                                                                   memory="100%")))
    assert engine.ffn.file.direct, "O_DIRECT should work on this filesystem"
    before = process_read_bytes()
    result = engine.generate(PROMPT, 10, stop_at_eos=False)
    disk = process_read_bytes() - before
    reported = result.stats["ffn_bytes_read"]
    assert reported > 0
    assert abs(disk - reported) <= 64 * 1024, (disk, reported)


def test_budget_too_small_is_a_clear_error(model):
    path, kind = model
    with pytest.raises(LLMFlashError, match="cannot hold the resident part .* give at least"):
        Engine(path, ffn=ffn_factory(RunOptions(mode="hybrid", memory="5%")))


def test_budget_parsing():
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("2KiB", 0) == 2048
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    for bad in ("lots", "150%", "0%", "5 parsecs"):
        with pytest.raises(LLMFlashError):
            parse_budget(bad, 1000)


def test_memory_plan_respects_budget(model):
    path, _ = model
    d = FlashModelDir(path)
    plan = plan_memory(d, "80%", torch.float32, context=16)  # tiny models: a short KV cache
    assert plan.planned_bytes <= plan.budget_bytes
    assert plan.capacity_per_layer >= 1


@pytest.mark.parametrize("mode", ["naive", "hybrid", "mmap"])
def test_baselines_match_dense(model, mode):
    path, _ = model
    dense = Engine(path)
    other = Engine(path, ffn=ffn_factory(RunOptions(mode=mode, memory="95%", context=32)))
    a = dense.generate(PROMPT, 10, stop_at_eos=False).token_ids
    result = other.generate(PROMPT, 10, stop_at_eos=False)
    assert result.token_ids == a
    if mode == "naive":
        layers = FlashModelDir(path).layers
        assert result.stats["bytes_per_token"][0] >= sum(r.nbytes for r in layers)
    np.testing.assert_array_less(-1e-9, np.array(result.stats["compute_ms"]))


def test_peak_rss_within_budget_plus_overhead(tmp_path):
    """A flash run's peak RSS stays under budget + the runtime's own overhead (measured here)."""
    import json
    import subprocess
    import sys

    import transformers as tf

    from llmflash.tools.bench import FIXED_OVERHEAD_BYTES, runtime_overhead_bytes

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, hidden_act="relu",
                         max_position_embeddings=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False)
    model_bytes = sum(FlashModelDir(tmp_path / "flash").weights_nbytes().values())
    assert model_bytes > 100 * 2**20  # big enough that the budget matters against the overhead
    proc = subprocess.run([sys.executable, "-m", "llmflash", "generate", str(tmp_path / "flash"),
                           "--ids", ",".join(str(i) for i in range(1, 33)), "--max-new-tokens", "16",
                           "--mode", "flash", "--sparsity", "exact", "--lookahead",  # its staging too
                           "--memory", "50%", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    plan = out["stats"]["memory_plan"]
    # the selector's copy is inside the budget (every selector is charged)
    assert plan["extra_resident_bytes"] == out["stats"]["selector_bytes"] > 0
    limit = plan["budget_bytes"] + runtime_overhead_bytes() + FIXED_OVERHEAD_BYTES
    assert out["peak_rss_bytes"] <= limit, (out["peak_rss_bytes"], limit)


def test_ablation_reads_change_requests_not_results(model):
    """--reads bundle|part (the paper's I/O ablation) issue more, smaller requests for the same
    bundles: logits equal the planned run's; one read per bundle, then more than one per bundle."""
    path, kind = model
    if kind == "silu":
        pytest.skip("exact selection needs a ReLU model")
    runs = {}
    for policy in ("planned", "bundle", "part"):
        _, flash = engines(path, memory="ffn:0.8", window=3, reads=policy)
        cache = flash.model.new_cache(64)
        logits = [flash.model.forward(torch.tensor(PROMPT), cache)]
        for nxt in [5, 77, 5, 301, 12]:
            logits.append(flash.model.forward(torch.tensor([nxt]), cache))
        runs[policy] = (torch.cat(logits), flash.ffn.log)
    for policy in ("bundle", "part"):
        torch.testing.assert_close(runs[policy][0], runs["planned"][0], rtol=0, atol=0)
    loaded = sum(runs["planned"][1].neurons_loaded[1:])
    assert loaded > 0 and all(sum(log.neurons_loaded[1:]) == loaded for _, log in runs.values())
    reads = {policy: sum(log.reads[1:]) for policy, (_, log) in runs.items()}
    assert reads["planned"] < reads["bundle"] < reads["part"], reads
    assert reads["bundle"] >= loaded


def test_release_freed_heap_returns_fragmented_pages():
    """Freed heap memory (what loading leaves behind in glibc's heap) leaves RSS once released."""
    import ctypes
    import gc

    from llmflash.runtime.memory_plan import release_freed_heap

    try:
        ctypes.CDLL(None).malloc_trim
    except AttributeError:
        pytest.skip("not glibc: malloc_trim does not exist and release_freed_heap does nothing")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    release_freed_heap()
    # Freeing a 16 MiB block raises glibc's mmap threshold to 16 MiB, so the 4 MiB blocks below come
    # from the heap; every tenth one is kept, which pins the heap's top as loading does with its tensors.
    big = torch.ones(4 * 2**20)
    del big
    blocks = [torch.ones(2**20) for _ in range(100)]  # 4 MiB each
    kept = blocks[9::10]
    del blocks
    gc.collect()
    before = rss()
    release_freed_heap()
    after = rss()
    assert sum(t.numel() for t in kept) == 10 * 2**20
    assert before - after > 200 * 2**20, (before, after)  # ~90 freed blocks: 360 MiB
