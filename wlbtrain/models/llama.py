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

import functools
import math
import zlib
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import KernelAttention, LocalAttention

# fp32 logits the loss holds at once (1 GiB: 8192 tokens of a 32K vocabulary); a 128K-token
# micro-batch with a 32K vocabulary would need 16 GiB. Longer micro-batches run the head in
# slices of LOSS_LOGITS // vocab tokens, each recomputed in the backward; one within it runs whole,
# without the recomputation and the per-slice host work a small vocabulary would be bound by.
LOSS_LOGITS = 8192 * 32768
# How activation checkpointing recomputes. The layers and the loss draw no random numbers (no
# dropout), so there is no RNG state to stash and restore; stashing it would also need the
# default device (CUDA) initialised before the first checkpoint, and torch refuses a run that
# initialises it inside one (a CPU run on a GPU host, where compiling the layer does).
RECOMPUTE = dict(use_reentrant=False, preserve_rng_state=False)


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
        # With more tensor-parallel ranks than KV heads every rank computes all KV heads and
        # keeps the one its query heads read (set by apply_tp); None: keep what k_proj gives.
        self.kv_head: int | None = None
        self.rotate = apply_rotary  # or a compiled one (apply_compile)

    def forward(self, x, cos, sin, attention: LocalAttention):
        T = x.shape[0]
        # -1 rather than n_heads: tensor parallelism leaves a slice of the heads on each rank.
        q = self.q_proj(x).view(T, -1, self.head_dim)
        k = self.k_proj(x).view(T, -1, self.head_dim)
        v = self.v_proj(x).view(T, -1, self.head_dim)
        if self.kv_head is not None:
            k, v = (t[:, self.kv_head:self.kv_head + 1] for t in (k, v))
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if isinstance(attention, KernelAttention):  # a registered operator: stays in the graph
            out = attention(q, k, v)
        else:
            out = _attend(attention, q, k, v)
        return self.o_proj(out.reshape(T, -1))


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """The residual stream in the autocast dtype (bf16 on a GPU), as FSDP's bf16 weights make it:
    one run's numerics do not depend on whether it is data parallel, and the norms, residual adds
    and their gradients move half the bytes of an fp32 stream. Without autocast, unchanged."""
    kind = x.device.type
    return x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x


