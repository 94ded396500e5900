"""scripts/bench_train.py's summaries: the timed steps, and where the GPU waited."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from torch.autograd import DeviceType

_SPEC = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_train)


def _event(name, start, end, device):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=device, cpu_parent=None)


def test_idle_report_finds_the_gap_and_the_host_work_beside_it():
    gpu, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [_event("step", 0, 1000, cpu), _event("optimizer", 310, 590, cpu),
              _event("matmul", 10, 100, gpu), _event("norm", 105, 300, gpu),
              _event("attention", 250, 280, gpu),  # overlaps the one before: not a gap
              _event("adam", 600, 900, gpu)]
    report = bench_train.idle_report(events).splitlines()
    # busy 90 + 195 + 300 of the 900 us from the step's start to the last kernel's end
    assert report[0].startswith("GPU busy 0.6 of 0.9 ms profiled (65.0%); idle 0.3 ms in 3 gaps")
    # the step itself overlaps every gap (10 + 5 + 300 us), the optimizer 280 us of the last
    assert report[2].split() == ["0.32", "ms", "step"]
    assert report[3].split() == ["0.28", "ms", "optimizer"]
    assert report[-3].split()[0] == "0.300" and report[-3].endswith("adam")


def test_summary_gives_medians_and_totals_over_the_timed_steps():
    def row(tokens, seconds, mfu):
        return {"tokens": tokens, "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                "mfu": mfu, "memory_gib": 1.0, "loss": 1.0}

    warm = [row(100, 10.0, 0.01)]  # compiling: outside both
    timed = [row(100, 1.0, 0.30), row(100, 1.0, 0.30), row(100, 2.0, 0.15), row(50, 1.0, 0.20)]
    summary = bench_train.summarise(warm + timed, warmup=1)
    assert summary["tokens_per_s"] == 75 and summary["mfu"] == 0.25  # medians of 4 steps
    # 350 tokens in 5 s; FLOPs 0.3 + 0.3 + 0.3 + 0.2 peak-seconds over 5 s
    assert summary["tokens_per_s_total"] == 70
    assert abs(summary["mfu_total"] - 0.22) < 1e-12
    assert bench_train.summarise(warm + [{**timed[0], "mfu": None}], 1)["mfu_total"] is None
