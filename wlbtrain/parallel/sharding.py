"""Context-parallel sharding plans: which tokens of a packed micro-batch each CP rank holds.

Pure functions: segment lengths in, a ``ShardPlan`` out; no process group. The micro-batch is
the packer's pieces back to back (segment i = piece i), then one padding segment at the tail
that brings the total to a multiple of ``2·cp·tp``; padding tokens carry no label.

A rank's tokens are its ``Chunk``s back to back, in the order listed: increasing
``global_start`` (so segment by segment, and within a segment by offset). Every rank holds the
same number of tokens (``padded_tokens // cp``), so sequence parallelism can split them evenly
over the tensor-parallel ranks and all-gathers need no size exchange. Two chunks of one segment
that touch on one rank are merged into one (e.g. the middle pair of a per-sequence cut).

Shardings (``parallel.cp_sharding``):

- ``per_sequence`` (Llama 3): the padded micro-batch cut into 2·cp equal chunks; rank i takes
  chunks i and 2·cp−1−i. Balanced when the micro-batch is one document, not otherwise.
- ``per_document``: a segment of length d = e + r, e the largest multiple of 2·cp not above d,
  is cut into 2·cp chunks of e/(2·cp) tokens, rank i taking chunks i and 2·cp−1−i of every
  segment; its last r tokens are dealt one by one round-robin over the ranks, the count
  continuing across segments. No segment is padded; the padding segment fills the ranks up to
  equal counts. Balanced, but cuts short documents into chunks below the kernel's tile size.
- ``adaptive``: per micro-batch, whichever of the two the ``ShardCostEstimator`` finds faster.
- ``hybrid``: segments at least ``hybrid_threshold`` long per-document, the others (with the
  padding) as one sub-sequence cut per-sequence; the threshold is searched with the estimator and
  hybrid is taken only when it beats both pure shardings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from ..data.cost import read_profile

SHARDINGS = ("per_sequence", "per_document", "adaptive", "hybrid")


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of one segment's tokens held by one rank."""

    segment: int  # index of the segment in the micro-batch (the padding segment is the last)
    start: int  # offset of the first token within its segment (its RoPE position)
    length: int
    global_start: int  # offset in the padded micro-batch: cu_seqlens[segment] + start


@dataclass
class RankShard:
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    def token_index(self) -> np.ndarray:
        """[num_tokens] int64: where each local token sits in the padded micro-batch."""
        parts = [np.arange(c.global_start, c.global_start + c.length) for c in self.chunks]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def positions(self) -> np.ndarray:
        """[num_tokens] int64: each local token's offset within its segment (for RoPE)."""
        parts = [np.arange(c.start, c.start + c.length) for c in self.chunks]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass
class ShardPlan:
    sharding: str  # what was applied: per_sequence | per_document | hybrid
    cp: int
    segment_lengths: list[int]  # the micro-batch's segments, the padding segment last (may be 0)
    ranks: list[RankShard]
    rank_costs: list[float] = field(default_factory=list)  # estimated attention cost per rank
    # hybrid only: segments at least this long were sharded per-document, the rest per-sequence
    hybrid_threshold: int | None = None

    @property
    def padded_tokens(self) -> int:
        return sum(self.segment_lengths)

    @property
    def padding(self) -> int:
        return self.segment_lengths[-1]

    def cu_seqlens(self) -> np.ndarray:
        cu = np.zeros(len(self.segment_lengths) + 1, dtype=np.int64)
        np.cumsum(self.segment_lengths, out=cu[1:])
        return cu

    @property
    def estimate(self) -> float:
        """Seconds of the CP step's attention: it waits for its slowest rank."""
        return max(self.rank_costs) if self.rank_costs else 0.0

    @property
    def balance(self) -> float:
        """Slowest over fastest rank's estimated attention cost (1.0: balanced)."""
        return cost_balance(self.rank_costs)


def cost_balance(rank_costs) -> float:
    costs = np.asarray(rank_costs, dtype=np.float64)
    if costs.size == 0 or costs.max() <= 0:
        return 1.0
    return float(costs.max() / costs.min()) if costs.min() > 0 else math.inf


# --------------------------------------------------------------------------- cost estimate