@torch.compiler.disable
def _attend(attention: LocalAttention, q, k, v):
    """Other attention runs outside the compiler: the context-parallel exchange and the
    reference's per-document loop change with every micro-batch. Under ``torch.compile`` the
    layer is split here into two graphs, neither of which depends on the callable or its
    segments, so new lengths and documents do not recompile."""
    return attention(q, k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.activation = swiglu  # or a compiled one (apply_compile)

    def forward(self, x):
        return self.down_proj(self.activation(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.recompute = False  # activation checkpointing (set by apply_activation_checkpointing)

    def forward(self, x, cos, sin, attention: LocalAttention):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class ModelChunk:
    """A contiguous run of decoder layers, the unit a pipeline schedule runs: with ``embed`` it
    starts from tokens, with ``head`` it ends in the loss (or logits)."""

    layers: tuple[int, ...]
    embed: bool
    head: bool


class Llama(nn.Module):
    """tokens [T], positions [T], attention → logits [T, vocab_size] (or the summed loss).

    A pipeline stage builds the same class with only some of the layers (``layer_ids``) and
    without the embedding or the head; parameter names stay those of the whole model.
    """

    def __init__(self, cfg: ModelConfig, layer_ids: Iterable[int] | None = None,
                 embed: bool = True, head: bool = True):
        super().__init__()
        self.cfg = cfg
        ids = range(cfg.n_layers) if layer_ids is None else layer_ids
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim) if embed else None
        # A dict keyed by the global layer index keeps parameter names stable when a pipeline
        # stage holds only some of the layers.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in ids})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps) if head else None
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if head else None
        self.loss_sum = _loss_sum  # or a compiled one (apply_compile)

    def whole(self) -> ModelChunk:
        """Everything this module holds, as one chunk."""
        return ModelChunk(tuple(int(i) for i in self.layers), self.embed_tokens is not None,
                          self.lm_head is not None)

    def forward(self, inputs, positions, attention: LocalAttention, labels=None,
                chunk: ModelChunk | None = None):
        """Run ``chunk`` (default: everything held).

        inputs: tokens [T] int64 when the chunk embeds, else hidden states [T, dim] (the local
        sequence shard under sequence parallelism). Returns hidden states [T, dim] when the chunk
        has no head; with a head, logits [T, vocab] or, given labels [T] (-100: no target), the
        summed token loss.
        """
        chunk = chunk or self.whole()
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = in_compute_dtype(self.embed_tokens(inputs)) if chunk.embed else inputs
        for i in chunk.layers:
            layer = self.layers[str(i)]
            if layer.recompute:
                # keep only the layer's input; its activations are rebuilt in the backward
                x = checkpoint(layer, x, cos, sin, attention, **RECOMPUTE)
            else:
                x = layer(x, cos, sin, attention)
        if not chunk.head:
            return x
        h = _replicate_tokens(self.norm(x))
        if labels is None:
            return self.lm_head(h)
        chunk = max(1, LOSS_LOGITS // self.cfg.vocab_size)
        if h.shape[0] <= chunk:
            return self.loss_sum(self.lm_head, h, labels)
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for h_part, labels_part in zip(h.split(chunk), labels.split(chunk)):
            # Recomputed in the backward, so no slice's logits outlive its own loss.
            total = total + checkpoint(self.loss_sum, self.lm_head, h_part, labels_part,
                                       **RECOMPUTE)
        return total

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise in place (after ``to_empty``), identically under any sharding.

        Each parameter's full value is drawn on the CPU from a generator seeded by (seed, its
        name), then the local shard is copied in: a sharded run, or a pipeline stage holding
        only some layers, starts from exactly the weights of a single-device run.
        """
        std = 0.02
        # Residual-branch outputs shrink with depth so the residual stream's variance stays put.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            shape = tuple(param.shape)
            if name.endswith("layernorm.weight") or name == "norm.weight":
                full = torch.ones(shape)
            else:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                scale = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                full = torch.randn(shape, generator=gen) * scale
            _copy_full(param, full)


def _loss_sum(head: nn.Linear, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token loss of one slice of the micro-batch, the logits in fp32."""
    # Under tensor parallelism the logits are a DTensor sharded over the vocabulary and
    # cross_entropy runs vocabulary-parallel (inside torch's loss_parallel context).
    loss = F.cross_entropy(head(h).float(), labels, reduction="sum")
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def apply_activation_checkpointing(model: Llama, mode: str, every: int = 2) -> None:
    """Recompute decoder layers in the backward: ``full`` every layer, ``selective`` every
    ``every``-th (by global layer index, so pipeline stages agree), ``none`` no layer. Memory for
    a layer's activations is traded for one more forward of it; names and weights are untouched."""
    for name, layer in model.layers.items():
        layer.recompute = mode == "full" or (mode == "selective" and int(name) % every == 0)


def apply_compile(model: Llama, whole_layers: bool = True) -> None:
    """Regional compilation: each decoder layer's forward is compiled on its own (hooks that
    tensor parallelism, activation checkpointing and FSDP put around it stay eager), with dynamic
    token counts, as is the loss over a slice of the head. The layers share one code object, so
    they share graphs: packed micro-batches of any length compile a handful of graphs in all.
    Call after tensor parallelism and before FSDP (TorchTitan's order).

    Without ``whole_layers`` (tensor parallelism: layers of DTensors do not compile with dynamic
    token counts in this torch) only the elementwise work on plain tensors is compiled: RoPE and
    SwiGLU, each one fused kernel instead of several.
    """
    for layer in model.layers.values():
        if whole_layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        else:
            layer.self_attn.rotate = _compiled(apply_rotary)
            layer.mlp.activation = _compiled(swiglu)
    if model.lm_head is not None and whole_layers:
        # head, fp32 upcast, log-softmax and the gather fused: the [slice, vocab] logits are
        # written once instead of three times
        model.loss_sum = _compiled(_loss_sum)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _replicate_tokens(h: torch.Tensor) -> torch.Tensor:
    """Under sequence parallelism the final norm's output is a DTensor sharded over tokens; the
    vocabulary-parallel head needs every token on every rank (it is sliced for the loss)."""
    if isinstance(h, DTensor):
        return h.redistribute(h.device_mesh, [Replicate()] * h.device_mesh.ndim)
    return h


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into ``param``, which may be a sharded DTensor."""
    if isinstance(param, DTensor):
        # Every rank holds the same full value: slice locally, no broadcast.
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
    param.copy_(full.to(param.dtype))


def build_model(cfg: ModelConfig, layer_ids: Iterable[int] | None = None, embed: bool = True,
                head: bool = True) -> Llama:
    """The model (or a pipeline stage of it) on the meta device: shapes only, no memory.
    Parallelise it, then ``to_empty(device=...)`` and ``init_weights(seed)``."""
    with torch.device("meta"):
        return Llama(cfg, layer_ids, embed, head)


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


def stage_costs(cfg: ModelConfig, context: int) -> tuple[list[float], float, float]:
    """(per-layer, embedding, head) costs per token for splitting the layers into pipeline
    stages: a layer's matrix products plus attention over documents of about half the context;
    the head's output projection is recomputed in the backward (4/3 of its usual cost)."""
    from ..data.cost import (attention_flops_per_squared_token, head_flops_per_token,
                             linear_flops_per_token)

    layer = linear_flops_per_token(cfg) + attention_flops_per_squared_token(cfg.dim) * context / 2
    return [layer] * cfg.n_layers, 0.0, head_flops_per_token(cfg) * 4 / 3
