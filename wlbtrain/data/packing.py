"""Packers: which document pieces go into which micro-batch of a global batch.

A global batch is ``n_micro_batches`` = DP × PP micro-batches planned together (micro-batch m runs
on DP rank m // micro_batches as pipeline micro-batch m % micro_batches). The slowest micro-batch
sets the pace of the pipeline and of the DP all-reduce, so what matters is the balance of the
micro-batches' estimated cost (``CostModel``), not of their token counts. A DP rank trains a
contiguous slice of the plan and, without a pipeline, takes the sum of its slice, so fixed and wlb
hand a step's micro-batches out in ``rank_balanced_order`` (never sorted by cost):

- ``plain``: stream order, fixed ``context`` tokens per micro-batch, pieces cut at the boundary.
  What today's frameworks do; the baseline.
- ``fixed``: fixed ``context`` tokens per micro-batch, but the pieces of a window of
  ``fixed_window`` global batches are dealt out greedily by cost (longest first onto the
  least-loaded micro-batch), then the micro-batches are grouped into steps by cost.
- ``wlb``: WLB-LLM's variable-length packing. Micro-batches hold up to ``max_tokens`` tokens; the
  longest piece goes first onto the least-loaded micro-batch with room, else onto the one with
  fewest tokens, else it is carried to the next step. Outliers (pieces at or above the lowest
  threshold) wait in FIFO ``OutlierQueue``s by length and are released together, one per
  micro-batch, once a queue holds as many pieces as there are micro-batches: long documents then
  share a step with documents of similar length instead of stalling it alone. With ``refine`` a
  bounded local search (moves and swaps between micro-batches, short pieces held back from the
  most loaded ones or put in from the carry-over) then drives the step's imbalance towards 1.
  Without a pipeline, ``ranks`` makes a DP rank's micro-batches together the unit it balances.
  With ``outlier_thresholds="auto"`` (the default) a ``ThresholdTuner`` (tuning.py) moves the
  thresholds as it learns the length distribution, within a token-delay budget; when they move,
  queued pieces are queued again by the new bands (or carried), in the order they were pulled.

Every piece a stream emits is trained exactly once: packers hold back pieces (the cut remainder,
planned windows, queues, carry-over) only in their state, which ``state_dict`` saves with the
step at which each piece left the stream, so resuming reproduces the same future plan. All
planning is deterministic (bounded by move counts, not wall time) for that reason.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Optional

import numpy as np

from wlbtrain.data.cost import CostModel
from wlbtrain.data.refine import DEFAULT_REFINE_MOVES, refine_plan
from wlbtrain.data.tuning import DEFAULT_MAX_TOKEN_DELAY, ThresholdTuner

Piece = tuple[int, int, int]  # (doc_id, start, length)
# A piece held by a packer also remembers the step it was pulled from the stream at:
# (doc_id, start, length, pulled_step). Token delay = training step − pulled_step.
Item = tuple[int, int, int, int]

PACKINGS = ("plain", "fixed", "wlb")
# wlb outlier thresholds as fractions of the longest piece; see default_outlier_thresholds.
DEFAULT_THRESHOLD_FRACTIONS = (0.25, 0.5, 1.0)
AUTO = "auto"  # data.outlier_thresholds: tuned online (wlbtrain.data.tuning)


def max_piece_for(packing: str, context: int, max_tokens_per_micro_batch: int) -> int:
    """The longest piece the stream may emit: never longer than the context window the model
    trains on, and for wlb never longer than one of its micro-batches holds. A wlb cap above the
    context lets a micro-batch add short documents beside a long one; it does not lengthen
    the attention span."""
    _check_packing(packing)
    return min(context, max_tokens_per_micro_batch) if packing == "wlb" else context


def default_outlier_thresholds(max_piece: int) -> list[int]:
    """Where ``auto`` starts, until its first search ends: at 1/4, 1/2 and all of the longest
    piece (``max_piece_for``).

    The first two were tuned on the doclens samples (see BENCHMARKS.md, "Packing balance"): a
    queue adds about (mean length of its pieces) / (2 · context) steps of average token delay
    whatever its threshold, so two queues stay under half a step, while below a quarter of the
    longest piece the greedy balances pieces well by itself. The last is a queue of full pieces
    alone (documents longer than the context are cut into them): a full piece fills its
    micro-batch, so a step that holds one balances only if every micro-batch holds one. Grouped
    with shorter outliers in the top queue, documents longer than the context (all-long at
    7B-128K) ran at 1.1–1.5 until the first search (BENCHMARKS.md, "a queue for full pieces").
    That queue is the start's only: the first search weighs the other two against its
    candidates and, where none beats them, keeps them without it (ThresholdTuner.step).
    """
    return sorted({max(1, int(max_piece * f)) for f in DEFAULT_THRESHOLD_FRACTIONS})


def balance_ranks(balance: str, dp: int, pp: int) -> Optional[int]:
    """``data.balance`` as make_packer's ``ranks`` option: None to balance micro-batches (what a
    pipeline waits for), else the number of DP ranks whose summed work is balanced."""
    if balance not in ("micro_batches", "ranks"):
        raise ValueError(f"balance {balance!r}: expected micro_batches or ranks")
    if balance == "micro_batches":
        return None
    if pp > 1:
        raise ValueError("balance ranks is for layouts without a pipeline (pp = 1): a pipeline "
                         "waits for its slowest micro-batch, use micro_batches")
    return dp


def make_packer(packing: str, *, context: int, max_tokens_per_micro_batch: int | None = None,
                n_micro_batches: int, cost_model: CostModel, **options) -> "Packer":
    """Build the packer named by ``data.packing``.

    options (each ignored by packers it does not concern): outlier_thresholds (list[int], or
    "auto" / None: tuned online), max_token_delay (auto's budget of average token delay in
    steps; default DEFAULT_MAX_TOKEN_DELAY), refine (bool, default True), refine_moves (int),
    max_carry (tokens refine may hold back per step; default: context), fixed_window (int,
    default 1), ranks (wlb: None
    balances micro-batches, for a pipeline; an int balances the sums of that many DP ranks'
    micro-batches, for data parallelism without a pipeline).
    """
    _check_packing(packing)
    known = {"outlier_thresholds", "max_token_delay", "refine", "refine_moves", "max_carry",
             "fixed_window", "ranks"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown packer option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    if context <= 0 or n_micro_batches <= 0:
        raise ValueError(f"context ({context}) and n_micro_batches ({n_micro_batches}) must be positive")
    if packing == "plain":
        return PlainPacker(n_micro_batches, cost_model, context)
    if packing == "fixed":
        return FixedPacker(n_micro_batches, cost_model, context,
                           window=1 if options.get("fixed_window") is None else options["fixed_window"])
    max_tokens = max_tokens_per_micro_batch or context
    return WlbPacker(n_micro_batches, cost_model, context, max_tokens,
                     thresholds=options.get("outlier_thresholds"),
                     refine=True if options.get("refine") is None else options["refine"],
                     refine_moves=options.get("refine_moves", DEFAULT_REFINE_MOVES),
                     max_carry=options.get("max_carry"), ranks=options.get("ranks"),
                     max_token_delay=options.get("max_token_delay"))


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"packing {packing!r}: expected one of {', '.join(PACKINGS)}")


# ----------------------------------------------------------------------------------------- base

class Packer:
    """Plans one global batch per ``pack`` call; subclasses implement ``_plan``."""

    name = "base"

    def __init__(self, n_micro_batches: int, cost_model: CostModel):
        self.n_micro_batches = n_micro_batches
        self.cost_model = cost_model
        self.step = 0  # global batches planned so far
        # delay in steps of every piece of the last plan, in the plan's shape
        self.last_delays: list[list[int]] = []

    def pack(self, stream) -> Optional[list[list[Piece]]]:
        plan = self._plan(stream)
        if plan is None:
            return None
        self.last_delays = [[self.step - item[3] for item in mb] for mb in plan]
        self.step += 1
        return [[item[:3] for item in mb] for mb in plan]

    def pending(self) -> list[Piece]:
        return [item[:3] for item in self._held()]

    def state_dict(self) -> dict:
        return {"packing": self.name, "n_micro_batches": self.n_micro_batches,
                "step": self.step, **self._state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("packing") != self.name or state.get("n_micro_batches") != self.n_micro_batches:
            raise ValueError(
                f"packer state is for packing {state.get('packing')!r} with "
                f"{state.get('n_micro_batches')} micro-batches, but this run uses {self.name!r} "
                f"with {self.n_micro_batches}: resume with the same data.packing and layout")
        self.step = int(state["step"])
        self._load(state)

    def _pull(self, stream) -> Optional[Item]:
        piece = stream.next()
        return None if piece is None else (*map(int, piece), self.step)

    # subclass hooks
    def _plan(self, stream) -> Optional[list[list[Item]]]:
        raise NotImplementedError

    def _held(self) -> list[Item]:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    def _load(self, state: dict) -> None:
        raise NotImplementedError


def _items(rows) -> list[Item]:
    return [tuple(int(v) for v in row) for row in rows]


def _cut(item: Item, head: int) -> tuple[Item, Item]:
    """Split a piece after ``head`` tokens; both halves keep the pull step."""
    doc, start, length, pulled = item
    return (doc, start, head, pulled), (doc, start + head, length - head, pulled)


def _tokens(items: Iterable[Item]) -> int:
    return sum(item[2] for item in items)


# ---------------------------------------------------------------------------------------- plain

class PlainPacker(Packer):
    """Stream order, exactly ``context`` tokens per micro-batch; the cut remainder waits."""

    name = "plain"

    def __init__(self, n_micro_batches: int, cost_model: CostModel, context: int):
        super().__init__(n_micro_batches, cost_model)
        self.context = context
        self.held: list[Item] = []  # the remainder of a piece cut at a micro-batch boundary

    def _plan(self, stream):
        plan = [self._fill(stream) for _ in range(self.n_micro_batches)]
        return plan if any(plan) else None

    def _fill(self, stream) -> list[Item]:
        micro_batch, room = [], self.context
        while room > 0:
            item = self.held.pop(0) if self.held else self._pull(stream)
            if item is None:
                break
            if item[2] > room:
                item, rest = _cut(item, room)
                self.held.insert(0, rest)
            micro_batch.append(item)
            room -= item[2]
        return micro_batch

    def _held(self):
        return list(self.held)

    def _state(self):
        return {"held": [list(i) for i in self.held]}

    def _load(self, state):
        self.held = _items(state["held"])


# ---------------------------------------------------------------------------------------- fixed

class FixedPacker(Packer):
    """Fixed-length micro-batches, balanced greedily by cost over a window of global batches."""

    name = "fixed"

    def __init__(self, n_micro_batches: int, cost_model: CostModel, context: int, window: int = 1):
        super().__init__(n_micro_batches, cost_model)
        if window < 1:
            raise ValueError(f"fixed_window must be >= 1, got {window}")
        self.context = context
        self.window = window
        self.held: list[Item] = []  # remainder of the piece cut at the window's token budget
        self.planned: list[list[list[Item]]] = []  # planned global batches not yet handed out

    def _plan(self, stream):
        if not self.planned:
            self.planned = self._plan_window(stream)
        return self.planned.pop(0) if self.planned else None

    def _plan_window(self, stream) -> list[list[list[Item]]]:
        n_bins = self.window * self.n_micro_batches
        pool = self._take_exactly(stream, n_bins * self.context)
        bins = fixed_length_greedy(pool, n_bins, self.context, self.cost_model)
        return group_into_steps(bins, self.n_micro_batches, self.cost_model)

    def _take_exactly(self, stream, budget: int) -> list[Item]:
        """Pull pieces worth exactly ``budget`` tokens (fewer at the end), cutting the last."""
        pool, self.held = self.held, []
        tokens = _tokens(pool)
        while tokens < budget:
            item = self._pull(stream)
            if item is None:
                break
            pool.append(item)
            tokens += item[2]
        if tokens > budget:
            head, rest = _cut(pool[-1], pool[-1][2] - (tokens - budget))
            pool[-1] = head
            self.held = [rest]
        return pool

    def _held(self):
        return [item for step in self.planned for mb in step for item in mb] + self.held

    def _state(self):
        return {"held": [list(i) for i in self.held],
                "planned": [[[list(i) for i in mb] for mb in step] for step in self.planned]}

    def _load(self, state):
        self.held = _items(state["held"])
        self.planned = [[_items(mb) for mb in step] for step in state["planned"]]


def fixed_length_greedy(pool: list[Item], n_bins: int, capacity: int,
                        cost_model: CostModel) -> list[list[Item]]:
    """Longest piece first onto the least-loaded bin with room; a piece no bin can take whole is
    cut over the emptiest bins, so every bin ends exactly full when the pool fills them all."""
    bins: list[list[Item]] = [[] for _ in range(n_bins)]
    cost = np.zeros(n_bins)
    room = np.full(n_bins, capacity, dtype=np.int64)
    for item in sorted(pool, key=_longest_first):
        fits = room >= item[2]
        if fits.any():
            b = int(np.argmin(np.where(fits, cost, np.inf)))
            _place(bins, cost, room, b, item, cost_model)
            continue
        while item is not None and room.max() > 0:
            b = int(np.argmax(room))
            head, rest = _cut(item, int(room[b])) if item[2] > room[b] else (item, None)
            _place(bins, cost, room, b, head, cost_model)
            item = rest
    return bins


def _place(bins, cost, room, b, item, cost_model):
    bins[b].append(item)
    cost[b] += cost_model.piece_cost(item[2])
    room[b] -= item[2]


def group_into_steps(bins: list[list[Item]], n: int, cost_model: CostModel) -> list[list[list[Item]]]:
    """Micro-batches of similar cost share a step: sort by cost, take them n at a time. Within a
    step they are handed out in ``rank_balanced_order``, not by cost: a DP rank trains a
    contiguous slice of the step, and heaviest-first would make the first rank the straggler."""
    bins = [b for b in bins if b]
    bins.sort(key=lambda b: -cost_model.micro_batch_cost(i[2] for i in b))
    steps = [bins[k:k + n] for k in range(0, len(bins), n)]
    if steps:
        steps[-1] += [[] for _ in range(n - len(steps[-1]))]
    return [[step[i] for i in rank_balanced_order(_costs(step, cost_model))] for step in steps]


def _costs(bins: list[list[Item]], cost_model: CostModel) -> list[float]:
    return [cost_model.micro_batch_cost(it[2] for it in b) for b in bins]


def rank_balanced_order(costs) -> list[int]:
    """An order of a step's micro-batches whose contiguous equal slices have similar total cost.

    DP rank r trains micro-batches [r·k, (r+1)·k) of a step (k per rank), and without a
    pipeline its time is their sum; the packer knows only n = dp·k. So the order balances every
    slicing it can at once: split n into p equal groups of similar total cost (p the smallest
    prime factor of n; heaviest first onto the lightest group with room), lightest group first,
    and order each group the same way, recursively. That balances the slices of every dp that is
    a product of n's smallest prime factors taken in order (all powers of two when n is one).
    Deterministic: ties go by index.
    """
    return _balanced(list(range(len(costs))), [float(c) for c in costs])


def _balanced(idx: list[int], costs: list[float]) -> list[int]:
    n = len(idx)
    if n <= 1:
        return idx
    p = next(f for f in range(2, n + 1) if n % f == 0)
    size = n // p
    groups: list[list[int]] = [[] for _ in range(p)]
    sums = [0.0] * p
    for i in sorted(idx, key=lambda i: (-costs[i], i)):
        g = min((g for g in range(p) if len(groups[g]) < size), key=lambda g: (sums[g], g))
        groups[g].append(i)
        sums[g] += costs[i]
    order = sorted(range(p), key=lambda g: (sums[g], g))
    return [i for g in order for i in _balanced(sorted(groups[g]), costs)]


def _longest_first(item: Item):
    # ties by pull step then position in the stream: deterministic and oldest first
    return (-item[2], item[3], item[0], item[1])


# ------------------------------------------------------------------------------------------ wlb

class OutlierQueue:
    """FIFO of outlier pieces with length in [low, high), released n at a time."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high
        self.items: deque[Item] = deque()

    def __len__(self):
        return len(self.items)

    def accepts(self, length: int) -> bool:
        return self.low <= length < self.high

    def release(self, n: int) -> list[Item]:
        return [self.items.popleft() for _ in range(min(n, len(self.items)))]


