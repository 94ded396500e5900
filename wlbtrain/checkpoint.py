"""Atomic, resumable checkpoints.

Layout of ``<out_dir>/checkpoints/step-<N>/``:
  model.safetensors   full weights (fp32) under Hugging Face LlamaForCausalLM names
  optimizer.pt        the optimizer's full state (keyed by parameter name)
  rng.pt              torch / numpy / python RNG states
  state.json          step, data stream and packer state, the config that wrote it

A checkpoint is written into a hidden temporary directory, flushed to disk and renamed into
place, so a crash during a save leaves the previous checkpoints intact and never a half one that
looks complete. Only rank 0 writes; every rank reads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from .config import ConfigError
from .data.store import fsync_dir
from .models.llama import from_hf_state_dict, hf_state_dict

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings a checkpoint's weights, data stream and packer state depend on: resuming under other
# values would fail to load or, worse, silently train other documents.
RESUME_KEYS = ("data.source", "data.tokenizer", "data.packing", "data.context",
               "data.max_tokens_per_micro_batch", "data.outlier_thresholds", "data.fixed_window",
               "train.micro_batches", "train.seed")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def save_checkpoint(out_dir, step: int, model, optimizer, train_state: dict, keep: int) -> Path:
    """Write ``step-<step>`` atomically, then delete all but the newest ``keep``.

    Collective: every rank calls it; if rank 0 fails to write, every rank raises (none is left
    waiting for a rank that has died)."""
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    final = checkpoint_root(out_dir) / f"step-{step}"
    failure = [None]
    if rank0:
        try:
            _write(final, step, model_state, optim_state, train_state)
            _prune(out_dir, keep)
        except Exception as err:  # noqa: BLE001 - reported to every rank below
            failure = [f"{type(err).__name__}: {err}"]
    if dist.is_initialized():
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise RuntimeError(f"saving checkpoint {final} failed on rank 0 ({failure[0]}); "
                           "the previous checkpoints are intact")
    return final


def _write(final: Path, step: int, model_state, optim_state, train_state: dict) -> None:
    tmp = final.with_name(f".tmp-step-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in hf_state_dict(model_state).items()}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **train_state}, indent=1))
    _fsync_files(tmp)
    _replace(tmp, final)


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
    _check_same_settings(saved.get("config", {}), cfg.to_dict(), path)
    saved_micro = saved.get("global_micro_batches", global_micro_batches)
    if saved_micro != global_micro_batches:
        raise ConfigError(
            f"parallel.dp: {path} planned {saved_micro} micro-batches per global batch "
            f"(dp × train.micro_batches), this run {global_micro_batches}; keep the product")
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


def load_checkpoint(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``path``; returns state.json's contents."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no state.json)")
    weights = from_hf_state_dict(load_file(path / "model.safetensors"))
    set_model_state_dict(model, weights, options=_FULL)
    optim_state = torch.load(path / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim_state, options=_FULL)
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


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


def _fsync_files(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory itself to disk."""
    for f in directory.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(directory)


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
