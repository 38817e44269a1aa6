"""The decode pipeline (docs/FLASH.md, "Overlap"): a layer's new neurons read while the FFN over its
cached rows computes (overlap, on by default), and lookahead reads of layer l+1 during layer l.

Both only change when bytes arrive: a run with either must give the same tokens and bit-identical
logits as a run without it (the lookahead whether its guesses are good or deliberately wrong); the
lookahead's staging buffer is charged to the budget; the background reads return the bytes on disk.
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
from llmflash.conversion.writer import convert
from llmflash.format.layout import QUANTIZED_ROWS, FlashModelDir
from llmflash.runtime.engine import Engine
from llmflash.runtime.kernel_aio import KernelAIO, kernel_aio_available
from llmflash.runtime.memory_plan import plan_memory
from llmflash.runtime.modes import RunOptions, ffn_factory, selector_dtype
from llmflash.runtime.providers import FlashFFN
from llmflash.runtime.reader import FlashFile, FlashReader, aligned_empty
from llmflash.runtime.read_planner import plan_reads
from llmflash.runtime.selectors import make_selector, resolve_sparsity

pytestmark = pytest.mark.skipif(not kernel_aio_available(), reason="the pipeline needs kernel AIO")

PROMPT = [1, 17, 42, 99, 7, 250, 3, 18]
STEPS = [5, 77, 5, 301, 12, 9, 140, 33]


@pytest.fixture(scope="module")
def relu(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("lookahead")
    tiny_models.build("llama-relu", base / "hf")
    convert(base / "hf", base / "flash", dtype="float32", progress=False)
    return base / "flash"


def budget(path: Path, ffn_share: float) -> str:
    """Resident part + KV + the exact selector's copy + `ffn_share` of the FFN + room for scratch
    and staging rows (tiny models are mostly resident)."""
    d = FlashModelDir(path)
    held = QUANTIZED_ROWS if d.quantized else torch.float32  # what the engine holds weights at
    plan = plan_memory(d, "1GiB", held)  # only its sizes are used
    selector = make_selector(d, resolve_sparsity(d, None, "flash"), selector_dtype(d, held))
    ffn = plan.row_bytes * plan.neurons_per_layer * plan.layers
    return f"{plan.resident_bytes + plan.kv_bytes + selector.nbytes() + int(ffn * ffn_share) + 160 * plan.row_bytes}B"


def flash(path: Path, lookahead: bool, memory: str, overlap: bool = True) -> Engine:
    return Engine(path, ffn=ffn_factory(RunOptions(mode="flash", memory=memory, window=3, lookahead=lookahead,
                                                   overlap=overlap)))


def pair(path: Path, memory: str, overlap: bool = False) -> tuple[Engine, Engine]:
    """Flash without and with the lookahead over the same memory plan (the one with the staging
    buffer), so the caches have the same rows and the same selections give the same arithmetic.
    overlap=True: the second engine has the in-layer overlap instead of the lookahead."""
    on = flash(path, not overlap, memory, overlap=overlap)
    plan = on.ffn.plan

    def build(model_dir, dtype):
        selector = make_selector(model_dir, resolve_sparsity(model_dir, None, "flash"), selector_dtype(model_dir, dtype))
        return FlashFFN(model_dir, dtype, selector, plan, 3, FlashReader(), lookahead=False, overlap=False)

    return Engine(path, ffn=build), on


def run_logits(engine: Engine) -> list[torch.Tensor]:
    cache = engine.model.new_cache(64)
    engine.ffn.begin_generation()
    out = [engine.model.forward(torch.tensor(PROMPT), cache)]
    for t in STEPS:
        out.append(engine.model.forward(torch.tensor([t]), cache))
    return out


class WrongGuess:
    """Wraps a selector: selections unchanged, lookahead deliberately wrong (the neurons the layer's
    selection on the earlier input does NOT pick, weakest first)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def select(self, layer, x):
        return self.inner.select(layer, x)

    def lookahead(self, layer, x):
        chosen = self.inner.select(layer, x).mask.any(0).numpy()
        return np.flatnonzero(~chosen)[::-1].astype(np.int64)


@pytest.mark.parametrize("share", [1.0, 0.3, 0.05])
def test_same_logits_with_and_without_lookahead(relu, share):
    """Bit-identical logits: the lookahead only changes where bytes come from (roomy budget, a
    budget whose window shrinks, and one whose selections overflow into the scratch rows)."""
    off, on = pair(relu, budget(relu, share))
    assert on.ffn.lookahead and not off.ffn.lookahead
    for a, b in zip(run_logits(off), run_logits(on)):
        assert torch.equal(a, b)
    log = on.ffn.log
    assert sum(log.la_hits) > 0  # the guesses were used
    assert sum(log.io_hidden_s) > 0
    assert on.ffn.plan.planned_bytes <= on.ffn.plan.budget_bytes
    if share == 0.05:
        assert sum(log.streamed) > 0


