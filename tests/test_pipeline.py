"""Pipeline parallelism: stage split, schedule orders, exchange programs, and the executor on gloo
against a single-process run of the same variable-length micro-batches."""

import os
import random
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wlbtrain.parallel.pipeline import (Action, Exchange, P2P, PipelineDeadlock,
                                        PipelineRunner, build_programs, build_schedule,
                                        check_matching, pipeline_metrics, simulate,
                                        split_layers, stage_chunks)

# ---------------------------------------------------------------------------------------------
# Stage split


def test_split_balances_cost_including_embedding_and_head():
    chunks = split_layers([1.0] * 8, pp=2, head_cost=1.5)
    # 4 | 4+1.5 would make the last stage 5.5; 5 | 3+1.5 caps it at 5
    assert [c.layers for c in chunks] == [tuple(range(5)), (5, 6, 7)]
    assert [(c.embed, c.head) for c in chunks] == [(True, False), (False, True)]
    equal = split_layers([1.0] * 8, pp=4)
    assert [len(c.layers) for c in equal] == [2, 2, 2, 2]
    heavy_first = split_layers([4.0, 1.0, 1.0, 1.0, 1.0], pp=2)
    assert [c.layers for c in heavy_first] == [(0,), (1, 2, 3, 4)]


def test_split_gives_every_chunk_a_layer_and_refuses_too_few():
    chunks = split_layers([1.0] * 6, pp=2, virtual=3, embed_cost=10.0, head_cost=10.0)
    assert [len(c.layers) for c in chunks] == [1] * 6
    assert sum((c.layers for c in chunks), ()) == tuple(range(6))
    with pytest.raises(ValueError, match="cannot fill"):
        split_layers([1.0] * 3, pp=2, virtual=2)


def test_stage_chunks_interleaved_layout():
    chunks = split_layers([1.0] * 8, pp=2, virtual=2)
    rank0, rank1 = stage_chunks(chunks, 0, 2), stage_chunks(chunks, 1, 2)
    assert rank0.chunk_ids == (0, 2) and rank1.chunk_ids == (1, 3)
    assert rank0.layer_ids == (0, 1, 4, 5) and rank1.layer_ids == (2, 3, 6, 7)
    assert (rank0.embed, rank0.head, rank1.embed, rank1.head) == (True, False, False, True)


# ---------------------------------------------------------------------------------------------
# Schedules


