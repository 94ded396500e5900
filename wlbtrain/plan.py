"""``wlbtrain plan``: run the packers on a recipe's documents and report their balance.

No model, no process group: the recipe's model shape and layout only feed the cost model. For
each packer it runs K global batches of a seeded document stream and reports the imbalance of
the micro-batches' estimated cost (max / mean per step: mean, p90, max), the planning time per
global batch and the token delay in steps (token-weighted mean, max). With ``parallel.cp > 1`` it
also shards every micro-batch over the CP ranks with each sharding and reports the balance of
the ranks' estimated attention cost (max / min) and what adaptive and hybrid chose. ``--json`` prints one
packer's full plan in the structure DESIGN.md fixes; ``--plot`` draws the micro-batch costs of
plain vs wlb packing. ``--sweep-delay`` runs wlb with ``auto`` thresholds over a range of
delay budgets instead and prints (or plots) imbalance against the average token delay.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from wlbtrain.config import EXIT_BAD_INPUT
from wlbtrain.data.cost import CostModel, imbalance
from wlbtrain.data.packing import PACKINGS, balance_ranks, make_packer, max_piece_for
from wlbtrain.data.stream import DocumentStream
from wlbtrain.parallel.sharding import (SHARDINGS, ShardCostEstimator, compare_shardings,
                                        cost_balance, has_cp_profile)

DEFAULT_STEPS = 100
# Without a recipe the cost model uses the paper's 7B-128K layout (Llama-2-7B shape, TP8 CP2 PP4,
# 4 micro-batches per global batch); a recipe or overrides replace any of it.
DEFAULT_LAYOUT = ["model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=32",
                  "model.ffn_dim=11008", "model.vocab_size=32000", "data.context=131072",
                  "data.packing=wlb", "parallel.tp=8", "parallel.cp=2", "parallel.pp=4",
                  "train.micro_batches=4"]


class PlanError(ValueError):
    """Bad input to ``wlbtrain plan``; its text is the one-line message."""


# ------------------------------------------------------------------------------- simulation

@dataclass
class StepResult:
    plan: list  # micro-batches of (doc_id, start, length)
    costs: list[float]  # estimated seconds per micro-batch
    pack_ms: float
    delays: list[list[int]]  # steps each piece waited, in the plan's shape

    @property
    def imbalance(self) -> float:
        return imbalance(self.costs)

    def rank_imbalance(self, ranks: int) -> float:
        """Over the DP ranks' summed micro-batch costs (rank r trains a contiguous slice)."""
        return imbalance(np.asarray(self.costs).reshape(ranks, -1).sum(axis=1))


@dataclass
class PackerRun:
    name: str
    steps: list[StepResult] = field(default_factory=list)
    pending: list = field(default_factory=list)

    def summary(self, n_micro_batches: int, context: int, ranks: int = 1) -> dict:
        return summarize(self.steps, n_micro_batches, context, ranks)


def simulate(packer, stream, steps: int, cost_model: CostModel, name: str = "") -> PackerRun:
    """Plan up to ``steps`` global batches (fewer if a non-looping stream runs out)."""
    run = PackerRun(name or packer.name)
    for _ in range(steps):
        start = time.perf_counter()
        plan = packer.pack(stream)
        pack_ms = (time.perf_counter() - start) * 1e3
        if plan is None:
            break
        costs = [cost_model.micro_batch_cost(p[2] for p in mb) for mb in plan]
        run.steps.append(StepResult(plan, costs, pack_ms, packer.last_delays))
    run.pending = packer.pending()
    return run


