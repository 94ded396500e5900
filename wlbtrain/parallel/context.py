"""Context-parallel attention: exact document-causal attention when a micro-batch's tokens are
sharded over the CP ranks by any ``ShardPlan``.

``make_context_attention(plan, rank, group, mode, kernel)`` returns the ``LocalAttention`` of one
CP rank for one micro-batch: ``(q, k, v) -> out`` over the rank's tokens in its local order (its
chunks back to back), equal to unsharded document-causal attention over the padded micro-batch
restricted to those rows. Every index the kernels need is derived here, once per micro-batch;
the callable is then used by every layer.

Geometry. Inside the attention the rank's tokens are put in global order (its chunks sorted by
position), so the tokens of one segment on one rank form one contiguous *run*. A query sees the
keys of its segment at positions up to its own; since any two chunks of a valid plan are either
the same chunk or disjoint, a key chunk of another rank is seen whole or not at all.

Modes
-----
``allgather`` (Llama 3, the WLB-LLM paper): all-gather K and V (one collective for both, then
one permutation into global order); each query chunk attends its segment's key prefix, from the
segment start to the chunk's end, bottom-right causal. The backward gathers K and V again rather
than keeping a whole micro-batch of K/V per layer alive until the backward, and reduce-scatters
dK and dV in fp32 (all-reduce and slice on gloo, which has no reduce-scatter).

The trap: two chunks of one segment on one rank (a head and a tail chunk, or more under other
plans) need nested key prefixes, which non-overlapping ``cu_seqlens_k`` cannot express in one
call. The work is split into calls ("rounds"): a rank's run of a segment is cut into groups
where the chunks are not adjacent in the micro-batch, and round j holds the j-th group of every
segment. Keys are read in place from the gathered buffer: gaps between the key ranges a round
needs become segments with no queries, and queries a round skips become segments with no keys
(output 0, LSE -inf), so no call copies K or V. The rounds' outputs cover disjoint rows and are
combined by the same LSE merge as the ring's. Chosen over the alternatives because
  - copying each chunk's key prefix into one buffer costs up to a micro-batch of K/V per query
    chunk of a segment (per-sequence sharding: about one more micro-batch of K/V per rank), for
    one saved launch;
  - per-segment key offsets in the kernel make the forward easy, but overlapping key ranges
    make the dK/dV backward accumulate from several programs into the same rows (atomics or a
    reduction pass), a larger kernel change for one saved launch.
Head/tail plans (per-sequence, per-document) need two rounds (one where the chunks touch),
three where leftover tokens sit apart from them; the count does not grow with the number of
documents. A round costs one launch, plus empty tiles for the key-only segments in the
backward's dK/dV kernel (a read of K/V and a write of zeros).

``ring`` (pass-KV): each rank's K/V (in global order, stacked into one message) travels around
the ring, cp - 1 hops of async P2P, each hop's transfer posted before the current block is
computed (on CUDA from a side stream). Hop 0 is the rank's own block: one causal call over its
runs (in global order, every earlier token of a run is visible and the run's diagonal is
causal). A visiting block of rank s is attended without a mask: a query chunk sees the prefix of
s's run of its segment that lies before it, and query chunks with the same prefix merge; nested
prefixes go into rounds as above. Partial outputs merge by LSE in fp32. The backward replays the
ring with the kernel's backward against the merged output and LSE; dK/dV shares travel with the
block they belong to in an fp32 accumulator (bf16 partial sums would grow the error with the
ring size) and reach the owner after cp hops.

Communication per layer, with n = padded_tokens / cp and E = 2 · Hkv · D values per token
(K and V):
  - allgather: forward one all-gather (receives (cp-1)·n·E values, activation dtype); backward
    one all-gather and one fp32 reduce-scatter of cp·n·E values ((cp-1)·n·E sent per rank).
  - ring: forward cp-1 hops of n·E values; backward cp-1 hops of K/V and cp hops of fp32
    dK/dV, n·E values each.

Kernels: ``triton`` uses ``wlbtrain.kernels`` (forward with LSE into fp32 partials, backward
against an external output and LSE); ``reference`` runs the same calls in pure torch, fp32.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..models.attention import LocalAttention
from .sharding import Chunk, ShardPlan

MODES = ("allgather", "ring")
KERNELS = ("reference", "triton")

# torch >= 2.12 names these *_single and deprecates the older names; 2.11 has only the older.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# P2P tags keep K/V and dK/dV messages apart on backends that match by tag (gloo).
_TAG_KV, _TAG_DKV = 0, 1


def make_context_attention(plan: ShardPlan, rank: int, group, mode: str, kernel: str,
                           device: torch.device | None = None) -> LocalAttention:
    """Attention for CP rank ``rank`` of ``group`` over the micro-batch sharded by ``plan``.

    Returns a differentiable callable ``(q, k, v) -> out``: q [n, Hq, D], k, v [n, Hkv, D],
    out [n, Hq, D], n = plan.padded_tokens // plan.cp, rows in the rank's local order (its
    chunks back to back). mode: "allgather" or "ring"; kernel: "reference" or "triton".
    device: where the index tensors live (default: the current CUDA device on an NCCL group,
    else the CPU); q, k, v must be there. Call once per micro-batch, use for every layer.
    """
    if mode not in MODES:
        raise ValueError(f"parallel.cp_attention: unknown mode {mode!r}; choose from {MODES}")
    if kernel not in KERNELS:
        raise ValueError(f"train.attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    if plan.cp != size or dist.get_rank(group) != rank:
        raise ValueError(f"context attention: plan is for cp={plan.cp}, rank {rank}; the group "
                         f"has {size} ranks and this process is rank {dist.get_rank(group)}")
    check_plan(plan)
    backend = dist.get_backend(group)
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                  else torch.device("cpu"))
    return _ContextAttention(_Layout(plan, rank, mode), group, backend, mode,
                             _KERNEL_OPS[kernel], torch.device(device))


def check_plan(plan: ShardPlan) -> None:
    """Raise ValueError unless plan's chunks tile the padded micro-batch exactly, every chunk
    lies inside its segment, and every rank holds padded_tokens // cp tokens."""
    total, cu = plan.padded_tokens, plan.cu_seqlens()
    if plan.cp < 1 or len(plan.ranks) != plan.cp or total % plan.cp:
        raise ValueError(f"ShardPlan: {len(plan.ranks)} rank shards for cp={plan.cp} and "
                         f"{total} padded tokens; need cp shards and tokens divisible by cp")
    cover = np.zeros(total + 1, np.int64)
    for r, shard in enumerate(plan.ranks):
        if shard.num_tokens != total // plan.cp:
            raise ValueError(f"ShardPlan: rank {r} holds {shard.num_tokens} tokens, not "
                             f"{total // plan.cp}")
        for c in shard.chunks:
            seg_ok = 0 <= c.segment < len(plan.segment_lengths)
            if (not seg_ok or c.length < 0 or c.start < 0
                    or c.start + c.length > plan.segment_lengths[c.segment]
                    or c.global_start != cu[c.segment] + c.start):
                raise ValueError(f"ShardPlan: rank {r} has {c}, outside its segment or with a "
                                 f"global_start other than cu_seqlens[segment] + start")
            cover[c.global_start] += 1
            cover[c.global_start + c.length] -= 1
    if not (np.cumsum(cover[:-1]) == 1).all():
        raise ValueError("ShardPlan: the chunks do not cover every token of the micro-batch "
                         "exactly once")


