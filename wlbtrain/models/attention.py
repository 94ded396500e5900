"""Document-causal attention backends for packed micro-batches.

Every backend takes q: [T, Hq, D], k, v: [T, Hkv, D] and ``cu_seqlens`` (int32 prefix sums of the
segment lengths) and returns [T, Hq, D]; no token attends across a segment boundary.

- ``reference``: pure torch, one causal SDPA call per segment. Exact and simple; the oracle.
- ``triton``: the packed-document Triton kernel in ``wlbtrain.kernels``.

The model does not see ``cu_seqlens``: each micro-batch hands it a ``LocalAttention``, a callable
``(q, k, v) -> out`` over this rank's tokens that knows the micro-batch's segments (and, under
context parallelism, how to reach the keys other ranks hold).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# (q, k, v, cu_seqlens, max_seqlen, tables, covered) -> out; tables: a dict the backend may keep
# derived data in, shared by the calls over one cu_seqlens (see segment_attention); covered: the
# segments span every row (cu_seqlens[0] = 0, cu_seqlens[-1] = rows)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, dict, bool],
                       torch.Tensor]
LocalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int,
                        tables: dict | None = None, covered: bool = False) -> torch.Tensor:
    """Per-segment causal attention with grouped-query heads, in plain torch."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [L, H, D] → [1, H, L, D]: the 4-D layout the fused (flash) SDPA kernels take; 3-D
        # inputs fall back to the math kernel, which stores every L×L score matrix.
        qs = q[start:end].transpose(0, 1)[None]
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)[None]
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    return torch.cat(out) if out else torch.zeros_like(q)


def triton_attention(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int,
                     tables: dict | None = None, covered: bool = False) -> torch.Tensor:
    from wlbtrain.kernels import varlen_attention

    return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                            block_tables=tables, rows_covered=covered)


BACKENDS: dict[str, AttentionFn] = {"reference": reference_attention, "triton": triton_attention}


def get_backend(name: str) -> AttentionFn:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name]


def segment_attention(backend: AttentionFn, cu_seqlens: torch.Tensor, max_seqlen: int,
                      covered: bool = False) -> LocalAttention:
    """Attention within the segments ``cu_seqlens`` of one micro-batch held whole on this rank.
    Its layers share one tables dict: the Triton kernels' tile tables are built once per
    micro-batch, not once per layer and pass. ``covered``: the segments span all the
    micro-batch's rows (known on the host when it is built), so nothing outside them is filled."""
    tables: dict = {}
    return lambda q, k, v: backend(q, k, v, cu_seqlens, max_seqlen, tables, covered)