def summarize(steps: list[StepResult], n_micro_batches: int, context: int, ranks: int = 1) -> dict:
    """Balance, planning time and token delay over the steps of one run; with ranks > 1 also the
    balance of the DP ranks' summed work, what a step without a pipeline waits for."""
    if not steps:
        return {"steps": 0}
    imb = np.array([s.imbalance for s in steps])
    rank_imb = np.array([s.rank_imbalance(ranks) for s in steps])
    delays = np.array([d for s in steps for mb in s.delays for d in mb], dtype=np.float64)
    weights = np.array([p[2] for s in steps for mb in s.plan for p in mb], dtype=np.float64)
    ms = np.array([s.pack_ms for s in steps])
    tokens = weights.sum()
    busiest = sum(max(s.costs) for s in steps)
    return {
        "imbalance_mean": round(float(imb.mean()), 4),
        "imbalance_p90": round(float(np.percentile(imb, 90)), 4),
        "imbalance_max": round(float(imb.max()), 4),
        "rank_imbalance_mean": round(float(rank_imb.mean()), 4),
        "pack_ms_median": round(float(np.median(ms)), 3),
        "pack_ms_mean": round(float(ms.mean()), 3),
        "pack_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "token_delay_mean": round(float(np.average(delays, weights=weights)), 3) if tokens else 0.0,
        "token_delay_max": int(delays.max()) if delays.size else 0,
        "steps": len(steps),
        # tokens trained per step over what fixed-length packing trains (n × context)
        "fill": round(float(tokens / (len(steps) * n_micro_batches * context)), 4),
        # estimated seconds per million tokens: the pipeline waits for the busiest micro-batch
        "s_per_mtoken": round(float(busiest / tokens * 1e6), 6) if tokens else 0.0,
    }


# ---------------------------------------------------------------------- context parallelism

@dataclass
class CPStats:
    """One CP sharding over a run's micro-batches."""

    balance: list[float] = field(default_factory=list)  # max / min rank attention cost
    slowest_s: list[float] = field(default_factory=list)  # the slowest rank's attention
    applied: dict[str, int] = field(default_factory=dict)  # what adaptive / hybrid chose, counted

    def add(self, applied: str, rank_costs) -> None:
        self.balance.append(cost_balance(rank_costs))
        self.slowest_s.append(float(np.max(rank_costs)))
        self.applied[applied] = self.applied.get(applied, 0) + 1


def cp_micro_batches(run: PackerRun, cfg, estimator: ShardCostEstimator,
                     shardings=SHARDINGS) -> dict[str, CPStats]:
    """Shard every micro-batch of the run over the CP ranks with each sharding."""
    par = cfg.parallel
    stats = {s: CPStats() for s in shardings}
    for step in run.steps:
        for mb in step.plan:
            results = compare_shardings([p[2] for p in mb], par.cp, 2 * par.cp * par.tp,
                                        estimator, shardings)
            for s, (applied, costs) in results.items():
                stats[s].add(applied, costs)
    return stats


def _ratio(value: float) -> float | None:
    return round(value, 4) if np.isfinite(value) else None  # JSON has no infinity


def _add_cp_json(plan: dict, run: PackerRun, cfg, estimator: ShardCostEstimator) -> None:
    """Each micro-batch's applied sharding and rank balance under parallel.cp_sharding."""
    par, sharding = cfg.parallel, cfg.parallel.cp_sharding
    balances = []
    for step_json, step in zip(plan["steps"], run.steps):
        for mb_json, mb in zip(step_json["micro_batches"], step.plan):
            ((applied, costs),) = compare_shardings([p[2] for p in mb], par.cp, 2 * par.cp * par.tp,
                                                    estimator, (sharding,)).values()
            balances.append(cost_balance(costs))
            mb_json["cp_sharding"] = applied
            mb_json["cp_balance"] = _ratio(balances[-1])
    if balances:
        plan["summary"].update(cp_sharding=sharding,
                               cp_balance_mean=_ratio(float(np.mean(balances))),
                               cp_balance_max=_ratio(float(np.max(balances))))