class WlbPacker(Packer):
    """Variable-length packing with outlier delay (WLB-LLM), optionally refined by local search.

    What it balances depends on what waits for what. In a pipeline every micro-batch is a unit
    (``ranks=None``): the slowest one sets the pace. Without a pipeline a DP rank runs its
    micro-batches back to back and the ranks meet at the gradient reduction, so the unit is a
    rank (``ranks=dp``): its micro-batches together, up to micro_batches × max_tokens tokens,
    then dealt into micro-batches by tokens. Outlier groups then need one piece per rank, not
    per micro-batch, and fill dp× faster; with one rank nothing waits at all.
    """

    name = "wlb"

    def __init__(self, n_micro_batches: int, cost_model: CostModel, context: int, max_tokens: int,
                 thresholds: Optional[list[int] | str] = None, refine: bool = True,
                 refine_moves: int = DEFAULT_REFINE_MOVES, max_carry: Optional[int] = None,
                 ranks: Optional[int] = None, max_token_delay: Optional[float] = None):
        super().__init__(n_micro_batches, cost_model)
        if max_tokens <= 0:
            raise ValueError(f"max_tokens_per_micro_batch must be positive, got {max_tokens}")
        if ranks is not None and (ranks <= 0 or n_micro_batches % ranks):
            raise ValueError(f"ranks ({ranks}) must divide the {n_micro_batches} micro-batches")
        self.ranks = ranks
        # balance units (micro-batches, or ranks) and the tokens each holds
        self.units = ranks or n_micro_batches
        self.unit_tokens = max_tokens * (n_micro_batches // self.units)
        self.context = context
        self.max_tokens = max_tokens
        self.refine = refine
        self.refine_moves = refine_moves
        self.max_carry = context if max_carry is None else max_carry
        self.carry: list[Item] = []  # pieces that did not fit the last step
        # tokens a step pulls: what fixed-length packing would train, so steps stay comparable,
        # but never more than the micro-batches can hold: a step that pulled n·context tokens
        # into n·max_tokens of room (max_tokens < context) would carry the excess over forever
        self.budget = n_micro_batches * min(context, max_tokens)
        max_piece = min(context, max_tokens)
        self.tuner: Optional[ThresholdTuner] = None
        if thresholds is None or thresholds == AUTO:
            delay = DEFAULT_MAX_TOKEN_DELAY if max_token_delay is None else max_token_delay
            self.tuner = ThresholdTuner(max_piece, self.units, self.unit_tokens, self.budget,
                                        cost_model, delay, refine=refine,
                                        refine_moves=refine_moves, max_carry=self.max_carry)
            thresholds = default_outlier_thresholds(max_piece)
        elif isinstance(thresholds, str):
            raise ValueError(f"outlier thresholds {thresholds!r}: expected {AUTO!r} or a list of "
                             f"token counts")
        elif max_token_delay is not None:
            raise ValueError("max_token_delay is the budget of auto outlier thresholds; the "
                             f"thresholds {thresholds} are fixed")
        self.thresholds = sorted(int(t) for t in thresholds)
        if any(t <= 0 for t in self.thresholds):
            raise ValueError(f"outlier thresholds must be positive, got {self.thresholds}")
        self.queues = _queues(self.thresholds)

    def _plan(self, stream):
        if self.tuner is not None:
            moved = self.tuner.step(self.step, self.thresholds)
            if moved is not None:
                self._move_thresholds(moved)
        groups, pool = self._gather(stream)
        if not groups and not pool:
            return None
        units, cap, cm = self.units, self.unit_tokens, self.cost_model
        bins, returned = place_outlier_groups(groups, units, cap, cm)
        for item in reversed(returned):  # back to the head of its queue: FIFO order kept
            if not self._return_to_queue(item):
                pool.append(item)
        # Carried pieces first, whatever their length: otherwise the same short pieces lose to
        # fresh longer ones step after step and their delay grows without bound. Refine holds
        # back only fresh pieces, so nothing starves there either.
        bins, left = greedy_pack(pool, units, cap, cm, bins=bins, first=lambda it: it[3] < self.step)
        if self.refine:
            bins, left = refine_plan(bins, left, cap, cm, max_moves=self.refine_moves,
                                     max_carry=self.max_carry, may_hold=self._may_hold)
        if self.ranks is None:
            plan = [bins[i] for i in rank_balanced_order(_costs(bins, cm))]
        else:  # rank-major, as the trainer deals them: rank r trains micro-batches r·k .. r·k+k-1
            plan = []
            for rank_items in bins:
                micro_batches, spilled = deal_by_tokens(rank_items, self.n_micro_batches // units,
                                                        self.max_tokens)
                plan += micro_batches
                left += spilled
        self.carry = left
        return plan

    def _may_hold(self, item: Item) -> bool:
        # Only fresh pieces below the outlier thresholds: a held piece waits one step, and an
        # outlier held back would land next step without the similar outliers of its group.
        short = not self.thresholds or item[2] < self.thresholds[0]
        return short and item[3] == self.step

    def _gather(self, stream) -> tuple[list[list[Item]], list[Item]]:
        """This step's candidates: released outlier groups, and the carry-over plus fresh pieces
        up to the token budget (released outliers count towards it)."""
        pool, groups = self.carry, []
        self.carry = []
        tokens = _tokens(pool)
        for queue in self.queues:  # full queues from earlier steps go first
            while len(queue) >= self.units and tokens < self.budget:
                groups.append(queue.release(self.units))
                tokens += _tokens(groups[-1])
        exhausted = False
        while tokens < self.budget:
            item = self._pull(stream)
            if item is None:
                exhausted = True
                break
            if self.tuner is not None:
                self.tuner.observe(item[2])
            queue = self._queue_for(item[2])
            if queue is None:
                pool.append(item)
                tokens += item[2]
                continue
            queue.items.append(item)
            # A queue that fills releases at once, even past the budget: the short pieces it
            # pushes out wait one step instead of the whole group.
            if len(queue) >= self.units:
                groups.append(queue.release(self.units))
                tokens += _tokens(groups[-1])
        if exhausted:  # no more pieces will come to fill the queues: flush them
            for queue in self.queues:
                while len(queue):
                    groups.append(queue.release(self.units))
        return groups, pool

    def _queue_for(self, length: int) -> Optional[OutlierQueue]:
        for queue in self.queues:
            if queue.accepts(length):
                return queue
        return None

    def _move_thresholds(self, thresholds: list[int]) -> None:
        """Give the queues new bands; what they hold is queued again by the new bands.

        Held pieces keep their pull order (oldest first), so a piece that waited leaves with its
        new queue's next group. A piece below every new band joins the carry-over, placed first
        next step, as it would have been had it arrived now.
        """
        held = sorted((item for queue in self.queues for item in queue.items),
                      key=lambda item: item[3])
        self.thresholds = list(thresholds)
        self.queues = _queues(self.thresholds)
        for item in held:
            queue = self._queue_for(item[2])
            if queue is None:
                self.carry.append(item)
            else:
                queue.items.append(item)

    def _return_to_queue(self, item: Item) -> bool:
        # a queued piece lies in its queue's band, except in a state saved before a move re-queued
        # held pieces (queues then kept theirs): the lowest queue takes one below every band
        queue = self._queue_for(item[2]) or (self.queues[0] if self.queues else None)
        if queue is not None:
            queue.items.appendleft(item)
        return queue is not None

    def _held(self):
        return list(self.carry) + [item for q in self.queues for item in q.items]

    def _state(self):
        state = {"thresholds": list(self.thresholds), "ranks": self.ranks,
                 "carry": [list(i) for i in self.carry],
                 "queues": [[list(i) for i in q.items] for q in self.queues]}
        if self.tuner is not None:
            state["tuner"] = self.tuner.state_dict()
        return state

    def _load(self, state):
        thresholds = [int(t) for t in state["thresholds"]]
        if self.tuner is None and thresholds != list(self.thresholds):
            raise ValueError(f"packer state has outlier thresholds {state['thresholds']}, this run "
                             f"{self.thresholds}: resume with the same data.outlier_thresholds")
        # auto: the saved thresholds are where tuning had moved the queues; a state from fixed
        # thresholds (no "tuner") resumes with those and an empty window
        self.thresholds = thresholds
        self.queues = _queues(thresholds)
        if self.tuner is not None and "tuner" in state:
            self.tuner.load_state_dict(state["tuner"])
        self.carry = _items(state["carry"])
        for queue, items in zip(self.queues, state["queues"]):
            queue.items = deque(_items(items))


def _queues(thresholds: list[int]) -> list[OutlierQueue]:
    bounds = list(thresholds) + [np.iinfo(np.int64).max]
    return [OutlierQueue(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def deal_by_tokens(items: list[Item], k: int, capacity: int) -> tuple[list[list[Item]], list[Item]]:
    """Deal one rank's pieces into k micro-batches of at most ``capacity`` tokens: longest first
    onto the micro-batch with the fewest tokens (even memory), else onto any with room. Their
    costs need no balance, the rank runs them back to back. Returns (micro-batches, pieces no
    micro-batch had room for, which are carried over)."""
    micro_batches: list[list[Item]] = [[] for _ in range(k)]
    tokens = [0] * k
    spilled: list[Item] = []
    for item in sorted(items, key=_longest_first):
        order = sorted(range(k), key=lambda b: (tokens[b], b))
        b = next((b for b in order if tokens[b] + item[2] <= capacity), None)
        if b is None:
            spilled.append(item)
            continue
        micro_batches[b].append(item)
        tokens[b] += item[2]
    return micro_batches, spilled


def place_outlier_groups(groups: list[list[Item]], n: int, capacity: int, cost_model: CostModel
                         ) -> tuple[list[list[Item]], list[Item]]:
    """Released outliers go one per balance unit: each group's longest onto the least-loaded.

    A piece that does not fit its unit is returned (it rejoins its queue rather than
    being carried alone into a step without similar outliers). Returns (bins, returned).
    """
    bins: list[list[Item]] = [[] for _ in range(n)]
    cost, tokens, returned = [0.0] * n, [0] * n, []
    for group in sorted(groups, key=lambda g: -max(it[2] for it in g)):
        order = sorted(range(n), key=lambda b: (cost[b], b))
        for b, item in zip(order, sorted(group, key=_longest_first)):
            if tokens[b] + item[2] > capacity:
                returned.append(item)
                continue
            bins[b].append(item)
            cost[b] += cost_model.piece_cost(item[2])
            tokens[b] += item[2]
    return bins, sorted(returned, key=lambda it: it[3])


def greedy_pack(pool: list[Item], n: int, capacity: int, cost_model: CostModel,
                bins: Optional[list[list[Item]]] = None, first=None
                ) -> tuple[list[list[Item]], list[Item]]:
    """WLB-LLM's greedy: longest piece first onto the least-loaded micro-batch if it has room,
    else onto the one with fewest tokens if that has room, else it is left over.

    bins: micro-batches already started (default: n empty ones); first: optional predicate,
    pieces it selects are placed before the others, the oldest (earliest pulled) of them first,
    so a piece that keeps losing its place ages to the front. Returns (n micro-batches,
    leftovers).
    """
    if first is None:
        key = _longest_first
    else:
        def key(it):
            early = bool(first(it))
            return (not early, it[3] if early else 0, *_longest_first(it))
    bins = [list(b) for b in bins] if bins is not None else [[] for _ in range(n)]
    cost = [cost_model.micro_batch_cost(it[2] for it in b) for b in bins]
    tokens = [_tokens(b) for b in bins]
    left: list[Item] = []
    for item in sorted(pool, key=key):
        length = item[2]
        b = cost.index(min(cost))
        if tokens[b] + length > capacity:
            b = tokens.index(min(tokens))
            if tokens[b] + length > capacity:
                left.append(item)
                continue
        bins[b].append(item)
        cost[b] += cost_model.piece_cost(length)
        tokens[b] += length
    return bins, left
