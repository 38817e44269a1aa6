"""Read planning: every wanted byte covered, reads aligned and disjoint, merging monotone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash.errors import LLMFlashError
from llmflash.runtime.read_planner import (
    DEFAULT_PROFILE,
    PROFILE_ENV,
    DeviceProfile,
    ReadPlan,
    default_profile_path,
    load_default_profile,
    plan_reads,
)

ALIGNS = st.sampled_from([512, 4096])


@st.composite
def planning_cases(draw: st.DrawFn) -> dict:
    align = draw(ALIGNS)
    bundle_bytes = draw(st.integers(1, 9000))
    n_slots = draw(st.integers(1, 400))
    slots = draw(st.lists(st.integers(0, n_slots * 2), min_size=1, max_size=120))
    return {
        "slots": np.array(slots, dtype=np.int64),
        "bundle_bytes": bundle_bytes,
        "base_offset": draw(st.integers(0, 3)) * 4096,
        "align": align,
        "max_read_bytes": align * draw(st.sampled_from([1, 2, 7, 64, 2048])),
        "gap": draw(st.sampled_from([0.0, 600.0, 5000.0, 15_000.0, 1e5])),
    }


def _plan(case: dict, gap: float | None = None) -> ReadPlan:
    return plan_reads(
        case["slots"], case["bundle_bytes"], case["base_offset"], DEFAULT_PROFILE,
        align=case["align"], max_read_bytes=case["max_read_bytes"],
        merge_gap_bytes=case["gap"] if gap is None else gap,
    )


def _staging_file_offsets(plan: ReadPlan) -> np.ndarray:
    """For each staging byte, the file offset it was read from (what the reader fills in)."""
    if plan.n_reads == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(o, o + n) for o, n in zip(plan.offsets, plan.lengths)])


@settings(max_examples=150, deadline=None)
@given(planning_cases())
def test_every_wanted_byte_lands_where_the_plan_says(case: dict) -> None:
    plan = _plan(case)
    source = _staging_file_offsets(plan)
    bb = case["bundle_bytes"]
    expected = case["base_offset"] + case["slots"][:, None] * bb + np.arange(bb)
    got = source[plan.slot_positions[:, None] + np.arange(bb)]
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=150, deadline=None)
@given(planning_cases())
def test_reads_are_aligned_bounded_sorted_and_disjoint(case: dict) -> None:
    plan = _plan(case)
    align, cap = case["align"], case["max_read_bytes"]
    assert np.all(plan.offsets % align == 0)
    assert np.all(plan.lengths % align == 0)
    assert np.all((plan.lengths > 0) & (plan.lengths <= cap))
    assert np.all(plan.offsets[1:] >= plan.offsets[:-1] + plan.lengths[:-1])
    assert np.array_equal(plan.buffer_offsets, np.concatenate(([0], np.cumsum(plan.lengths)[:-1])))
    assert plan.staging_bytes == plan.lengths.sum()
    assert plan.wanted_bytes == np.unique(case["slots"]).size * case["bundle_bytes"]


@settings(max_examples=150, deadline=None)
@given(planning_cases(), st.sampled_from([0.0, 512.0, 4000.0, 15_000.0, 64_000.0, 1e6]))
def test_larger_merge_gap_never_increases_reads(case: dict, other_gap: float) -> None:
    small, large = sorted([case["gap"], other_gap])
    assert _plan(case, large).n_reads <= _plan(case, small).n_reads


def _runs_of_touching_ranges(slots: np.ndarray, bb: int, base: int, align: int) -> int:
    unique = np.unique(slots)
    first = base + unique * bb
    starts = first // align * align
    ends = -(-(first + bb) // align) * align
    return 1 + int(np.sum(starts[1:] > ends[:-1]))


@settings(max_examples=100, deadline=None)
@given(planning_cases())
def test_zero_gap_gives_one_read_per_run_of_touching_ranges(case: dict) -> None:
    case = {**case, "max_read_bytes": 1 << 30}
    plan = _plan(case, gap=0.0)
    expected = _runs_of_touching_ranges(case["slots"], case["bundle_bytes"], case["base_offset"], case["align"])
    assert plan.n_reads == expected


def test_zero_gap_with_aligned_bundles_reads_each_run_of_adjacent_slots_once() -> None:
    slots = np.array([9, 3, 4, 5, 12, 10, 20])  # runs: 3-5, 9-10, 12, 20
    plan = plan_reads(slots, 16384, 4096, DEFAULT_PROFILE, merge_gap_bytes=0)
    assert plan.n_reads == 4
    assert plan.offsets.tolist() == [4096 + 3 * 16384, 4096 + 9 * 16384, 4096 + 12 * 16384, 4096 + 20 * 16384]
    assert plan.lengths.tolist() == [3 * 16384, 2 * 16384, 16384, 16384]


def test_default_gap_merges_one_missing_16k_bundle_but_not_two() -> None:
    gap = DEFAULT_PROFILE.merge_gap_bytes()
    assert 8192 < gap < 2 * 16384
    assert plan_reads(np.array([0, 1]), 8192, 0, DEFAULT_PROFILE).n_reads == 1
    assert plan_reads(np.array([0, 2]), 8192, 0, DEFAULT_PROFILE).n_reads == 1
    assert plan_reads(np.array([0, 5]), 8192, 0, DEFAULT_PROFILE).n_reads == 2


def test_duplicates_and_caller_order_are_kept() -> None:
    slots = np.array([7, 2, 7, 0])
    plan = plan_reads(slots, 1000, 4096, DEFAULT_PROFILE, merge_gap_bytes=0)
    source = _staging_file_offsets(plan)
    firsts = source[plan.slot_positions]
    assert firsts.tolist() == [4096 + 7000, 4096 + 2000, 4096 + 7000, 4096]
    assert plan.n_unique == 3


def test_empty_slots_give_an_empty_plan() -> None:
    plan = plan_reads(np.array([], dtype=np.int64), 3456, 0, DEFAULT_PROFILE)
    assert plan.n_reads == 0 and plan.total_bytes == 0 and plan.slot_positions.size == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_reads(np.array([-1]), 100, 0, DEFAULT_PROFILE)
    with pytest.raises(ValueError):
        plan_reads(np.array([1]), 100, 0, DEFAULT_PROFILE, max_read_bytes=1000)
    with pytest.raises(ValueError):
        plan_reads(np.array([1]), 0, 0, DEFAULT_PROFILE)


def test_cost_model_matches_storage_md() -> None:
    p = DEFAULT_PROFILE
    assert p.merge_gap_bytes() == pytest.approx(1.19e9 * (54 / 32 + 10.7) * 1e-6)
    assert 14_000 < p.merge_gap_bytes() < 16_000
    # 1024 random 16 KiB bundles: STORAGE.md measured 24-26 ms.
    assert 0.020 < p.read_seconds(1024, 1024 * 16384) < 0.030
    # Fewer reads than threads overlap only as many ways as there are reads.
    assert p.read_seconds(1, 4096) == pytest.approx((54 + 10.7) * 1e-6 + 4096 / 1.19e9)
    assert p.read_seconds(0, 0) == 0.0


def test_profile_round_trips_through_json(tmp_path) -> None:
    profile = DeviceProfile(a_us=40.0, s0_us=9.0, bandwidth_Bps=2e9, threads=16)
    path = profile.save(tmp_path / "sub" / "profile.json")
    assert json.loads(path.read_text())["a_us"] == 40.0
    loaded = DeviceProfile.load(path)
    assert loaded == profile and loaded.source == "default"


def test_default_profile_location_follows_env(tmp_path, monkeypatch) -> None:
    target = tmp_path / "p.json"
    monkeypatch.setenv(PROFILE_ENV, str(target))
    assert default_profile_path() == target
    assert load_default_profile() is DEFAULT_PROFILE
    DeviceProfile(a_us=1.0, s0_us=2.0, bandwidth_Bps=3e9).save(target)
    assert load_default_profile().s0_us == 2.0


def test_broken_profiles_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LLMFlashError, match="bad.json"):
        DeviceProfile.load(bad)
    bad.write_text(json.dumps({"a_us": 1.0}))
    with pytest.raises(LLMFlashError, match="bad.json"):
        DeviceProfile.load(bad)
    bad.write_text(json.dumps({"a_us": 1.0, "s0_us": 1.0, "bandwidth_Bps": -5}))
    with pytest.raises(LLMFlashError, match="bad.json"):
        DeviceProfile.load(bad)
    with pytest.raises(LLMFlashError, match="missing.json"):
        DeviceProfile.load(tmp_path / "missing.json")


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        DeviceProfile(a_us=math.nan, s0_us=1.0, bandwidth_Bps=1e9)
    with pytest.raises(ValueError):
        DeviceProfile(a_us=1.0, s0_us=1.0, bandwidth_Bps=0.0)
    with pytest.raises(ValueError):
        DeviceProfile(a_us=1.0, s0_us=1.0, bandwidth_Bps=1e9, threads=0)


@settings(max_examples=100, deadline=None)
@given(planning_cases(), st.sampled_from(["bundle", "part"]))
def test_ablation_reads_land_every_byte_and_count_one_read_per_bundle_or_part(case: dict, reads: str) -> None:
    """bench --reads bundle|part (the paper's I/O ablation): same bytes in staging, unmerged reads."""
    bb = case["bundle_bytes"]
    cuts = (bb // 3, 2 * bb // 3)
    plan = plan_reads(case["slots"], bb, case["base_offset"], DEFAULT_PROFILE, align=case["align"],
                      max_read_bytes=case["max_read_bytes"], reads=reads, part_cuts=cuts)
    source = _staging_file_offsets(plan)
    expected = case["base_offset"] + case["slots"][:, None] * bb + np.arange(bb)
    np.testing.assert_array_equal(source[plan.slot_positions[:, None] + np.arange(bb)], expected)
    assert np.all(plan.offsets % case["align"] == 0) and np.all(plan.lengths % case["align"] == 0)
    n = np.unique(case["slots"]).size
    if reads == "bundle":
        assert plan.n_reads == n
    else:
        assert n <= plan.n_reads <= 3 * n
        if bb >= 3 * 2 * case["align"]:  # parts long enough that each has an aligned start of its own
            assert plan.n_reads == 3 * n


def test_unknown_read_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="reads must be one of"):
        plan_reads(np.array([1]), 100, 0, DEFAULT_PROFILE, reads="merged")
