"""Refinement of a wlb plan: a bounded local search that drives a step's imbalance towards 1.

The paper's greedy leaves imbalance on the table (1.05 in its Table 2). After it, this search
repeatedly takes the best of: moving or swapping pieces between the most loaded micro-batch and
the least loaded ones, putting a carried-over piece back in, and holding short fresh pieces back
from the heaviest micro-batch(es) for the next step. It is bounded by a move count, not wall
time, so the plan is deterministic and a resumed run plans identically.
"""

from __future__ import annotations

import numpy as np

from wlbtrain.data.cost import CostModel

# A held piece: (doc_id, start, length, pulled_step), as in packing.py.
Item = tuple[int, int, int, int]

# Moves per step: on the doclens files and the generated families at the paper layouts, 16
# moves balance within 0.01 of 64 while 64 made planning's p99 30-70 ms (BENCHMARKS.md).
DEFAULT_REFINE_MOVES = 16
# Refine stops once a step is this close to perfect balance: the rest is below the cost model's
# own accuracy, and every move costs planning time.
REFINE_GOOD_ENOUGH = 1.002
# Pair moves of the most loaded micro-batch are tried with this many of the least loaded only:
# they are where its excess can go, and it bounds the time per move at 8 micro-batches.
REFINE_PARTNERS = 3
# A move must lower the imbalance by at least this fraction: in a step an outlier group leaves
# unbalanced, the search would otherwise crawl through hundreds of negligible moves.
REFINE_MIN_GAIN = 1e-4
# Micro-batches within this fraction of the heaviest count as tied with it (see _best_shave).
REFINE_TIE = 0.02
_EPS = 1e-12


class _Bin:
    """A micro-batch under local search: its items sorted by length, with their lengths, costs
    and whether each may be held back, as arrays kept in step with the items."""

    def __init__(self, items: list[Item], cost_model: CostModel, may_hold):
        self.cost_model = cost_model
        self.may_hold = may_hold
        self.items = sorted(items, key=lambda it: it[2])
        self.lengths = np.array([it[2] for it in self.items], dtype=np.int64)
        self.costs = cost_model.piece_costs(self.lengths)
        self.holdable = np.array([may_hold(it) for it in self.items], dtype=bool)
        self._update_totals()

    def _update_totals(self) -> None:
        self.cost = float(self.costs.sum())
        self.tokens = int(self.lengths.sum())

    def remove(self, k: int) -> Item:
        item = self.items.pop(k)
        self.lengths = np.delete(self.lengths, k)
        self.costs = np.delete(self.costs, k)
        self.holdable = np.delete(self.holdable, k)
        self._update_totals()
        return item

    def add(self, item: Item) -> None:
        k = int(np.searchsorted(self.lengths, item[2], side="right"))
        self.items.insert(k, item)
        self.lengths = np.insert(self.lengths, k, item[2])
        self.costs = np.insert(self.costs, k, self.cost_model.piece_cost(item[2]))
        self.holdable = np.insert(self.holdable, k, self.may_hold(item))
        self._update_totals()


class _Carry:
    """The step's carry-over under local search, in its order, with its lengths and costs kept
    as arrays: it can hold hundreds of short pieces, too many to read again every move."""

    def __init__(self, items: list[Item], cost_model: CostModel):
        self.cost_model = cost_model
        self.items = list(items)
        self.lengths = np.array([it[2] for it in self.items], dtype=np.int64)
        self.costs = cost_model.piece_costs(self.lengths)
        self.tokens = int(self.lengths.sum())

    def pop(self, k: int) -> Item:
        item = self.items.pop(k)
        self.lengths = np.delete(self.lengths, k)
        self.costs = np.delete(self.costs, k)
        self.tokens -= item[2]
        return item

    def append(self, item: Item) -> None:
        self.items.append(item)
        self.lengths = np.append(self.lengths, item[2])
        self.costs = np.append(self.costs, self.cost_model.piece_cost(item[2]))
        self.tokens += item[2]


