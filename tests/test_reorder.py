"""Co-activation layout: same model, neurons moved on flash, hot neurons pinnable."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import tiny_models
from llmflash.conversion.writer import convert
from llmflash.runtime.modes import RunOptions, ffn_factory
from llmflash.runtime.engine import Engine
from llmflash.errors import LLMFlashError
from llmflash.format.layout import FlashModelDir
from llmflash.tools.reorder import coactivation_order, reorder

PROMPT = [1, 17, 42, 99, 7, 250, 3, 18]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("reorder")
    tiny_models.build("llama-relu", base / "hf")
    convert(base / "hf", base / "plain", dtype="float32", progress=False)
    convert(base / "hf", base / "ordered", dtype="float32", progress=False)
    text = base / "calib.txt"
    text.write_text(" ".join(tiny_models.TRAIN_TEXT) * 3)
    reorder(base / "ordered", text, tokens=400)
    return base / "plain", base / "ordered"


def test_layout_changes_but_model_does_not(models):
    plain, ordered = models
    d = FlashModelDir(ordered)
    assert d.verify() == []
    assert d.ffn_path.name != "ffn.bin" and not (ordered / "ffn.bin").exists()
    assert any(r.order is not None and list(r.order) != sorted(r.order) for r in d.layers)
    for r in d.layers:
        assert sorted(r.order) == list(range(r.neurons)) and r.hot
    a = Engine(plain).logits(PROMPT)
    b = Engine(ordered).logits(PROMPT)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flash_with_pinned_hot_neurons_equals_dense(models):
    _, ordered = models
    dense = Engine(ordered).generate(PROMPT, 12, stop_at_eos=False).token_ids
    flash = Engine(ordered, ffn=ffn_factory(RunOptions(mode="flash", sparsity=None,
                                                       memory="95%", window=2, pin=0.1)))
    result = flash.generate(PROMPT, 12, stop_at_eos=False)
    assert result.token_ids == dense
    assert all(p > 0 for p in result.stats["pinned_per_layer"])


def test_pin_needs_statistics(models):
    plain, _ = models
    with pytest.raises(LLMFlashError, match="llmflash reorder"):
        Engine(plain, ffn=ffn_factory(RunOptions(mode="flash", sparsity=None, memory="95%", pin=0.1)))


def test_chain_puts_coactive_neurons_together():
    rng = np.random.default_rng(0)
    groups = rng.permutation(40).reshape(8, 5)  # 8 groups of 5 neurons that always fire together
    active = np.zeros((200, 40), dtype=bool)
    for t in range(200):
        for g in rng.choice(8, 2, replace=False):
            active[t, groups[g]] = True
    order = coactivation_order(active)
    position = np.argsort(order)
    for g in groups:
        span = position[g].max() - position[g].min()
        assert span == 4, (g, position[g])


def test_cache_sizes_follow_window_statistics(models):
    from llmflash.runtime.memory_plan import plan_memory

    _, ordered = models
    d = FlashModelDir(ordered)
    assert all(r.window_union and len(r.window_union) == 8 for r in d.layers)
    for r in d.layers:  # a bigger window never holds fewer neurons
        assert all(a <= b + 1e-9 for a, b in zip(r.window_union, r.window_union[1:]))
    uniform = plan_memory(d, "90%", torch.float32)
    sized = plan_memory(d, "90%", torch.float32, window=3)
    assert sized.sized_from.startswith("window statistics") and uniform.sized_from == "uniform"
    assert sized.planned_bytes <= sized.budget_bytes
    assert sum(sized.capacities) <= uniform.capacity_per_layer * uniform.layers + uniform.layers


def test_predictors_stay_valid_after_reorder(tmp_path):
    """Neuron ids do not change, so predictors trained before `reorder` load and select the same
    neurons after it; flash mode with them still runs from the new bundle file."""
    from llmflash.tools.calibrate import calibrate
    from llmflash.runtime.predictors import PredictorSet
    from llmflash.runtime.selectors import PredictorSelector
    from llmflash.tools.train_predictors import TrainOptions

    tiny_models.build("llama-relu", tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "flash", dtype="float32", progress=False).path
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(tiny_models.TRAIN_TEXT) * 3)
    calibrate(path, text, tokens=600, window=100, train=True,
              train_options=TrainOptions(rank=16, epochs=1, min_steps=50), progress=False,
              log=lambda *a: None)
    x = torch.randn(2, FlashModelDir(path).config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = [PredictorSelector(PredictorSet.load(FlashModelDir(path))).select(l, x).ids() for l in range(2)]
    reorder(path, text, tokens=400)
    d = FlashModelDir(path)
    assert d.ffn_path.name != "ffn.bin"
    after = PredictorSelector(PredictorSet.load(d))
    for l, ids in enumerate(before):
        np.testing.assert_array_equal(after.select(l, x).ids(), ids)
    flash = Engine(path, ffn=ffn_factory(RunOptions(mode="flash", sparsity="predictor", memory="100%")))
    assert len(flash.generate(PROMPT, 4, stop_at_eos=False).token_ids) == 4
