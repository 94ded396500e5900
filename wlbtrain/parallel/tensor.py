"""Tensor + sequence parallelism through DTensor's ``parallelize_module``.

A packed micro-batch has no batch dimension: activations are ``[T, dim]`` and the sequence
dimension is 0. Between the blocks, each tensor-parallel rank holds ``T / tp`` consecutive tokens
of the residual stream (sequence parallel); inside attention and the feed-forward every rank sees
all ``T`` tokens and a slice of the heads or of the hidden units.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard, distribute_module,
                                      distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel,
                                               parallelize_module)

from ..config import ConfigError, ModelConfig


def check_tp(model: ModelConfig, tp: int) -> None:
    """Shapes tensor parallelism must split evenly; raises ConfigError naming the key."""
    for key in ("n_heads", "ffn_dim", "vocab_size"):
        value = getattr(model, key)
        if value % tp:
            raise ConfigError(f"parallel.tp: {tp} must divide model.{key} ({value}) to split it "
                              "over the tensor-parallel ranks")
    kv = model.n_kv_heads
    if kv % tp and tp % kv:
        raise ConfigError(f"parallel.tp: {tp} must divide model.n_kv_heads ({kv}) to split the "
                          f"KV heads, or be a multiple of it to replicate them")


def replicates_kv(model: ModelConfig, tp: int) -> bool:
    """Whether each KV head is replicated over tp / n_kv_heads ranks (more TP ranks than KV
    heads, as in a 70B model's TP 16 over 8 KV heads)."""
    return tp > model.n_kv_heads


class ReplicatedKV(ParallelStyle):
    """k_proj / v_proj when there are more TP ranks than KV heads: the weight is replicated, every
    rank computes all KV heads from the all-gathered input (a small share of the layer's work)
    and the attention keeps the one its query heads use. Each rank's weight gradient then covers
    only its KV head, so the output's gradient is declared partial: the weight's gradient is
    summed over the TP ranks."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for key, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(key, nn.Parameter(distribute_tensor(param, mesh,
                                                                          [Replicate()])))

        def prepare_input(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                         for x in inputs)

        def prepare_output(mod, output, mesh):
            return output.to_local(grad_placements=[Partial()])

        return distribute_module(module, mesh, partition, prepare_input, prepare_output)


def apply_tp(model: torch.nn.Module, tp_mesh: DeviceMesh) -> None:
    """Parallelise ``model`` (a Llama, or a pipeline stage of one) over ``tp_mesh``, in place.

    What it does to the module tree:
      - ``embed_tokens``: table split by vocabulary rows; takes the full token list and returns
        this rank's token shard ``[T/tp, dim]`` (reduce-scatter).
      - every ``*layernorm`` and the final ``norm``: sequence parallel on dim 0 (weights
        replicated, tokens sharded).
      - ``self_attn`` / ``mlp``: their input is all-gathered to ``[T, dim]``; q/k/v and gate/up are
        column-wise (a slice of heads / hidden units per rank), o and down row-wise with the
        result reduce-scattered back to ``[T/tp, dim]``. With more ranks than KV heads, k/v are
        replicated instead (``ReplicatedKV``) and each rank keeps its query heads' KV head.
      - ``lm_head``: column-wise over the vocabulary; takes all tokens (the model replicates the
        final norm's output before slicing it for the loss) and returns vocabulary-sharded
        logits as a DTensor, which ``F.cross_entropy`` reduces vocabulary-parallel inside
        ``loss_context`` — no rank holds ``[T, vocab]`` logits.
    Apply it on the meta-device model, before FSDP and before ``init_weights``.
    """
    token_shard = Shard(0)
    tp, cfg = tp_mesh.size(), model.cfg
    kv_style, kv_head = ColwiseParallel(), None
    if replicates_kv(cfg, tp):
        # this rank's query heads all read one KV head: keep only that one
        kv_style = ReplicatedKV()
        group = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head
        kv_head = tp_mesh.get_local_rank() * (cfg.n_heads // tp) // group
    for layer in model.layers.values():
        layer.self_attn.kv_head = kv_head
        plan = {
            "input_layernorm": SequenceParallel(sequence_dim=0),
            # (x, cos, sin, attention): only x changes layout
            "self_attn": PrepareModuleInput(input_layouts=(token_shard, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None),
                                            use_local_output=True),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": kv_style,
            "self_attn.v_proj": kv_style,
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


def sum_partial_grads(params) -> None:
    """Give every gradient its parameter's placements. Under tensor parallelism without FSDP the
    sequence-parallel norm weights (and ReplicatedKV's k/v weights) get Partial(sum) gradients;
    they are summed here, once, before the norm, the clipping and the optimizer. Leaving them
    partial is not safe: on torch 2.11, clipping them (clip_grads_with_norm_) corrupts them, and
    the norm weights' Adam moments came out 70-200% off after two clipped steps (exact with
    clipping off, and on torch 2.13). With FSDP the gradients arrive reduced: nothing to do."""
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            p.grad = grad.redistribute(grad.device_mesh, p.placements)


def loss_context(tp: int):
    """Where the loss is computed and differentiated under tensor parallelism: cross-entropy on
    vocabulary-sharded logits. Wrap the forward and the backward (the loss slices are recomputed
    in the backward)."""
    return loss_parallel() if tp > 1 else nullcontext()