def refine_plan(bins: list[list[Item]], left: list[Item], capacity: int, cost_model: CostModel,
                max_moves: int = DEFAULT_REFINE_MOVES, max_carry: int = 0,
                may_hold=lambda item: True) -> tuple[list[list[Item]], list[Item]]:
    """Bounded best-improvement local search on the step's imbalance (max / mean cost).

    Each move strictly lowers the imbalance, so the search ends; it stops after ``max_moves``.
    Moves, all within ``capacity`` tokens per micro-batch:
      - move a piece from the most loaded micro-batch to another, or swap it with a smaller one;
      - put a left-over piece into a micro-batch (raises the mean, clears the carry-over);
      - hold back a piece of the most loaded micro-batch (lowers the max more than the mean), or
        one piece from each of several near-tied most loaded ones at once; only pieces
        ``may_hold`` accepts, and while the carry-over stays within ``max_carry`` tokens.
    Micro-batches at their token limit cannot take more work, so holding back short pieces from
    the heavy ones (they wait one step) is often the only way down to balance.
    """
    state = [_Bin(b, cost_model, may_hold) for b in bins]
    left = _Carry(left, cost_model)
    n = len(state)
    for _ in range(max_moves):
        costs = np.array([b.cost for b in state])
        total = costs.sum()
        if n < 2 or total <= 0:
            break
        current = costs.max() * n / total
        if current <= REFINE_GOOD_ENOUGH:
            break
        bar = current * (1 - REFINE_MIN_GAIN)  # what a move must score below
        # the first best in this order wins ties; the costliest searches go first and last
        # and skip what cannot beat the bar (or, for the shave, the others' best)
        candidates = [_best_pair_move(state, costs, capacity, bar),
                      _best_insert(state, costs, left, capacity),
                      _best_hold(state, costs, left, max_carry)]
        best = min((c for c in candidates if c is not None), key=lambda c: c[0], default=None)
        shave = _best_shave(state, costs, left, max_carry, _to_beat(best, bar))
        if shave is not None and (best is None or shave[0] < best[0]):
            best = shave
        if best is None or best[0] >= bar:
            break
        best[1](state, left)
    return [b.items for b in state], left.items


def _to_beat(best, bar: float) -> float:
    """The score a further candidate must get below to matter: the bar, or the best so far."""
    return bar if best is None else min(best[0], bar)


def _rest_max(costs: np.ndarray, exclude: set[int]) -> float:
    rest = [c for i, c in enumerate(costs) if i not in exclude]
    return max(rest) if rest else 0.0


def _best_pair_move(state, costs, capacity, bar):
    """Best move or swap of a piece of the most loaded micro-batch h with another micro-batch;
    partners that cannot score below ``bar`` are not searched."""
    n, total = len(state), costs.sum()
    h = int(np.argmax(costs))
    src = state[h]
    if not src.items:
        return None
    best = None
    partners = [b for b in np.argsort(costs, kind="stable") if b != h][:REFINE_PARTNERS]
    for b in partners:
        b = int(b)
        dst = state[b]
        rest = _rest_max(costs, {h, b})
        # no transfer leaves the pair below their mean or the rest below its max: skip b when
        # even that cannot beat the best so far (the margin covers the mean's rounding, so the
        # result is the one without the skip)
        floor = max(rest, (src.cost + dst.cost) / 2 * (1 - 1e-9)) * n / total
        if floor >= _to_beat(best, bar):
            continue
        room = capacity - dst.tokens
        found = _best_transfer(src, dst, room)
        if found is None:
            continue
        peak, p, q = found
        score = max(peak, rest) * n / total
        if best is None or score < best[0]:
            best = (score, _apply_transfer(h, b, p, q))
    return best


def _best_transfer(src: _Bin, dst: _Bin, room: int):
    """Minimise max(new src cost, new dst cost) by moving piece p of src to dst, or swapping it
    with a shorter piece q of dst. Costs grow with length, so a useful swap sends the longer piece
    to dst and needs l_p − l_q ≤ room. Returns (new pair max, p, q or None) or None."""
    gap = src.cost - dst.cost
    if gap <= 0:
        return None
    best = None
    # move: dst takes p whole
    ok = src.lengths <= room
    if ok.any():
        peak = np.where(ok, np.maximum(src.cost - src.costs, dst.cost + src.costs), np.inf)
        p = int(peak.argmin())
        best = (float(peak[p]), p, None)
    if len(dst.items):
        # swap: for each p the ideal q has cost c_p − gap/2; dst is sorted by length (so by
        # cost): the two q around it, within [lo, hi), as the rows of one [2, P] array
        lo = dst.lengths.searchsorted(src.lengths - room, side="left")
        hi = dst.lengths.searchsorted(src.lengths, side="left")  # q strictly shorter
        mid = dst.costs.searchsorted(src.costs - gap / 2, side="left")
        q = _clip(np.stack((mid - 1, mid)), lo, hi - 1)
        delta = src.costs - dst.costs[_clip(q, 0, len(dst.costs) - 1)]
        peak = np.where((hi > lo) & (q >= 0),
                        np.maximum(src.cost - delta, dst.cost + delta), np.inf)
        # the first minimum in row order: the lower q wins a tie, and a move before either
        i = int(peak.argmin())
        row, p = divmod(i, peak.shape[1])
        if np.isfinite(peak[row, p]) and (best is None or peak[row, p] < best[0]):
            best = (float(peak[row, p]), p, int(q[row, p]))
    return best


