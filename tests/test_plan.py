"""`wlbtrain plan`: the balance table, the --json contract, and bad input."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from wlbtrain.plan import main

LENGTHS = np.minimum(np.random.default_rng(0).pareto(1.1, size=400) * 300 + 1, 20000).astype(int)
SMALL = ["--context", "4096", "--micro-batches", "4"]


@pytest.fixture
def lengths_file(tmp_path):
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps(LENGTHS.tolist()))
    return str(path)


def plan_json(capsys, *argv):
    assert main(list(argv) + ["--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # stdout holds the JSON and nothing else


def covered(plan):
    pieces = [p for step in plan["steps"] for mb in step["micro_batches"] for p in mb["docs"]]
    counts = [np.zeros(n, dtype=int) for n in LENGTHS]
    for doc, start, length in pieces + plan["pending"]:
        counts[doc][start:start + length] += 1
    return counts


@pytest.mark.parametrize("packing", ["plain", "fixed", "wlb"])
def test_json_round_trip_covers_every_document_once(capsys, lengths_file, packing):
    plan = plan_json(capsys, "--lengths", lengths_file, *SMALL, "--packing", packing,
                     "--steps", "1000")
    assert {"packing", "context", "micro_batches", "steps", "pending", "summary"} <= plan.keys()
    assert (plan["packing"], plan["context"], plan["micro_batches"]) == (packing, 4096, 4)
    assert {"imbalance_mean", "imbalance_max", "pack_ms_median", "token_delay_mean"} <= \
        plan["summary"].keys()
    for i, step in enumerate(plan["steps"]):
        assert step["step"] == i and step["pack_ms"] >= 0
        assert len(step["micro_batches"]) == 4
        for mb in step["micro_batches"]:
            assert sum(p[2] for p in mb["docs"]) <= 4096
    assert plan["pending"] == []  # the documents ran out before 1000 steps
    assert all((c == 1).all() for c in covered(plan))


def test_json_stops_after_k_steps_with_pending_pieces(capsys, lengths_file):
    plan = plan_json(capsys, "--lengths", lengths_file, *SMALL, "--packing", "wlb", "--steps", "5")
    assert len(plan["steps"]) == 5
    assert all(c.max() <= 1 for c in covered(plan))  # nothing twice, queued pieces included
    assert plan["summary"]["imbalance_max"] >= plan["summary"]["imbalance_mean"] >= 1.0


def test_json_is_deterministic_given_the_seed(capsys, lengths_file):
    def docs(seed):
        plan = plan_json(capsys, "--lengths", lengths_file, *SMALL, "--steps", "3", "--seed", seed)
        return [step["micro_batches"] for step in plan["steps"]]
    assert docs("1") == docs("1")
    assert docs("1") != docs("2")


@pytest.mark.parametrize("fmt", ["txt", "npy"])
def test_lengths_formats(capsys, tmp_path, fmt):
    path = tmp_path / f"lengths.{fmt}"
    if fmt == "npy":
        np.save(path, LENGTHS)
    else:
        path.write_text("\n".join(map(str, LENGTHS)) + "\n")
    plan = plan_json(capsys, "--lengths", str(path), *SMALL, "--steps", "1000")
    assert all((c == 1).all() for c in covered(plan))


def test_table_reports_every_packer(capsys, lengths_file):
    assert main(["--lengths", lengths_file, *SMALL, "--steps", "20"]) == 0
    out = capsys.readouterr().out
    for name in ("plain", "fixed (window 1)", "wlb", "wlb + refine"):
        assert name in out
    assert "imbalance" in out and "delay" in out


def test_recipe_and_overrides(capsys, lengths_file):
    plan = plan_json(capsys, "recipes/paper/550m_64k.yaml", "--lengths", lengths_file,
                     "--steps", "2", "data.outlier_thresholds=[8192, 16384]")
    assert plan["micro_batches"] == 8 and plan["context"] == 65536 and plan["packing"] == "wlb"


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "/no/such/file.json"], "not found"),
    (["--packing", "greedy"], "--packing"),
    (["--context", "0"], "data.context"),
    (["--steps", "0"], "--steps"),
    (["data.no_such_key=1"], "data.no_such_key"),
    (["train.micro_batches=zero"], "train.micro_batches"),
])
def test_bad_input_exits_2_with_one_line(capsys, lengths_file, argv, message):
    if "--lengths" not in argv:
        argv = ["--lengths", lengths_file] + argv
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


@pytest.mark.parametrize("content", ["1\n2\nabc\n", "[1, -2, 3]", "[[1, 2]]", "[]", "1.5\n2\n"])
def test_bad_lengths_files(capsys, tmp_path, content):
    path = tmp_path / ("lengths.json" if content.startswith("[") else "lengths.txt")
    path.write_text(content)
    assert main(["--lengths", str(path)]) == 2
    assert "--lengths" in capsys.readouterr().err


def test_plot(capsys, tmp_path, lengths_file):
    out = tmp_path / "plot.png"
    status = main(["--lengths", lengths_file, *SMALL, "--steps", "10", "--plot", str(out)])
    if importlib.util.find_spec("matplotlib") is None:
        assert status == 2 and "matplotlib" in capsys.readouterr().err
        assert not out.exists()
    else:
        assert status == 0 and out.stat().st_size > 0


def test_cli_dispatches_plan(lengths_file):
    result = subprocess.run([sys.executable, "-m", "wlbtrain.cli", "plan", "--lengths", lengths_file,
                             *SMALL, "--steps", "2", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["steps"]) == 2


# ------------------------------------------------------------------ context parallelism

def test_cp_table_compares_every_sharding(capsys, lengths_file):
    assert main(["--lengths", lengths_file, *SMALL, "--steps", "3", "parallel.cp=2",
                 "parallel.tp=2"]) == 0
    out = capsys.readouterr().out
    cp_lines = out[out.index("context parallelism: cp 2 × tp 2"):].splitlines()
    rows = [line.split() for line in cp_lines if line.startswith(("plain", "wlb"))]
    for sharding in ("per_sequence", "per_document", "adaptive", "hybrid"):
        assert any(r[1] == sharding for r in rows if r[0] == "plain")
    adaptive = next(line for line in cp_lines if line.startswith("plain") and "adaptive" in line)
    picks = [int(n.rstrip(",")) for n in adaptive.split()[6::2]]
    assert sum(picks) == 12  # every micro-batch of 3 steps × 4 counted once
    balance_mean, balance_max = float(rows[0][2]), float(rows[0][3])
    assert 1.0 <= balance_mean <= balance_max


def test_no_cp_section_without_cp(capsys, lengths_file):
    assert main(["--lengths", lengths_file, *SMALL, "--steps", "2", "parallel.cp=1"]) == 0
    assert "context parallelism" not in capsys.readouterr().out
    plan = plan_json(capsys, "--lengths", lengths_file, *SMALL, "--steps", "2", "parallel.cp=1")
    mb = plan["steps"][0]["micro_batches"][0]
    assert mb.keys() == {"docs"} and "cp_balance_mean" not in plan["summary"]


@pytest.mark.parametrize("sharding, allowed", [
    ("per_sequence", {"per_sequence"}),
    ("per_document", {"per_document"}),
    ("adaptive", {"per_sequence", "per_document"}),
    ("hybrid", {"per_sequence", "per_document", "hybrid"}),
])
def test_json_gives_each_micro_batch_its_cp_sharding(capsys, lengths_file, sharding, allowed):
    plan = plan_json(capsys, "--lengths", lengths_file, *SMALL, "--steps", "3", "parallel.cp=4",
                     "parallel.tp=1", f"parallel.cp_sharding={sharding}")
    assert {"packing", "context", "micro_batches", "steps", "pending", "summary"} <= plan.keys()
    balances = []
    for step in plan["steps"]:
        for mb in step["micro_batches"]:
            assert mb["cp_sharding"] in allowed and mb["cp_balance"] >= 1.0
            balances.append(mb["cp_balance"])
    s = plan["summary"]
    assert s["cp_sharding"] == sharding
    assert s["cp_balance_max"] == max(balances)
    assert s["cp_balance_mean"] == pytest.approx(np.mean(balances), abs=1e-3)


def test_paper_recipe_plans_cp(capsys):
    lengths = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "doclens",
                           "wikipedia_1m.txt")
    if not os.path.exists(lengths):
        pytest.skip("the doclens samples are not here")
    plan = plan_json(capsys, "recipes/paper/7b_128k.yaml", "--lengths", lengths, "--steps", "2")
    mbs = [mb for step in plan["steps"] for mb in step["micro_batches"]]
    assert len(mbs) == 8 and {mb["cp_sharding"] for mb in mbs} <= {"per_sequence", "per_document"}


def test_sweep_delay_prints_the_frontier(capsys, lengths_file):
    argv = ["--lengths", lengths_file, *SMALL, "--steps", "30", "--sweep-delay", "0,1"]
    assert main(argv + ["--json"]) == 0
    points = json.loads(capsys.readouterr().out)["sweep_delay"]
    assert [p["max_token_delay"] for p in points] == [0.0, 1.0]
    # a budget of no delay keeps no queue; one step buys balance with delay
    assert points[0]["token_delay_mean"] < points[1]["token_delay_mean"]
    assert points[1]["imbalance_mean"] < points[0]["imbalance_mean"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "imbalance vs average token delay" in table and len(table.splitlines()) == 5


def test_sweep_delay_rejects_bad_budgets(capsys, lengths_file):
    assert main(["--lengths", lengths_file, "--sweep-delay", "0,-1"]) == 2
    assert "--sweep-delay" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None,
                    reason="checks the message without matplotlib")
def test_sweep_delay_plot_without_matplotlib_still_prints(capsys, tmp_path, lengths_file):
    argv = ["--lengths", lengths_file, *SMALL, "--steps", "5", "--sweep-delay", "0.5",
            "--plot", str(tmp_path / "f.png")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "0.50" in captured.out and "matplotlib" in captured.err
    assert not (tmp_path / "f.png").exists()
