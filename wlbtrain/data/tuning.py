"""Online tuning of the wlb packer's outlier-queue thresholds under a token-delay budget.

Fixed thresholds are one point on a balance / delay frontier that moves with the data: where
they sit decides which pieces wait for similar ones (balance) and how long (delay). With
``data.outlier_thresholds: auto`` the packer keeps a bounded window of the piece lengths it
pulled (pieces too short to queue pooled, ``pool_shorts``) and, every RETUNE_EVERY steps,
searches for the thresholds that minimise the estimated imbalance of a step while the estimated
average token delay stays within ``data.max_token_delay`` steps (a soft bound: see
OVER_BUDGET_WEIGHT).

The estimate replays the window in stream order, as the packer sees it, without packing:

- a step is ``budget`` tokens; a queued piece counts where its queue fills (FIFO groups of
  ``units`` pieces) and the group goes whole into that step, an unqueued piece where it
  arrives; what a step pulled past its room waits one step;
- at the cap every micro-batch is full, so a micro-batch with a piece of length L costs at least
  a·L² + b·cap: the packer cannot even it out by adding work. The pieces that fill the rest
  count as free, since the greedy gives the heaviest micro-batch the shortest it has; counted
  at a share of the unqueued pieces' attention per token, they overstated the sets that leave
  medium pieces unqueued, which the replay then rarely saw (BENCHMARKS.md, "Shipped
  2026-12-08");
- a step's imbalance is max(that floor over its pieces, the mean) / mean, the mean of what the
  step can hold (groups released together beyond it go out over the next steps);
- a piece's delay is the release step of its group minus its arrival step (a group still open
  when the window ends: the band's mean wait at its observed rate), token-weighted as ``plan``
  reports it.

It ignores what the greedy and refine do within a step and the carry-over across steps, so it
ranks threshold sets rather than predicting the exact numbers; tests/test_tuning.py holds it to
the packer's numbers within 0.05 of imbalance and 0.1 steps of delay on a long tail. It costs
about a millisecond, so the search's forward selection runs on it; the VERIFY_CANDIDATES sets it
scores best are then replayed (replay.py: the packer's greedy, step by step, with the carry-over
and refine's hold-back, ~0.02-0.05 ms a step) on the window's last REPLAY_STEPS steps, and the
replayed imbalance and delay decide among them. That catches what the estimate cannot see, such
as steps of carried remainders behind groups that fill whole steps (documents much longer than
the context). Everything is a pure function of the observed lengths, so a resumed run tunes
identically.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np

from wlbtrain.data.cost import CostModel
from wlbtrain.data.replay import Replay

# Average token delay (steps) the tuner may spend when data.max_token_delay is not set; see
# BENCHMARKS.md "Auto outlier queues": at 1 step every generated family but bimodal at 64K
# meets 1.05 and wlb beats plain on all of them; at 0.5 (the paper's delay) documents much
# longer than the context (all-long at 7B) and bimodal at 64K end worse than plain packing.
DEFAULT_MAX_TOKEN_DELAY = 1.0
# Records remembered (pieces long enough to queue, and pools of short ones; see pool_shorts):
# hundreds of steps of most corpora, and an estimate still takes about a millisecond.
TUNE_WINDOW = 4096
# Steps between searches (a search spans up to ~20 steps at a full window).
RETUNE_EVERY = 32
# The first search waits until the window holds this many steps' worth of tokens.
MIN_WINDOW_STEPS = 8
# Candidate thresholds as fractions of the longest piece: below 1/10 the greedy balances pieces
# by itself; the grid is coarse on purpose, the estimate is not finer than that.
CANDIDATE_FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_QUEUES = 3
# Delay the estimate does not see, kept out of the budget: the carry-over of pieces a step
# could not place, and (with refine) the short pieces refine holds back for a step. Measured
# as realized minus estimated delay on the families and the doclens files (BENCHMARKS.md).
CARRY_DELAY = 0.03
REFINE_HOLD_DELAY = 0.05
# Imbalance a step of estimated delay beyond the budget costs. Steep, but not a wall: a wall
# made the search trade 0.05 steps over the estimate for 0.2-0.3 of imbalance where one queue
# group of long pieces sits at the budget (spiky and all-long families, BENCHMARKS.md).
OVER_BUDGET_WEIGHT = 2.0
# Estimated imbalance one step of delay is worth: only breaks near-ties, towards less delay.
DELAY_WEIGHT = 0.01
# Work a step may spend on a search. An estimate costs about as much as this many records
# before its first (numpy call overheads: ~0.17 ms, then ~0.17 µs a record on a 2-core CPU);
# a step spends 2 full-window estimates' worth (~2 ms), so planning stays within 20 ms at p99,
# and while the window is small a search still ends within a few steps.
ESTIMATE_OVERHEAD_RECORDS = 1000
EVAL_RECORDS_PER_STEP = 2 * (TUNE_WINDOW + ESTIMATE_OVERHEAD_RECORDS)
# New thresholds must beat the current ones by this much on the same window: moving queues
# churns their groups, and estimates from neighbouring windows differ by noise.
RETUNE_MIN_GAIN = 0.01
# The threshold sets the estimate scores best that a replay of the packer re-ranks (replay.py),
# with the current ones: the estimate misses whole kinds of steps (see replay.py), and the
# replay tracks the packer within ~0.01 of imbalance but costs ~0.02-0.05 ms a step.
VERIFY_CANDIDATES = 6
# Steps of the window's most recent records each replay runs (the same ones for every set).
REPLAY_STEPS = 96
# A window of fewer steps is not replayed. The first search (at MIN_WINDOW_STEPS) is replayed
# too: on its few steps the replay still ranks sets better than the estimate alone (twelve
# seeds: BENCHMARKS.md, "Shipped 2026-12-07").
MIN_REPLAY_STEPS = MIN_WINDOW_STEPS
# Replay steps a planning step may spend while a search verifies (~0.5-1 ms): a verification
# ends in ~30 planning steps, so the queues follow the data with less lag than at 8 (twelve
# seeds: BENCHMARKS.md, "Shipped 2026-12-06").
REPLAY_STEPS_PER_PLAN = 24
# The replay's delay runs within ~0.03 steps of the packer's on the same window, and later
# windows differ from it; it is held to the budget less this.
REPLAY_DELAY_MARGIN = 0.02


def pool_shorts(lengths, max_piece: int) -> np.ndarray:
    """A window's records from piece lengths in stream order: [R, 3] int64 of (tokens, Σ d²,
    pooled). Pieces below every candidate threshold are never queued and only count through
    their tokens and squares, so consecutive ones pool into one record of at most ``max_piece``
    tokens: the window then spans many more steps for the same work on short-heavy corpora."""
    pooler = _Pooler(short_below(max_piece), max_piece)
    for length in lengths:
        pooler.add(int(length))
    return np.array(pooler.records, dtype=np.int64).reshape(-1, 3)


def candidate_grid(max_piece: int) -> list[int]:
    """The thresholds a search may place: CANDIDATE_FRACTIONS of the longest piece."""
    return sorted({max(1, int(max_piece * f)) for f in CANDIDATE_FRACTIONS})


def short_below(max_piece: int) -> int:
    return max(1, int(max_piece * CANDIDATE_FRACTIONS[0]))


class _Pooler:
    def __init__(self, short: int, max_piece: int, records=None):
        self.short, self.max_piece = short, max_piece
        self.records = records if records is not None else []

    def add(self, length: int) -> None:
        last = self.records[-1] if self.records else None
        if length >= self.short:
            self.records.append((length, length * length, 0))
        elif last is not None and last[2] and last[0] + length <= self.max_piece:
            self.records[-1] = (last[0] + length, last[1] + length * length, 1)
        else:
            self.records.append((length, length * length, 1))


def as_records(window) -> np.ndarray:
    """[R, 3] records as they are; [W] piece lengths as one unpooled record each."""
    window = np.asarray(window, dtype=np.int64)
    if window.ndim == 1:
        return np.stack([window, window * window, np.zeros_like(window)], axis=1)
    return window.reshape(-1, 3)


def estimate(window, thresholds: list[int], units: int, unit_tokens: int,
             budget: int, cost_model: CostModel) -> tuple[float, float]:
    """(mean step imbalance, token-weighted mean delay in steps) of ``thresholds`` on a window.

    window: [R, 3] records from ``pool_shorts`` (or [W] piece lengths, one record each), in
    stream order; units: micro-batches (or ranks) per step, the size of a released group;
    unit_tokens: a unit's cap; budget: tokens a step pulls.
    """
    window = as_records(window)
    lengths, squares, pooled = window[:, 0], window[:, 1], window[:, 2].astype(bool)
    size = lengths.size
    if size == 0 or lengths.sum() <= 0:
        return 1.0, 0.0
    band = np.searchsorted(np.asarray(sorted(thresholds), dtype=np.int64), lengths, side="right")
    band[pooled] = 0
    # where each piece counts towards a step's budget: a queued one where its group completes
    counted = np.arange(size, dtype=np.float64)
    for k in range(1, len(thresholds) + 1):
        _group_release(np.flatnonzero(band == k), units, counted)
    order = np.argsort(counted, kind="stable")
    sl = lengths[order]
    before = np.cumsum(sl) - sl
    # a released group goes whole into the step its first piece falls in; whatever a step
    # pulled past its room (groups, the piece that crossed the budget) waits one step
    key = counted[order]
    head = np.r_[True, key[1:] != key[:-1]]
    first = np.maximum.accumulate(np.where(head, np.arange(size), 0))
    step = np.empty(size, dtype=np.int64)
    step[order] = before[first] // budget
    tail = np.r_[head[1:], True]
    unit_end = (before + sl)[tail]
    boundary = (before[head] // budget + 1) * budget
    slack = units * unit_tokens - budget
    # pooled short pieces split at the boundary: only whole pieces and groups overshoot it
    whole = ~pooled[order][head]
    overshoot = float(np.maximum(unit_end - boundary - slack, 0)[whole].sum())
    # a piece arrives in the step being filled when the stream reached it
    at = np.minimum(np.searchsorted(key, np.arange(size), side="left"), size - 1)
    arrival = before[at] // budget
    inside = counted < size
    n_steps = int(step[inside].max()) + 1 if inside.any() else 1
    wait = np.where(inside, step - arrival, 0).astype(np.float64)
    wait += _censored_wait(band, inside, units, n_steps, arrival, len(thresholds))
    delay = float(((wait * lengths).sum() + overshoot) / lengths.sum())
    return _step_imbalance(lengths, squares, pooled, band, step, inside, n_steps, units,
                           unit_tokens, budget, cost_model), delay


def _group_release(idx: np.ndarray, units: int, counted: np.ndarray) -> None:
    """One queue's pieces (window positions ``idx``, FIFO) leave in groups of ``units``, where
    the group's last piece arrives; a group the window ends before is placed after it."""
    whole = idx.size // units * units
    if whole:
        counted[idx[:whole]] = np.repeat(idx[units - 1:whole:units], units) + 0.5
    counted[idx[whole:]] = counted.size + 1