# --------------------------------------------------------------------------------------------
# Layout: which rows attend which keys, derived from the plan on the host
# --------------------------------------------------------------------------------------------

# A query group: rows [qa, qb) of a sorted local buffer attend keys [ka, kb) of a key buffer.
Entry = tuple[int, int, int, int]


def _sorted_chunks(chunks: list[Chunk]) -> tuple[list[Chunk], list[int]]:
    """Non-empty chunks in global order, and each one's offset in that order."""
    ordered = sorted((c for c in chunks if c.length > 0), key=lambda c: c.global_start)
    offsets = np.concatenate([[0], np.cumsum([c.length for c in ordered])]).tolist()
    return ordered, offsets[:-1]


def _rounds(groups: dict[int, list[list[int]]], key_range) -> list[list[Entry]]:
    """Round j: the j-th query group of every segment, segments in order, with its key range."""
    depth = max((len(g) for g in groups.values()), default=0)
    return [[(g[j][0], g[j][1], *key_range(seg, g[j])) for seg, g in sorted(groups.items())
             if len(g) > j] for j in range(depth)]


def _allgather_rounds(chunks: list[Chunk], offsets: list[int], seg_start) -> list[list[Entry]]:
    """Keys in global order; a query group is chunks adjacent in the micro-batch, bottom-right
    causal against its segment's prefix up to the group's end."""
    groups: dict[int, list[list[int]]] = {}
    for c, off in zip(chunks, offsets):
        g = groups.setdefault(c.segment, [])
        end = c.global_start + c.length
        if g and g[-1][2] == c.global_start:
            g[-1][1:] = [off + c.length, end]
        else:
            g.append([off, off + c.length, end])
    return _rounds(groups, lambda seg, g: (int(seg_start[seg]), g[2]))


