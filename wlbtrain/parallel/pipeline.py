"""Pipeline parallelism for variable-length micro-batches: stage split, schedules, executor.

The model is cut into ``pp × virtual`` contiguous *chunks* of decoder layers (``ModelChunk``);
chunk c runs on pipeline rank ``c % pp``, so with ``virtual > 1`` rank r holds chunks
r, r + pp, r + 2pp, ... (the interleaved layout). A *schedule* is one ordered list of
``Action`` (forward or backward of one micro-batch through one chunk) per pipeline rank.

From the schedule each rank derives its *program*: the actions with ``Exchange`` steps between
them, each one ``dist.batch_isend_irecv`` whose sends and receives are waited on together.
Micro-batches of one step have different token counts, but every rank knows every micro-batch's
activation shape from the packer's plan, so receive buffers are sized from the plan and no shape
is exchanged.

Why the programs cannot deadlock, also on NCCL. NCCL runs one batch as one group, and a group
may not finish any of its operations before all of them are matched (a pending receive can hold
back a send to the same peer), so the safe model is: *a batch completes only together with every
batch its operations are matched with, and all of those, transitively*. ``build_programs`` gives
every transfer one label (a time on a reference timeline) and both ends post it at that label,
in label order, so batches that complete together share a label and none waits on a later one
(its docstring has the argument). ``simulate`` runs programs under exactly that model — sends
and receives between each pair of ranks matched in posting order, as NCCL and gloo match them —
and raises when some batch can never complete; ``PipelineRunner`` runs it before the first step,
so a plan that could hang on the GPUs fails at start-up with the stuck steps named instead.

Sizes: activations and their gradients are [T, dim] (T: the micro-batch's tokens on this rank);
``forward`` returns that, or the scalar loss on the last chunk.
"""

from __future__ import annotations

import bisect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.distributed as dist

from ..models.llama import ModelChunk

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


# ---------------------------------------------------------------------------------------------
# Stage split


