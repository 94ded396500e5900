"""Document-causal attention backends for packed micro-batches.

Every backend takes q: [T, Hq, D], k, v: [T, Hkv, D] and ``cu_seqlens`` (int32 prefix sums of the
segment lengths) and returns [T, Hq, D]; no token attends across a segment boundary.

- ``reference``: pure torch, one causal SDPA call per segment. Exact and simple; the oracle.
- ``triton``: the packed-document Triton kernel in ``wlbtrain.kernels``.

The model does not see ``cu_seqlens``: each micro-batch hands it a ``LocalAttention``, a callable
``(q, k, v) -> out`` over this rank's tokens that knows the micro-batch's segments (and, under
context parallelism, how to reach the keys other ranks hold). The Triton backend's is a
``KernelAttention``: a registered operator that ``torch.compile`` keeps inside the layer's graph;
every other callable runs outside the compiler.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

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
    if backend is triton_attention:
        return KernelAttention(cu_seqlens, max_seqlen, covered)
    tables: dict = {}
    return lambda q, k, v: backend(q, k, v, cu_seqlens, max_seqlen, tables, covered)


class KernelAttention:
    """The Triton kernels over one micro-batch's segments, called through the registered
    operator ``wlbtrain::segment_attention``. ``torch.compile`` records the operator in the
    layer's graph (its tensors and integers are graph inputs, so a new micro-batch does not
    recompile) instead of splitting the layer in two around an opaque callable: one compiled
    region per layer and pass, which is host time small layers are bound by."""

    def __init__(self, cu_seqlens: Tensor, max_seqlen: int, covered: bool):
        self.cu_seqlens, self.max_seqlen, self.covered = cu_seqlens, int(max_seqlen), covered

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.ops.wlbtrain.segment_attention(q, k, v, self.cu_seqlens, self.max_seqlen,
                                                    self.covered)[0]


# The kernels' tile tables of each live cu_seqlens tensor: an operator takes only tensors and
# scalars, so the layers and passes of a micro-batch find theirs here. The entry goes with the
# tensor; a caller that hands over a copy just builds the tables again.
_TABLES = WeakTensorKeyDictionary()


def _tables(cu_seqlens: Tensor) -> dict:
    tables = _TABLES.get(cu_seqlens)
    if tables is None:
        tables = _TABLES[cu_seqlens] = {}
    return tables


@torch.library.custom_op("wlbtrain::segment_attention", mutates_args=())
def _segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                       covered: bool) -> tuple[Tensor, Tensor]:
    """(out [T, Hq, D], lse [Hq, T] fp32) of document-causal attention within the segments."""
    from wlbtrain.kernels import varlen_attention_forward

    return varlen_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                    block_tables=_tables(cu_seqlens), rows_covered=covered)


@_segment_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, covered):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("wlbtrain::segment_attention_backward", mutates_args=())
def _segment_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                covered: bool) -> tuple[Tensor, Tensor, Tensor]:
    from wlbtrain.kernels import varlen_attention_backward

    return varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens,
                                     max_seqlen, max_seqlen, block_tables=_tables(cu_seqlens),
                                     rows_covered=covered)


@_segment_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, covered):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, covered = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.covered = max_seqlen, covered
    ctx.mark_non_differentiable(lse)  # the model reads out only: no zero-filled lse gradient
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if dout is None:  # out was not used
        return None, None, None, None, None, None
    dq, dk, dv = _segment_attention_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens,
                                             ctx.max_seqlen, ctx.covered)
    return dq, dk, dv, None, None, None


_segment_attention.register_autograd(_backward, setup_context=_setup_context)
