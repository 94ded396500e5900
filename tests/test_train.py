"""End to end on the CPU: the debug recipe learns, checkpoints are complete and atomic, and a
resumed run continues exactly where an uninterrupted one goes."""

import contextlib
import gc
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wlbtrain import checkpoint as ckpt
from wlbtrain.config import load_config
from wlbtrain.data.store import write_store
from wlbtrain.metrics import DeviceScalars, DoneMark
from wlbtrain.train import CollectBetweenSteps, Trainer, train

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=128", "data.context=512", "train.micro_batches=2", "train.lr=3e-3",
        "train.warmup_steps=3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def long_tail_store(tmp_path_factory):
    """Random tokens in documents of a heavy-tailed length mix: wlb's delay queues fill."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.pareto(1.0, size=400) * 60 + 8, 1500).astype(int)
    path = tmp_path_factory.mktemp("long_tail") / "store"
    write_store(path, [rng.integers(0, 256, size=n) for n in lengths], vocab_size=256,
                tokenizer="test")
    return str(path)


def tiny(tmp_path, cache_dir, *extra):
    return load_config("recipes/debug.yaml", [*TINY, f"data.cache_dir={cache_dir}",
                                              f"train.out_dir={tmp_path}", *extra])


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def record_plans(monkeypatch):
    """Capture every step's global batch plan as the trainer runs it."""
    plans = {}
    original = Trainer.train_step

    def recording(self, plan, *rest):
        plans[self.step] = [list(map(tuple, mb)) for mb in plan]
        return original(self, plan, *rest)

    monkeypatch.setattr(Trainer, "train_step", recording)
    return plans


def crash_at(monkeypatch, step):
    """Make the trainer raise when it launches step ``step`` (over any patch already there)."""
    original = Trainer.train_step

    def crash(self, plan, *rest):
        if self.step == step:
            raise RuntimeError("simulated crash")
        return original(self, plan, *rest)

    monkeypatch.setattr(Trainer, "train_step", crash)


def test_debug_recipe_learns_and_writes_its_files(tmp_path, cache_dir):
    train(tiny(tmp_path, cache_dir, "train.steps=12", "checkpoint.every=5"))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("step", "loss", "tokens", "tokens_per_s", "mfu", "imbalance", "rank_imbalance",
                "step_time_s"):
        assert key in rows[0]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [10, 12]  # keep=2
    weights = load_file(tmp_path / "checkpoints/step-12/model.safetensors")
    assert "model.layers.1.self_attn.k_proj.weight" in weights and "lm_head.weight" in weights


