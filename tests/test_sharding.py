"""CP sharding plans: coverage, the chunk rules, balance, and the adaptive and hybrid choices."""

import json

import numpy as np
import pytest

from wlbtrain.parallel.sharding import (KERNEL_PASSES, SHARDINGS, KernelPass, ShardCostEstimator,
                                        causal_tiles, compare_shardings, plan_shards, shard_costs)

# Exact causal work: 1×1 tiles and no overheads, so a chunk costs Σ (position + 1) over its tokens.
EXACT = ShardCostEstimator(heads=1, head_dim=1, flops_per_s=2.0, chunk_s=0.0, call_s=0.0,
                           passes=(KernelPass("exact", 1, 1, 1),))


def layouts(cp, tp):
    """Named micro-batches: short segments, long ones, one filling it, many tiny ones, mixes."""
    rng = np.random.default_rng(cp * 10 + tp)
    share = 4096 // cp
    return {
        "shorter_than_2cp": [1, 2, 3, 2 * cp - 1, 1, 5, 7],
        "longer_than_rank_share": [share * 2 + 5, 17, share + 3, 40],
        "single_filling": [4096],
        "single_needs_padding": [4093],
        "many_tiny": rng.integers(1, 12, size=300).tolist(),
        "long_and_tiny": [3000] + [40] * 25,
        "random": rng.integers(1, 2000, size=8).tolist(),
        "pareto": np.minimum(rng.pareto(1.1, 40) * 60 + 1, 3000).astype(int).tolist(),
        "with_empty": [0, 30, 0, 500],
    }


def cases():
    for cp in (2, 4):
        for tp in (1, 2):
            for name, lengths in layouts(cp, tp).items():
                yield pytest.param(lengths, cp, tp, id=f"{name}-cp{cp}-tp{tp}")


def cu_of(plan):
    return plan.cu_seqlens()


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("lengths, cp, tp", list(cases()))
def test_every_token_held_once_equal_counts_consistent_chunks(lengths, cp, tp, sharding):
    multiple = 2 * cp * tp
    plan = plan_shards(lengths, cp, multiple, sharding)
    real = sum(lengths)
    assert plan.segment_lengths[:-1] == list(lengths)  # input segments, then the padding one
    assert plan.padded_tokens % multiple == 0 and 0 <= plan.padding < multiple
    assert plan.padded_tokens - plan.padding == real
    assert len(plan.ranks) == cp and len(plan.rank_costs) == cp
    held = np.concatenate([r.token_index() for r in plan.ranks])
    assert np.array_equal(np.sort(held), np.arange(plan.padded_tokens))  # each exactly once
    cu = cu_of(plan)
    for shard in plan.ranks:
        assert shard.num_tokens == plan.padded_tokens // cp and shard.num_tokens % tp == 0
        starts = [c.global_start for c in shard.chunks]
        assert starts == sorted(starts)  # the documented order
        for c in shard.chunks:
            assert c.length > 0 and c.start >= 0
            assert c.global_start == cu[c.segment] + c.start
            assert c.start + c.length <= plan.segment_lengths[c.segment]
        index = shard.token_index()
        segment = np.searchsorted(cu, index, side="right") - 1
        assert np.array_equal(shard.positions(), index - cu[segment])
    # padding only in the tail segment: every token past the real ones is padding
    assert plan.padding == plan.padded_tokens - real


@pytest.mark.parametrize("lengths, cp, tp", list(cases()))
def test_per_sequence_is_llama3_rule(lengths, cp, tp):
    plan = plan_shards(lengths, cp, 2 * cp * tp, "per_sequence")
    size = plan.padded_tokens // (2 * cp)
    for i, shard in enumerate(plan.ranks):
        expected = np.concatenate([np.arange(i * size, (i + 1) * size),
                                   np.arange((2 * cp - 1 - i) * size, (2 * cp - i) * size)])
        assert np.array_equal(shard.token_index(), expected)


def owner_map(plan):
    owner = np.full(plan.padded_tokens, -1)
    for r, shard in enumerate(plan.ranks):
        owner[shard.token_index()] = r
    return owner


@pytest.mark.parametrize("lengths, cp, tp", list(cases()))
def test_per_document_head_tail_and_round_robin_leftovers(lengths, cp, tp):
    plan = plan_shards(lengths, cp, 2 * cp * tp, "per_document")
    owner, cu = owner_map(plan), cu_of(plan)
    dealt = 0
    for s, d in enumerate(lengths):
        size = d // (2 * cp)
        for j in range(2 * cp):
            rank = j if j < cp else 2 * cp - 1 - j
            assert (owner[cu[s] + j * size:cu[s] + (j + 1) * size] == rank).all()
        for t in range(2 * cp * size, d):  # the leftovers, dealt on across segments
            assert owner[cu[s] + t] == dealt % cp
            dealt += 1


def leftover_cost(plan, cp):
    """Per rank: exact cost of its leftover and padding tokens (position + 1 each)."""
    cu, costs = cu_of(plan), np.zeros(cp)
    for r, shard in enumerate(plan.ranks):
        index, pos = shard.token_index(), shard.positions()
        seg = np.searchsorted(cu, index, side="right") - 1
        lengths = np.asarray(plan.segment_lengths)[seg]
        body = lengths - lengths % (2 * cp)
        extra = (pos >= body) | (seg == len(plan.segment_lengths) - 1)
        costs[r] = (pos[extra] + 1).sum()
    return costs


@pytest.mark.parametrize("lengths, cp, tp", list(cases()))
def test_per_document_equal_cost_up_to_leftovers(lengths, cp, tp):
    plan = plan_shards(lengths, cp, 2 * cp * tp, "per_document", EXACT)
    costs = np.asarray(plan.rank_costs)
    # the head/tail pairs cost every rank the same; only leftovers and padding differ
    assert costs.max() - costs.min() <= leftover_cost(plan, cp).max() + 1e-9
    assert len({s.num_tokens for s in plan.ranks}) == 1