def _censored_wait(band, inside, units, n_steps, arrival, n_queues) -> np.ndarray:
    """Wait of pieces still queued when the window ends: what a piece of the band waits on
    average at its observed rate, (units − 1) / 2 arrivals. Not the time to the window's end
    plus the missing pieces: in a short window that charges a rare band for its one late group."""
    wait = np.zeros(band.size)
    for k in range(1, n_queues + 1):
        rest = np.flatnonzero((band == k) & ~inside)
        if rest.size:
            rate = max(int((band == k).sum()), 1) / n_steps
            wait[rest] = (units - 1) / (2 * rate)
    return wait


def _step_imbalance(lengths, squares, pooled, band, step, inside, n_steps, units, unit_tokens,
                    budget, cost_model) -> float:
    """Mean over the window's full steps of max(the costliest micro-batch's floor, mean) / mean.

    A step trains ``budget`` tokens (what it pulls past that waits, what it lacks comes from
    the carry-over): its queued pieces as they are, its unqueued ones scaled to the rest.
    """
    a, b = cost_model.attn_coef, cost_model.linear_coef
    d, d2 = lengths.astype(np.float64), squares.astype(np.float64)
    queued, short = band > 0, band == 0
    per_token = float(d2[short].sum() / d[short].sum()) if short.any() else 0.0
    own = np.where(pooled, 0.0, d)  # a pool of short pieces floors like a short piece
    floor = a * own * own + b * unit_tokens
    full = inside & (step < n_steps - 1)  # the window's last step is partial
    if not full.any():
        full = inside
    s = step[full]

    def per_step(weights):
        return np.bincount(s, weights=weights[full], minlength=n_steps)

    t_q, q_q = per_step(d * queued), per_step(d2 * queued)
    t_u, q_u = per_step(d * ~queued), per_step(d2 * ~queued)
    room = np.maximum(budget - t_q, 0)
    attn = q_q + np.where(t_u > 0, q_u * room / np.maximum(t_u, 1), room * per_token)
    # groups released together beyond what the step holds go out over the next steps: a step
    # trains at most its capacity, of the same mix
    tokens = np.maximum(budget, t_q)
    held = np.minimum(1.0, units * unit_tokens / tokens)
    mean = (a * attn + b * tokens) * held / units
    peak = np.zeros(n_steps)
    np.maximum.at(peak, s, floor[full])
    used = np.bincount(s, minlength=n_steps) > 0
    if not used.any():
        return 1.0
    return float(np.mean(np.maximum(peak[used], mean[used]) / mean[used]))


