"""Train a recipe for a few steps and summarise its throughput from metrics.jsonl.

    python scripts/bench_train.py recipes/debug.yaml [section.key=value ...] [--warmup 5]
    torchrun --nproc-per-node 2 scripts/bench_train.py recipes/gpu2.yaml \
        --lengths ../shared/data/doclens/wlbllm_fig3.json --docs 4000

Runs `wlbtrain train` in this process (or in torchrun's process group) into a fresh out_dir,
skips the first `--warmup` steps (compilation, caches) and prints one markdown row on rank 0:
median tokens/s, step time and MFU, tokens/s and MFU over all timed steps, memory, first and
last loss. With `--lengths`, the documents are `--docs` lengths drawn (seeded) from that file,
filled with random tokens: a token store with a real length distribution, for throughput and
balance (its loss means nothing).
"""

import argparse
import bisect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wlbtrain.config import load_config
from wlbtrain.data.store import write_store
from wlbtrain.metrics import device_name
from wlbtrain.plan import load_lengths
from wlbtrain.train import train


def summarise(rows: list[dict], warmup: int) -> dict:
    """Medians over the steps after ``warmup`` (a typical step), and totals over the same steps
    (``*_total``: all their tokens or FLOPs over all their time, what a run's throughput is; it
    counts the slow steps a median skips, and with wlb packing the steps whose documents run
    less efficiently)."""
    timed = rows[warmup:] or rows
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    time_s = sum(r["step_time_s"] for r in timed)
    return {"steps": len(rows), "tokens_per_step": statistics.median(r["tokens"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None,
            "tokens_per_s_total": sum(r["tokens"] for r in timed) / time_s,
            # each step's FLOPs are its MFU × peak × time: the total is the time-weighted mean
            "mfu_total": (sum(r["mfu"] * r["step_time_s"] for r in timed) / time_s
                          if len(mfu) == len(timed) else None),
            "memory_gib": max(r["memory_gib"] for r in rows),
            # host time on the step's critical path (waiting for its input), as a share of it
            "input_wait_share": statistics.median(r.get("input_wait_s", 0) / r["step_time_s"]
                                                  for r in timed),
            "input_build_s": statistics.median(r.get("input_build_s", 0) for r in timed),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def synthetic_store(args, path: Path) -> Path:
    """A store of ``args.docs`` random-token documents with lengths drawn from ``args.lengths``;
    every rank draws the same, rank 0 writes it."""
    rng = np.random.default_rng(0)
    lengths = rng.choice(load_lengths(args.lengths), size=args.docs)
    if int(os.environ.get("RANK", "0")) == 0:
        docs = (rng.integers(0, 256, size=n, dtype=np.uint8) for n in lengths)
        write_store(path, docs, vocab_size=256, tokenizer="random")
    if "WORLD_SIZE" in os.environ:  # the others wait for it without a process group yet
        while not (path / "header.json").exists():
            time.sleep(0.5)
    return path


def profile_step(step: int, trace: str | None = None) -> None:
    """Run step ``step`` under torch.profiler and print its 30 costliest operators and where
    the GPU waited; ``trace``: also write the step's Chrome trace there."""
    from torch.profiler import ProfilerActivity, profile

    from wlbtrain.train import Trainer

    original = Trainer.train_step

    def profiled(self, *args):
        if self.step != step:
            return original(self, *args)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                               if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            result = original(self, *args)
            if torch.cuda.is_available():  # the trainer reads a step later: wait for it here
                torch.cuda.synchronize()
        if self.rank == 0:
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
            if torch.cuda.is_available():
                print(idle_report(prof.events()))
            if trace:
                prof.export_chrome_trace(trace)
        return result

    Trainer.train_step = profiled


def idle_report(events, top: int = 12) -> str:
    """Where the GPU waited in a profiled step: its busy share of the profiled span, and the
    longest gaps between kernels with the host operators running during each (the outermost
    operator of each thread, so a gap reads as "the host was in the optimizer step")."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == DeviceType.CUDA)
    host = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    if not kernels:
        return "no GPU activity"
    span_start = min([kernels[0][0]] + [e.time_range.start for e in host])
    span_end = max(end for _, end, _ in kernels)
    gaps, busy, reach = [], 0.0, span_start
    for start, end, name in kernels:
        if start > reach:
            gaps.append((start - reach, reach, start, name))
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = span_end - span_start
    idle = sum(g[0] for g in gaps)
    small = sum(g[0] for g in gaps if g[0] < 20)
    lines = [f"GPU busy {busy / 1e3:.1f} of {span / 1e3:.1f} ms profiled "
             f"({100 * busy / span:.1f}%); idle {idle / 1e3:.1f} ms in {len(gaps)} gaps, "
             f"{small / 1e3:.1f} ms of them under 20 us"]
    by_op: dict[str, float] = {}
    gap_ends = [end for _, _, end, _ in gaps]  # ascending: the gaps are disjoint, in order
    for e in host:  # each operator meets only the gaps inside its span: found by bisection
        first, last = e.time_range.start, e.time_range.end
        i = bisect.bisect_right(gap_ends, first)
        while i < len(gaps) and gaps[i][1] < last:
            overlap = min(last, gaps[i][2]) - max(first, gaps[i][1])
            by_op[e.name] = by_op.get(e.name, 0.0) + overlap
            i += 1
    lines.append("idle time by the host operator running (outermost; threads overlap):")
    for name, us in sorted(by_op.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"  {us / 1e3:8.2f} ms  {name[:90]}")
    lines.append("longest gaps (ms, kernel that ended the wait):")
    for length, start, _, name in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {length / 1e3:8.3f} at +{(start - span_start) / 1e3:.1f} ms  {name[:90]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the summary here")
    parser.add_argument("--out-dir", default="runs/bench", help="run directory (replaced)")
    parser.add_argument("--lengths", help="document lengths (JSON list, one a line, or .npy)")
    parser.add_argument("--docs", type=int, default=4000, help="documents drawn from --lengths")
    parser.add_argument("--profile", type=int, metavar="STEP",
                        help="profile this step: top kernels by device time on rank 0")
    parser.add_argument("--trace", help="with --profile: write that step's Chrome trace here")
    args = parser.parse_args()
    if args.profile:
        profile_step(args.profile, args.trace)
    out = Path(args.out_dir)
    overrides = [*args.overrides, f"train.out_dir={out}", "checkpoint.resume=none",
                 "checkpoint.every=0"]
    if args.lengths:
        overrides.append(f"data.source={synthetic_store(args, out.with_name(out.name + '-store'))}")
    cfg = load_config(args.recipe, overrides)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"recipe": args.recipe, "overrides": args.overrides, "wall_s": wall,
               "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
               **summarise(rows, args.warmup)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    mfu, mfu_total = ("n/a" if summary[k] is None else f"{100 * summary[k]:.1f}%"
                      for k in ("mfu", "mfu_total"))
    print("| recipe | device | tokens/step | tokens/s | step s | MFU | tokens/s, MFU over all "
          "timed steps | peak mem GiB | input wait % of step | input build ms | "
          "loss first → last | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.recipe} {' '.join(args.overrides)} | {summary['device']} | "
          f"{summary['tokens_per_step']:.0f} | {summary['tokens_per_s']:,.0f} | "
          f"{summary['step_time_s']:.3f} | {mfu} | "
          f"{summary['tokens_per_s_total']:,.0f}, {mfu_total} | {summary['memory_gib']:.2f} | "
          f"{100 * summary['input_wait_share']:.2f}% | {1e3 * summary['input_build_s']:.1f} | "
          f"{summary['loss_first']:.3f} → {summary['loss_last']:.3f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
