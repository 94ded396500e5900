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
    left = list(left)
    n = len(state)
    for _ in range(max_moves):
        costs = np.array([b.cost for b in state])
        total = costs.sum()
        if n < 2 or total <= 0:
            break
        current = costs.max() * n / total
        if current <= REFINE_GOOD_ENOUGH:
            break
        candidates = [_best_pair_move(state, costs, capacity),
                      _best_insert(state, costs, left, capacity, cost_model),
                      _best_hold(state, costs, left, max_carry),
                      _best_shave(state, costs, left, max_carry)]
        best = min((c for c in candidates if c is not None), key=lambda c: c[0], default=None)
        if best is None or best[0] >= current * (1 - REFINE_MIN_GAIN):
            break
        best[1](state, left)
    return [b.items for b in state], left


def _rest_max(costs: np.ndarray, exclude: set[int]) -> float:
    rest = [c for i, c in enumerate(costs) if i not in exclude]
    return max(rest) if rest else 0.0


def _best_pair_move(state, costs, capacity):
    """Best move or swap of a piece of the most loaded micro-batch h with another micro-batch."""
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
        peak = np.maximum(src.cost - src.costs, dst.cost + src.costs)
        peak = np.where(ok, peak, np.inf)
        p = int(np.argmin(peak))
        best = (float(peak[p]), p, None)
    if len(dst.items):
        # swap: for each p the ideal q has cost c_p − gap/2; dst is sorted by length (so by cost)
        target = src.costs - gap / 2
        lo = np.searchsorted(dst.lengths, src.lengths - room, side="left")
        hi = np.searchsorted(dst.lengths, src.lengths, side="left")  # q strictly shorter
        mid = np.searchsorted(dst.costs, target, side="left")
        for q in (_clip(mid - 1, lo, hi - 1), _clip(mid, lo, hi - 1)):
            valid = (hi > lo) & (q >= 0)
            qc = dst.costs[_clip(q, 0, len(dst.costs) - 1)]
            delta = src.costs - qc
            peak = np.where(valid, np.maximum(src.cost - delta, dst.cost + delta), np.inf)
            p = int(np.argmin(peak))
            if np.isfinite(peak[p]) and (best is None or peak[p] < best[0]):
                best = (float(peak[p]), p, int(q[p]))
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


def _best_insert(state, costs, left, capacity, cost_model):
    """Best left-over piece to put into a micro-batch without raising the step's max."""
    if not left:
        return None
    n, total, peak = len(state), costs.sum(), costs.max()
    lengths = np.array([it[2] for it in left], dtype=np.int64)
    extra = cost_model.piece_costs(lengths)
    shortest = int(lengths.min())
    best = None
    for b, bin_ in enumerate(state):
        if capacity - bin_.tokens < shortest:
            continue
        ok = lengths <= capacity - bin_.tokens
        score = np.maximum(peak, bin_.cost + extra) * n / (total + extra)
        score = np.where(ok, score, np.inf)
        k = int(np.argmin(score))
        if best is None or score[k] < best[0]:
            best = (float(score[k]), _apply_insert(b, k))
    return best


def _apply_insert(b, k):
    def apply(state, left):
        state[b].add(left.pop(k))
    return apply


def _best_hold(state, costs, left, max_carry):
    """Best piece of the most loaded micro-batch to carry over to the next step."""
    room = max_carry - sum(item[2] for item in left)
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


def _best_shave(state, costs, left, max_carry):
    """Hold back one piece from each of the k most loaded micro-batches at once (2 ≤ k < n).

    When several micro-batches tie near the top, holding from one alone leaves the max where it
    was and lowers the mean, so no single move helps; lowering them together to the next one's
    level does. Each gives the piece that brings it closest to that level."""
    room = max_carry - sum(item[2] for item in left)
    n = len(state)
    if room <= 0 or n < 3:
        return None
    order = np.argsort(-costs, kind="stable")
    tied = int((costs >= costs.max() * (1 - REFINE_TIE)).sum())
    if tied < 2:
        return None  # a single hold from the heaviest does it
    # each tied micro-batch's cost after holding back each of its pieces (inf where it may not
    # hold that piece): the same for every k, so computed once rather than per (k, micro-batch)
    after = {}
    for b in map(int, order[:min(tied + 1, n - 1)]):
        src = state[b]
        ok = src.holdable & (src.lengths <= room)
        after[b] = np.where(ok, src.cost - src.costs, np.inf) if ok.any() else None
    best = None
    for k in range(2, min(tied + 1, n - 1) + 1):
        level = costs[order[k]]
        picks, new = [], costs.copy()
        for b in map(int, order[:k]):
            if after[b] is None:
                break
            p = int(np.argmin(np.abs(after[b] - level)))
            picks.append((b, p))
            new[b] -= state[b].costs[p]
        if len(picks) < k or sum(int(state[b].lengths[p]) for b, p in picks) > room:
            continue
        score = new.max() * n / max(new.sum(), _EPS)
        if best is None or score < best[0]:
            best = (float(score), _apply_shave(picks))
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