def tune(lengths, max_piece: int, units: int, unit_tokens: int, budget: int,
         cost_model: CostModel, max_token_delay: float) -> tuple[list[int], float]:
    """Thresholds that minimise the estimated imbalance (plus DELAY_WEIGHT × delay, plus
    OVER_BUDGET_WEIGHT × the delay beyond ``max_token_delay``), all at once and without replays
    (``ThresholdSearch`` spreads the same search over steps). Returns (thresholds, score)."""
    search = ThresholdSearch.start(lengths, max_piece, [])
    while not search.done:
        search.advance(10 ** 9, units, unit_tokens, budget, cost_model, max_token_delay)
    return search.best, search.best_score


def _score(lengths, ts, units, unit_tokens, budget, cost_model, max_token_delay
           ) -> tuple[float, float]:
    """(score, estimated delay) of threshold set ``ts``."""
    imb, delay = estimate(lengths, ts, units, unit_tokens, budget, cost_model)
    return _penalised(imb, delay, ts, max_token_delay), delay


def _penalised(imb: float, delay: float, ts, max_token_delay: float) -> float:
    # no queue is always allowed: the carry-over's own delay is not the queues' to save
    over = 0.0 if not ts else max(0.0, delay - max_token_delay)
    return imb + DELAY_WEIGHT * delay + OVER_BUDGET_WEIGHT * over