def _ring_rounds(q_chunks, q_offsets, k_chunks, k_offsets) -> list[list[Entry]]:
    """Keys: another rank's block in its global order. A query chunk sees, whole, that rank's
    chunks of its segment that start before it: a prefix of the block's run of the segment."""
    runs: dict[int, tuple[int, list[int], list[int]]] = {}  # segment -> run offset, starts, counts
    for c, off in zip(k_chunks, k_offsets):
        _, starts, counts = runs.setdefault(c.segment, (off, [], [0]))
        starts.append(c.global_start)
        counts.append(counts[-1] + c.length)
    groups: dict[int, list[list[int]]] = {}
    for c, off in zip(q_chunks, q_offsets):
        if c.segment not in runs:
            continue
        _, starts, counts = runs[c.segment]
        seen = counts[bisect_left(starts, c.global_start)]
        if seen == 0:
            continue
        g = groups.setdefault(c.segment, [])
        if g and g[-1][2] == seen and g[-1][1] == off:
            g[-1][1] = off + c.length
        else:
            g.append([off, off + c.length, seen])
    return _rounds(groups, lambda seg, g: (runs[seg][0], runs[seg][0] + g[2]))


def _diagonal_round(chunks: list[Chunk], offsets: list[int]) -> list[Entry]:
    """The rank's own block: each run attends itself causally."""
    runs: dict[int, list[int]] = {}
    for c, off in zip(chunks, offsets):
        runs.setdefault(c.segment, [off, off])[1] = off + c.length
    return [(a, b, a, b) for _, (a, b) in sorted(runs.items())]


def _bounds(entries: list[Entry]) -> tuple[list[int], list[int]]:
    """cu_seqlens_q / cu_seqlens_k of one call. Query rows between groups become segments with
    no keys (output 0, LSE -inf), keys between ranges segments with no queries."""
    cu_q, cu_k = [0], [0]
    for qa, qb, ka, kb in entries:
        if qa > cu_q[-1]:
            cu_q.append(qa)
            cu_k.append(cu_k[-1])
        if ka > cu_k[-1]:
            cu_q.append(cu_q[-1])
            cu_k.append(ka)
        cu_q.append(qb)
        cu_k.append(kb)
    return cu_q, cu_k


class _Layout:
    """Host-side indices of one rank for one micro-batch: the permutation into global order and
    the kernel calls of each step (allgather: one step; ring: one per hop)."""

    def __init__(self, plan: ShardPlan, rank: int, mode: str):
        self.cp, self.rank = plan.cp, rank
        self.total = plan.padded_tokens
        self.local = self.total // plan.cp
        sorted_ = [_sorted_chunks(shard.chunks) for shard in plan.ranks]
        chunks, offsets = sorted_[rank]
        self.to_sorted = self._to_sorted(plan.ranks[rank].chunks)
        if mode == "allgather":
            self.steps = [[(e, True) for e in _allgather_rounds(chunks, offsets,
                                                                plan.cu_seqlens())]]
            positions = [_positions(c) for c, _ in sorted_]  # rank j's tokens in its sorted order
            self.global_of_gathered = np.concatenate(positions)
        else:
            self.steps = [[(_diagonal_round(chunks, offsets), True)]]
            for hop in range(1, plan.cp):
                k_chunks, k_offsets = sorted_[(rank - hop) % plan.cp]
                rounds = _ring_rounds(chunks, offsets, k_chunks, k_offsets)
                self.steps.append([(e, False) for e in rounds])

    @staticmethod
    def _to_sorted(chunks: list[Chunk]) -> np.ndarray:
        """[n] local row of each row of the global-order buffer."""
        local_start = np.concatenate([[0], np.cumsum([c.length for c in chunks])])
        order = sorted(range(len(chunks)), key=lambda i: chunks[i].global_start)
        parts = [np.arange(local_start[i], local_start[i] + chunks[i].length) for i in order]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _positions(chunks: list[Chunk]) -> np.ndarray:
    parts = [np.arange(c.global_start, c.global_start + c.length) for c in chunks]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class _Call:
    """One kernel call: query segment i attends key segment i (bottom-right causal or not)."""
    cu_q: torch.Tensor  # int32 on the device
    cu_k: torch.Tensor
    bounds_q: list[int]  # the same on the host, for the reference kernel
    bounds_k: list[int]
    max_q: int
    max_k: int
    causal: bool


