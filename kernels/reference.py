"""Pure-torch attention over packed documents: the oracle the Triton kernels are tested against.

Same signature and semantics as :func:`wlbtrain.kernels.varlen_attention`, computed in fp32 one
segment at a time. It materialises the score matrix of each segment, so keep it to small inputs
(tests, spot checks in benchmarks).
"""

import math

import torch


def _segment_attention(q, k, v, causal, scale):
    """q: [lq, Hq, D], k/v: [lk, Hq, D] fp32 -> out [lq, Hq, D], lse [Hq, lq] (natural log)."""
    lq, lk = q.shape[0], k.shape[0]
    if lk == 0:
        return q.new_zeros(q.shape), q.new_full((q.shape[1], lq), float("-inf"))
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        rows = torch.arange(lq, device=q.device)[:, None]
        cols = torch.arange(lk, device=q.device)[None, :]
        # Bottom-right alignment: the last query sees every key.
        scores = scores.masked_fill(cols > rows + (lk - lq), float("-inf"))
    # The row maximum only shifts the exponent; detaching it leaves the gradients exact and keeps
    # rows with no visible key (all -inf) free of NaN in both directions.
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    has_key = total > 0
    total_safe = torch.where(has_key, total, torch.ones_like(total))
    out = torch.einsum("hqk,khd->qhd", weights / total_safe, v)
    lse = torch.where(has_key, row_max + torch.log(total_safe), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal=True, softmax_scale=None, return_lse=False):
    """Attention over packed segments, one segment at a time, in fp32.

    q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] with Hq a multiple of Hkv; cu_seqlens_q,
    cu_seqlens_k: [num_segments + 1] int prefix sums. Segment i of q attends only segment i of k;
    causal masks are aligned bottom-right (query j of a segment with lq queries and lk keys sees
    keys 0 .. j + lk - lq). Rows that see no key get output 0 and LSE -inf; rows outside every
    segment too. max_seqlen_* are accepted for signature parity and not used.

    Returns out [total_q, Hq, D] in q's dtype, and with return_lse also lse [Hq, total_q] fp32
    (natural log). Differentiable through autograd.
    """
    del max_seqlen_q, max_seqlen_k
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs = [q.new_zeros((bounds_q[0], num_heads, head_dim), dtype=torch.float32)]
    lses = [q.new_full((num_heads, bounds_q[0]), float("-inf"), dtype=torch.float32)]
    for i in range(len(bounds_q) - 1):
        qs = q[bounds_q[i]:bounds_q[i + 1]].float()
        ks = k[bounds_k[i]:bounds_k[i + 1]].float().repeat_interleave(group, dim=1)
        vs = v[bounds_k[i]:bounds_k[i + 1]].float().repeat_interleave(group, dim=1)
        out, lse = _segment_attention(qs, ks, vs, causal, scale)
        outs.append(out)
        lses.append(lse)
    tail = total_q - bounds_q[-1]
    outs.append(q.new_zeros((tail, num_heads, head_dim), dtype=torch.float32))
    lses.append(q.new_full((num_heads, tail), float("-inf"), dtype=torch.float32))
    out = torch.cat(outs, dim=0).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out
