"""Per-layer DRAM cache of FFN neurons with a sliding window (LLM in a flash, §4 and §6).

One `NeuronCache` serves one FFN layer. Each cached neuron owns one row of a matrix that is
allocated once: the row is the neuron's bundle (for example gate row | up row | down column), and
the cache never looks inside it. The caller computes the FFN over `rows[:n_used]`; the order of the
neurons does not change an FFN's output, which is what lets the cache delete by moving the last
rows into the holes and insert by appending, never rewriting rows that stay.

What stays cached is the union of the neurons used by the last `window` tokens (plus the pinned
hot neurons). Instead of keeping a list of sets, every neuron carries the index of the last token
that used it: a neuron is in the union iff `last_used >= lo`, where `lo` is the first token still in
the window. That turns eviction and the window-shrink budget check into a few numpy operations over
the used rows, with no Python loop over neurons, because this runs for every layer on every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from llmflash.errors import LLMFlashError

__all__ = ["AdmitPlan", "NeuronCache"]

# last_used of a neuron no token in the history has used; far below any window start (>= -window).
_NEVER = np.iinfo(np.int64).min // 2
# Shared empty id array for plans with nothing to load or drop (left writable: torch.from_numpy
# warns on read-only arrays, and a zero-length array has nothing to overwrite).
_EMPTY = np.empty(0, dtype=np.int64)


@dataclass(slots=True)
class AdmitPlan:
    """What the caller must load from flash after one `NeuronCache.step` (or for the pinned rows).

    `neurons` is sorted ascending so the flash reads go forward through the file. `rows` are their
    destination rows, in the same order and ascending: by default the contiguous block appended
    after the last used row (so `fill` is one slice copy); with `reuse_holes` the holes left by
    this step's evictions come first, then an appended block.
    """

    neurons: np.ndarray  # int64 ids to read, ascending
    rows: np.ndarray  # int64 destination rows, same order as neurons
    evicted: int = 0  # neurons evicted this step
    window_used: int = 0  # tokens of history the cached union covers after this step
    # Active ids that did not fit, lowest priority; none of them is cached after the step.
    dropped: np.ndarray = field(default_factory=lambda: _EMPTY)
    moved: int = 0  # rows copied to fill the holes left by evictions

    def __len__(self) -> int:
        """Neurons to load, so `if plan:` reads "is there anything to fetch"."""
        return len(self.neurons)


class NeuronCache:
    """Rows of one FFN layer's neurons kept in memory across tokens (see the module docstring).

    Attributes the caller reads:
      rows        [capacity, row_width] tensor, allocated once and never reallocated.
      n_used      rows 0..n_used-1 hold cached neurons; the rest are free.
      row_neuron  int64 [capacity], neuron id of each row, -1 for a free row.
      neuron_row  int64 [n_neurons], row of each neuron, -1 if not cached.
      n_pinned    pinned neurons occupy rows 0..n_pinned-1 for the life of the cache.

    `reuse_holes=True` puts newly admitted neurons into the rows this step evicted before appending,
    instead of moving the last rows into those holes: the paper's scheme copies a row for every
    eviction below the end, while in steady state evictions and admissions nearly balance, so
    reusing holes leaves almost nothing to move. Off by default to keep the paper's layout
    (admitted rows form one block at the end).

    `debug=True` makes `used_rows` refuse to hand out a row that was admitted but not yet filled,
    and makes `step` check that `active` has no duplicates; both cost a little, so they are off by
    default.
    """

    def __init__(
        self,
        n_neurons: int,
        capacity: int,
        row_width: int,
        window: int,
        dtype: torch.dtype = torch.float32,
        pinned: np.ndarray | None = None,
        *,
        device: torch.device | str = "cpu",
        reuse_holes: bool = False,
        debug: bool = False,
    ) -> None:
        if n_neurons < 1:
            raise LLMFlashError(f"neuron cache: n_neurons must be positive, got {n_neurons}")
        if capacity < 0:
            raise LLMFlashError(f"neuron cache: capacity must not be negative, got {capacity}")
        if row_width < 1:
            raise LLMFlashError(f"neuron cache: row_width must be positive, got {row_width}")
        if window < 1:
            raise LLMFlashError(f"neuron cache: window must be at least 1 token, got {window}")
        self.n_neurons = int(n_neurons)
        self.capacity = int(capacity)
        self.row_width = int(row_width)
        self.window = int(window)
        self.debug = bool(debug)
        self.reuse_holes = bool(reuse_holes)
        self.device = torch.device(device)

        pinned_ids = _EMPTY if pinned is None else np.unique(np.asarray(pinned, dtype=np.int64))
        if len(pinned_ids) and (pinned_ids[0] < 0 or pinned_ids[-1] >= self.n_neurons):
            raise LLMFlashError(
                f"neuron cache: pinned neuron ids must lie in [0, {self.n_neurons}), "
                f"got {pinned_ids[0]}..{pinned_ids[-1]}"
            )
        if len(pinned_ids) > self.capacity:
            raise LLMFlashError(
                f"neuron cache: {len(pinned_ids)} pinned neurons do not fit in a capacity of "
                f"{self.capacity} rows; raise the memory budget or pin fewer neurons"
            )
        self.pinned = pinned_ids
        self.n_pinned = len(pinned_ids)
        self.is_pinned = np.zeros(self.n_neurons, dtype=bool)
        self.is_pinned[pinned_ids] = True
        # Rows left for the sliding window once the pinned neurons have theirs.
        self.n_slots = self.capacity - self.n_pinned

        self.rows = torch.zeros((self.capacity, self.row_width), dtype=dtype, device=self.device)
        self.row_neuron = np.full(self.capacity, -1, dtype=np.int64)
        self.neuron_row = np.full(self.n_neurons, -1, dtype=np.int64)
        self.row_neuron[: self.n_pinned] = pinned_ids
        self.neuron_row[pinned_ids] = np.arange(self.n_pinned, dtype=np.int64)
        self.n_used = self.n_pinned
        # Rows admitted by a plan whose data has not been copied in yet (moves with the row).
        self._unfilled = np.zeros(self.capacity, dtype=bool)
        self._unfilled[: self.n_pinned] = True

        self.last_used = np.full(self.n_neurons, _NEVER, dtype=np.int64)
        self.t = -1  # index of the current token
        self.history_start = 0  # oldest token still in the history (raised when the window shrinks)

    # ------------------------------------------------------------------ plans
    def initial_plan(self) -> AdmitPlan:
        """The load plan for the pinned neurons (rows 0..n_pinned-1, ids ascending).

        Pinned rows never move, so this plan stays valid for the life of the cache; the caller
        fills it once, before the first FFN.
        """
        return AdmitPlan(
            neurons=self.pinned.copy(),
            rows=np.arange(self.n_pinned, dtype=np.int64),
            window_used=0,
            dropped=_EMPTY,
        )

    def step(self, active: np.ndarray) -> AdmitPlan:
        """Advance one token: record `active`, evict what left the window, plan what to load.

        `active` holds this token's neuron ids, unique, most important first (the order only
        matters when they do not all fit). If the window's union is over capacity the oldest
        tokens are dropped from the history until it fits; if this token alone is over capacity,
        its lowest-priority neurons are reported in `dropped` and not cached.
        """
        a = np.asarray(active)
        if a.dtype != np.int64:
            a = a.astype(np.int64)
        a = a.reshape(-1)
        if len(a) and (a.min() < 0 or a.max() >= self.n_neurons):
            raise LLMFlashError(
                f"neuron cache: active neuron ids must lie in [0, {self.n_neurons}), "
                f"got {a.min()}..{a.max()}"
            )
        if self.debug and len(np.unique(a)) != len(a):
            raise LLMFlashError("neuron cache: active neuron ids contain duplicates")

        self.t += 1
        t = self.t
        act = a[~self.is_pinned[a]] if self.n_pinned else a
        dropped = _EMPTY
        if len(act) > self.n_slots:
            dropped = act[self.n_slots :].copy()  # act may be a view of the caller's array
            act = act[: self.n_slots]
        self.last_used[act] = t
        missing = act[self.neuron_row[act] < 0]

        P, n_used = self.n_pinned, self.n_used
        held = self.row_neuron[P:n_used]  # cached, not pinned
        held_last = self.last_used[held]
        lo = max(self.history_start, t - self.window + 1)
        in_window = held_last >= lo
        union = int(np.count_nonzero(in_window)) + len(missing)
        if union > self.n_slots:
            # Drop the oldest tokens until the union fits: count the union by age, once.
            span = t - lo + 1
            ages = t - held_last[in_window]
            per_age = np.bincount(ages, minlength=span)
            per_age[0] += len(missing)
            fits = int(np.searchsorted(np.cumsum(per_age), self.n_slots, side="right"))
            # fits >= 1: this token's own (truncated) set always fits in n_slots.
            lo = t - fits + 1
            self.history_start = lo
            in_window = held_last >= lo

        # Evict rows P..n_used-1 whose neuron no token in the window uses, then admit the missing
        # neurons (ids ascending). `boundary` is where the compacted rows end: rows above it are
        # either evicted or moved down into the holes below it (swap-with-last). By default the
        # new neurons are appended at `boundary`, as in the paper; with reuse_holes they take the
        # holes first, so a token that evicts c and loads m neurons moves |c - m| rows, not c.
        m = len(missing)
        if m > 1:
            missing = np.sort(missing)
        evict_rows = np.flatnonzero(~in_window)
        n_evict = len(evict_rows)
        moved = 0
        k_holes = 0  # holes that new neurons take (reuse_holes only)
        boundary = n_used
        if n_evict:
            evict_rows += P
            self.neuron_row[self.row_neuron[evict_rows]] = -1
            boundary = min(n_used, n_used - n_evict + (m if self.reuse_holes else 0))
            holes = evict_rows[evict_rows < boundary]
            if self.reuse_holes:
                k_holes = min(m, len(holes))
            moved = len(holes) - k_holes
            if moved:
                tail = np.arange(boundary, n_used, dtype=np.int64)
                movers = tail[in_window[boundary - P :]]  # the surviving rows above the boundary
                self._move_rows(movers, holes[k_holes:])
            self.row_neuron[boundary:n_used] = -1
            self._unfilled[boundary:n_used] = False
        if m:
            dest = np.arange(boundary - k_holes, boundary + m - k_holes, dtype=np.int64)
            if k_holes:
                dest[:k_holes] = holes[:k_holes]
            self.row_neuron[dest] = missing
            self.neuron_row[missing] = dest
            self._unfilled[dest] = True
        else:
            missing = _EMPTY
            dest = _EMPTY
        self.n_used = boundary + m - k_holes

        return AdmitPlan(
            neurons=missing,
            rows=dest,
            evicted=n_evict,
            window_used=t - lo + 1,
            dropped=dropped,
            moved=moved,
        )

    def _move_rows(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy rows src -> dst (one gather, one scatter) and carry the bookkeeping with them."""
        src_t = torch.from_numpy(src).to(self.device)
        dst_t = torch.from_numpy(dst).to(self.device)
        self.rows.index_copy_(0, dst_t, self.rows.index_select(0, src_t))
        ids = self.row_neuron[src]
        self.row_neuron[dst] = ids
        self.neuron_row[ids] = dst
        self._unfilled[dst] = self._unfilled[src]

    # ------------------------------------------------------------------ data
    def fill(self, plan: AdmitPlan, data: torch.Tensor | np.ndarray) -> None:
        """Copy the bundles read for `plan` into their rows (one vectorised copy, converting dtype).

        `data` is [len(plan.neurons), row_width] in plan order. The plan must still describe the
        cache: filling a plan from an earlier step after its rows moved would put data under the
        wrong neuron, so that is refused.
        """
        m = len(plan.neurons)
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if tuple(data.shape) != (m, self.row_width):
            raise LLMFlashError(
                f"neuron cache: fill expects data of shape ({m}, {self.row_width}), "
                f"got {tuple(data.shape)}"
            )
        if m == 0:
            return
        start, stop = int(plan.rows[0]), int(plan.rows[-1]) + 1
        contiguous = self.run_of(plan) is not None
        if (
            stop > self.n_used
            or len(plan.rows) != m
            or not np.array_equal(
                self.row_neuron[start:stop] if contiguous else self.row_neuron[plan.rows],
                plan.neurons,
            )
        ):
            raise LLMFlashError(
                "neuron cache: fill was given a plan that no longer matches the cache "
                "(a later step moved or evicted its rows); fill each plan before the next step"
            )
        if contiguous:
            target = self.rows[start:stop]
            if not (data.data_ptr() == target.data_ptr() and data.dtype == target.dtype
                    and data.device == target.device):  # else: read straight into the rows
                target.copy_(data)
            self._unfilled[start:stop] = False
        else:
            data = data.to(device=self.device, dtype=self.rows.dtype)
            self.rows.index_copy_(0, torch.from_numpy(plan.rows).to(self.device), data)
            self._unfilled[plan.rows] = False

    def run_of(self, plan: AdmitPlan) -> slice | None:
        """The plan's rows as one slice where they form a run (new neurons appended, or holes side
        by side), else None: such a plan is filled with one copy, or read straight into its rows."""
        m = len(plan.rows)
        if m == 0:
            return None
        start, stop = int(plan.rows[0]), int(plan.rows[-1]) + 1
        return slice(start, stop) if stop - start == m else None

    def used_rows(self) -> torch.Tensor:
        """rows[:n_used], the matrix the FFN is computed over (a view, no copy)."""
        if self.debug and self._unfilled[: self.n_used].any():
            bad = np.flatnonzero(self._unfilled[: self.n_used])
            raise AssertionError(
                f"neuron cache: rows {bad[:8].tolist()} (neurons "
                f"{self.row_neuron[bad[:8]].tolist()}) are used before being filled"
            )
        return self.rows[: self.n_used]

    def unfilled_rows(self) -> np.ndarray:
        """Used rows admitted but not yet filled (empty once every plan has been filled)."""
        return np.flatnonzero(self._unfilled[: self.n_used])

    def rows_of(self, neurons: np.ndarray) -> np.ndarray:
        """Row index of each given neuron, -1 for one that is not cached (e.g. a dropped one).

        Callers index with the result, so check for -1 where a neuron may be absent.
        """
        return self.neuron_row[np.asarray(neurons, dtype=np.int64)]

    def cached(self) -> np.ndarray:
        """Ids of the cached neurons, in row order (pinned first)."""
        return self.row_neuron[: self.n_used].copy()

    def reset(self) -> None:
        """Empty the cache for a new sequence; pinned rows and their data stay."""
        P = self.n_pinned
        self.neuron_row[self.row_neuron[P : self.n_used]] = -1
        self.row_neuron[P:] = -1
        self._unfilled[P:] = False
        self.n_used = P
        self.last_used.fill(_NEVER)
        self.t = -1
        self.history_start = 0

    def check(self) -> None:
        """Verify the bookkeeping invariants (tests and debugging; O(n_neurons + capacity))."""
        n = self.n_used
        assert 0 <= self.n_pinned <= n <= self.capacity, (self.n_pinned, n, self.capacity)
        ids = self.row_neuron[:n]
        assert (ids >= 0).all(), "free row inside the used range"
        assert (self.row_neuron[n:] == -1).all(), "used row beyond n_used"
        assert len(np.unique(ids)) == n, "neuron cached twice"
        assert (self.neuron_row[ids] == np.arange(n)).all(), "neuron_row disagrees with row_neuron"
        assert np.count_nonzero(self.neuron_row >= 0) == n, "neuron_row points at a free row"
        assert (self.row_neuron[: self.n_pinned] == self.pinned).all(), "pinned row moved"
