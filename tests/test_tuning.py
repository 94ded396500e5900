"""Online tuning of the outlier queues, and the wlb packer on generated length families at the
paper's layouts: exactly-once, caps, never worse than plain, resumable while thresholds move."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from wlbtrain.data.cost import CostModel, imbalance
from wlbtrain.data.families import FAMILIES
from wlbtrain.data.packing import make_packer, max_piece_for
from wlbtrain.data.stream import DocumentStream
from wlbtrain.data import tuning
from wlbtrain.data.replay import REPLAY_WARM_UP, Replay
from wlbtrain.data.tuning import (ThresholdSearch, ThresholdTuner, as_records, estimate,
                                  pool_shorts, tune)

sys.path.insert(0, str(Path(__file__).parent))
from test_packing import RecordingStream, assert_same_tokens  # noqa: E402

CONTEXT = 4096
COST = CostModel(attn_coef=1e-9, linear_coef=2e-6)  # attention = the rest at 2K tokens


def pieces(lengths, max_piece=CONTEXT):
    stream, out = DocumentStream(lengths, 0, max_piece, loop=False), []
    while (p := stream.next()) is not None:
        out.append(p[2])
    return np.array(out)


def long_tail(n=2500, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.pareto(1.1, n) * 150 + 1).astype(np.int64)


def test_queues_lower_the_estimated_imbalance_and_cost_delay():
    window = pieces(long_tail())
    none = estimate(window, [], 4, CONTEXT, 4 * CONTEXT, COST)
    two = estimate(window, [1024, 2048], 4, CONTEXT, 4 * CONTEXT, COST)
    three = estimate(window, [1024, 2048, 3072], 4, CONTEXT, 4 * CONTEXT, COST)
    assert three[0] < two[0] < none[0]
    assert none[1] < two[1] < three[1]


def test_the_estimate_tracks_the_packer():
    """Not a prediction to the digit, but close enough to rank threshold sets."""
    lengths = long_tail()
    window = pieces(lengths)
    for thresholds in ([2048], [1024, 2048, 3072]):
        est_imb, est_delay = estimate(window, thresholds, 4, CONTEXT, 4 * CONTEXT, COST)
        packer = make_packer("wlb", context=CONTEXT, n_micro_batches=4, cost_model=COST,
                             refine=False, outlier_thresholds=thresholds)
        stream, imb, delays, weights = DocumentStream(lengths, 0, CONTEXT, loop=False), [], [], []
        while (plan := packer.pack(stream)) is not None:
            imb.append(imbalance([COST.micro_batch_cost(p[2] for p in mb) for mb in plan]))
            delays += [d for mb in packer.last_delays for d in mb]
            weights += [p[2] for mb in plan for p in mb]
        assert abs(est_imb - np.mean(imb[:-2])) < 0.05
        assert abs(est_delay - np.average(delays, weights=weights)) < 0.1


@pytest.mark.parametrize("budget", [0.0, 0.3, 0.8])
def test_tune_keeps_the_estimated_delay_within_the_budget(budget):
    window = pieces(long_tail(seed=1))
    thresholds, score = tune(window, CONTEXT, 4, CONTEXT, 4 * CONTEXT, COST, budget)
    imb, delay = estimate(window, thresholds, 4, CONTEXT, 4 * CONTEXT, COST)
    assert np.isfinite(score)
    if budget == 0.0:  # no queue at all, whatever the carry-over's own delay
        assert thresholds == []
    else:  # within the budget, and a budget that allows queues buys balance with them
        assert delay <= budget
        assert imb < estimate(window, [], 4, CONTEXT, 4 * CONTEXT, COST)[0]


def test_search_spread_over_steps_finds_what_one_search_finds():
    window = pieces(long_tail(seed=2))
    whole, _ = tune(window, CONTEXT, 4, CONTEXT, 4 * CONTEXT, COST, 0.6)
    search, rounds = ThresholdSearch.start(window, CONTEXT, [1024]), 0
    while not search.done:
        search = ThresholdSearch.from_state(json.loads(json.dumps(search.state_dict())))
        search.advance(3, 4, CONTEXT, 4 * CONTEXT, COST, 0.6)
        rounds += 1
    assert search.best == whole and rounds > 5


def auto_packer(budget=0.5, refine=True):
    return make_packer("wlb", context=CONTEXT, n_micro_batches=4, cost_model=COST,
                       refine=refine, outlier_thresholds="auto", max_token_delay=budget)


def test_auto_moves_thresholds_and_keeps_every_token_exactly_once():
    lengths = long_tail(n=4000, seed=0)
    stream, packer = RecordingStream(lengths, 0, CONTEXT, loop=False), auto_packer()
    seen, trained = {tuple(packer.thresholds)}, []
    while (plan := packer.pack(stream)) is not None:
        seen.add(tuple(packer.thresholds))
        trained += [p for mb in plan for p in mb]
        assert all(sum(p[2] for p in mb) <= CONTEXT for mb in plan)
    # beyond the start: a search that only drops the full-piece queue is one move
    assert len(seen) > 2 and packer.tuner.retunes >= 2
    assert packer.pending() == []
    assert_same_tokens(lengths, trained, stream.emitted)


def test_before_the_first_search_full_pieces_share_steps_only_with_full_pieces():
    """Documents longer than the context are cut into full pieces and a remainder; auto starts
    with a queue of full pieces alone, so a step holds one in every micro-batch or in none
    (grouped with the remainders, a step mixed them and ran ~1.2 unbalanced). The first search
    weighs only the other queues, and that one goes."""
    lengths = FAMILIES["all-long"](300, 0) // 32  # 1K .. 16K tokens at a 4K context
    stream, packer = DocumentStream(lengths, 0, CONTEXT, loop=True), auto_packer(budget=1.0)
    assert packer.thresholds == [CONTEXT // 4, CONTEXT // 2, CONTEXT]
    steps_with_full = 0
    while packer.tuner.searches == 0:
        plan = packer.pack(stream)
        full = [sum(p[2] == CONTEXT for p in mb) for mb in plan]
        assert full in ([0] * 4, [1] * 4), full
        steps_with_full += full[0]
    assert steps_with_full >= 3
    while packer.tuner.search is not None:  # the first search ends: the start's queue goes
        packer.pack(stream)
    assert all(t < CONTEXT for t in packer.thresholds)


def test_moving_thresholds_queues_held_pieces_again_by_their_new_bands():
    packer = auto_packer()
    packer._move_thresholds([1000, 2000])
    packer.queues[0].items.extend([(0, 0, 1500, 3), (1, 0, 1200, 5)])
    packer.queues[1].items.extend([(2, 0, 2500, 1), (3, 0, 3000, 4)])
    carry = [(4, 0, 10, 5)]
    packer.carry = list(carry)
    # one queue from 3000: the pieces below it join the carry-over in pull order, none is
    # grouped with lengths of another band
    packer._move_thresholds([3000])
    assert [it[0] for it in packer.queues[0].items] == [3]
    assert [it[0] for it in packer.carry] == [4, 2, 0, 1]
    packer._move_thresholds([500, 1000, 3000])  # more queues: the held piece keeps its band
    assert [len(q.items) for q in packer.queues] == [0, 0, 1]
    assert len(packer.pending()) == 5
    packer.carry = []
    packer.queues[2].items.clear()
    packer.queues[0].items.extend([(5, 0, 700, 2), (6, 0, 600, 1)])
    packer.queues[2].items.append((7, 0, 4000, 3))
    packer._move_thresholds([650, 3500])  # each to its new band, or below every band
    assert [[it[0] for it in q.items] for q in packer.queues] == [[5], [7]]
    assert [it[0] for it in packer.carry] == [6]


def test_resume_mid_search_plans_identically(monkeypatch):
    monkeypatch.setattr(tuning, "EVAL_RECORDS_PER_STEP", 1)  # one estimate a step: long searches
    lengths = long_tail(n=3000, seed=5)
    stream, packer = DocumentStream(lengths, 1, CONTEXT, loop=True), auto_packer(refine=False)
    for _ in range(17):  # a search starts at step 16 and runs over several steps
        packer.pack(stream)
    assert packer.tuner.search is not None
    saved = json.loads(json.dumps({"s": stream.state_dict(), "p": packer.state_dict()}))
    expected = [packer.pack(stream) for _ in range(20)]
    stream2, packer2 = DocumentStream(lengths, 1, CONTEXT, loop=True), auto_packer(refine=False)
    stream2.load_state_dict(saved["s"])
    packer2.load_state_dict(saved["p"])
    assert [packer2.pack(stream2) for _ in range(20)] == expected
    assert packer2.thresholds == packer.thresholds


def test_tuner_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="max_token_delay"):
        ThresholdTuner(CONTEXT, 4, CONTEXT, 4 * CONTEXT, COST, -1.0)


def test_a_budget_with_fixed_thresholds_is_an_error():
    with pytest.raises(ValueError, match="max_token_delay"):
        make_packer("wlb", context=CONTEXT, max_tokens_per_micro_batch=CONTEXT,
                    n_micro_batches=4, cost_model=COST, outlier_thresholds=[CONTEXT // 2],
                    max_token_delay=0.5)


# ------------------------------------------------------------- families at the paper's layouts

# (context, micro-batches per step, cost model) of 7B-128K (TP8 CP2 PP4) and 550M-64K (TP2 CP2
# PP4 DP2) from FLOP counts, as scripts/bench_packing.py builds them
LAYOUTS = {
    "7B-128K": (131072, 4, CostModel.from_model(
        SimpleNamespace(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                        vocab_size=32000), SimpleNamespace(tp=8, cp=2, pp=4))),
    "550M-64K": (65536, 8, CostModel.from_model(
        SimpleNamespace(dim=1536, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=4096,
                        vocab_size=32000), SimpleNamespace(tp=2, cp=2, pp=4))),
}
# The 150 steps: over 20 steps after the warm-up, one unlucky step moved a family's mean by
# 0.02-0.03, more than what the packer is judged on.
STEPS = 150
# Steps left out of the balance: the queues are still filling, and the first search runs.
WARM_UP = 12


def covered_ranges(pieces) -> dict:
    """Per document, its pieces merged into [start, end) ranges; fails on any overlap (a token
    twice). Interval arithmetic, not per-token arrays: the families hold billions of tokens."""
    by_doc: dict = {}
    for doc, start, length in pieces:
        by_doc.setdefault(doc, []).append((start, start + length))
    merged = {}
    for doc, ranges in by_doc.items():
        ranges.sort()
        out = [list(ranges[0])]
        for start, end in ranges[1:]:
            assert start >= out[-1][1], f"document {doc}: a token packed twice"
            if start == out[-1][1]:
                out[-1][1] = end
            else:
                out.append([start, end])
        merged[doc] = out
    return merged


def run_family(family, layout, packing, **options):
    context, n, cost = LAYOUTS[layout]
    lengths = FAMILIES[family](60000, seed=7)
    # one epoch with tokens for STEPS at either layout (and no more: coverage checks are per token)
    lengths = lengths[:np.searchsorted(np.cumsum(lengths), 3 * STEPS * n * context) + 1]
    stream = RecordingStream(lengths, 0, max_piece_for(packing, context, context), loop=False)
    packer = make_packer(packing, context=context, max_tokens_per_micro_batch=context,
                         n_micro_batches=n, cost_model=cost, **options)
    plans, delays, weights = [], [], []
    for _ in range(STEPS):
        plans.append(packer.pack(stream))
        assert plans[-1] is not None, "the family ran out of documents"
        delays += [d for mb in packer.last_delays for d in mb]
        weights += [p[2] for mb in plans[-1] for p in mb]
    trained = [p for plan in plans for mb in plan for p in mb]
    assert covered_ranges(trained + packer.pending()) == covered_ranges(stream.emitted)
    assert all(sum(p[2] for p in mb) <= context for plan in plans for mb in plan)
    imb = np.mean([imbalance([cost.micro_batch_cost(p[2] for p in mb) for mb in plan])
                   for plan in plans[WARM_UP:]])
    return imb, np.average(delays, weights=weights)


# The target for every family: imbalance ≤ 1.05 at ≤ 1 step of average token delay.
# Bimodal at 64K misses it: its long mode (40K ± 10K tokens) is most of the tokens and fills
# most of a 64K micro-batch, so only narrow queues balance it, each costing ~0.3 steps; the
# frontier (BENCHMARKS.md) reaches 1.07 only past 2 steps.
BEYOND_THE_FRONTIER = {("bimodal", "550M-64K")}
CASES = [pytest.param(f, layout, marks=pytest.mark.xfail(strict=True, reason="frontier"))
         if (f, layout) in BEYOND_THE_FRONTIER else (f, layout)
         for layout in LAYOUTS for f in FAMILIES]


@pytest.mark.parametrize("family, layout", CASES)
def test_families_at_paper_layouts(family, layout):
    plain, _ = run_family(family, layout, "plain")
    wlb, delay = run_family(family, layout, "wlb", max_token_delay=1.0)
    assert wlb < plain or plain < 1.02  # nothing to gain where plain is already balanced
    assert wlb <= 1.05 and delay <= 1.0


@pytest.mark.parametrize("seed", range(6))
def test_the_estimate_sends_the_half_context_queue_to_the_replay(seed):
    """The replay ranks only the sets the estimate scores best. On lognormal lengths at 550M-64K
    and 0.5 steps, one queue at ½ context balances better than the two-queue sets the estimate
    used to put first (fixed queues, 300 steps, seeds 0-1: 1.077 at 0.40 steps against 1.100 at
    0.48 for {0.1, 0.5}; BENCHMARKS.md, "Shipped 2026-12-08"). With the fill beside a long piece
    counted at half the unqueued pieces' attention, the search left it out of the replay on
    seed 2."""
    context, n, cost = LAYOUTS["550M-64K"]
    stream = DocumentStream(FAMILIES["lognormal"](20000, seed), seed, context, loop=True)
    window = pool_shorts([stream.next()[2] for _ in range(8000)], context)[-tuning.TUNE_WINDOW:]
    tuner = ThresholdTuner(context, n, context, n * context, cost, 0.5, refine=True,
                           refine_moves=16, max_carry=context)
    search = ThresholdSearch.start(window, context, [], tuner.replay)
    while search.verify is None and not search.done:
        search.advance(10, n, context, n * context, cost, tuner.queue_delay, replay_steps=0)
    assert search.verify is not None and [context // 2] in search.verify["queue"]


def test_fixed_frontier_lists_the_best_sets_within_the_budget():
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import bench_packing

    lengths = FAMILIES["spiky"](3000, seed=1)
    layout = bench_packing.LAYOUTS["550M-64K"]
    best = bench_packing.fixed_frontier(lengths, layout, 0.5, steps=6, seed=0, top=4)
    assert 1 <= len(best) <= 4 and best == sorted(best)
    assert all(delay <= 0.5 and imb >= 1.0 for imb, delay, _ in best)
    assert all(0 < t < 1 for _, _, ts in best for t in ts)


def test_refine_time_replays_the_recorded_steps(monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import bench_packing

    # generated lengths only: the doclens files may not be beside a checkout
    monkeypatch.setattr(bench_packing, "REFINE_TIME_CELLS", [("550M-64K", "pareto")])
    line = bench_packing.refine_time(None, steps=4, seed=0, repeats=1)
    assert line.startswith("refine_plan on 4 recorded steps")
    from wlbtrain.data import packing, refine
    assert packing.refine_plan is refine.refine_plan  # the recording hook is gone


# ------------------------------------------------------------------ replaying the packer's greedy

def greedy_run(lengths, thresholds, steps=10 ** 6):
    packer = make_packer("wlb", context=CONTEXT, n_micro_batches=4, cost_model=COST,
                         refine=False, outlier_thresholds=thresholds)
    stream, imb, delays, weights = DocumentStream(lengths, 0, CONTEXT, loop=False), [], [], []
    while (plan := packer.pack(stream)) is not None and len(imb) < steps:
        imb.append(imbalance([COST.micro_batch_cost(p[2] for p in mb) for mb in plan]))
        delays += [d for mb in packer.last_delays for d in mb]
        weights += [p[2] for mb in plan for p in mb]
    return imb, np.average(delays, weights=weights)


@pytest.mark.parametrize("thresholds", [[], [2048], [1024, 2048, 3072]])
def test_the_replay_tracks_the_greedy(thresholds):
    """Piece by piece the replay is the packer's greedy: balance and delay as the packer's."""
    lengths = long_tail(seed=4)
    replay = Replay(thresholds)
    replay.advance(as_records(pieces(lengths)), 10 ** 6, 4, CONTEXT, 4 * CONTEXT, COST)
    imb, delay = greedy_run(lengths, thresholds)
    assert replay.done
    assert abs(replay.imbalance() - np.mean(imb[REPLAY_WARM_UP:-1])) < 0.01
    assert abs(replay.delay() - delay) < 0.05


def test_a_replay_of_pooled_short_pieces_stays_close():
    """Pools of short pieces replay as water: close to the piece-by-piece replay."""
    window = pieces(long_tail(seed=5))
    whole, pooled = Replay([1024, 2048]), Replay([1024, 2048])
    whole.advance(as_records(window), 10 ** 6, 4, CONTEXT, 4 * CONTEXT, COST)
    pooled.advance(pool_shorts(window, CONTEXT), 10 ** 6, 4, CONTEXT, 4 * CONTEXT, COST)
    assert abs(whole.imbalance() - pooled.imbalance()) < 0.02
    assert abs(whole.delay() - pooled.delay()) < 0.05


def test_a_replay_resumes_from_its_state():
    records = pool_shorts(pieces(long_tail(seed=6)), CONTEXT)
    once, chunked = Replay([1024, 3072]), Replay([1024, 3072])
    once.advance(records, 10 ** 6, 4, CONTEXT, 4 * CONTEXT, COST, 16, CONTEXT)
    while not chunked.done:
        chunked = Replay.from_state(json.loads(json.dumps(chunked.state_dict())))
        chunked.advance(records, 3, 4, CONTEXT, 4 * CONTEXT, COST, 16, CONTEXT)
    assert chunked.imbalances == once.imbalances and chunked.delay() == once.delay()


def test_a_search_that_replays_resumes_mid_replay():
    window = pool_shorts(pieces(long_tail(n=6000, seed=7)), CONTEXT)
    args = (4, CONTEXT, 4 * CONTEXT, COST, 0.6)
    whole = ThresholdSearch.start(window, CONTEXT, [1024], replay=(16, CONTEXT, 0.08))
    whole.advance(10 ** 9, *args)
    search = ThresholdSearch.start(window, CONTEXT, [1024], replay=(16, CONTEXT, 0.08))
    replaying = 0
    while not search.done:
        search = ThresholdSearch.from_state(json.loads(json.dumps(search.state_dict())))
        search.advance(3, *args, replay_steps=2)
        replaying += search.verify is not None
    assert whole.done and replaying > 5
    assert search.best == whole.best and search.best_score == pytest.approx(whole.best_score)


def test_a_replayed_set_is_held_to_the_budget_between_estimate_and_replay(monkeypatch):
    """The estimate runs long where a rare band's group is open at the window's end, the replay
    short: a replayed set's delay is their mean, and never less than the replay's."""
    assert tuning.verified_delay(0.6, 0.4) == pytest.approx(0.5)
    assert tuning.verified_delay(0.3, 0.4) == pytest.approx(0.4)
    seen = []
    real = tuning.verified_delay
    monkeypatch.setattr(tuning, "verified_delay",
                        lambda est, rep: seen.append((est, rep)) or real(est, rep))
    window = pool_shorts(pieces(long_tail(n=6000, seed=7)), CONTEXT)
    search = ThresholdSearch.start(window, CONTEXT, [1024], replay=(16, CONTEXT, 0.08))
    search.advance(10 ** 9, 4, CONTEXT, 4 * CONTEXT, COST, 0.6)
    # every replayed set was held to it, and on a long tail the estimate runs long for some
    assert search.done and len(seen) >= 2 and any(est > rep for est, rep in seen)


def _pour_by_scan(costs, room, tokens, rate):
    """replay._pour as first written: the volume at every break, lowest first."""
    def taken(level):
        return [min(max((level - c) / rate, 0.0), r) for c, r in zip(costs, room)]
    low = min(costs)
    for high in sorted(set(costs) | {c + r * rate for c, r in zip(costs, room)}):
        volume = sum(taken(high))
        if volume >= tokens:
            below = sum(taken(low))
            level = low + (tokens - below) * (high - low) / max(volume - below, 1e-300)
            return taken(level)
        low = high
    return taken(low)


def test_pouring_by_bisection_is_the_scan_bit_for_bit():
    """The replay's water-filling bisects the breaks; its plans must not move by an ulp."""
    from wlbtrain.data.replay import _pour
    rng = np.random.default_rng(8)
    for _ in range(2000):
        n = int(rng.choice([2, 4, 8]))
        costs = [float(c) for c in rng.choice([0.0, 1e-3, 2e-3], n) + rng.random(n) * 1e-3
                 * rng.integers(0, 2, n)]  # ties and unequal costs
        room = [int(r) for r in rng.integers(0, 3, n) * rng.integers(0, 5000, n)]
        rate = float(rng.choice([1e-7, 3.3e-7]))
        tokens = float(rng.choice([rng.random() * sum(room), sum(room), 1.0]))
        assert _pour(costs, room, tokens, rate) == _pour_by_scan(costs, room, tokens, rate)