def textbook_1f1b(rank, pp, n):
    """Warmup of pp-1-rank forwards, then one forward and one backward, then the backwards left."""
    warmup = pp - 1 - rank
    order = [("F", m) for m in range(warmup)]
    for i in range(n - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", m) for m in range(n - warmup, n)]


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("n", [4, 8])
def test_1f1b_is_the_textbook_order(pp, n):
    schedule = build_schedule("1f1b", pp, n)
    for rank, actions in enumerate(schedule):
        assert [(a.op, a.micro) for a in actions] == textbook_1f1b(rank, pp, n)
        assert {a.chunk for a in actions} == {rank}


def test_interleaved_follows_megatron_grouping():
    # pp 2, 2 chunks per rank, 4 micro-batches: forwards go in groups of pp micro-batches
    # through chunk r, then chunk r + pp; rank 0 warms up with 2·(pp-1) + (v-1)·pp = 4
    rank0 = build_schedule("interleaved_1f1b", 2, 4, 2)[0]
    assert [str(a) for a in rank0[:6]] == ["F0c0", "F1c0", "F0c2", "F1c2", "F2c0", "B0c2"]
    assert [str(a) for a in rank0 if a.op == "B"][:4] == ["B0c2", "B1c2", "B0c0", "B1c0"]


LAYOUTS = [(kind, pp, n, v) for pp in (1, 2, 3, 4) for n in (4, 6, 8) for kind, v in
           (("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("interleaved_1f1b", 2),
            ("interleaved_1f1b", 3)) if not (kind == "interleaved_1f1b" and n % pp)
           and not (kind == "1f1b" and n < pp)]


@pytest.mark.parametrize("kind,pp,n,v", LAYOUTS)
def test_schedule_complete_and_dependencies_hold_with_unequal_micro_batches(kind, pp, n, v):
    schedule = build_schedule(kind, pp, n, v)
    n_chunks = pp * v
    for rank, actions in enumerate(schedule):
        expected = {Action(op, m, c) for op in "FB" for m in range(n)
                    for c in range(rank, n_chunks, pp)}
        assert sorted(actions) == sorted(expected), "every action once, on its chunk's rank"
        position = {a: i for i, a in enumerate(actions)}
        assert all(position[Action("F", a.micro, a.chunk)] < i
                   for i, a in enumerate(actions) if a.op == "B")
    rng = random.Random(f"{kind}{pp}{n}{v}")
    size = [rng.uniform(0.2, 3.0) for _ in range(n)]  # micro-batches of very different work
    times = simulate(build_programs(schedule),
                     lambda rank, a: size[a.micro] * (1.0 if a.op == "F" else 2.0))
    ends = {a: end for (_, a), (_, end) in times.items()}
    starts = {a: start for (_, a), (start, _) in times.items()}
    assert len(times) == 2 * n * n_chunks, "every action ran: no deadlock"
    for a, start in starts.items():
        if a.op == "F" and a.chunk > 0:
            assert start >= ends[Action("F", a.micro, a.chunk - 1)]
        if a.op == "B":
            assert start >= ends[Action("F", a.micro, a.chunk)]
            if a.chunk < n_chunks - 1:
                assert start >= ends[Action("B", a.micro, a.chunk + 1)]


@pytest.mark.parametrize("kind,pp,n,v", [("1f1b", 4, 8, 1), ("interleaved_1f1b", 2, 4, 2),
                                         ("gpipe", 4, 4, 1)])
def test_each_neighbour_receives_exactly_what_the_other_sends_in_order(kind, pp, n, v):
    programs = build_programs(build_schedule(kind, pp, n, v))
    check_matching(programs)
    for a in range(pp):
        for b in range(pp):
            sends = [op.item for s in programs[a] if isinstance(s, Exchange) for op in s.ops
                     if op.send and op.peer == b]
            recvs = [op.item for s in programs[b] if isinstance(s, Exchange) for op in s.ops
                     if not op.send and op.peer == a]
            assert sends == recvs
            if abs(a - b) == 1:
                assert sends, "neighbouring stages talk"


def test_1f1b_steady_state_pairs_exchanges_like_megatron():
    """Where rank 1 posts (send activation m, receive gradient k) to rank 2, rank 2 posts
    (send gradient k, receive activation m) to rank 1: one matched exchange each."""
    programs = build_programs(build_schedule("1f1b", 4, 8))
    to_2 = [{(op.send, op.item) for op in s.ops if op.peer == 2} for s in programs[1]
            if isinstance(s, Exchange)]
    to_1 = [{(not op.send, op.item) for op in s.ops if op.peer == 1} for s in programs[2]
            if isinstance(s, Exchange)]
    assert [x for x in to_2 if x] == [x for x in to_1 if x]


def test_simulation_catches_a_program_that_would_hang_on_nccl():
    # rank 0 batches "send F0, receive B0" but rank 1 can only send B0 after receiving F0 in
    # its own batch: gloo would get through, one NCCL group per batch would not
    f0, b1 = Action("F", 0, 0), Action("B", 0, 1)
    programs = [[f0, Exchange((P2P(True, 1, f0), P2P(False, 1, b1))), Action("B", 0, 0)],
                [Exchange((P2P(False, 0, f0),)), Action("F", 0, 1), b1,
                 Exchange((P2P(True, 0, b1),))]]
    with pytest.raises(PipelineDeadlock, match="deadlock"):
        simulate(programs)


@pytest.mark.parametrize("kind,pp,n,v,message", [
    ("1f1b", 4, 3, 1, "at least pp = 4"), ("1f1b", 2, 4, 2, "interleaved_1f1b"),
    ("interleaved_1f1b", 4, 6, 2, "multiple of pp = 4"),
    ("interleaved_1f1b", 2, 4, 1, "virtual > 1"),
    ("zero_bubble", 2, 4, 1, "unknown")])
def test_schedule_checks_name_the_problem(kind, pp, n, v, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(kind, pp, n, v)


# ---------------------------------------------------------------------------------------------
# Executor: gloo processes against one process

DIM, IN_DIM, N_LAYERS = 8, 3, 8
ROWS = [3, 9, 1, 6, 4, 2, 7, 5]  # micro-batches of different sizes
# (schedule, virtual, micro-batches); pp is the number of processes
RUNS = [("1f1b", 1, 4), ("gpipe", 1, 3), ("1f1b", 1, 6), ("interleaved_1f1b", 2, 4)]


class Toy(torch.nn.Module):
    """Input projection (the 'embedding'), N_LAYERS Linear+tanh layers, a scalar head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(DIM, DIM, dtype=torch.float64)
                                          for _ in range(N_LAYERS))
        self.head = torch.nn.Linear(DIM, 1, dtype=torch.float64)

    def run(self, chunk, x, target):
        """x: [rows, IN_DIM] with the embedding, else [rows, DIM]; the summed loss with the head."""
        if chunk.embed:
            x = self.embed(x)
        for i in chunk.layers:
            x = torch.tanh(self.layers[i](x))
        return ((self.head(x).squeeze(-1) - target) ** 2).sum() if chunk.head else x


def micro_batches(n):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(ROWS[m], IN_DIM, generator=gen, dtype=torch.float64),
             torch.randn(ROWS[m], generator=gen, dtype=torch.float64)) for m in range(n)]


def reference(n, scale):
    model = Toy()
    whole = split_layers([1.0] * N_LAYERS, 1)[0]
    total = sum(model.run(whole, x, t) for x, t in micro_batches(n))
    (total * scale).backward()
    return total.item(), {k: p.grad for k, p in model.named_parameters()}


def worker(rank, world, port, failures):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(world)))
        for kind, virtual, n in RUNS:
            if kind == "1f1b" and n < world:
                continue
            check_one_run(rank, world, group, kind, virtual, n)
    except Exception as err:  # report, and let the other ranks time out rather than hang
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        dist.destroy_process_group()


def check_one_run(rank, world, group, kind, virtual, n):
    scale = 1.0 / sum(ROWS[:n])  # loss normalised by the step's rows, as by its target tokens
    chunks = split_layers([1.0] * N_LAYERS, world, virtual, embed_cost=0.5, head_cost=1.5)
    mine = stage_chunks(chunks, rank, world)
    model = Toy()
    data = micro_batches(n)
    runner = PipelineRunner(build_schedule(kind, world, n, virtual), group, "cpu")
    calls = []

    def forward(c, m, inputs):
        x, target = data[m]
        out = model.run(chunks[c], x if inputs is None else inputs, target)
        return out * scale if chunks[c].head else out

    result = runner.step(forward, lambda m: ((ROWS[m], DIM), torch.float64, "cpu"),
                         lambda c, m, last: calls.append((c, m, last)))
    ref_loss, ref_grads = reference(n, scale)
    if mine.head:
        loss = sum(v.item() for v in result.losses.values()) / scale
        assert abs(loss - ref_loss) < 1e-9 * abs(ref_loss), (kind, loss, ref_loss)
    held = {f"layers.{i}." for i in mine.layer_ids} | ({"embed."} if mine.embed else set()) \
        | ({"head."} if mine.head else set())
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in held):
            torch.testing.assert_close(p.grad, ref_grads[name], msg=f"{kind} {name}")
        else:
            assert p.grad is None, f"{kind}: {name} is not this stage's"
    # every chunk's last backward is flagged exactly once
    assert sorted(c for c, _, last in calls if last) == sorted(mine.chunk_ids)
    metrics = pipeline_metrics(result.times, group)
    assert len(metrics["micro_batch_times_s"]) == n and metrics["measured_imbalance"] >= 1.0
    assert 0.0 <= metrics["bubble"] < 1.0 and len(metrics["stage_busy_s"]) == world


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_matches_single_process(world):
    """Losses and every parameter's gradient under 1f1b, gpipe and interleaved 1F1B equal one
    process running the same unequal micro-batches through the whole model."""
    run_ranks(worker, world)


def run_ranks(fn, world):
    """fn(rank, world, port, failures) in ``world`` processes; a failing rank fails the test
    with its message. Fork where it is safe: four fresh interpreters importing torch take most
    of a minute on two shared cores. With CUDA, autograd's device threads in this process (other
    tests' GPU work) make forking unsafe, so spawn there."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    failures = mp.get_context(method).Queue()
    try:
        mp.start_processes(fn, args=(world, free_port(), failures), nprocs=world,
                           start_method=method)
    except Exception:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        pytest.fail("\n".join(messages) or "a pipeline worker failed")


def test_single_stage_runs_chunks_in_place():
    """pp = 1 (no process group) with two chunks hands activations over without communication."""
    n, scale = 3, 1.0
    chunks = split_layers([1.0] * N_LAYERS, 1, 2)
    model, data = Toy(), micro_batches(n)
    runner = PipelineRunner(build_schedule("gpipe", 1, n, 2), None, "cpu")
    result = runner.step(lambda c, m, x: model.run(chunks[c], data[m][0] if x is None else x,
                                                   data[m][1]),
                         lambda m: ((ROWS[m], DIM), torch.float64, "cpu"))
    ref_loss, ref_grads = reference(n, scale)
    assert abs(sum(v.item() for v in result.losses.values()) - ref_loss) < 1e-9 * ref_loss
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name])
    assert result.times.busy_s <= result.times.wall_s
    assert all(t > 0 for t in result.times.forward_s + result.times.backward_s)


def llama_worker(rank, world, port, failures):
    """Two stages of the real model, built with only their layers, against the whole model."""
    from wlbtrain.config import ModelConfig
    from wlbtrain.models.attention import reference_attention, segment_attention
    from wlbtrain.models.llama import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        cfg = ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=61)
        gen = torch.Generator().manual_seed(2)
        docs = [[5, 11], [17], [3, 9, 2]]  # document lengths of each micro-batch
        batches = []
        for lengths in docs:
            tokens = torch.randint(0, cfg.vocab_size, (sum(lengths),), generator=gen)
            positions = torch.cat([torch.arange(d) for d in lengths])
            cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
            attention = segment_attention(reference_attention, cu, max(lengths))
            batches.append((tokens, positions, attention, torch.roll(tokens, -1)))
        scale = 1.0 / sum(map(sum, docs))

        def build(layer_ids=None, embed=True, head=True):
            model = build_model(cfg, layer_ids, embed, head)
            model.to_empty(device="cpu")
            model.init_weights(0)
            return model

        whole = build()
        ref_loss = sum(whole(t, p, a, labels=y) for t, p, a, y in batches)
        (ref_loss * scale).backward()

        chunks = split_layers([1.0] * cfg.n_layers, world, head_cost=0.5)
        mine = stage_chunks(chunks, rank, world)
        stage = build(mine.layer_ids, mine.embed, mine.head)

        def forward(c, m, inputs):
            tokens, positions, attention, labels = batches[m]
            out = stage(tokens if inputs is None else inputs, positions, attention,
                        labels=labels, chunk=chunks[c])
            return out * scale if chunks[c].head else out

        runner = PipelineRunner(build_schedule("1f1b", world, len(docs)), dist.group.WORLD, "cpu")
        result = runner.step(forward, lambda m: ((sum(docs[m]), cfg.dim), torch.float32, "cpu"))
        if mine.head:
            loss = sum(v.item() for v in result.losses.values()) / scale
            assert abs(loss - ref_loss.item()) < 1e-4 * ref_loss.item()
        reference_grads = dict(whole.named_parameters())
        for name, p in stage.named_parameters():
            torch.testing.assert_close(p.grad, reference_grads[name].grad, msg=name)
    except Exception as err:
        failures.put(f"rank {rank}: {type(err).__name__}: {err}")
        raise
    finally:
        dist.destroy_process_group()


def test_llama_stages_match_the_whole_model():
    run_ranks(llama_worker, 2)
