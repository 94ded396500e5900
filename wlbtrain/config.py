"""Recipe → typed, validated configuration.

A recipe is a YAML file with the sections below; every key has a default, so a recipe only
names what it changes. Overrides are ``section.key=value`` strings whose values parse as YAML
scalars. Every problem (unknown key, wrong type, value out of range, missing file, sizes that do
not divide) raises ``ConfigError`` whose text is one line naming the key; the CLI prints it and
exits with status 2 before anything is started or written.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml


EXIT_BAD_INPUT = 2  # exit status for bad input, whichever command reads it


class ConfigError(ValueError):
    """A bad recipe or override; ``str(err)`` is the one-line message for the user."""


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    vocab_size: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def validate(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            _require(getattr(self, key) > 0, f"model.{key}", "a positive integer")
        _require(self.dim % self.n_heads == 0, "model.dim",
                 f"a multiple of model.n_heads ({self.n_heads}), got {self.dim}")
        _require((self.dim // self.n_heads) % 2 == 0, "model.dim",
                 "dim / n_heads even (rotary embeddings rotate pairs)")
        _require(self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                 f"a divisor of model.n_heads ({self.n_heads}), got {self.n_kv_heads}")
        _require(self.rope_theta > 0, "model.rope_theta", "a positive number")
        _require(self.norm_eps > 0, "model.norm_eps", "a positive number")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    source: str = "stdlib"  # `stdlib` or a token store directory made by `wlbtrain prepare`
    tokenizer: str = "byte"  # `byte` or a tokenizer.json
    context: int = 4096  # micro-batch length of the plain and fixed packers
    packing: Literal["plain", "fixed", "wlb"] = "plain"
    max_tokens_per_micro_batch: Optional[int] = None  # wlb cap; default: context
    cache_dir: Optional[str] = None  # where `stdlib` is prepared; default ~/.cache/wlbtrain
    # wlb delay-queue thresholds: `auto` (tuned online under max_token_delay) or token counts
    outlier_thresholds: Union[Literal["auto"], list[int], None] = "auto"
    # wlb with auto thresholds: average token delay (steps) the queues may cost; default 1
    max_token_delay: Optional[float] = None
    fixed_window: int = 1  # global batches the fixed packer balances over
    refine: bool = True  # wlb: local search after the greedy
    # wlb: what to even out. micro_batches: what a pipeline waits for (its slowest one);
    # ranks: without a pipeline (pp=1), the DP ranks' summed work, which they wait for
    balance: Literal["micro_batches", "ranks"] = "micro_batches"
    cost_profile: Optional[str] = None  # JSON from scripts/profile_cost.py; default: FLOP model
    # plan and gather step N+1 on a background thread while step N trains
    prefetch: bool = True

    def validate(self) -> None:
        _require(self.context > 0, "data.context", "a positive integer")
        if self.max_tokens_per_micro_batch is None:
            self.max_tokens_per_micro_batch = self.context
        _require(self.max_tokens_per_micro_batch > 0, "data.max_tokens_per_micro_batch",
                 "a positive integer")
        _require(self.fixed_window > 0, "data.fixed_window", "a positive integer")
        if self.source != "stdlib":
            _require_path(self.source, "data.source", "a token store directory or `stdlib`")
        if self.tokenizer != "byte":
            _require_path(self.tokenizer, "data.tokenizer", "`byte` or a tokenizer.json file")
        if self.cost_profile is not None:
            _require_path(self.cost_profile, "data.cost_profile", "a cost profile JSON file")
        if self.outlier_thresholds is None:  # `data.outlier_thresholds=` (empty): the default
            self.outlier_thresholds = "auto"
        if self.outlier_thresholds != "auto":
            _require(all(t > 0 for t in self.outlier_thresholds), "data.outlier_thresholds",
                     "`auto` or positive token counts")
        if self.max_token_delay is not None:
            _require(0 <= self.max_token_delay <= 1e6, "data.max_token_delay",
                     "a number of steps >= 0")
            # a budget nothing spends would read as honoured while fixed queues ignore it
            _require(self.outlier_thresholds == "auto", "data.max_token_delay",
                     "no value with fixed data.outlier_thresholds (the budget is what `auto` "
                     "tunes the queues under)")


@dataclass
class ParallelConfig:
    dp: int = 1  # -1: every process not used by tp, pp and cp
    tp: int = 1
    pp: int = 1
    cp: int = 1
    pp_virtual: int = 1  # model chunks per pipeline rank (interleaved 1F1B when > 1)
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = "1f1b"
    cp_sharding: Literal["per_sequence", "per_document", "adaptive", "hybrid"] = "per_sequence"
    cp_attention: Literal["allgather", "ring"] = "allgather"

    def validate(self) -> None:
        _require(self.dp >= 1 or self.dp == -1, "parallel.dp",
                 "an integer >= 1, or -1 for all processes left by tp, pp and cp")
        for key in ("tp", "pp", "cp", "pp_virtual"):
            _require(getattr(self, key) >= 1, f"parallel.{key}", "an integer >= 1")

    def data_parallel(self, world_size: int | None) -> int:
        """``dp`` with -1 resolved for ``world_size`` processes (1 when that is unknown)."""
        if self.dp != -1:
            return self.dp
        return max(world_size // (self.tp * self.pp * self.cp), 1) if world_size else 1


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batches: int = 1  # per DP rank and step: the pipeline's micro-batches
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr × this
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    attention: Literal["auto", "triton", "reference"] = "auto"  # auto: triton on GPU
    device: Literal["auto", "cuda", "cpu"] = "auto"
    out_dir: str = "runs/default"
    log_every: int = 1
    tensorboard: bool = False
    peak_tflops: Optional[float] = None  # MFU denominator; default: looked up from the device
    # Recompute decoder layers in the backward instead of keeping their activations: none,
    # full (every layer) or selective (every activation_checkpointing_every-th layer)
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # Regional torch.compile of each decoder layer and the loss: auto = on a GPU, not on the CPU
    compile: Literal["auto", True, False] = "auto"
    activation_checkpointing_every: int = 2
    # Python's garbage collector runs between steps, not inside them: its young generations
    # every gc_every steps, a full pass at each checkpoint (or every 20th collection without
    # one); 0 leaves it automatic
    gc_every: int = 50

    def validate(self) -> None:
        _require(self.steps >= 0, "train.steps", "an integer >= 0")
        _require(self.activation_checkpointing_every >= 1, "train.activation_checkpointing_every",
                 "an integer >= 1")
        _require(self.micro_batches >= 1, "train.micro_batches", "an integer >= 1")
        _require(self.gc_every >= 0, "train.gc_every", "an integer >= 0 (0: automatic)")
        _require(self.lr > 0, "train.lr", "a positive number")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", "a number >= 0")
        _require(0 <= self.beta1 < 1, "train.beta1", "a number in [0, 1)")
        _require(0 <= self.beta2 < 1, "train.beta2", "a number in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 disables clipping)")
        _require(self.log_every >= 1, "train.log_every", "an integer >= 1")
        if self.peak_tflops is not None:
            _require(self.peak_tflops > 0, "train.peak_tflops", "a positive number")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0: only at the end
    keep: int = 2  # newest checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto (latest in out_dir, if any) | none | PATH to a step-<N> directory
    # A Hugging Face LlamaForCausalLM safetensors directory a fresh run starts from
    init_from: str = "none"

    def validate(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "an integer >= 0")
        _require(self.keep >= 1, "checkpoint.keep", "an integer >= 1")
        if self.resume not in ("auto", "none"):
            _require_path(self.resume, "checkpoint.resume", "`auto`, `none` or a checkpoint directory")
        if self.init_from != "none":
            _require_path(self.init_from, "checkpoint.init_from",
                          "`none` or a directory of Hugging Face Llama safetensors")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        model, par = self.model, self.parallel
        # KV heads split over TP ranks, or are replicated when there are fewer than TP ranks.
        kv_ok = model.n_kv_heads % par.tp == 0 or par.tp % model.n_kv_heads == 0
        _require(model.n_heads % par.tp == 0 and kv_ok, "parallel.tp",
                 f"a divisor of model.n_heads ({model.n_heads}) that divides or is a multiple of "
                 f"model.n_kv_heads ({model.n_kv_heads}), got {par.tp}")
        chunks = par.pp * par.pp_virtual
        _require(model.n_layers >= chunks, "parallel.pp",
                 f"pp × pp_virtual ({par.pp} × {par.pp_virtual}) pipeline chunks of at least one "
                 f"of model.n_layers ({model.n_layers}) each")
        _require(self.data.balance != "ranks" or par.pp == 1, "data.balance",
                 "micro_batches with a pipeline (pp > 1): it waits for its slowest micro-batch")
        self._validate_schedule()

    def _validate_schedule(self) -> None:
        par, micro = self.parallel, self.train.micro_batches
        if par.pp_virtual > 1:
            _require(par.pp_schedule == "interleaved_1f1b", "parallel.pp_schedule",
                     f"interleaved_1f1b with parallel.pp_virtual > 1, got {par.pp_schedule}")
        if par.pp_schedule == "interleaved_1f1b":
            _require(par.pp_virtual > 1, "parallel.pp_virtual",
                     "more than 1 model chunk per rank for interleaved_1f1b")
            _require(micro % par.pp == 0, "train.micro_batches",
                     f"a multiple of parallel.pp ({par.pp}) for interleaved_1f1b, got {micro}")
        if par.pp > 1 and par.pp_schedule == "1f1b":
            _require(micro >= par.pp, "train.micro_batches",
                     f"at least parallel.pp ({par.pp}) for 1f1b, got {micro}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        raw = _read_recipe(path)
    for item in overrides:
        section, key, value = _parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys in the recipe")
        raw[section][key] = value
    cfg = _build(Config, raw, prefix="")
    cfg.validate()
    return cfg


def _read_recipe(path) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: recipe file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the recipe ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (model, data, ...)")
    return raw


def _parse_override(item: str) -> tuple[str, str, object]:
    name, sep, text = item.partition("=")
    parts = name.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=30")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return parts[0], parts[1], value


def _build(cls, raw, prefix: str):
    """Instantiate dataclass ``cls`` from ``raw``, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; known: {', '.join(sorted(names))}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value or {}, f"{key}.")
        else:
            values[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**values)


def _coerce(value, hint, key: str):
    """Check ``value`` against the type ``hint``; returns it, converted where lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        errors = []
        for alternative in inner:  # e.g. `auto` or a list: the first that takes the value
            try:
                return _coerce(value, alternative, key)
            except ConfigError as err:
                if isinstance(value, list) and typing.get_origin(alternative) is list:
                    raise  # the list's own error names the bad element
                errors.append(str(err).removeprefix(f"{key}: expected ").split(", got")[0])
        raise ConfigError(f"{key}: expected {' or '.join(errors)}, got {value!r}")
    if origin is Literal:
        # by type as well as value: 1 == True, but `1` is not the boolean the key takes
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise ConfigError(f"{key}: expected {names.get(hint, hint)}, got {value!r}")


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}")


def _require_path(path: str, key: str, expected: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"{key}: {path} does not exist (expected {expected})")
