"""Cost model: the estimated latency of a micro-batch on its pipeline stage.

A packed micro-batch of documents with lengths d_i costs

    Σ attn_coef · d_i²  +  linear_coef · d_i          (seconds)

because document-masked attention grows with the square of each document's length while
everything else (projections, MLP, head, norms, communication) grows with its token count. The
packers balance this, not token counts: two micro-batches with the same tokens can differ several
times over in work when one holds a long document.

The defaults come from FLOP counts and the device's peak (``CostModel.from_model``); a profile
measured on the real device by ``scripts/profile_cost.py`` replaces them
(``CostModel.from_profile``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

# Dense bf16 peak of one H100 SXM, the paper's GPU, in FLOP/s.
H100_BF16_PEAK_FLOPS = 989e12

# FlashAttention-style backward recomputes QKᵀ: backward = 2.5 × forward, so fwd+bwd = 3.5 × forward.
ATTENTION_FWD_BWD_FACTOR = 3.5
# A matrix product's backward computes both input and weight gradients: fwd+bwd = 3 × forward.
LINEAR_FWD_BWD_FACTOR = 3.0


@dataclass(frozen=True)
class CostModel:
    """Estimated latency of documents on one pipeline stage of one model replica.

    attn_coef: seconds per squared document length; linear_coef: seconds per token.
    """

    attn_coef: float
    linear_coef: float

    def __post_init__(self):
        for name in ("attn_coef", "linear_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost model {name} must be a finite number >= 0, got {value!r}")
        if self.attn_coef == 0 and self.linear_coef == 0:
            raise ValueError("cost model: attn_coef and linear_coef are both 0")

    def piece_cost(self, length: int) -> float:
        return self.attn_coef * length * length + self.linear_coef * length

    def piece_costs(self, lengths) -> np.ndarray:
        """Vectorised ``piece_cost``: lengths [n] → seconds [n] (float64, no int overflow)."""
        d = np.asarray(lengths, dtype=np.float64)
        return self.attn_coef * d * d + self.linear_coef * d

    def micro_batch_cost(self, lengths: Iterable[int]) -> float:
        return float(self.piece_costs(list(lengths)).sum())

    def crossover_length(self) -> float:
        """The document length at which attention costs as much as everything else."""
        return math.inf if self.attn_coef == 0 else self.linear_coef / self.attn_coef

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_model(cls, model, parallel, peak_flops: float = H100_BF16_PEAK_FLOPS,
                   attn_efficiency: float = 1.0, linear_efficiency: float = 1.0) -> "CostModel":
        """Coefficients from FLOP counts of a Llama-style model on one pipeline stage.

        model: has dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size; parallel: has tp, pp,
        cp. The stage modelled is the last one (n_layers/pp layers plus the output head), the
        slowest, which sets the pipeline's pace. TP splits heads and matrix columns and CP splits
        every document's tokens, so both terms divide by tp·cp. The efficiencies (achieved / peak)
        default to 1: pure FLOP counts; a measured profile is the way to real latencies.
        """
        layers = model.n_layers / parallel.pp
        shards = parallel.tp * parallel.cp
        attn_flops = layers * attention_flops_per_squared_token(model.dim) / shards
        linear_flops = (layers * linear_flops_per_token(model)
                        + head_flops_per_token(model)) / shards
        return cls(attn_coef=attn_flops / (peak_flops * attn_efficiency),
                   linear_coef=linear_flops / (peak_flops * linear_efficiency))

    @classmethod
    def from_profile(cls, path: str | os.PathLike) -> "CostModel":
        """Load ``{"attn_coef": s/token², "linear_coef": s/token, ...}`` written by profile_cost.py."""
        profile = read_profile(path)
        if not isinstance(profile, dict) or not {"attn_coef", "linear_coef"} <= profile.keys():
            raise ValueError(f"{path}: a cost profile needs the keys attn_coef and linear_coef")
        return cls(attn_coef=float(profile["attn_coef"]), linear_coef=float(profile["linear_coef"]))


def read_profile(path: str | os.PathLike) -> dict:
    """The parsed JSON of a cost profile (scripts/profile_cost.py); ValueError when missing or
    unreadable. Callers check the keys they need."""
    try:
        with open(path) as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: cost profile not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the cost profile ({err})") from None
    return profile


def attention_flops_per_squared_token(dim: int) -> float:
    """Forward+backward FLOPs of one layer's causal attention per d² of a document of length d.

    QKᵀ and PV are each 2·d²·dim multiply-adds-as-FLOPs over all heads (GQA shares K/V but not
    the work); the causal mask halves them: forward 2·dim·d².
    """
    return ATTENTION_FWD_BWD_FACTOR * 2.0 * dim


def layer_params(model) -> int:
    """Weights of one transformer layer's matrix products (norm weights do no matmul)."""
    kv_dim = model.dim * model.n_kv_heads // model.n_heads
    attention = model.dim * (model.dim + 2 * kv_dim) + model.dim * model.dim  # wqkv, wo
    mlp = 3 * model.dim * model.ffn_dim  # SwiGLU: w1, w3 up, w2 down
    return attention + mlp


def linear_flops_per_token(model) -> float:
    """Forward+backward FLOPs per token of one layer's matrix products: 2·params·3."""
    return 2.0 * LINEAR_FWD_BWD_FACTOR * layer_params(model)


def head_flops_per_token(model) -> float:
    """Forward+backward FLOPs per token of the output projection (on the last stage)."""
    return 2.0 * LINEAR_FWD_BWD_FACTOR * model.vocab_size * model.dim


def imbalance(costs) -> float:
    """Max / mean of a step's micro-batch costs: the step time over a perfectly balanced step.

    1.0 for an empty step (nothing to balance).
    """
    costs = np.asarray(costs, dtype=np.float64)
    mean = costs.mean() if costs.size else 0.0
    return float(costs.max() / mean) if mean > 0 else 1.0
