"""Train a recipe for a few steps and summarise its throughput from metrics.jsonl.

    python scripts/bench_train.py recipes/debug.yaml [section.key=value ...] [--warmup 5]

Runs `wlbtrain train` in this process (single device) into a fresh out_dir, skips the first
`--warmup` steps (compilation, caches) and prints one markdown row: median tokens/s, step time,
MFU, memory, first and last loss.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wlbtrain.config import load_config
from wlbtrain.train import train


def summarise(rows: list[dict], warmup: int) -> dict:
    timed = rows[warmup:] or rows
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    return {"steps": len(rows), "tokens_per_step": statistics.median(r["tokens"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None,
            "memory_gib": max(r["memory_gib"] for r in rows),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.recipe, [*args.overrides, f"train.out_dir={out}",
                                        "checkpoint.resume=none", "checkpoint.every=0"])
        start = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    summary = {"recipe": args.recipe, "overrides": args.overrides, "wall_s": wall,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               **summarise(rows, args.warmup)}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    mfu = "n/a" if summary["mfu"] is None else f"{100 * summary['mfu']:.1f}%"
    print("| recipe | device | tokens/step | tokens/s | step s | MFU | peak mem GiB | loss first → last |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {args.recipe} {' '.join(args.overrides)} | {summary['device']} | "
          f"{summary['tokens_per_step']:.0f} | {summary['tokens_per_s']:,.0f} | "
          f"{summary['step_time_s']:.3f} | {mfu} | {summary['memory_gib']:.2f} | "
          f"{summary['loss_first']:.3f} → {summary['loss_last']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