@pytest.mark.parametrize("packing", ["plain", "wlb"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, cache_dir, long_tail_store,
                                                monkeypatch, packing):
    steps = ["train.steps=8", "checkpoint.every=4", "checkpoint.keep=3", f"data.packing={packing}"]
    if packing == "wlb":  # documents held in delay queues across the checkpoint
        steps.append(f"data.source={long_tail_store}")
    plans_full = record_plans(monkeypatch)
    train(tiny(tmp_path / "full", cache_dir, *steps))
    full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}
    monkeypatch.undo()

    # A run that crashes during step 6: its last checkpoint is step 4.
    plans_crash = record_plans(monkeypatch)
    crash_at(monkeypatch, 6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(tmp_path / "resumed", cache_dir, *steps))
    monkeypatch.undo()

    plans_resumed = record_plans(monkeypatch)
    train(tiny(tmp_path / "resumed", cache_dir, *steps))  # checkpoint.resume=auto
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "resumed")}

    if packing == "wlb":
        state = json.loads((tmp_path / "resumed/checkpoints/step-4/state.json").read_text())
        held = state["packer"]["carry"] + sum(state["packer"]["queues"], [])
        assert held, "the checkpoint must hold pieces waiting in the packer for this test to bite"
    assert sorted(resumed) == list(range(1, 9)), "metrics of the crashed steps are replaced"
    for step in range(5, 9):
        assert resumed[step] == full[step], step  # bit-exact on the CPU in fp32
    assert sorted(plans_resumed) == [5, 6, 7, 8]
    trained = {**{s: p for s, p in plans_crash.items() if s <= 4}, **plans_resumed}
    assert trained == plans_full, "the resumed run sees the same documents, none twice or skipped"


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    train(tiny(tmp_path, cache_dir, "train.steps=2", "checkpoint.every=1"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train(tiny(tmp_path, cache_dir, "train.steps=3", "checkpoint.every=1"))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-2"
    assert load_file(tmp_path / "checkpoints/step-2/model.safetensors")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_scalars_keep_the_values_they_were_taken_at(device):
    """A step's loss and norm are copied off the device behind the work that made them: what
    the host launches afterwards (the next step) neither changes them nor is waited for."""
    start = DoneMark(torch.device(device))
    x = torch.randn(1024, 1024, device=device)
    for _ in range(4):  # the step's work
        x = x @ x / 32
    loss = torch.full((), 2.5, device=device)
    norm = torch.full((1,), 0.75, device=device, dtype=torch.bfloat16)
    scalars = DeviceScalars(loss, norm)
    for _ in range(4):  # later work, queued behind the copy
        x = x @ x / 32
    loss.add_(1)
    norm.mul_(0)
    assert scalars.read() == [2.5, 0.75]
    assert scalars.done.seconds_since(start) > 0  # the step's work, timed where it ran


def test_step_time_is_each_steps_own(tmp_path, cache_dir, monkeypatch):
    """A step is logged after the next one is launched; its step_time_s is still its own work
    (here each step's launch takes 0.5 s more), not the next step's, the last step's too."""
    original = Trainer.train_step

    def slow(self, plan, *rest):
        time.sleep(0.5)
        return original(self, plan, *rest)

    monkeypatch.setattr(Trainer, "train_step", slow)
    train(tiny(tmp_path, cache_dir, "train.steps=4", "checkpoint.every=2",
               "checkpoint.resume=none"))
    times = [row["step_time_s"] for row in read_metrics(tmp_path)]
    assert len(times) == 4 and min(times) >= 0.5, times
    # one step's sleep, not two: the steps after the first start from a warm model
    assert max(times[1:]) < 0.9, times


@contextlib.contextmanager
def collections():
    """The generation of every garbage collection inside, in a list; collection is on after."""
    seen = []

    def record(phase, info):
        if phase == "stop":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.enable()
        gc.callbacks.remove(record)


def test_the_collector_runs_between_steps_on_its_schedule():
    """Automatic collection is off inside; the young generations are collected at every third
    step, everything after a save; the collector's state before is restored after."""
    with collections() as seen:
        with CollectBetweenSteps(3) as collector:
            assert not gc.isenabled()
            for step in range(1, 8):
                seen.append(f"step {step}")
                collector.after_launch(step)
            collector.after_save()
        assert gc.isenabled()
        with CollectBetweenSteps(0) as collector:  # automatic: nothing scheduled
            assert gc.isenabled()
            collector.after_launch(3)
            collector.after_save()
        gc.disable()  # a user's own choice stays
        with CollectBetweenSteps(3):
            pass
        assert not gc.isenabled()
    assert seen == ["step 1", "step 2", "step 3", 1, "step 4", "step 5", "step 6", 1, "step 7",
                    2], seen


def test_without_checkpoints_every_few_rounds_collect_everything():
    """With no save to run a full pass, every FULL_ROUNDS-th scheduled collection is one; a save
    starts the count again."""
    rounds = CollectBetweenSteps.FULL_ROUNDS
    with collections() as seen, CollectBetweenSteps(2) as collector:
        for step in range(1, 2 * (2 * rounds + 2) + 1):
            collector.after_launch(step)
            if step == 2 * (rounds + 1):
                collector.after_save()
    # rounds - 1 young, a full one; a young one, the save's full one; rounds - 1 young, a full one
    young = [1] * (rounds - 1)
    assert seen == young + [2] + [1, 2] + young + [2] + [1], seen


@pytest.mark.parametrize("every, inside", [(2, False), (0, True)])
def test_training_steps_run_with_the_configured_collector(tmp_path, cache_dir, monkeypatch,
                                                         every, inside):
    """The trainer's steps run with automatic collection off by default, on with 0; on after."""
    enabled = []
    original = Trainer.train_step

    def watching(self, plan, *rest):
        enabled.append(gc.isenabled())
        return original(self, plan, *rest)

    monkeypatch.setattr(Trainer, "train_step", watching)
    train(tiny(tmp_path, cache_dir, "train.steps=3", f"train.gc_every={every}"))
    assert enabled == [inside] * 3 and gc.isenabled()


@pytest.mark.parametrize("bad_step", [2, 3])
def test_a_non_finite_loss_stops_the_run_before_any_checkpoint_of_it(tmp_path, cache_dir,
                                                                     monkeypatch, bad_step):
    """A step's loss is read only after the next step is launched; a NaN still stops the run
    with no checkpoint of (or after) the bad step, and every step before it is logged."""
    original = Trainer.train_step

    def diverging(self, plan, *rest):
        loss, norm = original(self, plan, *rest)
        return (loss * float("nan") if self.step == bad_step else loss), norm

    monkeypatch.setattr(Trainer, "train_step", diverging)
    with pytest.raises(FloatingPointError, match=f"at step {bad_step};"):
        train(tiny(tmp_path, cache_dir, "train.steps=6", "checkpoint.every=3"))
    assert ckpt.list_checkpoints(tmp_path) == []
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, bad_step + 1))


