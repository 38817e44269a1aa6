"""Tests for the per-layer neuron cache with windowing (llmflash/cache/neuron_cache.py).

The property tests replay random token sequences against a plain-Python reference: a deque of the
sets admitted for the last tokens, trimmed to the window and then, while the union plus the pinned
neurons exceeds the capacity, shortened from the oldest end. That is the paper's rule (§4, §6)
written the slow, obvious way, so the vectorised cache must agree with it step by step.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmflash.runtime.neuron_cache import AdmitPlan, NeuronCache
from llmflash.errors import LLMFlashError

ROW_WIDTH = 3


def bundle(ids: np.ndarray) -> torch.Tensor:
    """Row data derived from the neuron id, so a row that lands under the wrong neuron shows."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return (ids[:, None] * ROW_WIDTH + torch.arange(ROW_WIDTH)).to(torch.float32)


class Reference:
    """The window rule with Python sets: slow and obviously right."""

    def __init__(self, capacity: int, window: int, pinned: set[int]) -> None:
        self.capacity = capacity
        self.window = window
        self.pinned = pinned
        self.history: deque[set[int]] = deque()

    def step(self, active: list[int]) -> tuple[set[int], list[int], int]:
        """Return (cached set after the step, dropped ids, window_used)."""
        slots = self.capacity - len(self.pinned)
        unpinned = [i for i in active if i not in self.pinned]
        kept, dropped = unpinned[:slots], unpinned[slots:]
        self.history.append(set(kept))
        while len(self.history) > self.window:
            self.history.popleft()
        while len(set().union(*self.history)) > slots:
            self.history.popleft()
        return set().union(*self.history) | self.pinned, dropped, len(self.history)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, list[int], list[list[int]]]:
    n = draw(st.integers(1, 40))
    pinned = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=min(n, 4)))
    capacity = draw(st.integers(len(pinned), n + 2))
    window = draw(st.integers(1, 6))
    # Arbitrary sets (large ones force shrinks and drops) mixed with sets over a few low ids
    # (heavy overlap between tokens, so the window keeps neurons that come back).
    any_ids = st.lists(st.integers(0, n - 1), unique=True, max_size=n)
    low_ids = st.lists(st.integers(0, min(n - 1, 7)), unique=True, max_size=min(n, 8))
    token = any_ids | low_ids
    tokens = draw(st.lists(token, min_size=1, max_size=25))
    return n, capacity, window, pinned, tokens


def check_step(cache: NeuronCache, ref: Reference, active: list[int], before: set[int]) -> None:
    plan = cache.step(np.array(active, dtype=np.int64))
    want, want_dropped, want_window = ref.step(active)
    cache.check()  # (b) maps consistent, no duplicates, free rows are -1

    # (d) capacity is a hard limit.
    assert cache.n_used <= cache.capacity
    # (a) cached set == union of the last window_used tokens (plus pinned).
    got = set(cache.row_neuron[: cache.n_used].tolist())
    assert got == want
    assert plan.window_used == want_window
    assert 1 <= plan.window_used <= cache.window
    assert plan.dropped.tolist() == want_dropped
    # Let --hypothesis-show-statistics confirm the shrink and drop paths are exercised.
    if plan.window_used < min(cache.t + 1, cache.window):
        event("window shrunk")
    if len(plan.dropped):
        event("neurons dropped")
    if plan.moved:
        event("rows moved")
    assert not (set(plan.dropped.tolist()) & got)
    # (c) nothing admitted while cached; everything admitted was asked for, in ascending order.
    loaded = plan.neurons.tolist()
    assert not (set(loaded) & before)
    assert set(loaded) <= set(active)
    assert loaded == sorted(loaded)
    assert set(loaded) == (want - before)
    assert plan.evicted == len(before - got)
    rows = plan.rows.tolist()
    assert rows == sorted(set(rows)) and len(rows) == len(loaded)
    if cache.reuse_holes:
        # New neurons take the evicted rows first, so only the surplus of evictions moves rows.
        assert plan.moved <= max(0, plan.evicted - len(loaded))
    else:
        # Admitted rows are the contiguous block at the end of the used range.
        assert rows == list(range(cache.n_used - len(loaded), cache.n_used))
        assert plan.moved <= plan.evicted
    assert sorted(cache.unfilled_rows().tolist()) == plan.rows.tolist()

    cache.fill(plan, bundle(plan.neurons).numpy())
    # (e) every cached neuron's row still holds that neuron's data after moves.
    ids = cache.row_neuron[: cache.n_used]
    assert torch.equal(cache.used_rows(), bundle(ids))
    assert (cache.rows_of(ids) == np.arange(cache.n_used)).all()


