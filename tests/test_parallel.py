"""Every parallel layout reproduces the single-device run (gloo, CPU).

Layouts are data: adding one to the matrix is one line of LAYOUTS.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=128", "data.context=512", "train.lr=3e-3", "train.warmup_steps=2",
        "train.steps=4", "checkpoint.every=4", "checkpoint.resume=none"]

# (overrides, description, processes); each keeps dp × micro_batches = 4 micro-batches per step
LAYOUTS = [
    (["parallel.dp=2", "train.micro_batches=2"], "FSDP over 2 ranks", 2),
    (["parallel.dp=2", "train.micro_batches=2", "data.packing=wlb"], "FSDP, wlb packing", 2),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out_dir, cache, overrides, nproc):
    args = [*TINY, f"train.out_dir={out_dir}", f"data.cache_dir={cache}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "wlbtrain.cli", "train", "recipes/debug.yaml", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "wlbtrain.cli", "train", "recipes/debug.yaml", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows], load_file(out_dir / "checkpoints/step-4/model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("overrides,description,nproc", LAYOUTS, ids=[d for _, d, _ in LAYOUTS])
def test_layout_matches_single_device(tmp_path, overrides, description, nproc):
    cache = tmp_path / "cache"
    single = [o for o in overrides if not o.startswith(("parallel.", "train.micro_batches"))]
    ref_loss, ref_weights = run(tmp_path / "single", cache, [*single, "train.micro_batches=4"], 1)
    loss, weights = run(tmp_path / "layout", cache, overrides, nproc)
    assert loss == pytest.approx(ref_loss, rel=1e-5), description
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5)
