"""scripts/bench_cp.py end to end: two gloo ranks under torchrun, tiny layer, reference kernel."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARDINGS = ("per_sequence", "per_document", "adaptive", "hybrid")
MODES = ("allgather", "ring")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smoke_two_gloo_ranks(tmp_path):
    # Short documents beside a few longer than a rank's share: both static choices occur.
    lengths = np.random.default_rng(0).choice([3, 7, 20, 45, 90, 150, 300], size=300)
    (tmp_path / "lengths.json").write_text(json.dumps(lengths.tolist()))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "scripts/bench_cp.py", "--smoke",
           "--lengths", str(tmp_path / "lengths.json"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| ring | hybrid |") == 1  # rank 0 alone prints the table
    assert "adaptive within 2% of the better static sharding on" in done.stdout

    report = json.loads(out.read_text())
    assert report["cp"] == 2 and report["kernel"] == "reference"
    (result,) = report["results"]
    rows = result["micro_batches"]
    assert len(rows) == 4
    for row in rows:
        assert sum(row["lengths"]) == 256  # fixed-length packing fills the context
        for mode in MODES:
            measured = row["measured"][mode]
            assert set(measured) == set(SHARDINGS)
            for s in SHARDINGS:
                assert measured[s]["step_ms"] > 0 and len(measured[s]["rank_busy_ms"]) == 2
                # the slowest rank's elapsed time bounds every rank's busy time
                assert max(measured[s]["rank_busy_ms"]) <= measured[s]["step_ms"] + 1e-6
            # adaptive applies one of the static plans, timed once for both
            picked = row["applied"]["adaptive"][0]
            assert picked in ("per_sequence", "per_document")
            assert measured["adaptive"] == measured[picked]
    for mode in MODES:
        summary = result["summary"][mode]
        assert summary["micro_batches"] == 4
        assert 0 <= summary["estimator_agrees"] <= 4
        assert summary["shardings"]["per_sequence"]["speedup_vs_per_sequence"] == 1.0