@pytest.mark.parametrize("reuse_holes", [False, True])
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_matches_reference(
    reuse_holes: bool, scenario: tuple[int, int, int, list[int], list[list[int]]]
) -> None:
    n, capacity, window, pinned, tokens = scenario
    cache = NeuronCache(
        n, capacity, ROW_WIDTH, window, pinned=np.array(pinned), reuse_holes=reuse_holes, debug=True
    )
    init = cache.initial_plan()
    assert init.neurons.tolist() == sorted(pinned)
    assert init.rows.tolist() == list(range(len(pinned)))
    cache.fill(init, bundle(init.neurons))
    ref = Reference(capacity, window, set(pinned))
    for active in tokens:
        before = set(cache.row_neuron[: cache.n_used].tolist())
        check_step(cache, ref, active, before)

    # A new sequence starts from the pinned rows alone, their data intact.
    cache.reset()
    cache.check()
    assert cache.n_used == len(pinned)
    assert torch.equal(cache.used_rows(), bundle(sorted(pinned)))
    ref = Reference(capacity, window, set(pinned))
    for active in tokens[:3]:
        check_step(cache, ref, active, set(cache.row_neuron[: cache.n_used].tolist()))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.lists(st.integers(0, n - 1), unique=True, max_size=n), max_size=15),
        )
    )
)
def test_full_capacity_window_one_loads_what_is_missing(
    scenario: tuple[int, list[list[int]]],
) -> None:
    """(f) With room for every neuron and a 1-token window, each step loads active - previous."""
    n, tokens = scenario
    cache = NeuronCache(n, n, ROW_WIDTH, window=1)
    previous: set[int] = set()
    for active in tokens:
        plan = cache.step(np.array(active, dtype=np.int64))
        assert plan.neurons.tolist() == sorted(set(active) - previous)
        assert plan.evicted == len(previous - set(active))
        assert plan.window_used == 1 and len(plan.dropped) == 0
        assert set(cache.cached().tolist()) == set(active)
        cache.fill(plan, bundle(plan.neurons))
        assert torch.equal(cache.used_rows(), bundle(cache.cached()))
        previous = set(active)


def test_window_keeps_union_and_loads_only_new() -> None:
    cache = NeuronCache(20, 20, ROW_WIDTH, window=3)
    assert cache.step(np.array([1, 2])).neurons.tolist() == [1, 2]
    assert cache.step(np.array([2, 3])).neurons.tolist() == [3]
    plan = cache.step(np.array([4]))
    assert plan.neurons.tolist() == [4] and plan.evicted == 0 and plan.window_used == 3
    # Token 0's set ({1, 2}) leaves the window; 2 stays because token 1 used it.
    plan = cache.step(np.array([5]))
    assert plan.evicted == 1 and set(cache.cached().tolist()) == {2, 3, 4, 5}


def test_shrink_window_when_union_exceeds_capacity() -> None:
    cache = NeuronCache(10, 4, ROW_WIDTH, window=4)
    for ids in ([0], [1], [2]):
        plan = cache.step(np.array(ids))
        cache.fill(plan, bundle(plan.neurons))
    assert plan.window_used == 3 and cache.n_used == 3
    # {0,1,2} ∪ {3,4} = 5 > 4: the oldest token ({0}) is dropped, then it fits.
    plan = cache.step(np.array([3, 4]))
    cache.fill(plan, bundle(plan.neurons))
    assert plan.window_used == 3 and plan.evicted == 1 and len(plan.dropped) == 0
    assert set(cache.cached().tolist()) == {1, 2, 3, 4}
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))
    # The shrink persists: the history now starts at token 1, so the next token's window
    # holds tokens 1..4 at most and {5, 6} pushes out tokens 1 and 2.
    plan = cache.step(np.array([5, 6]))
    assert plan.window_used == 2 and set(cache.cached().tolist()) == {3, 4, 5, 6}
    # The window grows back once tokens are small again.
    plan = cache.step(np.array([6]))
    assert plan.window_used == 3
    plan = cache.step(np.array([6]))
    assert plan.window_used == 4 and set(cache.cached().tolist()) == {3, 4, 5, 6}
    plan = cache.step(np.array([6]))
    assert plan.window_used == 4 and set(cache.cached().tolist()) == {5, 6}


