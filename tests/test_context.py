"""Context-parallel attention equals unsharded document-causal attention, for any shard plan.

One spawn of four gloo ranks (CPU) runs every case, cp 2 on two pairs of ranks and then cp 4:
layouts × plans × modes × kernels.
Plans are built here from the ShardPlan types, not by the sharder: per_sequence-like,
per_document-like, contiguous, and random ones (several chunks of a segment per rank, in any
order). Each rank gathers outputs and gradients back into global order and compares them with
reference_varlen_attention over the whole padded micro-batch. The Triton kernel runs in Triton's
interpreter on tiny shapes.
"""

import json
import os
import socket
import time
from datetime import timedelta

import numpy as np
import torch

# The interpreter must be chosen before the kernels are decorated (spawned ranks inherit it).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from wlbtrain.parallel.context import check_plan, make_context_attention  # noqa: E402
from wlbtrain.parallel.sharding import Chunk, RankShard, ShardPlan  # noqa: E402
from conftest import interpreter_problem  # noqa: E402  (why the interpreter cannot run here)

WORLD = 4  # processes: two cp 2 groups side by side, then one cp 4 group
TOTAL = 64  # padded tokens of the equality layouts: a multiple of 2·cp for cp 2 and 4
ATOL = RTOL = 5e-5


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def cu_of(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def chunks_in(lengths, start, stop):
    """The global range [start, stop) cut at segment boundaries."""
    cu = cu_of(lengths)
    out = []
    for seg in range(len(lengths)):
        a, b = max(start, cu[seg]), min(stop, cu[seg + 1])
        if a < b:
            out.append(Chunk(seg, int(a - cu[seg]), int(b - a), int(a)))
    return out


def per_sequence_plan(lengths, cp):
    """The packed sequence in 2·cp chunks, rank i takes chunks i and 2·cp-1-i."""
    piece = sum(lengths) // (2 * cp)
    ranks = [chunks_in(lengths, i * piece, (i + 1) * piece)
             + chunks_in(lengths, (2 * cp - 1 - i) * piece, (2 * cp - i) * piece)
             for i in range(cp)]
    return ShardPlan("per_sequence", cp, list(lengths), [RankShard(c) for c in ranks])


def per_document_plan(lengths, cp):
    """Every segment (padding too) in 2·cp head/tail chunks, leftovers one token at a time
    round-robin across segments: a rank can hold three or more chunks of one segment."""
    cu = cu_of(lengths)
    ranks = [[] for _ in range(cp)]
    turn = 0
    for seg, length in enumerate(lengths):
        piece = length // (2 * cp)
        for i in range(cp) if piece else ():
            for j in (i, 2 * cp - 1 - i):
                ranks[i].append(Chunk(seg, j * piece, piece, int(cu[seg]) + j * piece))
        for t in range(2 * cp * piece, length):
            ranks[turn % cp].append(Chunk(seg, t, 1, int(cu[seg]) + t))
            turn += 1
    return ShardPlan("per_document", cp, list(lengths), [RankShard(c) for c in ranks])


def contiguous_plan(lengths, cp):
    """Rank i holds tokens [i·n, (i+1)·n): global order is gathered order, no permutation."""
    n = sum(lengths) // cp
    ranks = [RankShard(chunks_in(lengths, i * n, (i + 1) * n)) for i in range(cp)]
    return ShardPlan("contiguous", cp, list(lengths), ranks)


def random_plan(lengths, cp, gen):
    """Segments cut at random points, pieces dealt in random order, split at rank boundaries,
    each rank's chunk list shuffled."""
    cu = cu_of(lengths)
    cuts = set(cu.tolist()) | set(gen.integers(0, cu[-1], size=cu[-1] // 3).tolist())
    bounds = sorted(cuts)
    pieces = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    gen.shuffle(pieces)
    n = int(cu[-1]) // cp
    ranks, held = [[]], 0
    for a, b in pieces:
        while a < b:
            take = min(b - a, n - held)
            ranks[-1] += chunks_in(lengths, a, a + take)
            a, held = a + take, held + take
            if held == n and len(ranks) < cp:
                ranks.append([])
                held = 0
    for chunks in ranks:
        gen.shuffle(chunks)
    return ShardPlan("random", cp, list(lengths), [RankShard(c) for c in ranks])


def layouts(cp):
    """Segment lengths (padding last) of TOTAL tokens: short segments (< 2·cp), one longer than
    a rank's share, a single segment filling the micro-batch, and a random one."""
    gen = np.random.default_rng(cp)
    real = []
    while sum(real) < TOTAL - 8:
        real.append(int(gen.integers(1, 20)))
    real = real[:-1] if sum(real) > TOTAL else real
    return {
        "mixed": [3, 1, 37, 7, 2, 9, 5],
        "single": [TOTAL, 0],
        "random": real + [TOTAL - sum(real)],
    }


def plans(lengths, cp, seed):
    gen = np.random.default_rng(seed)
    return {"per_sequence": per_sequence_plan(lengths, cp),
            "per_document": per_document_plan(lengths, cp),
            "contiguous": contiguous_plan(lengths, cp),
            "random": random_plan(lengths, cp, gen),
            "random2": random_plan(lengths, cp, gen)}


@pytest.mark.parametrize("cp", [2, 4])
def test_helper_plans_are_valid(cp):
    for name, lengths in layouts(cp).items():
        for plan in plans(lengths, cp, seed=1).values():
            check_plan(plan)


def test_check_plan_rejects_overlaps_and_gaps():
    lengths = [6, 2]
    good = contiguous_plan(lengths, 2)
    check_plan(good)
    overlap = ShardPlan("x", 2, lengths, [RankShard([Chunk(0, 0, 4, 0)]),
                                           RankShard([Chunk(0, 2, 4, 2)])])
    with pytest.raises(ValueError, match="exactly once"):
        check_plan(overlap)
    outside = ShardPlan("x", 2, lengths, [RankShard([Chunk(0, 0, 4, 0)]),
                                           RankShard([Chunk(0, 4, 4, 4)])])
    with pytest.raises(ValueError, match="outside its segment"):
        check_plan(outside)


@pytest.mark.parametrize("mode,kernel,match", [("ulysses", "reference", "cp_attention"),
                                              ("ring", "flash", "train.attention")])
def test_unknown_mode_or_kernel_names_the_key(mode, kernel, match):
    plan = contiguous_plan([8], 2)
    with pytest.raises(ValueError, match=match):
        make_context_attention(plan, 0, None, mode, kernel)


# --------------------------------------------------------------------------------------------
# One rank's cases
# --------------------------------------------------------------------------------------------

def gather_global(local, plan, group=None):
    """Every rank's [n, ...] rows placed into global order: [padded_tokens, ...]."""
    parts = local.new_empty((plan.cp * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(parts, local.contiguous(), group=group)
    parts = parts.unflatten(0, (plan.cp, local.shape[0]))
    out = local.new_empty((plan.padded_tokens, *local.shape[1:]))
    for r, shard in enumerate(plan.ranks):
        out[torch.from_numpy(shard.token_index())] = parts[r]
    return out


def unsharded(q, k, v, plan, grad):
    """fp32 reference over the whole padded micro-batch: out and (dq, dk, dv)."""
    from wlbtrain.kernels import reference_varlen_attention

    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    cu = torch.from_numpy(plan.cu_seqlens()).to(torch.int32)
    top = max(plan.segment_lengths)
    out = reference_varlen_attention(q, k, v, cu, cu, top, top)
    return out.detach(), torch.autograd.grad((out * grad.float()).sum(), (q, k, v))


def sharded(q, k, v, plan, grad, mode, kernel, group):
    """This rank's out and (dq, dk, dv) under context parallelism, gathered to global order."""
    rank = dist.get_rank(group)
    index = torch.from_numpy(plan.ranks[rank].token_index())
    local = [t[index].detach().requires_grad_() for t in (q, k, v)]
    attention = make_context_attention(plan, rank, group, mode, kernel)
    out = attention(*local)
    (out * grad[index]).sum().backward()
    return (gather_global(out.detach(), plan, group),
            [gather_global(t.grad, plan, group) for t in local])


def inputs(total, heads, kv_heads, head_dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(total, h, head_dim, generator=gen).to(dtype)
                     for h in (heads, kv_heads, kv_heads, heads))
    return q, k, v, grad


def compare(got, want):
    """None, or what differs."""
    (out, grads), (ref_out, ref_grads) = got, want
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        if not torch.isfinite(a).all():
            return f"{name} has non-finite values"
        if not torch.allclose(a.float(), b, atol=ATOL, rtol=RTOL):
            return f"{name} differs by {(a.float() - b).abs().max().item():.3g}"
    return None


def rel_l2(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


# The interpreted Triton kernel is slow: half the tokens (still a segment shorter than 2·cp and
# one longer than a rank's share at cp 2 and 4), and plans with several rounds per call.
TRITON_LAYOUT = [3, 1, 17, 2, 5, 4]
TRITON_PLANS = {2: ("per_document",), 4: ("random",)}


def equality_cases(cp, with_triton):
    """(name, plan, mode, kernel, (Hq, Hkv, D)): every layout and plan on the reference kernel,
    a few on the interpreted Triton kernel."""
    for layout, lengths in layouts(cp).items():
        for plan_name, plan in plans(lengths, cp, seed=cp).items():
            for mode in ("allgather", "ring"):
                yield f"{mode}/reference/{layout}/{plan_name}", plan, mode, "reference", (4, 2, 16)
    if not with_triton:
        return
    small = plans(TRITON_LAYOUT, cp, seed=cp)
    for plan_name in TRITON_PLANS[cp]:
        for mode in ("allgather", "ring"):
            yield f"{mode}/triton/small/{plan_name}", small[plan_name], mode, "triton", (2, 1, 16)


def bf16_ring_error(cp, group):
    """Relative L2 error of the ring's bf16 gradients against fp32, one 256-token document."""
    plan = per_sequence_plan([256, 0], cp)
    q, k, v, grad = inputs(256, 4, 2, 32, seed=3, dtype=torch.bfloat16)
    _, ref_grads = unsharded(q, k, v, plan, grad)
    _, grads = sharded(q, k, v, plan, grad, "ring", "reference", group)
    return {name: rel_l2(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)}


def run_cases(cp, group, with_triton):
    results = {"cases": {}}
    for name, plan, mode, kernel, shape in equality_cases(cp, with_triton):
        start = time.perf_counter()
        q, k, v, grad = inputs(plan.padded_tokens, *shape, seed=len(name))
        got = sharded(q, k, v, plan, grad, mode, kernel, group)
        problem = compare(got, unsharded(q, k, v, plan, grad))
        results["cases"][name] = {"problem": problem, "seconds": time.perf_counter() - start}
    results["bf16_ring_error"] = bf16_ring_error(cp, group)
    return results


def worker(rank, port, out_dir, with_triton):
    """One of WORLD ranks: cp 2 on ranks {0, 1} and {2, 3} (group ranks differ from global
    ranks on the second; only the first runs the slow interpreted kernel), then cp 4."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=300))
    results = {}
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        results[2] = run_cases(2, pairs[rank // 2], with_triton and rank < 2)
        results[4] = run_cases(4, None, with_triton)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The groups, spawned once per CP size
# --------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """cp -> every rank's results for that cp (spawned once for the module)."""
    out_dir = tmp_path_factory.mktemp("context")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(free_port(), str(out_dir), interpreter_problem() is None),
             nprocs=WORLD)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return lambda cp: [res[str(cp)] for res in ranks]


def assert_cases(ranks, mode, kernel):
    prefix = f"{mode}/{kernel}/"
    names = [n for n in ranks[0]["cases"] if n.startswith(prefix)]
    assert names, f"no {prefix} cases ran"
    problems = [f"rank {r} {name}: {res['cases'][name]['problem']}"
                for r, res in enumerate(ranks) for name, case in res["cases"].items()
                if name.startswith(prefix) and case["problem"]]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_reference_kernel_matches_unsharded(group_results, cp, mode):
    assert_cases(group_results(cp), mode, "reference")


@pytest.mark.skipif(interpreter_problem() is not None, reason=str(interpreter_problem()))
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_triton_kernel_matches_unsharded(group_results, cp, mode):
    assert_cases(group_results(cp), mode, "triton")


def gpu_worker(rank, world, port, out_dir):
    """Compiled Triton kernel, bf16, NCCL: every plan kind and both modes against fp32."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    gen = np.random.default_rng(0)
    lengths = [int(x) for x in gen.integers(1, 900, size=8)] + [3, 1, 2500]
    lengths.append(-sum(lengths) % (2 * world) + 2 * world)  # padding
    errors = {}
    try:
        for plan_name, plan in plans(lengths, world, seed=5).items():
            q, k, v, grad = (t.cuda() for t in inputs(plan.padded_tokens, 8, 2, 128, seed=1,
                                                        dtype=torch.bfloat16))
            ref_out, ref_grads = unsharded(q, k, v, plan, grad)
            for mode in ("allgather", "ring"):
                out, grads = sharded(q, k, v, plan, grad, mode, "triton", None)
                errors[f"{mode}/{plan_name}"] = [rel_l2(a, b) for a, b in
                                                 zip((out, *grads), (ref_out, *ref_grads))]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_nccl_triton_bf16_matches_fp32_reference(tmp_path):
    """Up to 4 GPUs (one is a cp 1 group: the kernel calls and permutations, no P2P)."""
    world = min(torch.cuda.device_count(), 4)
    mp.spawn(gpu_worker, args=(world, free_port(), str(tmp_path)), nprocs=world)
    for rank in range(world):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(errors) == 10, errors
        for case, (out, dq, dk, dv) in errors.items():
            assert out < 1e-2 and max(dq, dk, dv) < 2e-2, (rank, case, out, dq, dk, dv)


def test_ring_bf16_error_does_not_grow_with_ring_size(group_results):
    """dK/dV cross cp - 1 ranks before they reach home; accumulated in bf16 their error would
    grow with the ring. In fp32 the cp 4 error stays that of cp 2 (one final rounding)."""
    two, four = group_results(2)[0]["bf16_ring_error"], group_results(4)[0]["bf16_ring_error"]
    for name in ("dq", "dk", "dv"):
        assert four[name] < 0.01, (name, four)
        assert four[name] <= 1.15 * two[name], (name, two, four)
