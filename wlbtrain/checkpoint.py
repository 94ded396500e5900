"""Atomic checkpoints that reshard, and starting a run from Hugging Face weights.

Layout of ``<out_dir>/checkpoints/step-<N>/``:
  model.safetensors      the full weights (fp32) under Hugging Face LlamaForCausalLM names; with
                         several pipeline stages, or above ``SHARD_BYTES``, instead
                         ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
  dcp/                   model and optimizer state as trained, sharded
                         (torch.distributed.checkpoint): it loads on any layout (other dp / tp /
                         pp degrees, one process)
  rng/rank-<r>.pt        each rank's torch / numpy / python (/ cuda) RNG states
  state.json             step, world size, data stream and packer state, the config that wrote it

The safetensors files are for people and other tools; resuming reads ``dcp/``. No rank ever
holds the whole optimizer state: DCP writes each rank's shard, and the weights file is gathered
one parameter at a time.

Every rank writes into a hidden temporary directory; once all have finished, rank 0 flushes the
directories and renames it into place. A crash during a save leaves the previous checkpoints
intact and never a half one that looks complete; a failure on any rank raises on every rank.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from .config import ConfigError
from .data.store import fsync_dir
from .models.llama import _copy_full, build_model, hf_state_dict

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings a checkpoint's weights, data stream and packer state depend on: resuming under other
# values would fail to load or, worse, silently train other documents. The split of a global
# batch into dp × train.micro_batches may change (resharding); its product may not.
RESUME_KEYS = ("data.source", "data.tokenizer", "data.packing", "data.context",
               "data.max_tokens_per_micro_batch", "data.outlier_thresholds", "data.fixed_window",
               "train.seed")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DCP_DIR = "dcp"
RNG_DIR = "rng"
# Largest safetensors file before the weights are split (Hugging Face's default shard size).
SHARD_BYTES = 5 * 10**9
# Sharded (no gathering); optimizer state flattened to one key per parameter and field, so a
# rank holding only some parameters (a pipeline stage) saves and loads exactly its own.
_SHARDED = StateDictOptions(flatten_optimizer_state_dict=True)
# Tensors old Hugging Face Llama checkpoints carry that are recomputed here, not learned.
_IGNORED_HF = ("rotary_emb.inv_freq",)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(out_dir, step: int, model, optimizer, train_state: dict, keep: int, *,
                    stage: int = 0, stages: int = 1, weights_writer: int | None = None) -> Path:
    """Write ``step-<step>`` atomically, then delete all but the newest ``keep``.

    Collective: every rank calls it. ``model`` is this rank's part: pipeline stage ``stage`` of
    ``stages`` (a Llama holding some layers), sharded or not; ranks of one stage hold the same
    modules. The rank ``weights_writer`` (a global rank of this stage; default 0) writes the
    stage's safetensors file(s). ``train_state`` (identical on every rank) goes to state.json.
    """
    final = checkpoint_root(out_dir) / f"step-{step}"
    tmp = final.with_name(f".tmp-step-{step}")
    rank0 = _rank() == 0
    _agree(_attempt(_fresh_dir, tmp) if rank0 else None, final)
    model_state = get_model_state_dict(model)
    writer = 0 if weights_writer is None else weights_writer
    errors = [_write_weights(tmp, model_state, stage, stages, writer),
              _attempt(_save_training_state, tmp / DCP_DIR, model_state, model, optimizer),
              _attempt(_save_rng, tmp)]
    if rank0:
        state = {"step": step, "world_size": _world(), **train_state}
        errors.append(_attempt(_write_json, tmp / "state.json", state))
    _agree(next((e for e in errors if e), None), final, cleanup=tmp)
    _agree(_attempt(_finish, tmp, final, out_dir, keep) if rank0 else None, final, cleanup=tmp)
    return final


def _fresh_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
    (tmp / RNG_DIR).mkdir(parents=True)


def _save_training_state(directory: Path, model_state: dict, model, optimizer) -> None:
    """Model and optimizer as this rank holds them; DCP records each shard's place in the whole
    tensor, which is what lets another layout load it."""
    optim_state = get_optimizer_state_dict(model, optimizer, options=_SHARDED)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory,
             no_dist=not dist.is_initialized())


def _save_rng(tmp: Path) -> None:
    path = tmp / RNG_DIR / f"rank-{_rank():05d}.pt"
    torch.save(_rng_state(), path)
    _fsync_file(path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))
    _fsync_file(path)


def _finish(tmp: Path, final: Path, out_dir, keep: int) -> None:
    """Every rank flushed its own files; make the directory entries durable, then rename."""
    for directory in (tmp / RNG_DIR, tmp / DCP_DIR, tmp):
        fsync_dir(directory)
    _replace(tmp, final)
    _prune(out_dir, keep)


# ---------------------------------------------------------------------------------------------
# The weights file(s)


def _write_weights(tmp: Path, model_state: dict, stage: int, stages: int,
                   writer: int) -> str | None:
    """Gather each parameter of this stage and let ``writer`` write the stage's files.

    Collective: every rank takes part in every ``full_tensor`` gather of its stage, in the same
    order, even after its own write failed (so none is left waiting); returns the error text.
    The writer holds at most one file's tensors at a time.
    """
    hf = hf_state_dict(model_state)
    entries = [(name, t.numel() * t.element_size()) for name, t in hf.items()]
    plans = _all_gather((stage, entries) if _rank() == writer else None)
    files = _file_plan([p for p in plans if p is not None], stages)
    error = None
    if _rank() == 0:
        error = _attempt(_write_index, tmp, files, plans)
    for file_name, names in files.get(stage, []):
        tensors = {}
        for name in names:
            full = _full_value(hf[name])
            if _rank() == writer:
                tensors[name] = full.detach().to("cpu").contiguous()
        if _rank() == writer and error is None:
            error = _attempt(_write_safetensors, tmp / file_name, tensors)
    return error


def _full_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _file_plan(plans: list[tuple[int, list]], stages: int) -> dict[int, list[tuple[str, list]]]:
    """stage → [(file name, tensor names)], numbered across stages in stage order.

    plans: one (stage, [(name, bytes)]) per writer. One ``model.safetensors`` when there is one
    stage under SHARD_BYTES; else each stage's tensors fill files of at most SHARD_BYTES (a larger
    tensor gets a file of its own).
    """
    by_stage = dict(plans)
    if len(plans) != stages or sorted(by_stage) != list(range(stages)):
        raise ValueError(f"each of the {stages} pipeline stages needs exactly one weights_writer, "
                         f"got writers for stages {sorted(s for s, _ in plans)}")
    groups = [(stage, g) for stage in range(stages) for g in _fill(by_stage[stage])]
    if stages == 1 and len(groups) == 1:
        return {0: [(WEIGHTS, groups[0][1])]}
    files: dict[int, list[tuple[str, list]]] = {}
    for i, (stage, names) in enumerate(groups):
        files.setdefault(stage, []).append((f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors",
                                            names))
    return files


def _fill(entries: list[tuple[str, int]]) -> list[list[str]]:
    groups, size = [[]], 0
    for name, nbytes in entries:
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _write_index(tmp: Path, files: dict, plans: list) -> None:
    """Hugging Face's index (tensor name → file) whenever the weights are split."""
    if list(files) == [0] and files[0][0][0] == WEIGHTS:
        return
    total = sum(nbytes for p in plans if p is not None for _, nbytes in p[1])
    weight_map = {name: file_name for stage_files in files.values()
                  for file_name, names in stage_files for name in names}
    _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_safetensors(path: Path, tensors: dict) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    _fsync_file(path)