def test_drop_lowest_priority_when_token_alone_exceeds_capacity() -> None:
    pinned = np.array([9])
    cache = NeuronCache(12, 4, ROW_WIDTH, window=3, pinned=pinned)
    cache.fill(cache.initial_plan(), bundle(pinned))
    plan = cache.step(np.array([0, 1]))
    cache.fill(plan, bundle(plan.neurons))
    # 3 slots beside the pinned neuron; priority order 7, 9 (pinned, free), 5, 1, 0, 2.
    plan = cache.step(np.array([7, 9, 5, 1, 0, 2]))
    assert plan.dropped.tolist() == [0, 2]
    assert plan.window_used == 1
    assert plan.neurons.tolist() == [5, 7]  # 1 was cached already; ascending for flash
    assert cache.n_used == 4 and set(cache.cached().tolist()) == {9, 7, 5, 1}
    assert cache.rows_of(np.array([0, 2])).tolist() == [-1, -1]
    cache.fill(plan, bundle(plan.neurons))
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))
    assert cache.cached()[0] == 9  # pinned rows never move


def test_pinned_fill_once_and_never_evicted() -> None:
    cache = NeuronCache(8, 5, ROW_WIDTH, window=1, pinned=np.array([6, 2]), debug=True)
    plan = cache.initial_plan()
    assert plan.neurons.tolist() == [2, 6] and plan.rows.tolist() == [0, 1]
    with pytest.raises(AssertionError):
        cache.used_rows()  # pinned rows not filled yet
    cache.fill(plan, bundle(plan.neurons))
    for ids in ([0, 2], [1], [3, 4, 5]):
        step = cache.step(np.array(ids))
        assert 2 not in step.neurons.tolist() and 6 not in step.neurons.tolist()
        cache.fill(step, bundle(step.neurons))
    assert cache.cached()[:2].tolist() == [2, 6]
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))


def test_moves_swap_last_rows_into_holes() -> None:
    cache = NeuronCache(10, 10, ROW_WIDTH, window=1)
    plan = cache.step(np.arange(6))
    cache.fill(plan, bundle(plan.neurons))
    rows_tensor = cache.rows
    # Evict neurons in rows 1 and 2; rows 4 and 5 move down, rows 0 and 3 stay.
    plan = cache.step(np.array([0, 3, 4, 5]))
    assert plan.evicted == 2 and plan.moved == 2 and len(plan.neurons) == 0
    assert cache.row_neuron[:4].tolist() == [0, 4, 5, 3]
    assert cache.row_neuron[4:].tolist() == [-1] * 6
    assert cache.rows is rows_tensor  # never reallocated
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))


def test_unfilled_row_is_caught_in_debug() -> None:
    cache = NeuronCache(10, 10, ROW_WIDTH, window=2, debug=True)
    plan = cache.step(np.array([3, 1]))
    assert cache.unfilled_rows().tolist() == [0, 1]
    with pytest.raises(AssertionError):
        cache.used_rows()
    cache.fill(plan, bundle(plan.neurons))
    assert cache.used_rows().shape == (2, ROW_WIDTH)


def test_fill_rejects_stale_plan_and_bad_shape() -> None:
    cache = NeuronCache(10, 10, ROW_WIDTH, window=1)
    plan = cache.step(np.array([1, 2]))
    with pytest.raises(LLMFlashError):
        cache.fill(plan, torch.zeros(3, ROW_WIDTH))
    cache.step(np.array([5]))  # evicts 1 and 2, row 0 now holds 5
    with pytest.raises(LLMFlashError):
        cache.fill(plan, bundle(plan.neurons))