def verified_delay(estimated: float, replayed: float) -> float:
    """The delay a replayed threshold set is held to the budget with. The estimate counts a
    group still open at the window's end at its band's mean wait, the replay only what its
    pieces have waited so far: where a rare band's group is open the estimate runs long and the
    replay short, so they meet halfway. The replay also counts what the estimate cannot (the
    carry-over, refine's holds), so it is never undercut. ``replayed`` is already shifted by the
    margins (the estimate is held to the budget less them, the replay to all of it). Held to the
    larger of the two, sets whose top queue sits at ½ context lost on the shared files at 0.5
    steps (twelve seeds: BENCHMARKS.md, "Shipped 2026-12-07 (a seventh session)")."""
    return max(replayed, (estimated + replayed) / 2)


class ThresholdSearch:
    """Forward selection on CANDIDATE_FRACTIONS of the longest piece (add the threshold that
    helps most, up to MAX_QUEUES), then each threshold nudged to its grid neighbours; on a
    snapshot of the window, a bounded number of estimates per ``advance`` so that no step pays
    for a whole search. With ``replay`` set, the VERIFY_CANDIDATES best-scored sets and the
    current ones are then replayed (replay.py) on the window's last REPLAY_STEPS steps, a
    bounded number of replay steps per ``advance``, and the replayed imbalance decides. Its
    fields are plain lists and numbers: it is saved with the packer."""

    def __init__(self, lengths, grid, current, stage, best, best_score, todo, stage_best,
                 stage_score, current_score, replay=None, seen=None, verify=None):
        self.lengths, self.grid, self.current = lengths, grid, current
        self.stage, self.best, self.best_score = stage, best, best_score
        self.todo, self.stage_best, self.stage_score = todo, stage_best, stage_score
        self.current_score = current_score
        # refine's (moves, max_carry) and the delay margin the estimate is held to (see
        # ThresholdTuner.queue_delay) for the replays, or None to trust the estimate alone
        self.replay = replay
        self.seen = seen if seen is not None else []  # [thresholds, score, delay] estimated
        # while verifying: {"window_from", "queue" of sets, "results" so far, "replay": the
        # running Replay (a state dict only in state_dict)}
        self.verify = verify
        self._replay_window = None  # the verify window as lists; a cache, not saved

    @classmethod
    def start(cls, lengths, max_piece: int, current: list[int],
              replay: Optional[tuple[int, int, float]] = None) -> "ThresholdSearch":
        grid = candidate_grid(max_piece)
        # stage 0 scores "no queue" and the current thresholds; then forward rounds 1..MAX_QUEUES
        return cls(as_records(lengths), grid, list(current), 0, [], np.inf,
                   [[], list(current)], [], np.inf, np.inf, replay=replay)

    @property
    def done(self) -> bool:
        return self.stage < 0

    def advance(self, evals: int, units, unit_tokens, budget, cost_model, max_token_delay,
                replay_steps: int = 10 ** 9) -> None:
        while evals > 0 and not self.done and self.stage != _VERIFY:
            if self.todo:
                ts = self.todo.pop(0)
                score, delay = _score(self.lengths, ts, units, unit_tokens, budget, cost_model,
                                      max_token_delay)
                self.seen.append([ts, score, delay])
                evals -= 1
                if ts == self.current:
                    self.current_score = score
                if ts and self.stage == 0:
                    continue  # the current thresholds are only the bar to beat
                if score < self.stage_score:
                    self.stage_best, self.stage_score = ts, score
                continue
            self._next_stage(budget)
        if self.stage == _VERIFY:
            self._replay(replay_steps, units, unit_tokens, budget, cost_model, max_token_delay)

    def _next_stage(self, budget) -> None:
        improved = self.stage_score < self.best_score
        if improved:
            self.best, self.best_score = self.stage_best, self.stage_score
        last_forward = self.stage >= MAX_QUEUES
        if self.stage > 0 and (not improved or last_forward) or self.stage > MAX_QUEUES:
            if self.stage <= MAX_QUEUES:  # forward selection ended: one nudging pass
                self.stage = MAX_QUEUES + 1
                self.todo = self._nudges()
                self.stage_best, self.stage_score = self.best, self.best_score
                if self.todo:
                    return
            if self.replay is not None:
                self._start_verify(budget)
                return
            self.stage = -1
            return
        self.stage += 1
        self.todo = [sorted(self.best + [t]) for t in self.grid if t not in self.best]
        self.stage_best, self.stage_score = self.best, self.best_score

    def _start_verify(self, budget) -> None:
        if self.lengths[:, 0].sum() < MIN_REPLAY_STEPS * budget:
            self.stage = -1  # too few steps to replay: they would rank noise
            return
        best_first = sorted(self.seen, key=lambda row: row[1])
        queue = []
        for ts, _, _ in best_first:
            if ts not in queue and len(queue) < VERIFY_CANDIDATES:
                queue.append(ts)
        if self.current not in queue:  # scored in stage 0
            queue.append(self.current)
        # the same most recent steps for every set, so that they are compared on equal terms
        tokens = np.cumsum(self.lengths[::-1, 0])
        back = int(np.searchsorted(tokens, REPLAY_STEPS * budget))
        window_from = max(0, len(self.lengths) - back - 1)
        self.stage = _VERIFY
        self.verify = {"window_from": window_from, "queue": queue, "results": [],
                       "replay": Replay(queue[0])}

    def _replay(self, steps, units, unit_tokens, budget, cost_model, max_token_delay) -> None:
        moves, max_carry, margin = self.replay
        # the window as plain lists, converted once per search rather than on every call (it
        # costs about a replay step): a cache only, not saved, rebuilt after from_state
        if self._replay_window is None:
            self._replay_window = self.lengths[self.verify["window_from"]:].tolist()
        window = self._replay_window
        while steps > 0:
            replay = self.verify["replay"]
            before = len(replay.imbalances)
            replay.advance(window, steps, units, unit_tokens, budget, cost_model, moves,
                           max_carry)
            steps -= max(1, len(replay.imbalances) - before)
            if not replay.done:
                return
            ts = replay.thresholds
            estimated = next(delay for seen, _, delay in self.seen if seen == ts)
            delay = verified_delay(estimated, replay.delay() + REPLAY_DELAY_MARGIN - margin)
            score = _penalised(replay.imbalance(), delay, ts, max_token_delay)
            self.verify["results"].append([ts, score])
            done = len(self.verify["results"])
            if done == len(self.verify["queue"]):
                self._finish_verify()
                return
            self.verify["replay"] = Replay(self.verify["queue"][done])

    def _finish_verify(self) -> None:
        results = self.verify["results"]
        best, score = min(results, key=lambda row: row[1])
        self.best, self.best_score = list(best), score
        self.current_score = next((s for ts, s in results if ts == self.current), np.inf)
        self.stage, self.verify = -1, None

    def _nudges(self) -> list[list[int]]:
        out = []
        for i, t in enumerate(self.best):
            for u in _neighbours(self.grid, t):
                ts = sorted(self.best[:i] + [u] + self.best[i + 1:])
                if u not in self.best and ts not in out:
                    out.append(ts)
        return out

    def state_dict(self) -> dict:
        def num(x):
            return None if not np.isfinite(x) else float(x)
        return {"lengths": self.lengths.tolist(), "grid": self.grid, "current": self.current,
                "stage": self.stage, "best": self.best, "best_score": num(self.best_score),
                "todo": self.todo, "stage_best": self.stage_best,
                "stage_score": num(self.stage_score), "current_score": num(self.current_score),
                "replay": None if self.replay is None else list(self.replay),
                "seen": [[ts, num(score), float(delay)] for ts, score, delay in self.seen],
                "verify": None if self.verify is None else
                {**self.verify, "replay": self.verify["replay"].state_dict()}}

    @classmethod
    def from_state(cls, state: dict) -> "ThresholdSearch":
        def num(x):
            return np.inf if x is None else float(x)
        ints = lambda xs: [int(v) for v in xs]  # noqa: E731
        replay = state.get("replay")
        verify = state.get("verify")
        if verify is not None:
            verify = {"window_from": int(verify["window_from"]),
                      "queue": [ints(ts) for ts in verify["queue"]],
                      "results": [[ints(ts), float(s)] for ts, s in verify["results"]],
                      "replay": Replay.from_state(verify["replay"])}
        return cls(as_records(np.asarray(state["lengths"], dtype=np.int64).reshape(-1, 3)),
                   ints(state["grid"]),
                   ints(state["current"]), int(state["stage"]), ints(state["best"]),
                   num(state["best_score"]), [ints(t) for t in state["todo"]],
                   ints(state["stage_best"]), num(state["stage_score"]),
                   num(state["current_score"]),
                   replay=None if replay is None else (int(replay[0]), int(replay[1]),
                                                       float(replay[2])),
                   seen=[[ints(ts), num(score), float(delay)]
                         for ts, score, delay in state.get("seen", [])],
                   verify=verify)