class KernelPass(NamedTuple):
    """One kernel of the attention's forward+backward: its tile and matrix products per tile."""

    name: str
    block_m: int  # query rows per tile
    block_n: int  # key columns per tile
    matmuls: int  # [block_m × D] × [D × block_n]-sized products per tile and head


# The Hopper tiles of kernels/attention.py (tests/test_sharding.py checks they still agree).
# The backward runs separate dK/dV and dQ kernels, each recomputing QKᵀ: forward QKᵀ, PV;
# dK/dV QKᵀ, dOVᵀ, PᵀdO, dSᵀQ; dQ QKᵀ, dOVᵀ, dSK.
KERNEL_PASSES = (KernelPass("forward", 128, 64, 2),
                 KernelPass("backward_dkdv", 64, 128, 4),
                 KernelPass("backward_dq", 128, 64, 3))
# Achieved rate per computed tile FLOP on an H100. The kernel runs forward+backward at ≈330
# TFLOP/s on long documents counting 7·D·d² per head (BASELINES.md); the passes above compute
# ≈9·D·d² in tiles, so the tiles run at ≈330·9/7 ≈ 420 TFLOP/s.
DEFAULT_TILE_FLOPS_PER_S = 420e12
# Per chunk: its query blocks' prologue and epilogue (load Q, store O and LSE) and the scheduling
# slot, beyond the tiles. scripts/profile_cost.py on an H200 (7B-128K rank: 4 heads × 128) fitted
# 432 TFLOP/s per tile FLOP and 0.42 µs per chunk, within 30% on chunk shapes from lone leftover
# tokens to 32K×128K.
DEFAULT_CHUNK_S = 0.4e-6
# Per rank and layer: the launches of the three kernels for the head and the tail calls. The same
# on every rank, so it never changes a choice; the profile measures ~3 ms of host time per
# forward+backward call under gVisor, which a real step overlaps with other layers' GPU work.
DEFAULT_CALL_S = 30e-6


