"""Tensor + sequence parallelism through DTensor's ``parallelize_module``.

A packed micro-batch has no batch dimension: activations are ``[T, dim]`` and the sequence
dimension is 0. Between the blocks, each tensor-parallel rank holds ``T / tp`` consecutive tokens
of the residual stream (sequence parallel); inside attention and the feed-forward every rank sees
all ``T`` tokens and a slice of the heads or of the hidden units.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)

from ..config import ConfigError, ModelConfig


def check_tp(model: ModelConfig, tp: int) -> None:
    """Shapes tensor parallelism must split evenly; raises ConfigError naming the key."""
    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        value = getattr(model, key)
        if value % tp:
            raise ConfigError(f"parallel.tp: {tp} must divide model.{key} ({value}) to split it "
                              "over the tensor-parallel ranks")


def apply_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> None:
    """Parallelise ``model`` (a Llama, or a pipeline stage of one) over ``tp_mesh``, in place.

    What it does to the module tree:
      - ``embed_tokens``: table split by vocabulary rows; takes the full token list and returns
        this rank's token shard ``[T/tp, dim]`` (reduce-scatter).
      - every ``*layernorm`` and the final ``norm``: sequence parallel on dim 0 (weights
        replicated, tokens sharded).
      - ``self_attn`` / ``mlp``: their input is all-gathered to ``[T, dim]``; q/k/v and gate/up are
        column-wise (a slice of heads / hidden units per rank), o and down row-wise with the
        result reduce-scattered back to ``[T/tp, dim]``.
      - ``lm_head``: column-wise over the vocabulary; takes all tokens (the model replicates the
        final norm's output before slicing it for the loss) and returns vocabulary-sharded
        logits as a DTensor, which ``F.cross_entropy`` reduces vocabulary-parallel inside
        ``loss_context`` — no rank holds ``[T, vocab]`` logits.
    Apply it on the meta-device model, before FSDP and before ``init_weights``.
    """
    token_shard = Shard(0)
    for layer in model.layers.values():
        plan = {
            "input_layernorm": SequenceParallel(sequence_dim=0),
            # (x, cos, sin, attention): only x changes layout
            "self_attn": PrepareModuleInput(input_layouts=(token_shard, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None),
                                            use_local_output=True),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=token_shard),
            "post_attention_layernorm": SequenceParallel(sequence_dim=0),
            "mlp": PrepareModuleInput(input_layouts=(token_shard,),
                                      desired_input_layouts=(Replicate(),), use_local_output=True),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=token_shard),
        }
        parallelize_module(layer, tp_mesh, plan)
    outer = {}
    if model.embed_tokens is not None:
        outer["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=token_shard)
    if model.lm_head is not None:
        outer["norm"] = SequenceParallel(sequence_dim=0)
        outer["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                           use_local_output=False)
    if outer:
        parallelize_module(model, tp_mesh, outer)


def loss_context(tp: int):
    """Where the loss is computed and differentiated under tensor parallelism: cross-entropy on
    vocabulary-sharded logits. Wrap the forward and the backward (the loss slices are recomputed
    in the backward)."""
    return loss_parallel() if tp > 1 else nullcontext()