def format_cp_table(runs: list[PackerRun], cfg, estimator: ShardCostEstimator) -> str:
    par = cfg.parallel
    profile = cfg.data.cost_profile if cfg.data.cost_profile and has_cp_profile(
        cfg.data.cost_profile) else None
    lines = [f"context parallelism: cp {par.cp} × tp {par.tp}; one rank's attention of one layer, "
             f"forward+backward, {estimator.heads} heads × {estimator.head_dim}, estimated "
             + (f"from {profile}" if profile else
                f"from FLOPs at {estimator.flops_per_s / 1e12:.0f} TFLOP/s per tile"),
             f"{'packing':<20} {'sharding':<13} {'balance mean':>12} {'max':>6}  "
             f"{'slowest rank ms':>15}  applied"]
    for run in runs:
        for name, st in cp_micro_batches(run, cfg, estimator).items():
            if not st.balance:
                continue
            applied = ", ".join(f"{k} {v}" for k, v in sorted(st.applied.items())) \
                if name in ("adaptive", "hybrid") else ""
            lines.append(f"{run.name:<20} {name:<13} {np.mean(st.balance):>12.3f} "
                         f"{np.max(st.balance):>6.3f}  {np.mean(st.slowest_s) * 1e3:>15.3f}  "
                         f"{applied}".rstrip())
    lines.append(f"balance = max / min of the CP ranks' estimated attention cost per micro-batch; "
                 f"slowest rank ms = mean over micro-batches (a CP step waits for its slowest "
                 f"rank); applied = micro-batches per sharding taken; the recipe applies "
                 f"{par.cp_sharding}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- inputs

def load_lengths(path: str) -> np.ndarray:
    """Document lengths from a JSON list, one integer a line, or a .npy array."""
    if not os.path.isfile(path):
        raise PlanError(f"--lengths {path}: file not found")
    try:
        if path.endswith(".npy"):
            values = np.load(path, allow_pickle=False)
        elif path.endswith(".json"):
            with open(path) as f:
                values = np.array(json.load(f))
        else:
            with open(path) as f:
                values = np.array(f.read().split(), dtype=np.float64)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise PlanError(f"--lengths {path}: expected a JSON list, one integer a line, or .npy "
                        f"({err})") from None
    return _check_lengths(values, path)


def _check_lengths(values: np.ndarray, path: str) -> np.ndarray:
    if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iuf":
        raise PlanError(f"--lengths {path}: expected a non-empty flat list of integers")
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise PlanError(f"--lengths {path}: lengths must be whole numbers")
    lengths = values.astype(np.int64)
    if (lengths < 0).any() or not (lengths > 0).any():
        raise PlanError(f"--lengths {path}: lengths must be >= 0, and at least one positive")
    return lengths


def _overrides(args) -> list[str]:
    """CLI flags as config overrides, so the config validates them like recipe keys."""
    items = list(args.overrides or [])
    if args.recipe is not None and "=" in args.recipe and not os.path.exists(args.recipe):
        items.insert(0, args.recipe)  # `plan key=value` without a recipe
        args.recipe = None
    flags = []
    if args.context is not None:
        flags.append(f"data.context={args.context}")
        if not any(o.startswith("data.max_tokens_per_micro_batch=") for o in items):
            flags.append(f"data.max_tokens_per_micro_batch={args.context}")
    if args.micro_batches is not None:
        flags.append(f"train.micro_batches={args.micro_batches}")
    if args.packing is not None:
        if args.packing not in PACKINGS:
            raise PlanError(f"--packing {args.packing}: expected one of {', '.join(PACKINGS)}")
        flags.append(f"data.packing={args.packing}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    base = DEFAULT_LAYOUT if args.recipe is None else []
    return base + items + flags


def _config(args):
    from wlbtrain.config import load_config
    overrides = _overrides(args)  # may move a `key=value` out of the recipe slot
    return load_config(args.recipe, overrides)


def _doc_lengths(args, cfg) -> np.ndarray:
    if args.lengths is not None:
        return load_lengths(args.lengths)
    from wlbtrain.data.store import open_source
    return np.asarray(open_source(cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir).doc_lengths)


def cost_model_for(cfg) -> CostModel:
    if cfg.data.cost_profile:
        return CostModel.from_profile(cfg.data.cost_profile)
    return CostModel.from_model(cfg.model, cfg.parallel)


# ---------------------------------------------------------------------------------- running

@dataclass
class Variant:
    label: str
    packing: str
    options: dict


def variants(cfg, packing_given: bool, json_mode: bool) -> list[Variant]:
    """The recipe's packer for --json or --packing; every packer for the table."""
    d = cfg.data
    own = {"outlier_thresholds": d.outlier_thresholds, "max_token_delay": d.max_token_delay,
           "fixed_window": d.fixed_window, "refine": d.refine,
           "ranks": balance_ranks(d.balance, cfg.parallel.data_parallel(None), cfg.parallel.pp)}
    if json_mode or packing_given:
        label = f"fixed (window {d.fixed_window})" if d.packing == "fixed" else d.packing
        return [Variant(label, d.packing, own)]
    return [Variant("plain", "plain", own),
            Variant(f"fixed (window {d.fixed_window})", "fixed", own),
            Variant("wlb", "wlb", {**own, "refine": False}),
            Variant("wlb + refine", "wlb", {**own, "refine": True})]


def run_variant(v: Variant, cfg, lengths: np.ndarray, steps: int, cost_model: CostModel) -> PackerRun:
    d = cfg.data
    n_micro = cfg.parallel.data_parallel(None) * cfg.train.micro_batches
    stream = DocumentStream(lengths, cfg.train.seed,
                            max_piece_for(v.packing, d.context, d.max_tokens_per_micro_batch),
                            loop=False)
    packer = make_packer(v.packing, context=d.context,
                         max_tokens_per_micro_batch=d.max_tokens_per_micro_batch,
                         n_micro_batches=n_micro, cost_model=cost_model, **v.options)
    return simulate(packer, stream, steps, cost_model, name=v.label)


def to_json(run: PackerRun, cfg, cp_estimator: ShardCostEstimator | None = None) -> dict:
    """DESIGN.md's plan JSON; with parallel.cp > 1 every micro-batch also carries its applied
    ``cp_sharding`` and ``cp_balance``, and the summary their mean and max."""
    n_micro = cfg.parallel.data_parallel(None) * cfg.train.micro_batches
    plan = {"packing": cfg.data.packing, "context": cfg.data.context, "micro_batches": n_micro,
            "steps": [{"step": i, "pack_ms": round(s.pack_ms, 3),
                       "micro_batches": [{"docs": [list(p) for p in mb]} for mb in s.plan]}
                      for i, s in enumerate(run.steps)],
            "pending": [list(p) for p in run.pending],
            "summary": run.summary(n_micro, cfg.data.context, cfg.parallel.data_parallel(None))}
    if cfg.parallel.cp > 1:
        _add_cp_json(plan, run, cfg, cp_estimator or ShardCostEstimator.for_config(cfg))
    return plan


def format_table(runs: list[PackerRun], cfg, cost_model: CostModel, source: str) -> str:
    dp = cfg.parallel.data_parallel(None)
    d, n_micro = cfg.data, dp * cfg.train.micro_batches
    cross = cost_model.crossover_length()
    lines = [f"{source}: {n_micro} micro-batches per step (dp {cfg.parallel.data_parallel(None)} × "
             f"{cfg.train.micro_batches}), context {d.context}, wlb up to "
             f"{d.max_tokens_per_micro_batch} tokens; attention costs as much as the rest at "
             f"{cross / 1024:.1f}K-token documents",
             f"{'packing':<20} {'steps':>5}  {'imbalance mean':>14} {'p90':>6} {'max':>6}  "
             f"{'pack ms med':>11} {'mean':>6}  {'delay mean':>10} {'max':>4}  {'tokens/step':>11}"
             + (f"  {'rank imbalance':>14}" if dp > 1 else "")]
    for run in runs:
        s = run.summary(n_micro, d.context, dp)
        if not s["steps"]:
            lines.append(f"{run.name:<20} {0:>5}  (no documents)")
            continue
        lines.append(f"{run.name:<20} {s['steps']:>5}  {s['imbalance_mean']:>14.3f} "
                     f"{s['imbalance_p90']:>6.3f} {s['imbalance_max']:>6.3f}  "
                     f"{s['pack_ms_median']:>11.2f} {s['pack_ms_mean']:>6.2f}  "
                     f"{s['token_delay_mean']:>10.2f} "
                     f"{s['token_delay_max']:>4}  {s['fill'] * 100:>10.1f}%"
                     + (f"  {s['rank_imbalance_mean']:>14.3f}" if dp > 1 else ""))
    lines.append("imbalance = max / mean estimated cost of a step's micro-batches; pack ms per "
                 "global batch; delay = steps a token waited (mean token-weighted); tokens/step "
                 "relative to n × context"
                 + ("; rank imbalance = the same over the DP ranks' summed micro-batches, what "
                    "a step without a pipeline waits for" if dp > 1 else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------- delay frontier

DEFAULT_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def sweep_delay(cfg, lengths: np.ndarray, steps: int, cost_model: CostModel,
                budgets=DEFAULT_SWEEP) -> list[dict]:
    """The wlb packer (the recipe's refine and balance) with ``auto`` thresholds at each delay
    budget: one point of the balance / delay frontier per budget."""
    own = variants(cfg, True, True)[0].options
    points = []
    for budget in budgets:
        options = {**own, "outlier_thresholds": "auto", "max_token_delay": budget}
        run = run_variant(Variant(f"budget {budget}", "wlb", options), cfg, lengths, steps,
                          cost_model)
        s = run.summary(cfg.parallel.data_parallel(None) * cfg.train.micro_batches,
                        cfg.data.context, cfg.parallel.data_parallel(None))
        points.append({"max_token_delay": budget, **s})
    return points


def format_sweep(points: list[dict], source: str) -> str:
    lines = [f"{source}: wlb with auto outlier thresholds, imbalance vs average token delay",
             f"{'max_token_delay':>15}  {'imbalance mean':>14} {'p90':>6}  {'delay mean':>10} "
             f"{'max':>4}  {'pack ms p99':>11}"]
    for p in points:
        if not p["steps"]:
            continue
        lines.append(f"{p['max_token_delay']:>15.2f}  {p['imbalance_mean']:>14.3f} "
                     f"{p['imbalance_p90']:>6.3f}  {p['token_delay_mean']:>10.2f} "
                     f"{p['token_delay_max']:>4}  {p['pack_ms_p99']:>11.2f}")
    lines.append("the budget bounds the tuner's estimate and replay of a recent window; the delay "
                 "column is what the plan made (mean token-weighted, in steps)")
    return "\n".join(lines)


def plot_sweep(path: str, points: list[dict], source: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [p for p in points if p["steps"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p["token_delay_mean"] for p in points], [p["imbalance_mean"] for p in points], "o-")
    for p in points:
        ax.annotate(f"{p['max_token_delay']:g}", (p["token_delay_mean"], p["imbalance_mean"]),
                    fontsize=8, textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("average token delay (steps)")
    ax.set_ylabel("mean imbalance (max / mean cost)")
    ax.set_title(f"{source}: wlb, auto thresholds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(path: str, runs: dict[str, PackerRun]) -> None:
    """Per-micro-batch estimated cost of each step, one panel per packer, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        for i, step in enumerate(run.steps):
            ms = np.array(step.costs) * 1e3
            ax.scatter(np.full(len(ms), i), ms, s=6, color="tab:blue", alpha=0.6)
        ax.plot([max(s.costs) * 1e3 for s in run.steps], color="tab:red", lw=1, label="max (step time)")
        ax.plot([np.mean(s.costs) * 1e3 for s in run.steps], color="black", lw=1, label="mean")
        imb = np.mean([s.imbalance for s in run.steps]) if run.steps else 1.0
        ax.set_title(f"{name}: mean imbalance {imb:.3f}")
        ax.set_xlabel("step")
        ax.legend(loc="upper right", fontsize=8)
    axes[0][0].set_ylabel("estimated micro-batch cost (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _check_plot_available(path: str | None) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlanError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PlanError(f"--plot {path}: folder {folder} does not exist")


# -------------------------------------------------------------------------------------- CLI

class _IntermixedParser(argparse.ArgumentParser):
    """Lets options and positionals mix (`plan RECIPE --steps 5 key=value`): plain argparse
    takes the positionals only from the first run of them and rejects the rest."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = _IntermixedParser
    parser.add_argument("recipe", nargs="?", help="YAML recipe (default: the 7B-128K layout)")
    parser.add_argument("--lengths", help="document lengths instead of the recipe's documents: "
                        "a JSON list, one integer a line, or .npy")
    parser.add_argument("--context", type=int, help="micro-batch length (and wlb's limit)")
    parser.add_argument("--micro-batches", type=int, dest="micro_batches",
                        help="micro-batches per DP rank and step (train.micro_batches)")
    parser.add_argument("--packing", help=f"one of {', '.join(PACKINGS)} (default: all in the "
                        "table; the recipe's with --json)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"global batches to plan (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, help="stream seed (train.seed)")
    parser.add_argument("--json", action="store_true", help="print one packer's plan as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="plot micro-batch costs, plain vs wlb")
    parser.add_argument("--sweep-delay", nargs="?", const=",".join(map(str, DEFAULT_SWEEP)),
                        dest="sweep_delay", metavar="B1,B2,...",
                        help="print wlb's imbalance vs average token delay over delay budgets "
                        f"(data.max_token_delay; default {','.join(map(str, DEFAULT_SWEEP))}); "
                        "--plot draws the frontier")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def run(args) -> int:
    from wlbtrain.config import ConfigError
    from wlbtrain.data.store import StoreError
    try:
        return _run(args)
    except (PlanError, ConfigError, StoreError) as err:
        print(f"wlbtrain plan: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _inputs(args):
    """The recipe with the command line's overrides, its document lengths and cost model."""
    cfg = _config(args)
    lengths = _doc_lengths(args, cfg)
    try:
        return cfg, lengths, cost_model_for(cfg)
    except ValueError as err:
        raise PlanError(f"data.cost_profile: {err}") from None


def _run(args) -> int:
    if args.steps is None or args.steps < 1:
        raise PlanError(f"--steps {args.steps}: expected a positive integer")
    if getattr(args, "sweep_delay", None) is not None:
        return _run_sweep(args)
    _check_plot_available(args.plot)
    cfg, lengths, cost_model = _inputs(args)
    chosen = variants(cfg, args.packing is not None, args.json)
    runs = [run_variant(v, cfg, lengths, args.steps, cost_model) for v in chosen]
    if args.plot:
        plot(args.plot, _plot_runs(runs, cfg, lengths, args.steps, cost_model))
    cp_estimator = _cp_estimator(cfg) if cfg.parallel.cp > 1 else None
    if args.json:
        json.dump(to_json(runs[0], cfg, cp_estimator), sys.stdout)
        sys.stdout.write("\n")
    else:
        source = args.lengths or args.recipe or "default 7B-128K layout"
        print(format_table(runs, cfg, cost_model, source))
        if cp_estimator is not None:
            print(format_cp_table(runs, cfg, cp_estimator))
    return 0


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(b) for b in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or any(not np.isfinite(b) or b < 0 for b in budgets):
        raise PlanError(f"--sweep-delay {text}: expected budgets in steps, e.g. 0,0.5,1")
    return budgets


def _run_sweep(args) -> int:
    """The frontier table; --plot without matplotlib still prints it and says what to install."""
    budgets = _budgets(args.sweep_delay)
    cfg, lengths, cost_model = _inputs(args)
    points = sweep_delay(cfg, lengths, args.steps, cost_model, budgets)
    source = args.lengths or args.recipe or "default 7B-128K layout"
    if args.json:
        json.dump({"sweep_delay": points}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_sweep(points, source))
    if args.plot:
        try:
            _check_plot_available(args.plot)
        except PlanError as err:
            print(f"wlbtrain plan: {err}; the table above is the frontier", file=sys.stderr)
            return 0
        plot_sweep(args.plot, points, source)
    return 0


def _cp_estimator(cfg) -> ShardCostEstimator:
    try:
        return ShardCostEstimator.for_config(cfg)
    except ValueError as err:
        raise PlanError(f"data.cost_profile: {err}") from None


def _plot_runs(runs, cfg, lengths, steps, cost_model) -> dict[str, PackerRun]:
    """plain and wlb as configured: reuse what ran, run what is missing."""
    by_name = {r.name: r for r in runs}
    own = variants(cfg, True, True)[0].options
    wanted = {"plain": Variant("plain", "plain", own),
              "wlb" + (" + refine" if cfg.data.refine else ""): Variant("wlb", "wlb", own)}
    out = {}
    for label, v in wanted.items():
        out[label] = by_name.get(label) or run_variant(v, cfg, lengths, steps, cost_model)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wlbtrain plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
