"""The wlb packer replayed on a tuning window, to re-rank the thresholds the estimate likes best.

The tuner's closed-form estimate (tuning.py) counts every step as holding its token budget with
the unqueued pieces beside the released groups. Where groups fill whole steps (documents much
longer than the context: full-context pieces and their remainders) the remainders are carried
step after step until a step of remainders alone trains a fraction of its budget, badly
balanced; and where refine holds short pieces back, a micro-batch beside a long piece stays
under its cap. Neither is in the estimate. The replay runs the packer's own greedy over the
window's records, step by step, with the carry-over:

- released groups one piece per micro-batch first, a piece that does not fit back to its queue;
- then the carried pieces, then fresh ones longest first, onto the cheapest micro-batch with
  room, else the one with fewest tokens, else carried;
- pooled short pieces (``tuning.pool_shorts``) poured like water onto the cheapest micro-batches
  with room; what finds no room is carried;
- with refine, short pieces held back from the heaviest micro-batches, at most one piece of the
  short pieces' typical length a move (and the carry-over limit) a step, to the level that
  minimises the step's imbalance.

A replay advances a bounded number of steps at a time and its state is plain lists and numbers,
so a search spreads it over planning steps and is saved with the packer. A step is pure Python
over a handful of micro-batches, where numpy's per-call overhead would dominate: the records are
read as plain lists, and the water-filling evaluates its volume at O(log n) levels, not at every
breakpoint, with the very same arithmetic (the results are bit for bit those of the plain scan).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

import numpy as np

from wlbtrain.data.cost import CostModel

# Steps at the replay's start whose queues are still filling; left out of its imbalance.
REPLAY_WARM_UP = 2
# Water levels refine's hold-back is tried at, between the step's mean and its maximum.
SHED_LEVELS = 12


class Replay:
    """One threshold set replayed from the start of a records window (see module doc)."""

    def __init__(self, thresholds: list[int], position: int = 0, queues=None, carry=None,
                 water=(0.0, 0.0), imbalances=None, step: int = 0, waited=(0.0, 0.0),
                 split=None):
        self.thresholds = sorted(int(t) for t in thresholds)
        self.position = position  # next record of the window to pull
        # pieces as [length, step pulled]: queued, and carried to the next step
        self.queues = queues if queues is not None else [[] for _ in self.thresholds]
        self.carry = carry if carry is not None else []
        self.water = list(water)  # carried pooled tokens and their Σ d²
        self.imbalances = imbalances if imbalances is not None else []
        self.step = step
        self.waited = list(waited)  # Σ tokens × steps waited, tokens trained
        # what is left of a pool of short pieces a step took only part of: [tokens, Σ d²]
        self.split = split
        self.done = False

    def imbalance(self) -> float:
        body = self.imbalances[REPLAY_WARM_UP:] or self.imbalances
        return float(np.mean(body)) if body else 1.0

    def delay(self) -> float:
        """Token-weighted steps between pull and training; pieces still queued or carried at
        the end count with what they have waited so far (a rare band's group that has not
        filled would otherwise not count at all)."""
        waiting = [p for q in self.queues for p in q] + self.carry
        waited = self.waited[0] + sum(length * (self.step - pulled) for length, pulled in waiting)
        tokens = self.waited[1] + sum(length for length, _ in waiting)
        return waited / tokens if tokens else 0.0

    def advance(self, records, steps: int, units: int, cap: int, budget: int,
                cost_model: CostModel, shed_moves: int = 0, max_carry: int = 0) -> None:
        """Replay up to ``steps`` more steps of ``records`` ([R, 3] from pool_shorts, as an
        array or as its ``tolist()``: a caller advancing a few steps at a time over the same
        records converts them once). shed_moves, max_carry: refine's moves and carry-over
        limit (0: no refine)."""
        if isinstance(records, np.ndarray):
            records = records.tolist()  # Python ints: numpy scalars cost ~10x per record
        for _ in range(steps):
            if self.done:
                return
            self._step(records, units, cap, budget, cost_model, shed_moves, max_carry)

    def _step(self, records, units, cap, budget, cm, shed_moves, max_carry) -> None:
        groups, pool, water = self._gather(records, units, budget)
        if groups is None:
            self.done = True  # the window's last, partial step
            return
        bins = _Bins(units, cap, cm, self.step)
        for group in sorted(groups, key=lambda g: -max(p[0] for p in g)):
            for piece in bins.place_group(group):  # back to the head of its queue
                self.queues[self._band(piece[0]) - 1].insert(0, piece)
        self.carry = [piece for piece in pool if not bins.place(piece)]
        self._pour_water(bins, water, shed_moves, max_carry)
        total = sum(bins.cost)
        if total > 0:
            self.imbalances.append(max(bins.cost) * units / total)
        if self.step >= REPLAY_WARM_UP:
            self.waited = [self.waited[0] + bins.waited, self.waited[1] + bins.trained]
        self.step += 1

    def _pour_water(self, bins: "_Bins", water, shed_moves: int, max_carry: int) -> None:
        """Pooled short pieces onto the cheapest micro-batches with room; refine's hold-back;
        what is left or held is carried (and waits a step: the pieces' own ages are not kept)."""
        water_tokens, water_squares = water
        if water_tokens <= 0:
            self.water = [0.0, 0.0]
            return
        typical = water_squares / water_tokens  # Σd² / Σd: the short pieces' length
        rate = bins.a * typical + bins.b
        room = [bins.cap - t for t in bins.tokens]
        poured = _pour(bins.cost, room, min(water_tokens, sum(room)), rate)
        base, bins.cost = bins.cost, [c + x * rate for c, x in zip(bins.cost, poured)]
        total = sum(poured)
        carried = water_tokens - total
        bins.trained += total
        if shed_moves and max_carry:
            # refine holds back one short piece a move (or one from each of several)
            shed = _shed(bins.cost, base, rate, min(max_carry, shed_moves * typical))
            held = (sum(bins.cost) - sum(shed)) / rate
            bins.cost, carried, bins.trained = shed, carried + held, bins.trained - held
        self.water = [carried, carried * typical]
        bins.waited += carried

    def _gather(self, records, units, budget):
        """As the packer's _gather: full queues first, then fresh records up to the budget."""
        pool = list(self.carry)
        water_tokens, water_squares = self.water
        tokens = sum(p[0] for p in pool) + water_tokens
        groups = []
        for queue in self.queues:
            while len(queue) >= units and tokens < budget:
                groups.append(queue[:units])
                del queue[:units]
                tokens += sum(p[0] for p in groups[-1])
        fresh = []
        while tokens < budget:
            if self.position >= len(records):
                return None, None, None
            length, square, pooled = records[self.position]
            self.position += 1
            if pooled:
                # short pieces are pulled one at a time: take what the step still needs
                if self.split is not None:
                    length, square = self.split
                need = budget - tokens
                if length > need:
                    part = need * square / length
                    self.split = [length - need, square - part]
                    length, square = need, part
                    self.position -= 1  # the rest of this pool comes next
                else:
                    self.split = None
                tokens += length
                water_tokens += length
                water_squares += square
                continue
            band = self._band(length)
            if band == 0:  # a queued piece counts when its group is released
                tokens += length
                fresh.append([length, self.step])
                continue
            queue = self.queues[band - 1]
            queue.append([length, self.step])
            if len(queue) >= units:
                groups.append(queue[:units])
                del queue[:units]
                tokens += sum(p[0] for p in groups[-1])
        return groups, pool + sorted(fresh, reverse=True), (water_tokens, water_squares)

    def _band(self, length: int) -> int:
        return bisect_right(self.thresholds, length)  # np.searchsorted(side="right") on a list

    def state_dict(self) -> dict:
        return {"thresholds": self.thresholds, "position": self.position, "queues": self.queues,
                "carry": self.carry, "water": self.water, "imbalances": self.imbalances,
                "step": self.step, "waited": self.waited, "split": self.split,
                "done": self.done}

    @classmethod
    def from_state(cls, state: dict) -> "Replay":
        pieces = lambda ps: [[int(length), int(pulled)] for length, pulled in ps]  # noqa: E731
        replay = cls([int(t) for t in state["thresholds"]], int(state["position"]),
                     [pieces(q) for q in state["queues"]], pieces(state["carry"]),
                     [float(v) for v in state["water"]],
                     [float(v) for v in state["imbalances"]], int(state["step"]),
                     [float(v) for v in state["waited"]],
                     None if state["split"] is None else [float(v) for v in state["split"]])
        replay.done = bool(state["done"])
        return replay


class _Bins:
    """A step's micro-batches as the greedy fills them: cost, tokens, and the wait of what they
    train (token-weighted steps since each piece was pulled)."""

    def __init__(self, units: int, cap: int, cost_model: CostModel, step: int):
        self.cap, self.step = cap, step
        self.a, self.b = cost_model.attn_coef, cost_model.linear_coef
        self.cost, self.tokens = [0.0] * units, [0] * units
        self.waited, self.trained = 0.0, 0.0

    def add(self, k: int, piece) -> None:
        length = piece[0]
        self.cost[k] += self.a * length * length + self.b * length
        self.tokens[k] += length
        self.waited += length * (self.step - piece[1])
        self.trained += length

    def place_group(self, group) -> list:
        """One piece per micro-batch, the longest onto the cheapest; returns what did not fit."""
        order = sorted(range(len(self.cost)), key=lambda k: self.cost[k])
        returned = []
        for k, piece in zip(order, sorted(group, reverse=True)):
            if self.tokens[k] + piece[0] > self.cap:
                returned.append(piece)
            else:
                self.add(k, piece)
        return returned

    def place(self, piece) -> bool:
        """The greedy's rule: the cheapest micro-batch if it has room, else the one with fewest
        tokens if that has room; False if neither has."""
        k = self.cost.index(min(self.cost))
        if self.tokens[k] + piece[0] > self.cap:
            k = self.tokens.index(min(self.tokens))
            if self.tokens[k] + piece[0] > self.cap:
                return False
        self.add(k, piece)
        return True


def _pour(costs: list[float], room: list[float], tokens: float, rate: float) -> list[float]:
    """Tokens each micro-batch takes when ``tokens`` at ``rate`` cost each fill the cheapest
    first (water-filling to one level), within each one's room. Exact: the filled volume is
    piecewise linear in the level, with breaks where a micro-batch starts or stops taking."""
    if tokens <= 0 or rate <= 0:
        return [0.0] * len(costs)

    def taken(level):
        # min(max((level - c) / rate, 0.0), r), room r ≥ 0, without the builtin calls
        return [0.0 if (t := (level - c) / rate) < 0.0 else r if r < t else t
                for c, r in zip(costs, room)]

    volumes = {}  # the bisection's, reused for the interpolation

    def volume(level):
        if level not in volumes:
            volumes[level] = sum(taken(level))
        return volumes[level]

    breaks = sorted(set(costs) | {c + r * rate for c, r in zip(costs, room)})
    # The first break whose volume holds the tokens, by bisection: the computed volume never
    # decreases with the level (every operation in it rounds monotonically), so this is the
    # break a scan from the lowest would stop at, and the level below is interpolated between
    # the same two volumes as there.
    j = bisect_left(breaks, tokens, key=volume)
    if j == len(breaks):
        return taken(breaks[-1])
    low, high = (breaks[j - 1] if j else min(costs)), breaks[j]
    below, above = volume(low), volume(high)
    level = low + (tokens - below) * (high - low) / max(above - below, 1e-300)
    return taken(level)


def _shed(costs: list[float], base: list[float], rate: float, limit: float) -> list[float]:
    """The costs after holding back short pieces (water above ``base``) from the heaviest
    micro-batches down to the level, among SHED_LEVELS, that minimises max / mean, within
    ``limit`` tokens."""
    total, n = sum(costs), len(costs)
    mean, top, floor = total / n, max(costs), max(base)
    best, out = top / mean, costs
    for i in range(SHED_LEVELS - 1):
        level = mean + (top - mean) * i / (SHED_LEVELS - 1)
        # max(b, min(c, level)) without the builtin calls; a cost is its base plus water (c ≥ b)
        lowered = [c if c <= level else b if b > level else level for c, b in zip(costs, base)]
        kept = sum(lowered)
        if (total - kept) / rate > limit:
            continue
        # the max of the lowered costs, without a pass over them: the same value
        ratio = max(floor, min(top, level)) * n / kept
        if ratio < best:
            best, out = ratio, lowered
    return out