# The stage of a search replaying its best-scored threshold sets (after the nudging pass).
_VERIFY = MAX_QUEUES + 2


def _neighbours(grid: list[int], t: int) -> list[int]:
    i = grid.index(t) if t in grid else int(np.searchsorted(grid, t))
    return [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]


class ThresholdTuner:
    """The window of observed piece lengths, and a search in progress; the packer owns the
    queues. Every RETUNE_EVERY steps (first once the window spans MIN_WINDOW_STEPS) a search
    starts on a snapshot of the window and runs a bounded number of estimates a step
    (EVAL_RECORDS_PER_STEP), then of replay steps (REPLAY_STEPS_PER_PLAN); when it ends, its
    best thresholds replace the current ones if clearly better on that snapshot.

    units, unit_tokens, budget: as the packer's (see ``estimate``); max_piece: the longest piece
    the stream emits (the grid scales with it); refine_moves, max_carry: the packer's refine
    (moves a step, tokens it may hold back), which the replays imitate.
    """

    def __init__(self, max_piece: int, units: int, unit_tokens: int, budget: int,
                 cost_model: CostModel, max_token_delay: float, refine: bool = False,
                 window: int = TUNE_WINDOW, refine_moves: int = 0, max_carry: int = 0):
        if not (max_token_delay >= 0):
            raise ValueError(f"max_token_delay must be >= 0 steps, got {max_token_delay}")
        self.max_piece, self.units, self.unit_tokens = max_piece, units, unit_tokens
        self.budget, self.cost_model = budget, cost_model
        self.max_token_delay = float(max_token_delay)
        # what the queues may spend: the budget less the delay they do not cause
        self.queue_delay = max(0.0, self.max_token_delay - CARRY_DELAY
                               - (REFINE_HOLD_DELAY if refine else 0.0))
        margin = self.max_token_delay - self.queue_delay
        self.replay = (refine_moves, max_carry, margin) if refine else (0, 0, margin)
        self.window: deque[tuple[int, int, int]] = deque(maxlen=window)  # pool_shorts records
        self._pooler = _Pooler(short_below(max_piece), max_piece, self.window)
        self.search: Optional[ThresholdSearch] = None
        self.searches = 0  # searches started
        self.retunes = 0  # how many times the thresholds moved

    def observe(self, length: int) -> None:
        self._pooler.add(int(length))

    def due(self, step: int) -> bool:
        """Every RETUNE_EVERY steps; first as soon as the window spans MIN_WINDOW_STEPS steps
        (a shorter one misjudges rare lengths: one 128K document is a band or not)."""
        if self.searches:
            return step % RETUNE_EVERY == 0
        return sum(r[0] for r in self.window) >= MIN_WINDOW_STEPS * self.budget

    def step(self, step: int, current: list[int]) -> Optional[list[int]]:
        """Advance the tuning by one packer step; new thresholds, or None to keep ``current``."""
        # the full pieces' own queue is the start's only (see default_outlier_thresholds): the
        # search weighs the rest, and where nothing beats them by enough, they stay alone
        searched = [t for t in current if t < self.max_piece]
        if self.search is None and self.due(step) and self.window:
            self.searches += 1
            snapshot = np.array(self.window, dtype=np.int64).reshape(-1, 3)
            self.search = ThresholdSearch.start(snapshot, self.max_piece, searched, self.replay)
        if self.search is None:
            return None
        size = len(self.search.lengths) + ESTIMATE_OVERHEAD_RECORDS
        evals = max(1, EVAL_RECORDS_PER_STEP // size)
        self.search.advance(evals, self.units, self.unit_tokens, self.budget,
                            self.cost_model, self.queue_delay, REPLAY_STEPS_PER_PLAN)
        if not self.search.done:
            return None
        search, self.search = self.search, None
        better = search.best_score < search.current_score - RETUNE_MIN_GAIN
        chosen = search.best if better else searched
        if chosen == list(current):
            return None
        self.retunes += 1
        return chosen

    def state_dict(self) -> dict:
        return {"window": [list(r) for r in self.window], "max_token_delay": self.max_token_delay,
                "retunes": self.retunes, "searches": self.searches,
                "search": None if self.search is None else self.search.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(tuple(int(v) for v in r) for r in state["window"])
        self.retunes = int(state.get("retunes", 0))
        self.searches = int(state.get("searches", 0))
        search = state.get("search")
        self.search = None if search is None else ThresholdSearch.from_state(search)