def _index(x: np.ndarray, device) -> torch.Tensor | None:
    """x as a device tensor, or None where it is the identity permutation (nothing to move)."""
    if np.array_equal(x, np.arange(len(x))):
        return None
    return torch.from_numpy(x).to(device)


def _bind_calls(steps, device) -> list[list[_Call]]:
    """All calls' cu_seqlens in one host-to-device copy, then views per call."""
    bounds = [[_bounds(entries) for entries, _ in step] for step in steps]
    flat = [v for step in bounds for cu_q, cu_k in step for v in (*cu_q, *cu_k)]
    packed = torch.tensor(flat, dtype=torch.int32).to(device)
    calls, at = [], 0
    for step, step_bounds in zip(steps, bounds):
        calls.append([])
        for (_, causal), (cu_q, cu_k) in zip(step, step_bounds):
            n = len(cu_q)
            max_q, max_k = (int(max(np.diff(cu), default=0)) for cu in (cu_q, cu_k))
            calls[-1].append(_Call(packed[at:at + n], packed[at + n:at + 2 * n], cu_q, cu_k,
                                   max_q, max_k, causal))
            at += 2 * n
    return calls


# --------------------------------------------------------------------------------------------
# Kernels: partial attention of a call into fp32 (out, lse), and its backward
# --------------------------------------------------------------------------------------------

class _TritonOps:
    @staticmethod
    def forward(q, k, v, call: _Call, scale: float):
        from wlbtrain.kernels import varlen_attention_forward

        return varlen_attention_forward(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k,
                                        causal=call.causal, softmax_scale=scale,
                                        out_dtype=torch.float32)

    @staticmethod
    def backward(dout, q, k, v, out, lse, call: _Call, scale: float):
        from wlbtrain.kernels import varlen_attention_backward

        return varlen_attention_backward(dout, q, k, v, out, lse, call.cu_q, call.cu_k,
                                         call.max_q, call.max_k, causal=call.causal,
                                         softmax_scale=scale, grad_dtype=torch.float32)


class _ReferenceOps:
    """The same calls in plain torch, fp32, one segment at a time (small inputs only)."""

    @staticmethod
    def forward(q, k, v, call: _Call, scale: float):
        from wlbtrain.kernels import reference_varlen_attention

        with torch.no_grad():
            return reference_varlen_attention(q.float(), k.float(), v.float(), call.cu_q,
                                              call.cu_k, call.max_q, call.max_k,
                                              causal=call.causal, softmax_scale=scale,
                                              return_lse=True)

    @staticmethod
    def backward(dout, q, k, v, out, lse, call: _Call, scale: float):
        """(dq, dk, dv) fp32 of this call's keys, given the final output and LSE over all keys:
        p = exp(s - lse), dv = pᵀ·dout, ds = p ∘ (dout·vᵀ - rowsum(dout ∘ out))."""
        dout, q, k, v, out = (t.float() for t in (dout, q, k, v, out))
        group = q.shape[1] // k.shape[1]
        # A row that sees no key anywhere has lse -inf; +inf makes its p 0 instead of NaN.
        lse = torch.where(torch.isneginf(lse), float("inf"), lse.float())
        delta = (dout * out).sum(-1).transpose(0, 1)  # [Hq, total_q]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        segments = zip(call.bounds_q[:-1], call.bounds_q[1:], call.bounds_k[:-1],
                       call.bounds_k[1:])
        for qa, qb, ka, kb in segments:
            if qa == qb or ka == kb:
                continue
            ks = k[ka:kb].repeat_interleave(group, dim=1)
            vs = v[ka:kb].repeat_interleave(group, dim=1)
            s = torch.einsum("qhd,khd->hqk", q[qa:qb], ks) * scale
            if call.causal:
                rows = torch.arange(qb - qa, device=q.device)[:, None]
                cols = torch.arange(kb - ka, device=q.device)[None, :]
                s = s.masked_fill(cols > rows + (kb - ka) - (qb - qa), float("-inf"))
            p = torch.exp(s - lse[:, qa:qb, None])
            ds = p * (torch.einsum("qhd,khd->hqk", dout[qa:qb], vs) - delta[:, qa:qb, None])
            dq[qa:qb] = torch.einsum("hqk,khd->qhd", ds, ks) * scale
            dk_heads = torch.einsum("hqk,qhd->khd", ds, q[qa:qb]) * scale
            dv_heads = torch.einsum("hqk,qhd->khd", p, dout[qa:qb])
            dk[ka:kb] = dk_heads.unflatten(1, (k.shape[1], group)).sum(2)
            dv[ka:kb] = dv_heads.unflatten(1, (k.shape[1], group)).sum(2)
        return dq, dk, dv