# ---------------------------------------------------------------------------------------------
# Loading to resume


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``path``; returns state.json's contents.

    Collective. Works on any layout: each rank reads the parts of the saved shards that overlap
    what it holds (a pipeline stage only its own parameters). RNG states are restored per rank
    when the world size is the one that saved; otherwise every rank takes rank 0's.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_SHARDED)
    wanted = {"model": model_state, "optim": optim_state}
    # Fills the tensors of `wanted` in place, each rank reading only what overlaps its shards.
    dcp.load(wanted, checkpoint_id=path / DCP_DIR, no_dist=not dist.is_initialized())
    set_model_state_dict(model, wanted["model"])
    set_optimizer_state_dict(model, optimizer, wanted["optim"], options=_SHARDED)
    rank = _rank() if state.get("world_size") == _world() else 0
    _set_rng_state(torch.load(path / RNG_DIR / f"rank-{rank:05d}.pt", weights_only=False))
    return state


def set_aside(out_dir, after_step: int) -> Path | None:
    """Move the checkpoints newer than ``after_step`` (from a run this one does not continue)
    into ``checkpoints/abandoned-<time>/``, where resume and pruning no longer see them but
    nothing is lost. Returns that directory, or None when there was nothing to move."""
    newer = [path for step, path in list_checkpoints(out_dir) if step > after_step]
    if not newer:
        return None
    dest = checkpoint_root(out_dir) / time.strftime("abandoned-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in newer:
        os.rename(path, dest / path.name)
    return dest


def resume_point(cfg, global_micro_batches: int) -> Path | None:
    """The checkpoint this run continues from (``checkpoint.resume``), after checking that it
    was written with the settings its weights, stream and packer state depend on.
    Raises ConfigError, before anything starts, when it cannot be resumed."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    path = latest_checkpoint(cfg.train.out_dir) if resume == "auto" else Path(resume)
    if path is None:
        return None
    try:
        saved = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint.resume: {path} is not a readable checkpoint "
                          f"(state.json: {err})") from None
    if not (path / DCP_DIR / ".metadata").is_file():
        raise ConfigError(f"checkpoint.resume: {path} has no {DCP_DIR}/ training state (an older "
                          "format); start from its weights with checkpoint.init_from="
                          f"{path} checkpoint.resume=none")
    _check_same_settings(saved.get("config", {}), cfg.to_dict(), path)
    saved_micro = saved.get("global_micro_batches", global_micro_batches)
    if saved_micro != global_micro_batches:
        raise ConfigError(
            f"train.micro_batches: {path} was trained with {saved_micro} micro-batches per "
            f"global batch (parallel.dp × train.micro_batches), this run has "
            f"{global_micro_batches}; any layout resumes, but keep the product")
    return path


def _check_same_settings(saved: dict, current: dict, path: Path) -> None:
    keys = [f"model.{k}" for k in current["model"]] + list(RESUME_KEYS)
    for key in keys:
        section, name = key.split(".")
        old, new = saved.get(section, {}).get(name), current[section][name]
        if old != new:
            raise ConfigError(
                f"{key}: {path} was trained with {old!r}, this run has {new!r}; resume with the "
                "same value, or start afresh (checkpoint.resume=none or another train.out_dir)")


# ---------------------------------------------------------------------------------------------
# Starting from Hugging Face weights (checkpoint.init_from)


def check_init_from(cfg) -> None:
    """Check ``checkpoint.init_from`` against the recipe's model from the safetensors headers
    alone (no tensor is read); raises ConfigError naming the first tensor that does not fit."""
    source = cfg.checkpoint.init_from
    if source == "none":
        return
    key = "checkpoint.init_from"
    try:
        shapes = _hf_shapes(_weight_files(Path(source)))
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{key}: {source} is not a readable Hugging Face safetensors "
                          f"directory ({type(err).__name__}: {err})") from None
    meta = build_model(cfg.model).state_dict()  # shapes only, on the meta device
    expected = {name: list(t.shape) for name, t in hf_state_dict(meta).items()}
    if "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]  # tied embeddings
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ConfigError(f"{key}: {source} lacks {missing[0]} (and {len(missing) - 1} more) "
                          f"that the recipe's model needs; check model.n_layers and the names")
    for name, want in expected.items():
        if shapes[name] != want:
            raise ConfigError(f"{key}: {source} has {name} of shape {shapes[name]}, the recipe's "
                              f"model needs {want}; set the model.* keys to the checkpoint's")
    extra = [n for n in shapes if n not in expected and not n.endswith(_IGNORED_HF)]
    if extra:
        raise ConfigError(f"{key}: {source} has {extra[0]} (and {len(extra) - 1} more), which the "
                          f"recipe's model lacks (model.n_layers={cfg.model.n_layers})")


@torch.no_grad()
def load_hf_weights(directory: str | Path, model) -> None:
    """Copy a Hugging Face LlamaForCausalLM safetensors directory into ``model``.

    Any layout: each rank reads (lazily, tensor by tensor) only the parameters its module holds
    and copies in its local shard. Without ``lm_head.weight`` (tied word embeddings) the head
    takes the embedding's weights. Shapes were checked by ``check_init_from``.
    """
    where = _weight_files(Path(directory))
    params = hf_state_dict(dict(model.named_parameters()))
    with ExitStack() as stack:
        handles = {}
        for name, param in params.items():
            source = name
            if name == "lm_head.weight" and name not in where:
                source = "model.embed_tokens.weight"
            file = where[source]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
            _copy_full(param, handles[file].get_tensor(source))


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name → the file holding it: from the index when there is one."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / WEIGHTS
    if not single.is_file():
        raise FileNotFoundError(f"neither {WEIGHTS} nor {INDEX} in {directory}")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def _hf_shapes(where: dict[str, Path]) -> dict[str, list[int]]:
    shapes = {}
    for file in sorted(set(where.values())):
        # Opening reads the header only; the tensors stay on disk.
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = list(handle.get_slice(name).get_shape())
    missing = [n for n in where if n not in shapes]
    if missing:
        raise KeyError(f"the index lists {missing[0]} in {where[missing[0]].name}, "
                       "which does not hold it")
    return shapes


# ---------------------------------------------------------------------------------------------
# Helpers: ranks, RNG, files


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _attempt(fn, *args) -> str | None:
    """Run ``fn``; its exception as text, to be shared with the other ranks, or None."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - every rank raises it in _agree
        return f"{type(err).__name__}: {err}"
    return None


def _agree(error: str | None, final: Path, cleanup: Path | None = None) -> None:
    """Barrier that shares each rank's error; raises on every rank if any rank failed."""
    failed = [(rank, e) for rank, e in enumerate(_all_gather(error)) if e]
    if not failed:
        return
    if cleanup is not None and _rank() == 0:
        shutil.rmtree(cleanup, ignore_errors=True)
    detail = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
    raise RuntimeError(f"saving checkpoint {final} failed ({detail}); "
                       "the previous checkpoints are intact")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (from an earlier run) is replaced."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)  # make the rename itself durable


def _prune(out_dir, keep: int) -> None:
    for _, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path)
