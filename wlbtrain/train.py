"""The training loop: recipe → packed global batches → loss → optimizer step → metrics and
checkpoints.

One global batch is ``parallel.dp × train.micro_batches`` micro-batches, planned together by the
packer; every rank plans the same global batch (the packer is deterministic) and trains its own
``train.micro_batches`` of them. The loss is the sum of token losses divided by the global batch's
number of target tokens, so variable-length micro-batches weigh every token equally and any
layout reproduces the single-device loss.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import yaml

from . import checkpoint as ckpt
from .config import Config, ConfigError
from .data.batch import build_micro_batch, num_targets, pad_micro_batch
from .data.cost import CostModel, imbalance
from .data.packing import balance_ranks, make_packer, max_piece_for
from .data.prefetch import InputPipeline, StepInput
from .data.store import TokenStore, open_source
from .data.stream import DocumentStream
from .metrics import DeviceScalars, DoneMark, MetricsLogger, device_peak_tflops, peak_memory_gib
from .models.attention import LocalAttention, get_backend, segment_attention
from .models.llama import (apply_activation_checkpointing, apply_compile, build_model,
                           flops_per_step, stage_costs)
from .parallel.dims import ParallelDims, init_process_group, world_size_from_env
from .parallel.fsdp import apply_fsdp
from .parallel.pipeline import (PipelineRunner, build_schedule, pipeline_metrics, split_layers,
                                stage_chunks)
from .parallel.context import make_context_attention
from .parallel.sharding import ShardCostEstimator, cost_balance, plan_shards
from .parallel.tensor import apply_tp, loss_context, sum_partial_grads


@dataclass
class Placement:
    device: torch.device
    compute_dtype: torch.dtype  # dtype of matrix products (autocast); weights stay fp32
    attention: str
    compile: bool  # regional torch.compile of the decoder layers and the loss


def resolve_placement(cfg: Config) -> Placement:
    """Device, compute dtype and attention backend from the recipe's `auto` choices."""
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA GPU is visible")
    on_gpu = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if on_gpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    attention = cfg.train.attention
    if attention == "auto":
        attention = "triton" if on_gpu else "reference"
    if attention == "triton":
        _check_triton(cfg, on_gpu)
    compile_ = on_gpu if cfg.train.compile == "auto" else cfg.train.compile
    return Placement(device, getattr(torch, dtype), attention, compile_)