_KERNEL_OPS = {"reference": _ReferenceOps, "triton": _TritonOps}


def _attend(ops, q, k, v, calls: list[_Call], scale, out=None, lse=None):
    """Merge the calls' partial attention into the running fp32 (out, lse)."""
    from wlbtrain.kernels import merge_attention_partials

    for call in calls:
        part_out, part_lse = ops.forward(q, k, v, call, scale)
        if out is None:
            out, lse = part_out, part_lse
        else:
            out, lse = merge_attention_partials(out, lse, part_out, part_lse)
    return out, lse


def _attend_backward(ops, dout, q, k, v, out, lse, calls: list[_Call], scale, dq, dkv):
    """Add the calls' gradient shares to dq [n, Hq, D] and dkv [total_k, 2, Hkv, D] (fp32)."""
    for call in calls:
        dq_c, dk_c, dv_c = ops.backward(dout, q, k, v, out, lse, call, scale)
        dq += dq_c
        dkv[:, 0] += dk_c
        dkv[:, 1] += dv_c


def _finish(out, lse, q):
    """Merged fp32 (out, lse) in q's dtype; rows no call reached (none in a valid plan) get 0."""
    if out is None:
        return q.new_zeros(q.shape), q.new_full((q.shape[1], q.shape[0]), float("-inf"),
                                                dtype=torch.float32)
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------

_COMM_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