def test_fill_converts_dtype() -> None:
    cache = NeuronCache(10, 4, 2, window=1, dtype=torch.bfloat16)
    plan = cache.step(np.array([4, 2]))
    cache.fill(plan, np.array([[1.5, 2.0], [3.0, 4.5]], dtype=np.float16))
    assert cache.used_rows().dtype == torch.bfloat16
    assert cache.used_rows().float().tolist() == [[1.5, 2.0], [3.0, 4.5]]


def test_bad_arguments() -> None:
    with pytest.raises(LLMFlashError):
        NeuronCache(10, 2, 4, window=1, pinned=np.array([1, 2, 3]))
    with pytest.raises(LLMFlashError):
        NeuronCache(10, 4, 4, window=0)
    with pytest.raises(LLMFlashError):
        NeuronCache(10, 4, 4, window=1, pinned=np.array([10]))
    cache = NeuronCache(10, 4, 4, window=1, debug=True)
    with pytest.raises(LLMFlashError):
        cache.step(np.array([10]))
    with pytest.raises(LLMFlashError):
        cache.step(np.array([-1]))
    with pytest.raises(LLMFlashError):
        cache.step(np.array([1, 1]))


def test_empty_step_and_zero_capacity() -> None:
    cache = NeuronCache(5, 0, 2, window=2)
    plan = cache.step(np.array([1, 2]))
    assert isinstance(plan, AdmitPlan) and len(plan) == 0
    assert plan.dropped.tolist() == [1, 2] and cache.n_used == 0
    cache = NeuronCache(5, 3, 2, window=2)
    cache.step(np.array([1]))
    plan = cache.step(np.array([], dtype=np.int64))
    assert len(plan) == 0 and cache.n_used == 1 and plan.window_used == 2
    plan = cache.step(np.array([], dtype=np.int64))
    assert cache.n_used == 0 and plan.evicted == 1


def test_unfilled_flag_moves_with_its_row() -> None:
    cache = NeuronCache(10, 10, ROW_WIDTH, window=1, debug=True)
    plan = cache.step(np.array([0, 1, 2]))
    cache.fill(plan, bundle(plan.neurons))
    late = cache.step(np.array([0, 1, 2, 3]))  # 3 goes to row 3 and is not filled
    cache.step(np.array([3]))  # 0, 1, 2 leave; 3 moves down to row 0, still unfilled
    assert cache.row_neuron[0] == 3 and cache.unfilled_rows().tolist() == [0]
    with pytest.raises(AssertionError):
        cache.used_rows()
    with pytest.raises(LLMFlashError):
        cache.fill(late, bundle(late.neurons))  # its row moved: refused, not misplaced


def test_reuse_holes_puts_new_neurons_in_evicted_rows() -> None:
    cache = NeuronCache(10, 10, ROW_WIDTH, window=1, reuse_holes=True)
    plan = cache.step(np.arange(6))
    cache.fill(plan, bundle(plan.neurons))
    # 1 and 2 leave (rows 1, 2), 7 and 8 arrive: they take rows 1 and 2, nothing moves.
    plan = cache.step(np.array([0, 3, 4, 5, 8, 7]))
    assert plan.neurons.tolist() == [7, 8] and plan.rows.tolist() == [1, 2]
    assert plan.evicted == 2 and plan.moved == 0 and cache.n_used == 6
    cache.fill(plan, bundle(plan.neurons))
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))
    # 0, 7, 3 leave (rows 0, 1, 3), 9 arrives: it takes row 0, the used range shrinks to 4 rows,
    # and the survivors above it (rows 4, 5) move into the remaining holes (rows 1, 3).
    plan = cache.step(np.array([9, 8, 4, 5]))
    assert plan.rows.tolist() == [0] and plan.evicted == 3 and plan.moved == 2
    assert cache.row_neuron[:4].tolist() == [9, 4, 8, 5] and cache.n_used == 4
    cache.fill(plan, bundle(plan.neurons))
    assert torch.equal(cache.used_rows(), bundle(cache.cached()))