def _clip(x, lo, hi):
    # np.clip's own definition; np.clip itself costs ~10 µs a call on these few-element arrays,
    # a fifth of refine's time in its slowest steps
    return np.minimum(np.maximum(x, lo), hi)


def _apply_transfer(h, b, p, q):
    def apply(state, left):
        moving = state[h].remove(p)
        if q is not None:
            state[h].add(state[b].remove(q))
        state[b].add(moving)
    return apply


def _best_insert(state, costs, left, capacity):
    """Best left-over piece to put into a micro-batch without raising the step's max."""
    if not left.items:
        return None
    n, total, peak = len(state), costs.sum(), costs.max()
    lengths, extra = left.lengths, left.costs
    # [micro-batch, piece] at once; the first minimum in row order, as a loop over them would
    tokens = np.array([b.tokens for b in state])[:, None]
    bin_costs = np.array([b.cost for b in state])[:, None]
    ok = lengths[None, :] <= capacity - tokens
    score = np.maximum(peak, bin_costs + extra) * n / (total + extra)
    score = np.where(ok, score, np.inf)
    i = int(score.argmin())
    if not np.isfinite(score.flat[i]):
        return None
    b, k = divmod(i, len(left.items))
    return float(score.flat[i]), _apply_insert(b, k)


def _apply_insert(b, k):
    def apply(state, left):
        state[b].add(left.pop(k))
    return apply


def _best_hold(state, costs, left, max_carry):
    """Best piece of the most loaded micro-batch to carry over to the next step."""
    room = max_carry - left.tokens
    h = int(np.argmax(costs))
    src = state[h]
    if room <= 0 or not src.items:
        return None
    n, total = len(state), costs.sum()
    rest = _rest_max(costs, {h})
    ok = src.holdable & (src.lengths <= room)
    if not ok.any():
        return None
    score = np.maximum(src.cost - src.costs, rest) * n / np.maximum(total - src.costs, _EPS)
    score = np.where(ok, score, np.inf)
    p = int(np.argmin(score))
    return float(score[p]), _apply_hold(h, p)


def _best_shave(state, costs, left, max_carry, bar):
    """Hold back one piece from each of the k most loaded micro-batches at once (2 ≤ k < n).

    When several micro-batches tie near the top, holding from one alone leaves the max where it
    was and lowers the mean, so no single move helps; lowering them together to the next one's
    level does. Each gives the piece that brings it closest to that level. None when no group
    can score below ``bar``."""
    room = max_carry - left.tokens
    n = len(state)
    if room <= 0 or n < 3:
        return None
    order = np.argsort(-costs, kind="stable")
    tied = int((costs >= costs.max() * (1 - REFINE_TIE)).sum())
    if tied < 2:
        return None  # a single hold from the heaviest does it
    top = min(tied + 1, n - 1)  # the largest group
    # a group leaves the micro-batch after it untouched and lowers the total: its score is at
    # least that one's cost over the current mean (the margin covers the sum's rounding)
    if costs[order[top]] * n / costs.sum() * (1 - 1e-9) >= bar:
        return None
    levels = costs[order[2:top + 1]]  # what a group of k lowers itself to: the (k+1)-th cost
    # picks[j][i]: the piece the j-th heaviest holds back in a group of k = i + 2, the one whose
    # after-hold cost is closest to that level; one argmin per micro-batch for every k at once
    picks = []
    for b in map(int, order[:top]):
        src = state[b]
        ok = src.holdable & (src.lengths <= room)
        if not ok.any():
            break  # this one and every larger group cannot hold
        after = np.where(ok, src.cost - src.costs, np.inf)
        picks.append(np.argmin(np.abs(after[:, None] - levels[None, :]), axis=0))
    best = None
    for k in range(2, min(len(picks), top) + 1):
        group = [(int(order[j]), int(picks[j][k - 2])) for j in range(k)]
        if sum(int(state[b].lengths[p]) for b, p in group) > room:
            continue
        new = costs.copy()
        for b, p in group:
            new[b] -= state[b].costs[p]
        score = new.max() * n / max(new.sum(), _EPS)
        if best is None or score < best[0]:
            best = (float(score), _apply_shave(group))
    return best


def _apply_shave(picks):
    def apply(state, left):
        for b, p in picks:
            _apply_hold(b, p)(state, left)
    return apply


def _apply_hold(h, p):
    def apply(state, left):
        left.append(state[h].remove(p))
    return apply