class _Ring:
    """Async P2P to the next rank of the CP group and from the previous one. On CUDA the
    transfers are posted from a side stream that first waits for the compute stream, so the
    sent tensor is complete; waiting makes the compute stream wait for the transfer."""

    def __init__(self, group, rank: int, cp: int, device: torch.device):
        self.group = group
        self.next = dist.get_global_rank(group, (rank + 1) % cp)
        self.prev = dist.get_global_rank(group, (rank - 1) % cp)
        self.stream = None
        if device.type == "cuda":
            self.stream = _COMM_STREAMS.setdefault(device, torch.cuda.Stream(device))

    def shift(self, send: torch.Tensor, tag: int):
        """Start sending ``send`` on and receiving its like; returns a wait() -> received."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        if self.stream is None:
            works = dist.batch_isend_irecv(ops)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(send.device))
            with torch.cuda.stream(self.stream):
                works = dist.batch_isend_irecv(ops)

        def wait():
            for work in works:
                work.wait()
            if self.stream is not None:
                torch.cuda.current_stream(send.device).wait_stream(self.stream)
            return recv

        return wait


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

class _AllGatherAttention(torch.autograd.Function):
    """q, k, v: [n, H, D] of this rank in global order -> out [n, Hq, D]."""

    @staticmethod
    def forward(ctx, q, k, v, attn: "_ContextAttention", scale: float):
        with torch.autocast(q.device.type, enabled=False):
            kv = attn.gather_kv(k, v)
            out, lse = _finish(*_attend(attn.ops, q, kv[:, 0], kv[:, 1], attn.calls[0], scale),
                               q)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attn, ctx.scale = attn, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        attn = ctx.attn
        with torch.autocast(q.device.type, enabled=False):
            kv = attn.gather_kv(k, v)
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            _attend_backward(attn.ops, dout.contiguous(), q, kv[:, 0], kv[:, 1], out, lse,
                             attn.calls[0], ctx.scale, dq, dkv)
            dkv = attn.reduce_scatter_kv(dkv)
        return dq.to(q.dtype), dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype), None, None


class _RingAttention(torch.autograd.Function):
    """q, k, v: [n, H, D] of this rank in global order -> out [n, Hq, D]."""

    @staticmethod
    def forward(ctx, q, k, v, attn: "_ContextAttention", scale: float):
        with torch.autocast(q.device.type, enabled=False):
            kv = torch.stack([k, v], dim=1)  # one message per hop
            out = lse = None
            for hop, calls in enumerate(attn.calls):
                # Post the next hop's transfer first, so that it overlaps this hop's compute.
                arrive = attn.ring.shift(kv, _TAG_KV) if hop < attn.cp - 1 else None
                out, lse = _attend(attn.ops, q, kv[:, 0], kv[:, 1], calls, scale, out, lse)
                if arrive is not None:
                    kv = arrive()
            out, lse = _finish(out, lse, q)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attn, ctx.scale = attn, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        attn = ctx.attn
        with torch.autocast(q.device.type, enabled=False):
            dout = dout.contiguous()
            kv = torch.stack([k, v], dim=1)
            dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            arrive_dkv = None
            for hop, calls in enumerate(attn.calls):
                arrive_kv = attn.ring.shift(kv, _TAG_KV) if hop < attn.cp - 1 else None
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
                _attend_backward(attn.ops, dout, q, kv[:, 0], kv[:, 1], out, lse, calls,
                                 ctx.scale, dq, dkv)
                if arrive_dkv is not None:
                    dkv += arrive_dkv()  # the shares of the ranks that held this block before
                if attn.cp > 1:
                    arrive_dkv = attn.ring.shift(dkv, _TAG_DKV)
                if arrive_kv is not None:
                    kv = arrive_kv()
            if attn.cp > 1:
                dkv = arrive_dkv()  # this rank's own block, with every rank's share
        return dq.to(q.dtype), dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype), None, None


class _ContextAttention:
    """The LocalAttention of one CP rank for one micro-batch (see make_context_attention)."""

    def __init__(self, layout: _Layout, group, backend: str, mode: str, ops,
                 device: torch.device):
        self.group, self.mode, self.ops, self.device = group, mode, ops, device
        self.cp, self.rank, self.local = layout.cp, layout.rank, layout.local
        self.calls = _bind_calls(layout.steps, device)
        self.to_sorted = _index(layout.to_sorted, device)
        self.from_sorted = _index(np.argsort(layout.to_sorted), device)
        if mode == "allgather":
            gathered = layout.global_of_gathered
            self.global_of_gathered = _index(gathered, device)
            self.gathered_of_global = _index(np.argsort(gathered), device)
            own = gathered[layout.rank * layout.local:(layout.rank + 1) * layout.local]
            self.own_rows = torch.from_numpy(own).to(device)
            # gloo has no reduce-scatter: all-reduce there and keep this rank's rows.
            self.has_reduce_scatter = backend != "gloo"
        else:
            self.ring = _Ring(group, layout.rank, layout.cp, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != self.local or k.shape[0] != self.local or v.shape[0] != self.local:
            raise ValueError(f"context attention: this rank holds {self.local} tokens; got q, k, "
                             f"v of {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        if q.device != self.device:
            raise ValueError(f"context attention: indices are on {self.device}, q on "
                             f"{q.device}; pass device= to make_context_attention")
        if self.to_sorted is not None:
            q, k, v = (x.index_select(0, self.to_sorted) for x in (q, k, v))
        fn = _AllGatherAttention if self.mode == "allgather" else _RingAttention
        out = fn.apply(q, k, v, self, 1.0 / math.sqrt(q.shape[-1]))
        return out if self.from_sorted is None else out.index_select(0, self.from_sorted)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[total, 2, Hkv, D]: every rank's K and V, in global order."""
        kv = torch.stack([k, v], dim=1)
        gathered = kv.new_empty((self.cp * self.local, *kv.shape[1:]))
        _all_gather(gathered, kv, group=self.group)
        if self.gathered_of_global is None:
            return gathered
        return gathered.index_select(0, self.gathered_of_global)

    def reduce_scatter_kv(self, dkv: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's dkv [total, 2, Hkv, D] (global order), this rank's rows."""
        if not self.has_reduce_scatter:
            dist.all_reduce(dkv, group=self.group)
            return dkv.index_select(0, self.own_rows)
        if self.global_of_gathered is not None:
            dkv = dkv.index_select(0, self.global_of_gathered)
        mine = dkv.new_empty((self.local, *dkv.shape[1:]))
        _reduce_scatter(mine, dkv.contiguous(), group=self.group)
        return mine
