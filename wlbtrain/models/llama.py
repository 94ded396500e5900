"""Llama-style decoder over packed micro-batches.

RMSNorm, rotary embeddings on per-document positions, grouped-query attention and a SwiGLU
feed-forward. The input is one packed sequence without a batch dimension: tokens [T] with
``cu_seqlens`` marking the documents; attention never crosses a document boundary. Module names
follow Hugging Face's LlamaForCausalLM (under its ``model.`` prefix, see ``hf_state_dict``) and the
rotary embedding uses the same half-split convention, so saved weights load there unchanged.

Build on the meta device, place with ``to_empty`` and call ``init_weights``: no memory is spent
on weights that are about to be sharded or overwritten.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import AttentionFn, reference_attention

# Tokens per slice of the output head in the loss: bounds the fp32 logits held at once to
# LOSS_CHUNK × vocab (a 128K-token micro-batch with a 32K vocabulary would need 16 GiB at once).
LOSS_CHUNK = 8192


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin: [T, 1, head_dim] for positions [T], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                            dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, D] by the half-split convention: pairs (i, i + D/2)."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, attention_fn: AttentionFn):
        T = x.shape[0]
        # -1 rather than n_heads: tensor parallelism leaves a slice of the heads on each rank.
        q = self.q_proj(x).view(T, -1, self.head_dim)
        k = self.k_proj(x).view(T, -1, self.head_dim)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention_fn(q, k, v, cu_seqlens, max_seqlen)
        return self.o_proj(out.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, attention_fn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen,
                               attention_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """tokens [T], positions [T], cu_seqlens [n+1] → logits [T, vocab_size]."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn = reference_attention):
        super().__init__()
        self.cfg = cfg
        self.attention_fn = attention_fn
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed by the global layer index keeps parameter names stable when a pipeline
        # stage holds only some of the layers.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens, positions, cu_seqlens, max_seqlen: int, labels=None):
        """Logits [T, vocab]; or, given labels [T] (-100: no target), the summed token loss."""
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed_tokens(tokens)
        for layer in self.layers.values():
            x = layer(x, cos, sin, cu_seqlens, max_seqlen, self.attention_fn)
        h = self.norm(x)
        if labels is None:
            return self.lm_head(h)
        total = h.new_zeros((), dtype=torch.float32)
        for h_part, labels_part in zip(h.split(LOSS_CHUNK), labels.split(LOSS_CHUNK)):
            # Recomputed in the backward, so no slice's logits outlive its own loss.
            total = total + checkpoint(self._loss_sum, h_part, labels_part, use_reentrant=False)
        return total

    def _loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(h).float(), labels, reduction="sum")

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise in place (after ``to_empty``), identically under any sharding.

        Each parameter's full value is drawn on the CPU from a generator seeded by (seed, its
        index), then the local shard is copied in: a sharded run starts from exactly the
        weights of a single-device run.
        """
        std = 0.02
        # Residual-branch outputs shrink with depth so the residual stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for index, (name, param) in enumerate(self.named_parameters()):
            shape = tuple(param.shape)
            if name.endswith("layernorm.weight") or name == "norm.weight":
                full = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                full = torch.randn(shape, generator=gen) * scale
            _copy_full(param, full)


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into ``param``, which may be a sharded DTensor."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    param.copy_(full.to(param.dtype))


def build_model(cfg: ModelConfig, attention_fn: AttentionFn) -> Llama:
    """The model on the meta device: shapes only, no memory. Parallelise it, then
    ``to_empty(device=...)`` and ``init_weights(seed)``."""
    with torch.device("meta"):
        return Llama(cfg, attention_fn)


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names → Hugging Face LlamaForCausalLM names."""
    return {name if name == "lm_head.weight" else f"model.{name}": t for name, t in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("model."): t for name, t in state.items()}


def num_params(cfg: ModelConfig, embedding: bool = False) -> int:
    """Parameter count; without ``embedding`` it counts those that do matrix work per token."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    layer = attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    total = cfg.n_layers * layer + cfg.dim + cfg.vocab_size * cfg.dim  # final norm, lm_head
    return total + (cfg.vocab_size * cfg.dim if embedding else 0)


def flops_per_step(cfg: ModelConfig, doc_lengths) -> float:
    """Training FLOPs (forward + backward) for a batch whose documents have these lengths.

    Matrix multiplies: 6 FLOPs per parameter per token. Document-causal attention: QKᵀ and PV
    each cost 2·d²·dim per layer for a full d×d score matrix, half of it under the causal mask,
    and the backward twice the forward: 3 · 2·dim·d² per layer and document.
    """
    tokens = sum(doc_lengths)
    attn = 6.0 * cfg.dim * cfg.n_layers * sum(float(d) * d for d in doc_lengths)
    return 6.0 * num_params(cfg) * tokens + attn