@pytest.mark.parametrize("share", [1.0, 0.3, 0.05])
def test_same_logits_with_and_without_overlap(relu, share):
    """The in-layer overlap reads a token's new neurons while the cached rows compute: bit-identical
    logits and the same bundles loaded as reading first (same plan), some I/O hidden, nothing of
    the lookahead's."""
    off, on = pair(relu, budget(relu, share), overlap=True)
    assert on.ffn.overlap and on.ffn.can_overlap and not off.ffn.overlap and not on.ffn.lookahead
    for a, b in zip(run_logits(off), run_logits(on)):
        assert torch.equal(a, b)
    assert on.ffn.log.neurons_loaded == off.ffn.log.neurons_loaded
    assert on.ffn.log.bytes == off.ffn.log.bytes
    assert sum(on.ffn.log.io_hidden_s) > 0 and sum(off.ffn.log.io_hidden_s) == 0
    assert sum(on.ffn.log.la_fetched) == 0
    assert on.ffn.caches[0].unfilled_rows().size == 0  # every background read landed in its rows
    if share == 0.05:
        assert sum(on.ffn.log.streamed) > 0


def test_same_logits_with_and_without_overlap_on_quantized_rows(tmp_path_factory):
    """int8 rows (dequantized per token, the selection's rows only): the same split, the same bits."""
    base = tmp_path_factory.mktemp("overlap-int8")
    tiny_models.build("llama-relu", base / "hf")
    path = convert(base / "hf", base / "flash", dtype="int8", progress=False).path
    off, on = pair(path, budget(path, 0.3), overlap=True)
    assert on.ffn.quant and on.ffn.summary()["overlap"]["on"]
    for a, b in zip(run_logits(off), run_logits(on)):
        assert torch.equal(a, b)
    assert on.ffn.log.neurons_loaded == off.ffn.log.neurons_loaded and sum(on.ffn.log.io_hidden_s) > 0


def test_deliberately_wrong_lookahead_changes_nothing(relu):
    off, bad = pair(relu, budget(relu, 0.3))
    bad.ffn.selector = WrongGuess(bad.ffn.selector)
    for a, b in zip(run_logits(off), run_logits(bad)):
        assert torch.equal(a, b)
    log = bad.ffn.log
    # mostly read for nothing (the complement on one input still overlaps the next input's set)
    assert sum(log.la_wasted) > sum(log.la_fetched) / 2 > 0
    # the misses were read on demand: the same bundles loaded as without lookahead
    assert log.neurons_loaded == off.ffn.log.neurons_loaded


def test_generate_tokens_and_stats(relu):
    """A run with the lookahead on against one without (its own plan: no staging buffer, so a
    few more cache rows): the same tokens."""
    memory = budget(relu, 0.3)
    a = flash(relu, False, memory, overlap=False).generate(PROMPT, 8, stop_at_eos=False)
    b = flash(relu, True, memory).generate(PROMPT, 8, stop_at_eos=False)
    assert a.token_ids == b.token_ids
    s = b.stats
    assert s["lookahead"]["on"] and not a.stats["lookahead"]["on"]
    n = len(b.token_ids) - 1
    for key in ("io_wait_ms", "io_hidden_ms", "lookahead_recall", "lookahead_bytes", "lookahead_wasted_bytes"):
        assert len(s[key]) == n, key
    assert s["io_wait_ms"] == s["io_ms"]
    assert all(r is None or 0 <= r <= 1 for r in s["lookahead_recall"])
    assert all(w <= f * FlashModelDir(relu).bundle.nbytes for w, f in zip(s["lookahead_wasted_bytes"],
                                                                            s["lookahead_bundles"]))
    assert a.stats["io_hidden_ms"] == [0] * n


def test_staging_buffer_is_charged(relu):
    memory = budget(relu, 0.3)
    off, on = flash(relu, False, memory), flash(relu, True, memory)
    plan_off, plan_on = off.ffn.plan, on.ffn.plan
    assert plan_on.lookahead_rows > 0 and plan_off.lookahead_bytes == 0
    assert on.ffn._la_staging.size == plan_on.lookahead_bytes
    assert plan_on.budget_bytes == plan_off.budget_bytes
    assert plan_on.planned_bytes <= plan_on.budget_bytes
    # the buffer is paid for with cache rows, not on top of the budget
    assert plan_on.cache_bytes + plan_on.lookahead_bytes <= plan_off.cache_bytes + plan_on.row_bytes * plan_on.layers