def _check_triton(cfg: Config, on_gpu: bool) -> None:
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("train.attention: triton needs a CUDA GPU (or TRITON_INTERPRET=1); "
                          "use reference on the CPU")
    from wlbtrain.kernels.attention import SUPPORTED_HEAD_DIMS

    if cfg.model.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(f"model.dim: dim / n_heads = {cfg.model.head_dim} is not a head size "
                          f"the triton kernel supports {SUPPORTED_HEAD_DIMS}; change model.dim or "
                          "model.n_heads, or use train.attention=reference")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr × min_lr_ratio` (1-based)."""
    t = cfg.train
    if step <= t.warmup_steps:
        return t.lr * step / max(t.warmup_steps, 1)
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Norm weights are not decayed: shrinking them only fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # one fused kernel for the whole update on a GPU (plain tensors; sharded ones use foreach)
    params = decay + no_decay
    fused = all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             fused=fused or None)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"signal {signum}: checkpointing after this step, then stopping", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class CollectBetweenSteps:
    """Python's garbage collector on a schedule. Left automatic, a full pass over a compiled
    model's objects (0.1–0.3 s) lands inside whichever step crosses its allocation threshold,
    and under data or pipeline parallelism that rank's pause stalls every rank at the next
    collective: imbalance no packing removes. Here it runs on every rank at the same steps,
    right after the next step is launched, so the device has queued work while it runs.
    Everything is collected after each checkpoint, and every FULL_ROUNDS-th scheduled collection
    when no checkpoint came since (``checkpoint.every: 0``): cyclic garbage that outlived the
    young generations is then freed within a bounded number of steps, not at the run's end."""

    FULL_ROUNDS = 20  # at the default gc_every (50): a full pass per 1,000 steps at most

    def __init__(self, every: int):
        self.every = every  # 0: automatic
        self.rounds = 0  # scheduled collections since the last full one

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        if self.every:
            gc.disable()
        return self

    def after_launch(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.rounds += 1
            if self.rounds >= self.FULL_ROUNDS:
                self._collect_all()
            else:
                gc.collect(1)  # the young generations: milliseconds

    def after_save(self) -> None:
        if self.every:
            self._collect_all()  # while a checkpoint pauses the run anyway

    def _collect_all(self) -> None:
        gc.collect()
        self.rounds = 0

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()


@dataclass
class Preflight:
    """What a run needs that bad input can break, settled before any process group starts."""

    place: Placement
    store: TokenStore
    dims: ParallelDims
    n_micro: int  # micro-batches per global batch: dp × train.micro_batches
    resume_path: Path | None
    cost_model: CostModel


def preflight(cfg: Config) -> Preflight:
    """Check everything that can fail on bad input; raises ConfigError / StoreError."""
    place = resolve_placement(cfg)
    store = open_source(cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir)
    if store.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: expected at least the tokenizer's vocabulary "
                          f"({store.vocab_size}), got {cfg.model.vocab_size}")
    dims = ParallelDims.from_config(cfg, world_size_from_env())
    n_micro = dims.dp * cfg.train.micro_batches
    resume_path = ckpt.resume_point(cfg, n_micro)
    if resume_path is None:  # a resumed run has its weights; init_from only starts a fresh one
        ckpt.check_init_from(cfg)
    return Preflight(place, store, dims, n_micro, resume_path, _cost_model(cfg))


def _cost_model(cfg: Config) -> CostModel:
    if cfg.data.cost_profile is None:
        return CostModel.from_model(cfg.model, cfg.parallel)
    try:
        return CostModel.from_profile(cfg.data.cost_profile)
    except ValueError as err:
        raise ConfigError(f"data.cost_profile: {err}") from None


@dataclass
class HostBatch:
    """One micro-batch of this rank gathered on the host (pinned when it goes to a GPU), made by
    the input pipeline ahead of its step; under context parallelism only this rank's shard."""

    tokens: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor  # the whole micro-batch's segments (unused under CP)
    max_seqlen: int
    cp_plan: object = None  # the context-parallel sharding plan, under CP


@dataclass
class LocalBatch:
    """One micro-batch as this rank feeds it to the model: ``rows`` tokens (padding included;
    under context parallelism this rank's share), split over tensor-parallel ranks inside."""

    tokens: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64, RoPE positions within each segment
    labels: torch.Tensor  # [rows] int64, IGNORE on padding and documents' last tokens
    attention: LocalAttention

    @property
    def rows(self) -> int:
        return int(self.tokens.numel())


@dataclass
class InFlight:
    """A launched step: its metrics known on the host, and its loss and gradient norm still on
    the device."""
    record: dict
    flops: float
    scalars: DeviceScalars  # the loss and the gradient norm


class Trainer:
    """Everything one training run holds; ``run()`` trains to ``train.steps``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        ready = preflight(cfg)
        self.place, self.store, self.dims = ready.place, ready.store, ready.dims
        self.n_micro, self.resume_path = ready.n_micro, ready.resume_path
        self.cost_model = ready.cost_model

        init_process_group(self.place.device)
        self.rank = dist.get_rank()
        self._agree_on_resume_point()
        self.mesh = self.dims.build_mesh(self.place.device.type)
        self.coords = self.dims.coordinates(self.mesh)
        self.dp_rank = self.coords["dp"]
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg)
        self.pipeline = self._build_pipeline()
        self.pipeline_record: dict = {}  # measured stage times of the last step
        # the kernel-aware estimate adaptive and hybrid sharding choose by
        self.cp_estimator = ShardCostEstimator.for_config(cfg)
        self.cp_plans: list = []  # this rank's CP plans of the current step

        self.stream, self.packer = self._build_data()
        self.step = 0
        if self.resume_path is not None:
            self._resume(self.resume_path)
        elif cfg.checkpoint.init_from != "none":
            ckpt.load_hf_weights(cfg.checkpoint.init_from, self.model)
        # the stream and packer state after the last trained step (the input pipeline's
        # packer runs a step ahead)
        self.data_state = self._snapshot_data_state()
        # Checkpoints past the resume point belong to a run this one does not continue; they
        # are set aside (not deleted) at the first save.
        self.set_aside_after = self.step
        peak = cfg.train.peak_tflops or device_peak_tflops(self.place.device)
        self.peak_flops = peak * 1e12 if peak else None

    def _agree_on_resume_point(self) -> None:
        """Every rank must continue from the same checkpoint (out_dir on a shared filesystem)."""
        mine = str(self.resume_path)
        chosen = [mine]
        dist.broadcast_object_list(chosen, src=0)
        if chosen[0] != mine:
            raise RuntimeError(f"rank {self.rank} would resume from {mine} but rank 0 from "
                               f"{chosen[0]}: train.out_dir must be one shared directory")

    def _build_model(self) -> torch.nn.Module:
        """This rank's part of the model: its pipeline stage's layers (all of them without a
        pipeline), tensor-parallel, FSDP-sharded, initialised as the whole model would be."""
        self.kernel = get_backend(self.place.attention)
        par = self.cfg.parallel
        layer_costs, embed_cost, head_cost = stage_costs(self.cfg.model, self.cfg.data.context)
        self.chunks = split_layers(layer_costs, par.pp, par.pp_virtual, embed_cost, head_cost)
        self.stage = stage_chunks(self.chunks, self.coords["pp"], par.pp)
        model = build_model(self.cfg.model, self.stage.layer_ids, self.stage.embed,
                            self.stage.head)
        # TorchTitan's order: tensor parallelism, activation checkpointing, compilation, then
        # FSDP over the data × context ranks (whose weights are the same), on the meta device;
        # weights are initialised last.
        if self.dims.tp > 1:
            apply_tp(model, self.mesh["tp"])
        apply_activation_checkpointing(model, self.cfg.train.activation_checkpointing,
                                       self.cfg.train.activation_checkpointing_every)
        if self.place.compile:
            apply_compile(model, whole_layers=self.dims.tp == 1)
        if self.dims.dp_cp > 1:
            # a pipeline runs several micro-batches' forwards before their backwards: keep the
            # gathered weights instead of gathering them again for every micro-batch
            apply_fsdp(model, self.dims.dp_cp_mesh, self.place.compute_dtype,
                       reshard_after_forward=par.pp == 1)
        model.to_empty(device=self.place.device)
        model.init_weights(self.cfg.train.seed)
        return model

    def _build_pipeline(self) -> PipelineRunner | None:
        par = self.cfg.parallel
        if par.pp == 1:
            return None
        schedule = build_schedule(par.pp_schedule, par.pp, self.cfg.train.micro_batches,
                                  par.pp_virtual)
        return PipelineRunner(schedule, self.mesh["pp"].get_group(), self.place.device)

    def _build_data(self):
        d = self.cfg.data
        max_piece = max_piece_for(d.packing, d.context, d.max_tokens_per_micro_batch)
        stream = DocumentStream(self.store.doc_lengths, self.cfg.train.seed, max_piece)
        options = {"outlier_thresholds": d.outlier_thresholds,
                   "max_token_delay": d.max_token_delay, "fixed_window": d.fixed_window,
                   "refine": d.refine,
                   "ranks": balance_ranks(d.balance, self.dims.dp, self.dims.pp)}
        packer = make_packer(d.packing, context=d.context,
                             max_tokens_per_micro_batch=d.max_tokens_per_micro_batch,
                             n_micro_batches=self.n_micro, cost_model=self.cost_model, **options)
        return stream, packer

    def _resume(self, path) -> None:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.stream.load_state_dict(state["stream"])
        self.packer.load_state_dict(state["packer"])
        self.step = state["step"]
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _autocast(self):
        if self.place.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.place.device.type, dtype=self.place.compute_dtype)

    def train_step(self, plan: list[list], host: list[HostBatch] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's micro-batches of ``plan`` (``host``: already
        gathered by the input pipeline), then one optimizer step. Returns (global mean loss per
        target token, gradient norm) as 0-d tensors on the device: nothing here waits for the
        device, so the next step can be launched while this one runs."""
        if host is None:
            host = self._host_batches(plan)
        targets = sum(num_targets(pieces, self.store.doc_lengths) for pieces in plan)
        # FSDP averages gradients over the dp × cp ranks; the loss is already a global mean
        # (and tensor-parallel ranks compute the same one), so undo the average.
        scale = self.dims.dp_cp / max(targets, 1)
        self.cp_plans = [b.cp_plan for b in host if b.cp_plan is not None]
        batches = [self._local_batch(b) for b in host]
        with loss_context(self.dims.tp):
            if self.pipeline is None:
                loss_sum = self._run_micro_batches(batches, scale)
            else:
                loss_sum = self._run_pipeline(batches, scale)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._global_loss(loss_sum) / max(targets, 1), grad_norm

    def _run_micro_batches(self, batches: list[LocalBatch], scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch in turn (no pipeline); the summed loss."""
        loss_sum = torch.zeros((), device=self.place.device)
        for i, batch in enumerate(batches):
            if self.dims.dp_cp > 1:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            with self._autocast():
                loss = self.model(batch.tokens, batch.positions, batch.attention,
                                  labels=batch.labels)
            (loss * scale).backward()
            loss_sum += loss.detach()
        return loss_sum

    def _run_pipeline(self, batches: list[LocalBatch], scale: float):
        """This rank's side of the pipeline schedule; the summed loss (0 off the last stage).
        The measured micro-batch times, reduced over the stages, go to ``pipeline_record``."""
        loss_sum = torch.zeros((), device=self.place.device)
        dim, tp = self.cfg.model.dim, self.dims.tp
        # the residual stream, and so what stages send each other, is in the compute dtype
        # (llama.in_compute_dtype)
        dtype = self.place.compute_dtype

        def forward(chunk_id: int, micro: int, inputs):
            nonlocal loss_sum
            chunk, batch = self.chunks[chunk_id], batches[micro]
            with self._autocast():
                out = self.model(batch.tokens if chunk.embed else inputs, batch.positions,
                                 batch.attention, labels=batch.labels if chunk.head else None,
                                 chunk=chunk)
            if not chunk.head:
                return out
            loss_sum = loss_sum + out.detach()
            return out * scale

        def spec(micro: int):
            return (batches[micro].rows // tp, dim), dtype, self.place.device

        def before_backward(chunk_id: int, micro: int, last: bool) -> None:
            if self.dims.dp_cp > 1:  # reduce-scatter a chunk's gradients at its last backward
                chunk = self.chunks[chunk_id]
                for i in chunk.layers:
                    self.model.layers[str(i)].set_requires_gradient_sync(last, recurse=False)
                if chunk.embed or chunk.head:
                    self.model.set_requires_gradient_sync(last, recurse=False)

        times = self.pipeline.step(forward, spec, before_backward).times
        # measured, beside the cost model's estimate: is the packer's balance real?
        self.pipeline_record = pipeline_metrics(times, self.mesh["pp"].get_group(),
                                                self.place.device)
        return loss_sum

    def _host_batches(self, plan: list[list]) -> list[HostBatch]:
        mb = self.cfg.train.micro_batches
        return [self._host_batch(pieces)
                for pieces in plan[self.dp_rank * mb:(self.dp_rank + 1) * mb]]

    def _host_batch(self, pieces) -> HostBatch:
        """What this rank feeds the model for one micro-batch, on the host: the tokens (tail
        padded for sequence and context parallelism), under context parallelism only this
        rank's shard of them. Runs on the input pipeline's thread."""
        batch = pad_micro_batch(build_micro_batch(self.store, pieces), self.dims.token_multiple)
        rows = (batch.tokens, batch.positions, batch.labels)
        plan = None
        if self.dims.cp > 1:
            par = self.cfg.parallel
            plan = plan_shards([length for _, _, length in pieces], par.cp,
                               self.dims.token_multiple, par.cp_sharding, self.cp_estimator)
            if plan.padded_tokens != batch.num_padded_tokens:
                raise RuntimeError(f"CP plan pads to {plan.padded_tokens} tokens, the "
                                   f"micro-batch to {batch.num_padded_tokens}")
            index = torch.from_numpy(plan.ranks[self.coords["cp"]].token_index())
            rows = tuple(t[index] for t in rows)
        cu = batch.cu_seqlens
        if self.place.device.type == "cuda":  # page-locked: the copy to the GPU does not block
            rows, cu = tuple(t.pin_memory() for t in rows), cu.pin_memory()
        return HostBatch(*rows, cu, batch.max_seqlen, plan)

    def _local_batch(self, host: HostBatch) -> LocalBatch:
        """The micro-batch on this rank's device, with the attention over its segments (under
        context parallelism, over the keys the CP ranks exchange)."""
        move = lambda t: t.to(self.place.device, non_blocking=True)  # noqa: E731
        if host.cp_plan is None:
            cu = host.cu_seqlens  # still on the host: whether it spans every row costs nothing
            covered = int(cu[0]) == 0 and int(cu[-1]) == host.tokens.shape[0]
            attention = segment_attention(self.kernel, move(cu), host.max_seqlen, covered)
        else:
            attention = make_context_attention(host.cp_plan, self.coords["cp"],
                                               self.mesh["cp"].get_group(),
                                               self.cfg.parallel.cp_attention,
                                               self.place.attention, self.place.device)
        return LocalBatch(move(host.tokens), move(host.positions), move(host.labels), attention)

    def _produce(self, step: int) -> StepInput:
        """Step ``step``'s input: its global batch planned, this rank's part gathered, and the
        data state a checkpoint of that step saves. Runs on the input pipeline's thread."""
        start = time.perf_counter()
        plan = self.packer.pack(self.stream)
        state = self._snapshot_data_state()
        host = self._host_batches(plan)
        return StepInput(step, plan, state, host, time.perf_counter() - start)

    def _snapshot_data_state(self) -> dict:
        # a deep copy: the state dicts share lists with the live packer, which moves on
        return copy.deepcopy({"stream": self.stream.state_dict(),
                              "packer": self.packer.state_dict()})

    def _global_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The summed loss of the whole global batch: one contribution per data-parallel rank
        (tensor-parallel ranks all hold the same value)."""
        if self.dims.world_size == 1:
            return loss_sum
        mine = loss_sum if self.coords["tp"] == 0 else torch.zeros_like(loss_sum)
        dist.all_reduce(mine)
        return mine

    def _clip_gradients(self) -> torch.Tensor:
        """Clip by the global norm over every stage's gradients; returns that norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        sum_partial_grads(params)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # sharded by FSDP or tensor parallelism
            norm = norm.full_tensor()
        if self.dims.pp > 1:  # each stage holds other parameters: add the squares
            squares = norm.float() ** 2
            dist.all_reduce(squares, group=self.mesh["pp"].get_group())
            norm = squares.sqrt()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, norm)
        return norm

    def _launch_record(self, step_input: StepInput, loss, grad_norm, lr, waited) -> InFlight:
        """What is known of a step once it is launched; its record waits for the device."""
        plan = step_input.plan
        lengths = [length for pieces in plan for _, _, length in pieces]
        tokens = sum(lengths)
        costs = [self.cost_model.micro_batch_cost([p[2] for p in pieces]) for pieces in plan]
        mb = self.cfg.train.micro_batches
        # Without pipeline parallelism a DP rank's step is the sum of its micro-batches.
        rank_costs = [sum(costs[r * mb:(r + 1) * mb]) for r in range(self.dims.dp)]
        flops = flops_per_step(self.cfg.model, lengths)
        multiple = self.dims.token_multiple
        padding = sum(-sum(p[2] for p in pieces) % multiple for pieces in plan)
        cp = {}
        if self.cp_plans:  # rank 0's micro-batches: the sharding applied, the CP ranks' balance
            cp = {"cp_sharding": [p.sharding for p in self.cp_plans],
                  "cp_balance": max(cost_balance(p.rank_costs) for p in self.cp_plans)}
        # host time the step waited for its input (on the critical path), and the host time
        # producing it took (off it when the pipeline runs ahead)
        record = {"step": self.step, "tokens": tokens, "imbalance": imbalance(costs),
                  "padding": padding / max(tokens + padding, 1),
                  "rank_imbalance": imbalance(rank_costs), "lr": lr,
                  "input_wait_s": waited, "input_build_s": step_input.seconds,
                  **cp, **self.pipeline_record}
        return InFlight(record, flops, DeviceScalars(loss, grad_norm))

    def _step_record(self, flight: InFlight, since: DoneMark) -> dict:
        """The step's metrics row, its time counted from ``since``; reading its loss and norm
        waits for the device."""
        loss, grad_norm = flight.scalars.read()
        seconds = flight.scalars.done.seconds_since(since)
        tokens, world = flight.record["tokens"], self.dims.world_size
        mfu = flight.flops / seconds / (self.peak_flops * world) if self.peak_flops else None
        return {**flight.record, "loss": loss,
                "tokens_per_s": tokens / seconds,
                "tokens_per_s_per_device": tokens / seconds / world, "mfu": mfu,
                "step_time_s": seconds, "grad_norm": grad_norm,
                "memory_gib": peak_memory_gib(self.place.device)}

    def _train_state(self) -> dict:
        return {**self.data_state, "global_micro_batches": self.n_micro,
                "config": self.cfg.to_dict()}

    def save(self) -> None:
        if self.set_aside_after is not None:
            if self.rank == 0:
                moved = ckpt.set_aside(self.cfg.train.out_dir, self.set_aside_after)
                if moved:
                    print(f"checkpoints newer than step {self.set_aside_after} are from another "
                          f"run: moved to {moved}", flush=True)
            self.set_aside_after = None
        stage = self.coords["pp"]
        # the first rank of each pipeline stage writes that stage's weights file
        writer = int(self.mesh.mesh[stage, 0, 0, 0])
        ckpt.save_checkpoint(self.cfg.train.out_dir, self.step, self.model, self.optimizer,
                             self._train_state(), self.cfg.checkpoint.keep, stage=stage,
                             stages=self.dims.pp, weights_writer=writer)

    def _stop_agreed(self, requested: bool) -> bool:
        """A signal may reach ranks on either side of a step boundary: stop only together. The
        ranks' flags are combined now and read at the next boundary, so that reading them
        waits for nothing launched since (every rank reads the same value at the same step)."""
        if self.dims.world_size == 1:  # nothing to agree on
            return requested
        flag = torch.tensor([int(requested)], device=self.place.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed, self.stop_flag = self.stop_flag, DeviceScalars(flag)
        return agreed is not None and agreed.read()[0] > 0

    def run(self) -> None:
        cfg = self.cfg
        rank0 = self.rank == 0
        if rank0:
            os.makedirs(cfg.train.out_dir, exist_ok=True)
            with open(os.path.join(cfg.train.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            print(f"layout {self.dims.describe(self.rank)}  mesh [pp, dp, cp, tp]  "
                  f"device {self.place.device}  "
                  f"attention {self.place.attention}  dtype {self.place.compute_dtype}  "
                  f"compile {self.place.compile}  "
                  f"packing {cfg.data.packing}  documents {self.store.num_docs}", flush=True)
            if self.place.compile and self.dims.tp > 1:
                print("train.compile: under tensor parallelism only RoPE and SwiGLU are "
                      "compiled (DTensor layers do not compile with dynamic token counts yet)",
                      flush=True)
        logger = MetricsLogger(cfg.train.out_dir, cfg.train.steps, rank0, self.step,
                               cfg.train.tensorboard)
        saved_step = self.step
        inputs = InputPipeline(self._produce, range(self.step + 1, cfg.train.steps + 1),
                               background=cfg.data.prefetch)
        # Step N's loss is read (a wait for the device) only after step N+1 is launched, so the
        # host's work between steps overlaps the device's instead of leaving it idle.
        self.pending, self.stop_flag, self.clock = None, None, DoneMark(self.place.device)
        with StopRequest() as stop, inputs, CollectBetweenSteps(cfg.train.gc_every) as collector:
            try:
                while self.step < cfg.train.steps and not self._stop_agreed(stop.requested):
                    launched = self._launch_step(inputs)
                    self._finish_step(logger)  # the step before, read while this one runs
                    self.pending = launched
                    collector.after_launch(self.step)
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self._finish_step(logger)  # never save a step whose loss is unread
                        self.save()
                        collector.after_save()
                        saved_step, self.clock = self.step, DoneMark(self.place.device)
                self._finish_step(logger)
            except BaseException:
                self._finish_step(logger, quietly=True)  # log the last step that completed
                raise
        if self.step != saved_step:
            self.save()
        logger.close()

    def _launch_step(self, inputs: InputPipeline) -> InFlight:
        """Queue the next step's work on the device; nothing here waits for it."""
        self.step += 1
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        step_input = inputs.next()
        waited = time.perf_counter() - start
        loss, grad_norm = self.train_step(step_input.plan, step_input.batches)
        self.data_state = step_input.state
        return self._launch_record(step_input, loss, grad_norm, lr, waited)

    def _finish_step(self, logger: MetricsLogger, quietly: bool = False) -> None:
        """Wait for the pending step, log it, and stop on a non-finite loss. ``quietly``:
        while another error unwinds, log what can be read and raise nothing."""
        flight, self.pending = self.pending, None
        if flight is None:
            return
        try:
            record = self._step_record(flight, self.clock)
        except Exception:
            if quietly:
                return
            raise
        self.clock = flight.scalars.done
        step = record["step"]
        logger.log(record, step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps)
        if not math.isfinite(record["loss"]) and not quietly:
            raise FloatingPointError(f"loss is {record['loss']} at step {step}; the last "
                                     "checkpoint holds the last good state")


def train(cfg: Config) -> None:
    trainer = Trainer(cfg)
    try:
        try:
            trainer.run()
        except Exception as err:
            # In a 4D run the first question is where: name this rank's coordinates.
            where = trainer.dims.describe(trainer.rank, trainer.coords)
            print(f"{where}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            raise
        if dist.is_initialized():
            # The last collective may be a broadcast rank 0 has sent but a peer not yet read;
            # tearing the group down under it aborts the process (seen with gloo).
            dist.barrier()
    finally:
        # Model, optimizer and FSDP state hold pending communication handles; free them while
        # the process groups are alive, not at interpreter exit (gloo aborts there).
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
