"""Per-step metrics: one console line, one ``metrics.jsonl`` record, TensorBoard if asked for.

MFU counts the model's training FLOPs including document-causal attention
(``models.llama.flops_per_step``) against the devices' dense bf16 peak.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
_PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
                ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("B200", 2250.0),
                ("A10G", 125.0), ("L4", 121.0), ("4090", 165.0)]


def device_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name: what benchmark rows record."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_gib(device: torch.device) -> float:
    """High-water mark of this process's memory: the allocator's on a GPU, RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class DoneMark:
    """The moment the work queued so far on ``device`` completes. On a GPU a timing event
    behind that work; on the CPU the host clock, since the work is done once it is queued.
    Step times are the seconds between two steps' marks: the device's time, not the host's,
    which runs a step ahead."""

    def __init__(self, device: torch.device):
        self.event, self.at = None, None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.at = time.perf_counter()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def seconds_since(self, earlier: DoneMark) -> float:
        """Both marks reached (``wait``) on the same device."""
        if self.event is not None:
            return earlier.event.elapsed_time(self.event) / 1e3
        return self.at - earlier.at


class DeviceScalars:
    """Scalars of a step, copied off the device without waiting for it. The copy is queued
    right behind the work that produced them, so reading them later waits for that work only,
    not for the next step the host has launched meanwhile (``.item()`` would wait for both).
    ``done`` marks when that work completed."""

    def __init__(self, *values: torch.Tensor):
        stacked = torch.stack([v.detach().reshape(()).float() for v in values])
        if stacked.device.type == "cuda":
            self.host = torch.empty(stacked.shape, pin_memory=True)
            self.host.copy_(stacked, non_blocking=True)
        else:
            self.host = stacked
        self.done = DoneMark(stacked.device)

    def read(self) -> list[float]:
        self.done.wait()
        return self.host.tolist()


class MetricsLogger:
    """Writes metrics on rank 0; every other rank's logger does nothing."""

    def __init__(self, out_dir: str | Path, total_steps: int, enabled: bool,
                 resume_step: int = 0, tensorboard: bool = False):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(out_dir) / "metrics.jsonl"
        self.started = time.monotonic()
        self.first_step = resume_step
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            self.writer = _tensorboard_writer(Path(out_dir) / "tensorboard")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the previous run did past its last checkpoint."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict, console: bool = True) -> None:
        """One metrics.jsonl record per step; the console line only when ``console``."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if console:
            print(self._console_line(record), flush=True)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, record["step"])

    def _console_line(self, r: dict) -> str:
        step = r["step"]
        done = step - self.first_step
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        mfu = "  n/a" if r["mfu"] is None else f"{100 * r['mfu']:4.1f}%"
        return (f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} "
                f"({100 * step / max(self.total_steps, 1):3.0f}%)  loss {r['loss']:.4f}  "
                f"lr {r['lr']:.2e}  tok/s {r['tokens_per_s']:,.0f}  mfu {mfu}  "
                f"imbalance {r['imbalance']:.3f}{_measured(r)}  mem {r['memory_gib']:.2f}GiB  "
                f"step {r['step_time_s']:.2f}s  eta {_duration(eta)}")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _measured(r: dict) -> str:
    """With a pipeline, the measured balance beside the cost model's estimate."""
    if "measured_imbalance" not in r:
        return ""
    return f" (measured {r['measured_imbalance']:.3f}, bubble {100 * r['bubble']:.0f}%)"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("train.tensorboard is set but tensorboard is not installed "
                      "(pip install tensorboard); logging to metrics.jsonl only")
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(str(log_dir))
