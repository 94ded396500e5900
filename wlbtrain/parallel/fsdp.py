"""Data parallelism through FSDP2 (``fully_shard``) over the mesh's ``dp`` dimension."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older layouts
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: torch.nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> None:
    """Shard every decoder layer, then the root (embedding, final norm, output head).

    Each layer is its own FSDP unit so only one layer's full weights are gathered at a time;
    gradients are reduced in fp32 whatever the compute dtype, so accumulation over micro-batches
    loses nothing to bf16 rounding.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