@dataclass(frozen=True)
class ShardCostEstimator:
    """Latency of one rank's attention (forward+backward, one layer) under a sharding.

    Each query chunk attends to its segment's key prefix (keys from the segment's start to the
    chunk's end, causal, bottom-right aligned), as all-gather CP computes it. A (q_len, k_len)
    chunk costs, in every kernel pass, the BLOCK_M×BLOCK_N tiles the kernel computes under the
    causal mask (a partial tile costs a whole one) times the tile's time, plus ``chunk_s``; a
    rank adds ``call_s``. Defaults: a rank of the paper's 7B-128K layout (32 heads over TP 8,
    head dim 128) on an H100; ``from_profile`` takes measured numbers.
    """

    heads: int = 4  # query heads on the rank (n_heads / tp)
    head_dim: int = 128
    flops_per_s: float = DEFAULT_TILE_FLOPS_PER_S
    chunk_s: float = DEFAULT_CHUNK_S
    call_s: float = DEFAULT_CALL_S
    passes: tuple[KernelPass, ...] = KERNEL_PASSES

    def __post_init__(self):
        for name in ("heads", "head_dim", "flops_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"shard cost estimator: {name} must be > 0")
        for name in ("chunk_s", "call_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"shard cost estimator: {name} must be a finite number >= 0")

    def tile_s(self, p: KernelPass) -> float:
        return p.matmuls * 2.0 * p.block_m * p.block_n * self.head_dim * self.heads / self.flops_per_s

    def chunk_costs(self, q_len, k_len) -> np.ndarray:
        """Seconds per chunk: q_len, k_len [n] (k_len >= q_len: the key prefix) → [n]."""
        q = np.asarray(q_len, dtype=np.int64)
        k = np.asarray(k_len, dtype=np.int64)
        seconds = np.full(q.shape, self.chunk_s, dtype=np.float64)
        for p in self.passes:
            seconds += causal_tiles(q, k, p.block_m, p.block_n) * self.tile_s(p)
        return seconds

    def rank_costs(self, rank, start, length, cp: int) -> np.ndarray:
        """[cp] seconds from chunk arrays (rank, offset in the segment, length)."""
        return self.grouped_costs(rank, start, length, cp)

    def grouped_costs(self, group, start, length, groups: int) -> np.ndarray:
        """[groups] seconds: the chunks of each group (a rank) summed, plus call_s."""
        length = np.asarray(length, dtype=np.int64)
        costs = self.chunk_costs(length, np.asarray(start, dtype=np.int64) + length)
        return np.bincount(group, weights=costs, minlength=groups) + self.call_s

    def plan_costs(self, plan: ShardPlan) -> list[float]:
        layout = _layout_of(plan)
        return self.rank_costs(layout.rank, layout.start, layout.length, plan.cp).tolist()

    @classmethod
    def from_model(cls, model, parallel, **overrides) -> "ShardCostEstimator":
        """A rank of a Llama-style model under TP: n_heads / tp query heads of dim / n_heads."""
        return cls(heads=max(model.n_heads // parallel.tp, 1),
                   head_dim=model.dim // model.n_heads, **overrides)

    @classmethod
    def for_config(cls, cfg) -> "ShardCostEstimator":
        """One CP rank of the recipe: the "cp" section of data.cost_profile when it has one,
        else the FLOP-based default, for the model's heads per tensor-parallel rank."""
        profile = cfg.data.cost_profile
        if profile and has_cp_profile(profile):
            model = cfg.model
            return cls.from_profile(profile, max(model.n_heads // cfg.parallel.tp, 1),
                                    model.dim // model.n_heads)
        return cls.from_model(cfg.model, cfg.parallel)

    @classmethod
    def from_profile(cls, path: str | os.PathLike, heads: int | None = None,
                     head_dim: int | None = None) -> "ShardCostEstimator":
        """The ``"cp"`` section that scripts/profile_cost.py measures on the GPU; heads and
        head_dim default to the profiled rank's."""
        cp = _read_cp_profile(path)
        try:
            passes = tuple(KernelPass(str(n), int(m), int(b), int(k)) for n, m, b, k in
                           cp.get("passes", KERNEL_PASSES))
            return cls(heads=int(heads or cp["heads"]), head_dim=int(head_dim or cp["head_dim"]),
                       flops_per_s=float(cp["flops_per_s"]), chunk_s=float(cp["chunk_s"]),
                       call_s=float(cp["call_s"]), passes=passes)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bad \"cp\" section of the cost profile ({err})") from None


def has_cp_profile(path: str | os.PathLike) -> bool:
    try:
        return isinstance(read_profile(path).get("cp"), dict)
    except (ValueError, AttributeError):  # unreadable, or not a JSON object
        return False


def _read_cp_profile(path) -> dict:
    profile = read_profile(path)
    if not isinstance(profile, dict) or not isinstance(profile.get("cp"), dict):
        raise ValueError(f"{path}: the cost profile has no \"cp\" section; measure it on a GPU "
                         "with scripts/profile_cost.py")
    return profile["cp"]


def causal_tiles(q_len, k_len, block_m: int, block_n: int) -> np.ndarray:
    """[n] tiles the kernel computes for chunks of q_len queries over k_len keys (causal,
    bottom-right aligned, k_len >= q_len): query block b's last row sees keys up to
    min((b+1)·block_m, q_len) − 1 + k_len − q_len, so it runs that many keys' column tiles.
    Summed in closed form when one tile side divides the other (every kernel tile does)."""
    q = np.asarray(q_len, dtype=np.int64)
    k = np.asarray(k_len, dtype=np.int64)
    blocks = -(-q // block_m)
    last = np.where(blocks > 0, -(-k // block_n), 0)  # the last block's last row is the chunk's
    return last + _full_block_tiles(np.maximum(blocks - 1, 0), k - q, block_m, block_n)


def _full_block_tiles(m, off, block_m, block_n):
    """Σ_{j=1..m} ⌈(j·block_m + off) / block_n⌉, the column tiles of the m full query blocks."""
    if block_m % block_n == 0:
        per = block_m // block_n
        return per * m * (m + 1) // 2 + m * -(-off // block_n)
    if block_n % block_m == 0:
        # ⌈(j·M + off)/N⌉ = ⌈(j + s)/g⌉ with g = N/M and s = ⌈off/M⌉: a sum over consecutive t
        g = block_n // block_m
        s = -(-off // block_m)

        def ceil_sum(t):  # Σ_{u=1..t} ⌈u/g⌉
            whole, rest = t // g, t % g
            return g * whole * (whole + 1) // 2 + rest * (whole + 1)
        return ceil_sum(s + m) - ceil_sum(s)
    owner = np.repeat(np.arange(m.size), m)
    j = np.arange(owner.size) - (np.cumsum(m) - m)[owner] + 1
    return np.bincount(owner, weights=-(-(j * block_m + off[owner]) // block_n),
                       minlength=m.size).astype(np.int64)


# ------------------------------------------------------------------------------ sharding
#
# Candidate shardings of one micro-batch are built together as "variants": variant v shards the
# segments under long_masks[v] per-document and the rest, with the padding, per-sequence
# (per_sequence: none long; per_document: all long; hybrid: the long ones). One batch of numpy
# operations lays out and costs every variant at once, which keeps the hybrid search and the
# adaptive choice to about a millisecond at 128K tokens: planning runs per micro-batch.

class _Layout(NamedTuple):
    """Chunks of several variants as arrays, sorted by (variant, rank, global_start)."""

    variant: np.ndarray
    rank: np.ndarray
    segment: np.ndarray
    start: np.ndarray
    length: np.ndarray
    global_start: np.ndarray


class _Candidate(NamedTuple):
    sharding: str
    threshold: int | None
    long_mask: np.ndarray  # [n] segments sharded per-document


def padded_length(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def plan_shards(segment_lengths: Sequence[int], cp: int, multiple: int, sharding: str,
                estimator: ShardCostEstimator | None = None) -> ShardPlan:
    """The CP plan of one micro-batch.

    segment_lengths: its real segments (document pieces) in order; multiple: 2·cp·tp, what the
    padded total must be a multiple of; sharding: one of ``SHARDINGS``; estimator: the cost
    model of adaptive and hybrid and of ``rank_costs`` (default ``ShardCostEstimator()``).
    """
    lengths, padded = _check(segment_lengths, cp, multiple, sharding)
    candidates, layout, costs = _evaluate(lengths, cp, padded, sharding, estimator)
    best = _best(candidates, costs, sharding)
    mine = layout.variant == best
    chosen = _Layout(*(a[mine] for a in layout))
    return ShardPlan(candidates[best].sharding, cp,
                     lengths.tolist() + [padded - int(lengths.sum())], _rank_shards(chosen, cp),
                     costs[best].tolist(), candidates[best].threshold)


def shard_costs(segment_lengths: Sequence[int], cp: int, multiple: int, sharding: str,
                estimator: ShardCostEstimator | None = None) -> tuple[str, np.ndarray]:
    """What ``plan_shards`` would apply and its [cp] rank costs, without building Chunks."""
    return compare_shardings(segment_lengths, cp, multiple, estimator, (sharding,))[sharding]


def compare_shardings(segment_lengths: Sequence[int], cp: int, multiple: int,
                      estimator: ShardCostEstimator | None = None,
                      shardings: Sequence[str] = SHARDINGS) -> dict[str, tuple[str, np.ndarray]]:
    """{sharding: (what it applies, [cp] rank costs)} for several shardings of one micro-batch,
    from one evaluation (for ``wlbtrain plan``, which compares them all)."""
    widest = "hybrid" if "hybrid" in shardings else "adaptive"
    if all(s in ("per_sequence", "per_document") for s in shardings):
        widest = "adaptive"
    lengths, padded = _check(segment_lengths, cp, multiple, widest)
    for s in shardings:
        _check(lengths, cp, multiple, s)
    candidates, _, costs = _evaluate(lengths, cp, padded, widest, estimator, with_layout=False)
    out = {}
    for s in shardings:
        best = _best(candidates, costs, s)
        out[s] = (candidates[best].sharding, costs[best])
    return out


def _check(segment_lengths, cp: int, multiple: int, sharding: str) -> tuple[np.ndarray, int]:
    if sharding not in SHARDINGS:
        raise ValueError(f"cp sharding {sharding!r}: expected one of {', '.join(SHARDINGS)}")
    if cp < 1 or multiple < 1 or multiple % (2 * cp):
        raise ValueError(f"cp {cp}, multiple {multiple}: need cp >= 1 and multiple = 2·cp·tp")
    lengths = np.asarray(segment_lengths, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError("segment lengths must be >= 0")
    return lengths, padded_length(int(lengths.sum()), multiple)


def _evaluate(lengths, cp, padded, sharding, estimator, with_layout=True):
    """(candidates, their layout, [candidates, cp] rank costs): per_sequence and per_document
    first, then the hybrid thresholds."""
    estimator = estimator or ShardCostEstimator()
    none, every = np.zeros(lengths.size, bool), np.ones(lengths.size, bool)
    candidates = [_Candidate("per_sequence", None, none), _Candidate("per_document", None, every)]
    if sharding == "per_sequence":
        candidates = candidates[:1]
    elif sharding == "per_document":
        candidates = candidates[1:]
    elif sharding == "hybrid":
        # below one query tile per chunk, per-document sharding only adds padded tiles
        floor = 2 * cp * max(p.block_m for p in estimator.passes)
        candidates += [_Candidate("hybrid", t, lengths >= t)
                       for t in hybrid_thresholds(lengths) if t >= floor]
    layout = _layouts(lengths, cp, padded, np.stack([c.long_mask for c in candidates]))
    costs = estimator.grouped_costs(layout.variant * cp + layout.rank, layout.start,
                                    layout.length, len(candidates) * cp).reshape(-1, cp)
    return candidates, layout, costs


def _best(candidates, costs, sharding) -> int:
    """Index of the candidate the sharding applies: itself, or the fastest allowed one (ties go
    to the earlier: per_sequence, then per_document, then the longest threshold)."""
    allowed = [i for i, c in enumerate(candidates)
               if c.sharding == sharding
               or (sharding in ("adaptive", "hybrid") and c.sharding != "hybrid")
               or sharding == "hybrid"]
    return min(allowed, key=lambda i: (costs[i].max(), i))


def hybrid_thresholds(lengths: np.ndarray) -> list[int]:
    """Candidate split lengths: the k-th longest segment for k = 1, 2, 3, 4, 6, 8, 12, … (a
    geometric grid: O(log n) candidates), each leaving the shortest segment per-sequence."""
    n = lengths.size
    ks = {m << i for m in (1, 3) for i in range(n.bit_length()) if (m << i) < n}
    ordered = np.sort(lengths)[::-1]
    return sorted({int(ordered[k - 1]) for k in ks if ordered[k - 1] > ordered[-1]}, reverse=True)


def _layouts(lengths, cp, padded, long_masks) -> _Layout:
    """Every variant's chunks: long_masks [variants, n] per-document, the rest per-sequence."""
    doc_part, doc_tokens = _per_document_part(lengths, long_masks, cp)
    # padded/cp >= every rank's per-document tokens: the dealt leftovers differ by at most one
    need = padded // cp - doc_tokens
    seq_part = _per_sequence_part(lengths, long_masks, cp, padded, need)
    return _assemble([doc_part, seq_part], lengths, padded)


def _per_document_part(lengths, long_masks, cp):
    """Head/tail chunks and round-robin leftovers of the long segments, as (variant, rank,
    segment, start, length) arrays; and [variants, cp] tokens per rank."""
    two_cp, n_var = 2 * cp, long_masks.shape[0]
    var, seg = np.nonzero(long_masks)  # row-major: each variant's segments in order
    d = lengths[seg]
    chunk = d // two_cp
    j = np.arange(two_cp)
    rank_of_j = np.where(j < cp, j, two_cp - 1 - j)  # chunk j goes to rank j or 2cp−1−j
    head_tail = (np.repeat(var, two_cp), np.tile(rank_of_j, var.size), np.repeat(seg, two_cp),
                 (chunk[:, None] * j[None, :]).ravel(), np.repeat(chunk, two_cp))
    left = d - chunk * two_cp
    owner = np.repeat(np.arange(var.size), left)
    ordinal = np.arange(owner.size)
    offset = chunk[owner] * two_cp + ordinal - (np.cumsum(left) - left)[owner]
    # the deal runs on across a variant's segments, so ranks' leftovers differ by at most one
    left_per_var = np.bincount(var, weights=left, minlength=n_var).astype(np.int64)
    dealt = (ordinal - (np.cumsum(left_per_var) - left_per_var)[var[owner]]) % cp
    leftovers = (var[owner], dealt, seg[owner], offset, np.ones(owner.size, np.int64))
    tokens = (2 * np.bincount(var, weights=chunk, minlength=n_var)[:, None]
              + np.bincount(var[owner] * cp + dealt, minlength=n_var * cp).reshape(n_var, cp))
    return _concat([head_tail, leftovers]), tokens.astype(np.int64)


def _per_sequence_part(lengths, long_masks, cp, padded, need):
    """Each variant's sub-sequence (its short segments, then the padding) cut head/tail: rank i
    takes ⌊need_i/2⌋ tokens from the front half and the rest from the mirrored back half
    (Llama 3's rule when every need is padded/cp)."""
    n_var, n = long_masks.shape
    var, seg = np.nonzero(~long_masks)
    var = np.concatenate([var, np.arange(n_var)])  # the padding segment (index n) ends each
    seg = np.concatenate([seg, np.full(n_var, n)])
    order = np.lexsort((seg, var))
    var, seg = var[order], seg[order]
    seg_len = np.append(lengths, padded - int(lengths.sum()))[seg]
    heads = need // 2
    # padding alone: head/tail pairing balances nothing, one piece per rank
    heads[~(~long_masks).any(axis=1)] = 0
    piece_len = np.concatenate([heads, (need - heads)[:, ::-1]], axis=1)
    piece_rank = np.tile(np.concatenate([np.arange(cp), np.arange(cp)[::-1]]), n_var)
    # one number line for all variants: variant v's sub-sequence starts at v·stride
    stride = padded + 1
    piece_key = (np.cumsum(piece_len, axis=1) - piece_len + stride * np.arange(n_var)[:, None]).ravel()
    seg_end = np.cumsum(seg_len)
    var_start = np.concatenate([[0], seg_end])[np.searchsorted(var, np.arange(n_var))]
    seg_key = seg_end - seg_len - var_start[var] + stride * var
    cuts = np.union1d(piece_key, seg_key)  # each cut-to-cut run is one chunk
    var_end = stride * np.arange(n_var) + need.sum(axis=1)
    ends = np.minimum(np.append(cuts[1:], var_end[-1]), var_end[cuts // stride])
    # zero-length pieces or segments share a start with the next: searchsorted takes the last
    piece = np.searchsorted(piece_key, cuts, side="right") - 1
    at = np.searchsorted(seg_key, cuts, side="right") - 1
    return (cuts // stride, piece_rank[piece], seg[at], cuts - seg_key[at], ends - cuts)


def _concat(parts):
    return tuple(np.concatenate([np.asarray(p[i], dtype=np.int64) for p in parts])
                 for i in range(5))


def _assemble(parts, lengths, padded) -> _Layout:
    """Sort chunks by (variant, rank, global_start), drop empty ones, merge touching ones."""
    var, rank, seg, start, length = _concat(parts)
    keep = length > 0
    var, rank, seg, start, length = var[keep], rank[keep], seg[keep], start[keep], length[keep]
    cu = np.zeros(lengths.size + 2, dtype=np.int64)
    np.cumsum(np.append(lengths, padded - int(lengths.sum())), out=cu[1:])
    gstart = cu[seg] + start
    order = np.lexsort((gstart, rank, var))
    var, rank, seg, start, length, gstart = (a[order] for a in (var, rank, seg, start, length, gstart))
    touches = ((var[1:] == var[:-1]) & (rank[1:] == rank[:-1]) & (seg[1:] == seg[:-1])
               & (gstart[1:] == gstart[:-1] + length[:-1]))
    if not var.size:
        return _Layout(var, rank, seg, start, length, gstart)
    first = np.flatnonzero(np.concatenate([[True], ~touches]))
    return _Layout(var[first], rank[first], seg[first], start[first],
                   np.add.reduceat(length, first), gstart[first])


def _rank_shards(layout: _Layout, cp: int) -> list[RankShard]:
    bounds = np.searchsorted(layout.rank, np.arange(cp + 1))
    rows = list(zip(layout.segment.tolist(), layout.start.tolist(), layout.length.tolist(),
                    layout.global_start.tolist()))
    return [RankShard([Chunk(*row) for row in rows[bounds[r]:bounds[r + 1]]]) for r in range(cp)]


def _layout_of(plan: ShardPlan) -> _Layout:
    cols = [(0, r, c.segment, c.start, c.length, c.global_start)
            for r, shard in enumerate(plan.ranks) for c in shard.chunks]
    return _Layout(*np.array(cols, dtype=np.int64).reshape(-1, 6).T)