def split_layers(layer_costs: Sequence[float], pp: int, virtual: int = 1,
                 embed_cost: float = 0.0, head_cost: float = 0.0) -> list[ModelChunk]:
    """Split the decoder layers into ``pp × virtual`` contiguous chunks of balanced cost.

    layer_costs: [n_layers] relative cost of each layer; the embedding counts toward chunk 0 and
    the head (final norm, output head, loss) toward the last chunk. Minimises the most expensive
    chunk (what the pipeline waits for), then, among splits with that bottleneck, the sum of
    squared chunk costs (so equal layers split into equal counts). Every chunk holds >= 1 layer.
    """
    n_chunks = pp * virtual
    costs = [float(c) for c in layer_costs]
    if pp < 1 or virtual < 1:
        raise ValueError(f"pipeline degree and virtual chunks must be >= 1, got {pp}, {virtual}")
    if len(costs) < n_chunks:
        raise ValueError(f"{len(costs)} layers cannot fill pp × virtual = {pp} × {virtual} = "
                         f"{n_chunks} pipeline chunks of at least one layer each")
    if min(costs + [embed_cost, head_cost]) < 0:
        raise ValueError("layer, embedding and head costs must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    n = len(costs)

    def chunk_cost(i: int, j: int) -> float:  # layers [i, j)
        return (prefix[j] - prefix[i] + (embed_cost if i == 0 else 0.0)
                + (head_cost if j == n else 0.0))

    bottleneck = _partition(n, n_chunks, chunk_cost, max, lambda c: c)[0]
    limit = bottleneck * (1 + 1e-9) + 1e-12
    # Among splits at the bottleneck, the most even one; infeasible chunks cost infinity.
    _, cuts = _partition(n, n_chunks, chunk_cost, lambda a, b: a + b,
                         lambda c: c * c if c <= limit else float("inf"))
    return [ModelChunk(tuple(range(i, j)), embed=(k == 0), head=(k == n_chunks - 1))
            for k, (i, j) in enumerate(zip(cuts[:-1], cuts[1:]))]


def _partition(n: int, parts: int, chunk_cost, combine, score) -> tuple[float, list[int]]:
    """Dynamic programme over cut points: best[k][j] = best split of layers [0, j) into k parts,
    the parts' scores folded with ``combine``. Returns (best value, cut points 0 = c0 < ... = n)."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    back = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        # part k ends at j; the k-1 parts before it need >= k-1 layers, the rest >= parts-k
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                value = combine(best[k - 1][i], score(chunk_cost(i, j))) if k > 1 \
                    else score(chunk_cost(i, j))
                if value < best[k][j]:
                    best[k][j], back[k][j] = value, i
    cuts = [n]
    for k in range(parts, 0, -1):
        cuts.append(back[k][cuts[-1]])
    return best[parts][n], cuts[::-1]


@dataclass(frozen=True)
class StageChunks:
    """What one pipeline rank holds: its chunks in execution order and the union of their parts
    (the ``layer_ids`` / ``embed`` / ``head`` to build its module with)."""

    chunks: tuple[ModelChunk, ...]
    chunk_ids: tuple[int, ...]  # global chunk index of each of ``chunks``
    layer_ids: tuple[int, ...]
    embed: bool
    head: bool


def stage_chunks(chunks: Sequence[ModelChunk], pp_rank: int, pp: int) -> StageChunks:
    """Rank ``pp_rank`` holds chunks pp_rank, pp_rank + pp, ... of ``chunks``."""
    if len(chunks) % pp:
        raise ValueError(f"{len(chunks)} chunks do not divide over {pp} pipeline ranks")
    ids = tuple(range(pp_rank, len(chunks), pp))
    mine = tuple(chunks[c] for c in ids)
    return StageChunks(mine, ids, tuple(i for c in mine for i in c.layers),
                       any(c.embed for c in mine), any(c.head for c in mine))


# ---------------------------------------------------------------------------------------------
# Schedules


@dataclass(frozen=True, order=True)
class Action:
    """Forward ("F") or backward ("B") of micro-batch ``micro`` through global chunk ``chunk``."""

    op: Literal["F", "B"]
    micro: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro}c{self.chunk}"


def check_schedule(kind: str, pp: int, n_micro: int, virtual: int = 1) -> None:
    """Raise ValueError naming what to change when ``kind`` cannot run this layout."""
    if kind not in SCHEDULES:
        raise ValueError(f"pipeline schedule {kind!r} is unknown; choose from {SCHEDULES}")
    if pp < 1 or virtual < 1 or n_micro < 1:
        raise ValueError(f"pp, virtual chunks and micro-batches must be >= 1, got "
                         f"{pp}, {virtual}, {n_micro}")
    if kind == "1f1b":
        if virtual != 1:
            raise ValueError(f"1f1b runs one chunk per rank, got virtual = {virtual}; use "
                             "interleaved_1f1b for more")
        if n_micro < pp:
            raise ValueError(f"1f1b needs at least pp = {pp} micro-batches per step to fill the "
                             f"pipeline, got {n_micro} (train.micro_batches)")
    if kind == "interleaved_1f1b":
        if virtual < 2:
            raise ValueError(f"interleaved_1f1b needs virtual > 1 chunks per rank, got {virtual} "
                             "(parallel.pp_virtual); use 1f1b for one")
        if n_micro % pp:
            raise ValueError(f"interleaved_1f1b needs micro-batches per step a multiple of pp = "
                             f"{pp}, got {n_micro} (train.micro_batches)")


def build_schedule(kind: str, pp: int, n_micro: int, virtual: int = 1) -> list[list[Action]]:
    """One ordered list of actions per pipeline rank."""
    check_schedule(kind, pp, n_micro, virtual)
    build = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved_1f1b": _interleaved}[kind]
    return [build(rank, pp, n_micro, virtual) for rank in range(pp)]


def _gpipe(rank: int, pp: int, n_micro: int, virtual: int) -> list[Action]:
    """Every forward (chunk by chunk), then every backward (last chunk first)."""
    chunks = list(range(rank, pp * virtual, pp))
    forwards = [Action("F", m, c) for c in chunks for m in range(n_micro)]
    return forwards + [Action("B", m, c) for c in reversed(chunks) for m in range(n_micro)]


def _one_f_one_b(rank: int, pp: int, n_micro: int, virtual: int) -> list[Action]:
    """Warm up with pp-1-rank forwards, then alternate forward / backward, then drain."""
    warmup = min(pp - 1 - rank, n_micro)
    return _warmup_steady_cooldown([Action("F", m, rank) for m in range(n_micro)],
                                   [Action("B", m, rank) for m in range(n_micro)], warmup)


def _interleaved(rank: int, pp: int, n_micro: int, virtual: int) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches in groups of pp run through one local chunk,
    then the next; backwards visit the local chunks in reverse. The longer warmup (two per
    later rank, plus (virtual-1)·pp) lets each rank's first backward find its gradient ready."""
    total = n_micro * virtual

    def action(op: str, k: int) -> Action:
        local = (k // pp) % virtual
        if op == "B":
            local = virtual - 1 - local
        micro = (k // (pp * virtual)) * pp + k % pp
        return Action(op, micro, local * pp + rank)

    warmup = min((pp - 1 - rank) * 2 + (virtual - 1) * pp, total)
    return _warmup_steady_cooldown([action("F", k) for k in range(total)],
                                   [action("B", k) for k in range(total)], warmup)


def _warmup_steady_cooldown(forwards: list[Action], backwards: list[Action],
                            warmup: int) -> list[Action]:
    order = list(forwards[:warmup])
    for f, b in zip(forwards[warmup:], backwards):
        order += [f, b]
    return order + backwards[len(forwards) - warmup:]


# ---------------------------------------------------------------------------------------------
# Programs: the actions with the exchanges between them


class PipelineDeadlock(ValueError):
    """Some rank's program can never proceed (or sends and receives do not match)."""


@dataclass(frozen=True)
class P2P:
    """One send or receive. ``item`` is the action that produced the tensor: F(m, c) for the
    activation entering chunk c+1, B(m, c) for the gradient leaving chunk c toward chunk c-1."""

    send: bool
    peer: int  # rank in the pipeline group
    item: Action


@dataclass(frozen=True)
class Exchange:
    """Sends and receives posted together in one ``batch_isend_irecv`` and waited on together."""

    ops: tuple[P2P, ...]


Step = Action | Exchange


def _producer(action: Action, n_chunks: int) -> Action | None:
    """The action whose output ``action`` consumes (None: it starts from data or the loss)."""
    if action.op == "F":
        return Action("F", action.micro, action.chunk - 1) if action.chunk > 0 else None
    return Action("B", action.micro, action.chunk + 1) if action.chunk < n_chunks - 1 else None


def _consumer_chunk(action: Action, n_chunks: int) -> int | None:
    """The chunk that consumes ``action``'s output (None: nobody, or the same action's backward)."""
    if action.op == "F":
        return action.chunk + 1 if action.chunk < n_chunks - 1 else None
    return action.chunk - 1 if action.chunk > 0 else None


# Reference durations of the timeline the exchanges are placed on: a backward costs about twice
# its forward. Only where exchanges sit depends on them, never whether the programs are safe.
REFERENCE_FORWARD, REFERENCE_BACKWARD = 1.0, 2.0


def build_programs(schedule: list[list[Action]]) -> list[list[Step]]:
    """Each rank's actions with the Exchanges between them.

    Every transfer gets one time, its label: when its consumer starts on a reference timeline
    (each action starting as soon as its rank is free and its input exists). Sender and receiver
    both post it in their gap between actions that covers the label — gap g spans (start of
    action g-1, start of action g] — so the receiver posts it just before consuming it and the
    sender at its first gap from then on (never before producing it: the consumer starts after
    the producer ends). Transfers of one gap with one label form one Exchange; in 1F1B's steady
    state that is Megatron's pairing (send activation + receive gradient facing send gradient +
    receive activation). Safety: each rank's exchanges run in increasing label order and matched
    operations carry equal labels, so exchanges that must complete together share one label and
    none can wait on a later one: no deadlock, whatever the real durations. Any label between
    the producer's end and the consumer's start would be as safe; the consumer's start makes
    senders wait rather than receivers fetch early.
    """
    pp = len(schedule)
    n_chunks = 1 + max(a.chunk for actions in schedule for a in actions)
    chunk_rank = {a.chunk: r for r, actions in enumerate(schedule) for a in actions}
    start, end = _reference_timeline(schedule, n_chunks)
    # per rank: gap index → label → ops
    gaps: list[dict[int, dict[float, list[P2P]]]] = [{} for _ in range(pp)]
    for sender, actions in enumerate(schedule):
        for produced in actions:
            consumer = _consumer_chunk(produced, n_chunks)
            if consumer is None:
                continue
            receiver = chunk_rank[consumer]
            consumed = Action(produced.op, produced.micro, consumer)
            label = start[consumed]
            for rank, op in ((sender, P2P(True, receiver, produced)),
                             (receiver, P2P(False, sender, produced))):
                gap = _gap_covering(label, [start[a] for a in schedule[rank]])
                gaps[rank].setdefault(gap, {}).setdefault(label, []).append(op)
    programs = []
    for rank, actions in enumerate(schedule):
        program: list[Step] = []
        for g in range(len(actions) + 1):
            for label in sorted(gaps[rank].get(g, {})):
                program.append(Exchange(tuple(gaps[rank][g][label])))
            if g < len(actions):
                program.append(actions[g])
        programs.append(program)
    return programs


def _reference_timeline(schedule: list[list[Action]], n_chunks: int):
    """Start and end of every action when each starts as soon as its rank is free and its input
    has been produced. Raises PipelineDeadlock when the orders themselves wait on each other."""
    start: dict[Action, float] = {}
    end: dict[Action, float] = {}
    pos, clock = [0] * len(schedule), [0.0] * len(schedule)
    progress = True
    while progress:
        progress = False
        for r, actions in enumerate(schedule):
            while pos[r] < len(actions):
                action = actions[pos[r]]
                inputs = [_producer(action, n_chunks)]
                if action.op == "B":  # a backward also needs its own forward
                    inputs.append(Action("F", action.micro, action.chunk))
                inputs = [a for a in inputs if a is not None]
                if any(a not in end for a in inputs):
                    break
                producer_end = max((end[a] for a in inputs), default=0.0)
                start[action] = max(clock[r], producer_end)
                clock[r] = end[action] = start[action] + (
                    REFERENCE_FORWARD if action.op == "F" else REFERENCE_BACKWARD)
                pos[r] += 1
                progress = True
    stuck = [f"rank {r} at {schedule[r][pos[r]]}" for r in range(len(schedule))
             if pos[r] < len(schedule[r])]
    if stuck:
        raise PipelineDeadlock("schedule orders wait on each other: " + ", ".join(stuck))
    return start, end


def _gap_covering(label: float, starts: list[float]) -> int:
    """Index g of the gap (starts[g-1], starts[g]] holding ``label``; len(starts) after the last."""
    return bisect.bisect_left(starts, label)


def check_matching(programs: list[list[Step]]) -> None:
    """For every ordered pair of ranks (a, b), a's sends to b, in posting order, must be exactly
    b's receives from a in posting order: p2p matches in order, so anything else pairs the wrong
    tensors (or hangs)."""
    pp = len(programs)
    for a in range(pp):
        for b in range(pp):
            if a == b:
                continue
            sends = [op.item for op in _ops(programs[a]) if op.send and op.peer == b]
            recvs = [op.item for op in _ops(programs[b]) if not op.send and op.peer == a]
            if sends != recvs:
                raise PipelineDeadlock(
                    f"rank {a} sends to rank {b} {list(map(str, sends))} but rank {b} receives "
                    f"{list(map(str, recvs))}")


def _ops(program: list[Step]) -> Iterable[P2P]:
    return (op for step in program if isinstance(step, Exchange) for op in step.ops)


def simulate(programs: list[list[Step]],
             duration: Callable[[int, Action], float] = lambda rank, action: 1.0,
             ) -> dict[tuple[int, Action], tuple[float, float]]:
    """Run the programs on a model of NCCL's grouped p2p and return each action's (start, end).

    duration(rank, action) -> seconds of compute. A batch completes, together with every batch
    its operations are matched with (transitively), once all their ranks have reached them;
    transfers take no time. Raises PipelineDeadlock if some rank can never proceed.
    """
    check_matching(programs)
    pp = len(programs)
    group_of = _matched_groups(programs)
    pos, clock = [0] * pp, [0.0] * pp
    times: dict[tuple[int, Action], tuple[float, float]] = {}
    while True:
        for r in range(pp):  # computations never wait
            while pos[r] < len(programs[r]) and isinstance(programs[r][pos[r]], Action):
                action = programs[r][pos[r]]
                times[(r, action)] = (clock[r], clock[r] + duration(r, action))
                clock[r] += duration(r, action)
                pos[r] += 1
        waiting = [(r, pos[r]) for r in range(pp) if pos[r] < len(programs[r])]
        if not waiting:
            return times
        ready = [g for g in {group_of[w] for w in waiting}
                 if all(pos[r] == i for r, i in g)]
        if not ready:
            stuck = ", ".join(f"rank {r} at {_describe(programs[r][i])}" for r, i in waiting)
            raise PipelineDeadlock(f"pipeline programs deadlock: {stuck}")
        for g in ready:
            end = max(clock[r] for r, _ in g)
            for r, _ in g:
                clock[r], pos[r] = end, pos[r] + 1


def _matched_groups(programs: list[list[Step]]) -> dict[tuple[int, int], frozenset]:
    """(rank, step index) of every Exchange → the set of exchanges that complete together."""
    where = {}  # (sender, receiver, item) → {"send"/"recv": (rank, index)}
    parent: dict[tuple[int, int], tuple[int, int]] = {}
    for r, program in enumerate(programs):
        for i, step in enumerate(program):
            if isinstance(step, Exchange):
                parent[(r, i)] = (r, i)
                for op in step.ops:
                    if op.peer == r:  # handed over in place, never on the wire
                        continue
                    key = (r, op.peer, op.item) if op.send else (op.peer, r, op.item)
                    where.setdefault(key, {})["send" if op.send else "recv"] = (r, i)

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for ends in where.values():
        parent[root(ends["send"])] = root(ends["recv"])
    groups: dict = {}
    for x in parent:
        groups.setdefault(root(x), set()).add(x)
    return {x: frozenset(groups[root(x)]) for x in parent}


def _describe(step: Step) -> str:
    if isinstance(step, Action):
        return str(step)
    return "exchange[" + ", ".join(
        f"{'send' if op.send else 'recv'} {op.item} {'to' if op.send else 'from'} {op.peer}"
        for op in step.ops) + "]"


# ---------------------------------------------------------------------------------------------
# Executor

ActivationSpec = Callable[[int], tuple[torch.Size | Sequence[int], torch.dtype, torch.device]]
ForwardFn = Callable[[int, int, "torch.Tensor | None"], torch.Tensor]
BeforeBackwardFn = Callable[[int, int, bool], None]


@dataclass
class StepTimes:
    """One step on one pipeline rank, in seconds. forward_s / backward_s: [n_micro], each
    micro-batch's compute on this rank summed over the rank's chunks."""

    forward_s: list[float]
    backward_s: list[float]
    busy_s: float
    wall_s: float

    @property
    def bubble(self) -> float:
        return max(self.wall_s - self.busy_s, 0.0) / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class PipelineStep:
    times: StepTimes
    # the detached values ``forward`` returned on the last chunk, by micro-batch; empty on
    # ranks without the head
    losses: dict[int, torch.Tensor] = field(default_factory=dict)


class PipelineRunner:
    """Runs one rank's side of a pipeline schedule, one training step per ``step()`` call.

    schedule: ``build_schedule(...)`` (every rank's actions: each rank derives what its
    neighbours will send from them). group: the pipeline ProcessGroup, its ranks the stages in
    order (None: a single stage, no communication). device: where activations live.
    """

    def __init__(self, schedule: list[list[Action]], group: dist.ProcessGroup | None,
                 device: torch.device | str):
        self.pp = 1 if group is None else dist.get_world_size(group)
        if len(schedule) != self.pp:
            raise ValueError(f"schedule has {len(schedule)} ranks, pipeline group {self.pp}")
        self.group = group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.device = torch.device(device)
        self.n_chunks = 1 + max(a.chunk for actions in schedule for a in actions)
        self.n_micro = 1 + max(a.micro for actions in schedule for a in actions)
        programs = build_programs(schedule)
        simulate(programs)  # fails here, with the stuck steps named, rather than hang later
        self.program = programs[self.rank]
        self._last_backward = {a.chunk: a for a in schedule[self.rank] if a.op == "B"}
        self._peers = [self.rank if group is None else dist.get_global_rank(group, r)
                       for r in range(self.pp)]
        if group is not None:
            # NCCL: the first batched p2p on a communicator must involve every rank of the
            # group, and stage pairs do not; one collective sets the communicator up.
            dist.all_reduce(torch.zeros(1, device=self.device), group=group)

    def step(self, forward: ForwardFn, activation_spec: ActivationSpec,
             before_backward: BeforeBackwardFn | None = None) -> PipelineStep:
        """Run every action of this rank's program.

        forward(chunk, micro, inputs) -> Tensor: inputs is None on chunk 0 (the callback reads
        micro-batch ``micro`` itself), else the activation from chunk-1 ([T, dim], requires
        grad). Returns the loss scalar (already scaled for backward) on the last chunk, else the
        activation for chunk+1, of shape and dtype ``activation_spec(micro)``.
        activation_spec(micro) -> (shape, dtype, device) of micro-batch ``micro``'s activations
        between chunks (and of their gradients).
        before_backward(chunk, micro, last) is called before each backward; ``last`` is True on
        the chunk's last backward of the step (where FSDP should reduce its gradients).
        """
        state = _StepState(forward, activation_spec, before_backward or (lambda *a: None),
                           _Timer(self.device), self.n_micro)
        for step in self.program:
            if isinstance(step, Exchange):
                self._exchange(step, state)
            elif step.op == "F":
                self._forward(step, state)
            else:
                self._backward(step, state)
        if state.saved or state.inbox or state.outbox:
            raise RuntimeError("pipeline step ended with tensors still held: the schedule is "
                               "incomplete")
        return PipelineStep(state.timer.finish(self.n_micro), state.losses)

    def _forward(self, action: Action, s: "_StepState") -> None:
        inputs = None
        if action.chunk > 0:
            inputs = s.inbox.pop(_producer(action, self.n_chunks)).requires_grad_()
        with s.timer.measure(action):
            output = s.forward(action.chunk, action.micro, inputs)
        s.saved[action] = (inputs, output)
        if action.chunk == self.n_chunks - 1:
            s.losses[action.micro] = output.detach()
        else:
            _check_shape(output, s.spec(action.micro), action)
            s.outbox[action] = output.detach()

    def _backward(self, action: Action, s: "_StepState") -> None:
        inputs, output = s.saved.pop(Action("F", action.micro, action.chunk))
        s.before_backward(action.chunk, action.micro, self._last_backward[action.chunk] == action)
        with s.timer.measure(action):
            if action.chunk == self.n_chunks - 1:
                output.backward()
            else:
                torch.autograd.backward(output, s.inbox.pop(_producer(action, self.n_chunks)))
        if inputs is not None:
            if inputs.grad is None:
                raise RuntimeError(f"chunk {action.chunk} output does not depend on its input")
            s.outbox[action] = inputs.grad
        # inputs, output and the received gradient go out of scope here: their memory (and the
        # chunk's saved activations, freed by backward) returns before the next forward.

    def _exchange(self, exchange: Exchange, s: "_StepState") -> None:
        ops = []
        received = {}
        for op in exchange.ops:
            if op.peer == self.rank:  # a single stage with several chunks hands over in place
                if op.send:
                    s.inbox[op.item] = s.outbox.pop(op.item)
                continue
            if op.send:
                tensor = s.outbox.pop(op.item)
                ops.append(dist.P2POp(dist.isend, tensor, self._peers[op.peer], self.group))
            else:
                shape, dtype, device = s.spec(op.item.micro)
                tensor = torch.empty(shape, dtype=dtype, device=device)
                received[op.item] = tensor
                ops.append(dist.P2POp(dist.irecv, tensor, self._peers[op.peer], self.group))
        if ops:
            # On NCCL wait() only orders the compute stream after the transfer: no host sync.
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        s.inbox.update(received)


@dataclass
class _StepState:
    forward: ForwardFn
    spec: ActivationSpec
    before_backward: BeforeBackwardFn
    timer: "_Timer"
    n_micro: int
    inbox: dict = field(default_factory=dict)  # producing Action → tensor received for us
    outbox: dict = field(default_factory=dict)  # our Action → tensor waiting to be sent
    saved: dict = field(default_factory=dict)  # F Action → (inputs, output) until its backward
    losses: dict = field(default_factory=dict)


def _check_shape(output: torch.Tensor, spec, action: Action) -> None:
    shape, dtype, _ = spec
    if tuple(output.shape) != tuple(shape) or output.dtype != dtype:
        # The receiver sized its buffer from the plan: a mismatch would corrupt or hang.
        raise RuntimeError(f"{action}: forward returned {tuple(output.shape)} {output.dtype}, "
                           f"activation_spec says {tuple(shape)} {dtype}")


class _Timer:
    """Compute time per action: CUDA events on the GPU (recorded on the current stream, read
    once after the step, so the schedule never waits for the device), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[Action, object, object]] = []
        self.start = self._mark()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def measure(self, action: Action):
        begin = self._mark()
        yield
        self.spans.append((action, begin, self._mark()))

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    def finish(self, n_micro: int) -> StepTimes:
        end = self._mark()
        if self.cuda:
            end.synchronize()
        forward, backward = [0.0] * n_micro, [0.0] * n_micro
        for action, a, b in self.spans:
            (forward if action.op == "F" else backward)[action.micro] += self._seconds(a, b)
        return StepTimes(forward, backward, sum(forward) + sum(backward),
                         self._seconds(self.start, end))


def pipeline_metrics(times: StepTimes, group: dist.ProcessGroup | None,
                     device: torch.device | str = "cpu") -> dict:
    """Reduce every stage's StepTimes over the pipeline group (a collective: call on every
    stage). Returns what metrics.jsonl records:

    micro_batch_times_s: [n_micro] forward + backward of each micro-batch on the busiest stage;
    measured_imbalance: their max / mean; bubble: the idle share of the stages' wall time,
    1 - Σ busy / Σ wall; stage_busy_s: [pp] each stage's compute time.
    """
    mine = torch.tensor([times.busy_s, times.wall_s,
                         *(f + b for f, b in zip(times.forward_s, times.backward_s))],
                        dtype=torch.float64, device=device)
    if group is None:
        rows = [mine]
    else:
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()
    busiest = int(table[:, 0].argmax())
    micro = table[busiest, 2:].tolist()
    mean = sum(micro) / len(micro) if micro else 0.0
    wall = float(table[:, 1].sum())
    return {"micro_batch_times_s": micro,
            "measured_imbalance": max(micro) / mean if mean > 0 else 1.0,
            "bubble": 1.0 - float(table[:, 0].sum()) / wall if wall > 0 else 0.0,
            "stage_busy_s": table[:, 0].tolist()}