def test_background_reads_return_the_bytes_on_disk(relu):
    d = FlashModelDir(relu)
    data = np.fromfile(d.ffn_path, dtype=np.uint8)
    bb = d.bundle.nbytes
    region = d.layers[1]
    slots = np.array([0, 3, 4, 9, region.neurons - 1])
    with FlashFile(d.ffn_path) as f, FlashReader() as reader:
        assert f.direct and reader.can_submit(f)
        plan = plan_reads(slots, bb, region.offset, reader.profile, f.align, reader.max_read_bytes)
        staging = aligned_empty(plan.staging_bytes)
        pending = reader.submit_bundles(f, region.offset, bb, slots, plan, staging)
        reader.read_bundles(f, region.offset, bb, np.array([1, 2]))  # on-demand reads meanwhile
        reader.wait(pending)
        for i, s in enumerate(slots.tolist()):
            at = int(plan.slot_positions[i])
            np.testing.assert_array_equal(staging[at : at + bb], data[region.offset + s * bb:][:bb])
        buf = aligned_empty(3 * bb + 4096)
        pending = reader.submit_range(f, region.offset + 5 * bb, 3 * bb, buf)
        reader.wait(pending)
        np.testing.assert_array_equal(buf[pending.head : pending.head + 3 * bb],
                                      data[region.offset + 5 * bb:][: 3 * bb])


def test_kernel_aio_one_batch_per_context(tmp_path):
    path = tmp_path / "f.bin"
    np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8).tofile(path)
    dest = aligned_empty(1 << 16)
    aio = KernelAIO(depth=4)
    try:
        with FlashFile(path, direct=True) as f:
            offsets = np.arange(16, dtype=np.int64) * 4096  # more reads than the depth
            batch = aio.submit(f.fd, dest, offsets, np.full(16, 4096, np.int64), offsets)
            with pytest.raises(Exception, match="still in flight"):
                aio.submit(f.fd, dest, offsets, np.full(16, 4096, np.int64), offsets)
            aio.poll(batch)
            got = aio.reap(batch)
            assert (got == 4096).all() and batch.done
        np.testing.assert_array_equal(dest, np.fromfile(path, dtype=np.uint8))
    finally:
        aio.close()


def test_cli_lookahead_flags(relu):
    """--lookahead turns the pipeline on; off is the default (and --no-lookahead says so explicitly)."""
    memory = budget(relu, 0.3)

    def generate(*extra):
        proc = subprocess.run([sys.executable, "-m", "llmflash", "generate", str(relu), "--ids", "1,17,42",
                               "--max-new-tokens", "4", "--mode", "flash", "--memory", memory, "--json", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    on, off, default = generate("--lookahead"), generate("--no-lookahead"), generate()
    assert on["stats"]["lookahead"]["on"] and not off["stats"]["lookahead"]["on"]
    assert not default["stats"]["lookahead"]["on"]
    assert on["token_ids"] == off["token_ids"]
    assert on["stats"]["memory_plan"]["lookahead_bytes"] > 0 == off["stats"]["memory_plan"]["lookahead_bytes"]


def test_replayed_lookahead_is_degraded_as_stated():
    """trace:PATH has no real lookahead predictor: its guess is the trace's own set at the stated
    recall and over-selection (synthetic, labelled), never the perfect set."""
    from llmflash.format.trace_file import Trace
    from llmflash.runtime.trace_selector import LOOKAHEAD_RATIO, LOOKAHEAD_RECALL, TraceSelector

    rng = np.random.default_rng(0)
    active = [rng.random((16, 4000)) < 0.1 for _ in range(3)]
    sel = TraceSelector(Trace.from_active(active, {"kind": "test"}))
    recall, ratio = [], []
    for step in range(12):
        sel.begin_pass(1)
        for layer in range(3):
            truth = np.flatnonzero(active[layer][sel.token])
            guess = sel.lookahead(layer, torch.zeros(1, 8))
            assert len(np.unique(guess)) == len(guess)
            recall.append(np.isin(truth, guess).mean())
            ratio.append(len(guess) / len(truth))
    assert abs(np.mean(recall) - LOOKAHEAD_RECALL) < 0.02
    assert abs(np.mean(ratio) - LOOKAHEAD_RATIO) < 0.02
    assert "synthetic" in sel.lookahead_kind and sel.summary()["lookahead_synthetic"]["recall"] == LOOKAHEAD_RECALL


def test_a_pass_that_raises_mid_overlap_leaves_a_consistent_cache(relu):
    """A pass interrupted while a layer's new neurons are in flight (Ctrl-C in `chat`): the batch is
    waited out, that layer starts over, and the next generation gives what a fresh engine gives."""
    memory = budget(relu, 0.3)
    engine = flash(relu, False, memory)
    engine.generate(PROMPT, 4, stop_at_eos=False)
    ffn = engine.ffn
    real = ffn._ffn_cached_except

    def interrupted(*args):
        assert ffn._in_layer is not None  # the new rows' reads are in flight right now
        raise KeyboardInterrupt

    ffn._ffn_cached_except = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.generate(STEPS, 4, stop_at_eos=False)
    ffn._ffn_cached_except = real
    after = engine.generate(STEPS, 6, stop_at_eos=False)
    fresh = flash(relu, False, memory).generate(STEPS, 6, stop_at_eos=False)
    assert after.token_ids == fresh.token_ids
    assert ffn._in_layer is None and all(c.unfilled_rows().size == 0 for c in ffn.caches)