def long_and_short(cp):
    rng = np.random.default_rng(cp)
    return [20000] + rng.integers(50, 400, size=60).tolist()


@pytest.mark.parametrize("cp", [2, 4])
def test_per_document_balanced_where_per_sequence_is_not(cp):
    lengths = long_and_short(cp)
    seq = plan_shards(lengths, cp, 2 * cp, "per_sequence")
    doc = plan_shards(lengths, cp, 2 * cp, "per_document")
    assert seq.balance > 1.5
    assert doc.balance < 1.05
    assert doc.estimate < seq.estimate


@pytest.mark.parametrize("cp", [2, 4])
def test_adaptive_picks_by_the_estimate(cp):
    tiny = [64] * 1024  # chunks of 64/(2cp) tokens: mostly tile padding under per_document
    few_long = [40000, 16000, 9000]
    assert plan_shards(tiny, cp, 16, "adaptive").sharding == "per_sequence"
    assert plan_shards(few_long, cp, 16, "adaptive").sharding == "per_document"
    for lengths in (tiny, few_long, long_and_short(cp)):
        adaptive = plan_shards(lengths, cp, 16, "adaptive")
        pure = [plan_shards(lengths, cp, 16, s).estimate for s in ("per_sequence", "per_document")]
        assert adaptive.estimate == min(pure)


@pytest.mark.parametrize("lengths, cp, tp", list(cases()))
def test_hybrid_never_worse_than_adaptive(lengths, cp, tp):
    adaptive = plan_shards(lengths, cp, 2 * cp * tp, "adaptive")
    hybrid = plan_shards(lengths, cp, 2 * cp * tp, "hybrid")
    assert hybrid.estimate <= adaptive.estimate
    assert (hybrid.sharding == "hybrid") == (hybrid.hybrid_threshold is not None)


def test_hybrid_splits_long_from_tiny():
    lengths = [30000] + [24] * 800 + [12000]
    plan = plan_shards(lengths, 2, 16, "hybrid")
    assert plan.sharding == "hybrid" and plan.hybrid_threshold == 12000
    assert plan.estimate < plan_shards(lengths, 2, 16, "adaptive").estimate
    owner, cu = owner_map(plan), cu_of(plan)
    quarter = 30000 // 4  # the long ones per document: head/tail quarters on ranks 0,1,1,0
    assert [owner[q * quarter] for q in range(4)] == [0, 1, 1, 0]
    assert (owner[cu[1]:cu[801]] >= 0).all()


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_shard_costs_agrees_with_the_plan(sharding):
    lengths = long_and_short(2) + [7, 3]
    est = ShardCostEstimator()
    plan = plan_shards(lengths, 2, 8, sharding, est)
    applied, costs = shard_costs(lengths, 2, 8, sharding, est)
    assert applied == plan.sharding and np.allclose(costs, plan.rank_costs)
    assert np.allclose(est.plan_costs(plan), plan.rank_costs)
    assert compare_shardings(lengths, 2, 8, est)[sharding][0] == plan.sharding


def brute_tiles(q, k, bm, bn):
    return sum(-(-(min((b + 1) * bm, q) + k - q) // bn) for b in range(-(-q // bm)))


@pytest.mark.parametrize("bm, bn", [(128, 64), (64, 128), (16, 16), (48, 32)])
def test_causal_tiles_match_enumeration(bm, bn):
    rng = np.random.default_rng(bm + bn)
    q = rng.integers(0, 600, 200)
    k = q + rng.integers(0, 900, 200)
    assert causal_tiles(q, k, bm, bn).tolist() == [brute_tiles(a, b, bm, bn) for a, b in zip(q, k)]


def test_tiny_chunks_cost_whole_tiles():
    est = ShardCostEstimator()
    one_block = est.chunk_costs([128], [4096])[0]
    single_tokens = est.chunk_costs(np.ones(128, int), np.arange(3969, 4097)).sum()
    assert single_tokens > 50 * one_block / 2  # each lone query pays for its whole key row


def test_kernel_passes_match_the_kernel():
    pytest.importorskip("triton")
    from wlbtrain.kernels import attention
    fwd, bwd = attention._HOPPER_FORWARD, attention._HOPPER_BACKWARD
    tiles = [(p.block_m, p.block_n) for p in KERNEL_PASSES]
    assert tiles == [(fwd.block_m, fwd.block_n), (bwd.dkdv.block_m, bwd.dkdv.block_n),
                     (bwd.dq.block_m, bwd.dq.block_n)]


def test_from_profile(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"attn_coef": 1e-10, "linear_coef": 1e-6,
                                "cp": {"flops_per_s": 3e14, "chunk_s": 1e-6, "call_s": 2e-5,
                                       "heads": 8, "head_dim": 64,
                                       "passes": [["forward", 64, 32, 2]]}}))
    est = ShardCostEstimator.from_profile(path)
    assert (est.heads, est.head_dim, est.flops_per_s, est.passes[0].block_m) == (8, 64, 3e14, 64)
    assert ShardCostEstimator.from_profile(path, heads=2).heads == 2
    path.write_text(json.dumps({"attn_coef": 1e-10, "linear_coef": 1e-6}))
    with pytest.raises(ValueError, match="no \"cp\" section"):
        ShardCostEstimator.from_profile(path)


@pytest.mark.parametrize("args, message", [
    (([10], 2, 8, "zigzag"), "zigzag"),
    (([10], 2, 6, "per_sequence"), "multiple"),
    (([10, -1], 2, 8, "per_sequence"), ">= 0"),
])
def test_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        plan_shards(*args)
