"""ParallelDims: the one place that checks parallel degrees and builds the device mesh.

Mesh dimensions, outermost first: ``pp, dp, cp, tp`` (tensor parallelism innermost, so its
frequent collectives stay on the fastest links). Everything else asks for ``dims.mesh["dp"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError, ParallelConfig

MESH_DIMS = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelDims:
    pp: int
    dp: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, par: ParallelConfig, world_size: int) -> "ParallelDims":
        """Validate the degrees against ``world_size``; raises ConfigError before any process
        group exists."""
        dp = par.data_parallel(world_size)
        if dp * par.tp * par.pp * par.cp != world_size:
            raise ConfigError(
                f"parallel: dp*tp*pp*cp = {dp}*{par.tp}*{par.pp}*{par.cp} = "
                f"{dp * par.tp * par.pp * par.cp} must equal the number of processes "
                f"({world_size}); start that many (NPROC=... scripts/train.sh) or set "
                "parallel.dp=-1 to give data parallelism every process left")
        unsupported = [k for k in ("tp", "pp", "cp") if getattr(par, k) > 1]
        if unsupported:
            raise ConfigError(f"parallel.{unsupported[0]}: degrees above 1 are not supported yet "
                              "(data parallelism is); set it to 1")
        return cls(par.pp, dp, par.cp, par.tp, world_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        return init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS),
                                mesh_dim_names=MESH_DIMS)

    def describe(self, rank: int) -> str:
        """Where this rank sits, e.g. ``PP(1)-DP(2)-CP(1)-TP(1)-Rank(1)``."""
        return "-".join(f"{d.upper()}({getattr(self, d)})" for d in MESH_DIMS) + f"-Rank({rank})"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(device: torch.device) -> None:
    """Join torchrun's process group, or make a one-process group for the debug mode, so that
    a single process runs exactly the distributed code path."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
