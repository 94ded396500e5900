"""A rank killed mid-run (SIGKILL) under ``MAX_RESTARTS=1``: torchrun restarts the job from the
latest checkpoint, the run finishes, and every document of the epoch is trained exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from test_parallel import TINY, free_port, worker_with_rank
from wlbtrain.config import load_config
from wlbtrain.data.store import write_store
from wlbtrain.train import Trainer, train

STEPS = 8
RUN = [*TINY, f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=10",
       "checkpoint.resume=auto"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """60 documents, about six steps' worth: the run trains the whole first epoch."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("restart") / "store"
    docs = [rng.integers(0, 256, size=n) for n in rng.integers(20, 400, size=60)]
    write_store(path, docs, vocab_size=256, tokenizer="test")
    return path


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run_killing_rank_1(out_dir, store, kill_after: int) -> str:
    """scripts/train.sh with 2 ranks and MAX_RESTARTS=1; SIGKILL rank 1 once rank 0 has logged
    step ``kill_after``. Returns the combined console output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "MAX_RESTARTS": "1",
           "MASTER_PORT": str(free_port()), "PYTHON": sys.executable}
    args = [*RUN, "parallel.dp=2", "train.micro_batches=2", f"data.source={store}",
            f"train.out_dir={out_dir}"]
    proc = subprocess.Popen(["scripts/train.sh", "recipes/debug.yaml", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.split()[:2] == ["step", f"{kill_after}/{STEPS}"]:
            os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)  # train.sh exec'd torchrun
            break
    seen.append(proc.stdout.read())
    output = "".join(seen)
    assert proc.wait(timeout=300) == 0, output[-3000:]
    return output


def replay(cfg, resumed_state: dict, resume_step: int) -> tuple[list, np.ndarray]:
    """The pieces the restarted run trained, step by step: steps up to ``resume_step`` from a
    fresh stream and packer, the rest from the checkpoint's saved stream and packer state.
    Checks on the way that the saved state is exactly that after ``resume_step`` steps."""
    trainer = Trainer(cfg)
    try:
        plans = [trainer.packer.pack(trainer.stream) for _ in range(resume_step)]
        now = json.loads(json.dumps({"stream": trainer.stream.state_dict(),
                                     "packer": trainer.packer.state_dict()}))
        assert now == {k: resumed_state[k] for k in ("stream", "packer")}
        trainer.stream.load_state_dict(resumed_state["stream"])
        trainer.packer.load_state_dict(resumed_state["packer"])
        plans += [trainer.packer.pack(trainer.stream) for _ in range(resume_step, STEPS)]
        return plans, trainer.store.doc_lengths
    finally:
        dist.destroy_process_group()


def first_epoch_coverage(plans, doc_lengths) -> np.ndarray:
    """[num_docs, 2]: over the first epoch's worth of trained tokens, the least and the most
    times any token of each document was trained (1, 1 everywhere: exactly once)."""
    covered = [np.zeros(int(n), dtype=np.int64) for n in doc_lengths]
    budget = int(np.sum(doc_lengths))
    for pieces in (p for plan in plans for p in plan):
        for doc, start, length in pieces:
            take = min(length, budget)
            covered[doc][start:start + take] += 1
            budget -= take
    assert budget == 0, "the run is too short to cover the first epoch"
    return np.array([(c.min(), c.max()) for c in covered])


@pytest.mark.slow
def test_killed_rank_restarts_from_the_checkpoint_without_losing_or_repeating(tmp_path, store):
    output = run_killing_rank_1(tmp_path / "run", store, kill_after=3)
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", output)
    assert len(resumed) == 1, output[-3000:]
    resume_path, resume_step = resumed[0][0], int(resumed[0][1])
    assert resume_step in (2, 4)  # the last checkpoint before the kill
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one row per step"

    # The same run uninterrupted, on one process (dp 2 reproduces it, see test_parallel).
    cfg = load_config("recipes/debug.yaml", [*RUN, "train.micro_batches=4",
                                             f"data.source={store}",
                                             f"train.out_dir={tmp_path / 'ref'}"])
    train(cfg)
    reference = read_metrics(tmp_path / "ref")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    last = f"checkpoints/step-{STEPS}/model.safetensors"
    got, want = load_file(tmp_path / "run" / last), load_file(tmp_path / "ref" / last)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)

    # Exactly once, directly: what the restarted run trained covers the first epoch's tokens
    # once each.
    saved = json.loads((Path(resume_path) / "state.json").read_text())
    replay_cfg = load_config("recipes/debug.yaml", [*RUN, "train.micro_batches=4",
                                                    "checkpoint.resume=none",
                                                    f"data.source={store}",
                                                    f"train.out_dir={tmp_path / 'replay'}"])
    plans, lengths = replay(replay_cfg, saved, resume_step)
    coverage = first_epoch_coverage(plans, lengths)
    assert (coverage == 1).all(), coverage