def test_a_crash_still_logs_the_step_before_it(tmp_path, cache_dir, monkeypatch):
    """The last completed step's row is written even when the next step fails at launch."""
    crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny(tmp_path, cache_dir, "train.steps=5", "checkpoint.every=0"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_sigterm_checkpoints_the_finished_step_and_stops(tmp_path, cache_dir):
    """A preempted job (SIGTERM) loses nothing: it saves after the current step and exits 0."""
    import signal
    import subprocess
    import sys

    args = [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}",
            "train.steps=1000", "checkpoint.every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "wlbtrain.cli", "train", "recipes/debug.yaml",
                             *args], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.split()[:2] == ["step", "2/1000"]:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "checkpointing after this step" in rest
    last = read_metrics(tmp_path)[-1]["step"]
    assert ckpt.latest_checkpoint(tmp_path).name == f"step-{last}"


def test_a_fresh_run_sets_older_checkpoints_aside(tmp_path, cache_dir):
    """resume=none into an out_dir with checkpoints: the new run's own checkpoints are kept and
    resumed next time; the old ones are moved aside, not deleted."""
    train(tiny(tmp_path, cache_dir, "train.steps=6", "checkpoint.every=3"))
    train(tiny(tmp_path, cache_dir, "train.steps=2", "checkpoint.every=1",
               "checkpoint.resume=none"))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    aside = list((tmp_path / "checkpoints").glob("abandoned-*/step-*"))
    assert sorted(p.name for p in aside) == ["step-3", "step-6"]
    assert ckpt.resume_point(tiny(tmp_path, cache_dir), 2).name == "step-2"


def test_log_every_thins_the_console_not_the_metrics(tmp_path, cache_dir, capsys):
    train(tiny(tmp_path, cache_dir, "train.steps=4", "train.log_every=3"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(printed) == 2  # step 3 and the last step


def test_rank_prints_layout_and_a_failure_names_its_coordinates(tmp_path, cache_dir, monkeypatch,
                                                                capsys):
    def broken(self, plan, *rest):
        raise RuntimeError("injected")

    monkeypatch.setattr(Trainer, "train_step", broken)
    with pytest.raises(RuntimeError, match="injected"):
        train(tiny(tmp_path, cache_dir, "train.steps=2", "checkpoint.resume=none"))
    out, err = capsys.readouterr()
    assert "layout PP(1)-DP(1)-CP(1)-TP(1)-Rank(0)" in out
    assert "PP(0/1)-DP(0/1)-CP(0/1)-TP(0/1)-Rank(0): RuntimeError: injected" in err


@pytest.mark.interpreter
def test_triton_attention_trains_as_the_reference_does(tmp_path, cache_dir, monkeypatch):
    """The trainer's Triton path (tile tables shared by a micro-batch's layers, rows known to be
    covered by segments, so nothing outside them is written) gives the reference's losses and
    weights."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    losses, weights = {}, {}
    for kernel in ("reference", "triton"):
        out = tmp_path / kernel
        train(tiny(out, cache_dir, "data.context=128", "train.steps=3",
                   f"train.attention={kernel}", "checkpoint.every=3"))
        losses[kernel] = [row["loss"] for row in read_metrics(out)]
        weights[kernel] = load_file(out / "checkpoints/step-3/model.safetensors")
    assert len(losses["triton"]) == 3
    np.testing.assert_allclose(losses["triton"], losses["reference"], rtol=1e-4)
    # Adam's first steps move every weight by about the learning rate whatever the gradient's
    # size, so the weights tell a wrong gradient apart where three losses may not
    for name, want in weights["reference"].items():
        torch.testing.assert_close(weights["triton"][name], want, rtol=0, atol=1e-4, msg=name)
