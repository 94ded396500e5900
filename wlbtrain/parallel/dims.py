"""ParallelDims: the one place that checks parallel degrees and builds the device mesh.

Mesh dimensions, outermost first: ``pp, dp, cp, tp`` (tensor parallelism innermost, so its
frequent collectives stay on the fastest links). Derived from it once:
  - ``dp_cp``: the data × context ranks flattened. Context-parallel ranks hold the same weights,
    so FSDP shards the weights over them too, and gradients are reduced over the same ranks.
Everything else asks for ``mesh["tp"]``, ``dims.dp_cp_mesh``, ...; nobody builds groups by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import Config, ConfigError

MESH_DIMS = ("pp", "dp", "cp", "tp")
SUPPORTED = ("dp", "tp", "pp", "cp")  # degrees above 1 that training runs today


@dataclass
class ParallelDims:
    pp: int
    dp: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> "ParallelDims":
        """Validate the degrees against ``world_size`` and the model; raises ConfigError, naming
        the key, before any process group exists."""
        par = cfg.parallel
        dp = par.data_parallel(world_size)
        if dp * par.tp * par.pp * par.cp != world_size:
            raise ConfigError(
                f"parallel: dp*tp*pp*cp = {dp}*{par.tp}*{par.pp}*{par.cp} = "
                f"{dp * par.tp * par.pp * par.cp} must equal the number of processes "
                f"({world_size}); start that many (NPROC=... scripts/train.sh) or set "
                "parallel.dp=-1 to give data parallelism every process left")
        for key in MESH_DIMS:
            if key not in SUPPORTED and getattr(par, key) > 1:
                raise ConfigError(f"parallel.{key}: degrees above 1 are not supported yet; set it "
                                  "to 1")
        if par.tp > 1:
            from .tensor import check_tp

            check_tp(cfg.model, par.tp)
        return cls(par.pp, dp, par.cp, par.tp, world_size)

    @property
    def dp_cp(self) -> int:
        """Ranks that shard the weights (FSDP) and reduce the gradients."""
        return self.dp * self.cp

    @property
    def token_multiple(self) -> int:
        """A micro-batch's padded token count is a multiple of this: sequence parallelism splits
        tokens over tp ranks, context parallelism into 2·cp chunks."""
        return self.tp * 2 * self.cp if self.cp > 1 else self.tp

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world mesh; the flattened data × context mesh is kept as ``dp_cp_mesh`` (torch
        deprecates slicing flattened dimensions back out of the root mesh)."""
        mesh = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS),
                                mesh_dim_names=MESH_DIMS)
        self.dp_cp_mesh = mesh["dp", "cp"]._flatten(mesh_dim_name="dp_cp")
        return mesh

    def coordinates(self, mesh: DeviceMesh) -> dict[str, int]:
        return {d: mesh[d].get_local_rank() for d in MESH_DIMS}

    def describe(self, rank: int, coords: dict[str, int] | None = None) -> str:
        """Where a rank sits: ``PP(0/1)-DP(1/2)-CP(0/1)-TP(0/2)-Rank(2)``, or the degrees alone
        (``PP(1)-DP(2)-...``) before the mesh exists."""
        if coords is None:
            parts = [f"{d.upper()}({getattr(self, d)})" for d in MESH_DIMS]
        else:
            parts = [f"{d.upper()}({coords[d]}/{getattr(self, d)})" for d in MESH_DIMS]
        return "-".join(parts) + f"-Rank({rank})"


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
