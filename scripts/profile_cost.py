#!/usr/bin/env python
"""Measure the cost model's coefficients for a recipe on this device.

    python scripts/profile_cost.py RECIPE --out profile.json [key=value ...]

Times, forward + backward, on one GPU as one rank of the recipe's layout sees them:
  - the attention of one causal document of length d at several lengths (the Triton
    ``varlen_attention`` kernel on a GPU, else torch SDPA), with n_heads/tp query heads;
  - one transformer layer's matrix products (TP-sharded QKV, output, SwiGLU up and down) and
    the output head, at several token counts;
then fits seconds = a·d² + b·d (attention) and seconds = c·tokens (linear layers) by least
squares and writes ``{"attn_coef": ..., "linear_coef": ...}`` for ``data.cost_profile``.

The "cp" section feeds the context-parallel sharding estimate (``ShardCostEstimator``): the
attention of n chunks of q queries over a k-key prefix each (what a CP rank computes) at shapes
from single leftover tokens to long chunks, fitted as seconds = call_s + chunk_s·n + tile FLOPs
/ flops_per_s, the tile FLOPs counted as the kernel's tiles under the causal mask. On a CPU
(the reference attention, no tiles) it is a smoke test of tiny shapes; --no-cp skips it.
CP divides every document's tokens over cp ranks, so both terms divide by cp; a pipeline stage
runs n_layers/pp layers, the last one also the head. On a CPU it runs tiny shapes as a smoke
test (`--lengths 64,128,256 --tokens 64,128,256`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from wlbtrain.config import ConfigError, load_config  # noqa: E402
from wlbtrain.metrics import device_name  # noqa: E402
from wlbtrain.parallel.sharding import (KERNEL_PASSES, KernelPass,  # noqa: E402
                                        ShardCostEstimator, causal_tiles)

GPU_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536, 131072]
GPU_TOKENS = [4096, 8192, 16384, 32768, 65536]
CPU_LENGTHS = [64, 128, 256, 512]
CPU_TOKENS = [64, 128, 256, 512]
# CP chunk shapes (q_len, k_len, chunks per call): lone leftover tokens and tiny chunks (the
# per-chunk overhead), calls of one chunk (the per-call overhead), and long head/tail chunks.
# Counts are large enough that the work outlasts a call's fixed cost (about 4 ms of host time
# per forward+backward on an H200 under gVisor), else the fit cannot tell them apart.
GPU_CP_SHAPES = [(1, 4096, 2048), (1, 32768, 256), (16, 16, 65536), (64, 64, 16384),
                 (128, 2048, 4096), (256, 256, 1), (512, 8192, 512), (2048, 2048, 512),
                 (4096, 32768, 16), (16384, 65536, 4), (32768, 32768, 1), (32768, 131072, 1)]
CPU_CP_SHAPES = [(1, 32, 8), (4, 16, 8), (16, 16, 2), (16, 64, 4), (32, 32, 1)]


def time_fwd_bwd(fn, inputs, repeats: int, device: torch.device) -> float:
    """Median seconds of forward + backward of ``fn(*inputs).sum()``."""
    def once():
        for x in inputs:
            x.grad = None
        fn(*inputs).float().sum().backward()

    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        once()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        once()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_fn(device: torch.device):
    """(name, fn(q, k, v)) for q: [d, Hq, D], k/v: [d, Hkv, D], one causal document."""
    if device.type == "cuda":
        try:
            from wlbtrain.kernels import varlen_attention

            def triton(q, k, v):
                d = q.shape[0]
                cu = torch.tensor([0, d], dtype=torch.int32, device=q.device)
                return varlen_attention(q, k, v, cu, cu, d, d, causal=True)
            return "triton varlen_attention", triton
        except ImportError:
            pass

    def sdpa(q, k, v):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, d, D]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return "torch sdpa", sdpa


def profile_attention(cfg, lengths, device, dtype, repeats):
    m, tp = cfg.model, cfg.parallel.tp
    hq, hkv, hd = m.n_heads // tp, m.n_kv_heads // tp, m.dim // m.n_heads
    name, fn = attention_fn(device)
    seconds = []
    for d in lengths:
        q = torch.randn(d, hq, hd, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(d, hkv, hd, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(d, hkv, hd, device=device, dtype=dtype, requires_grad=True)
        seconds.append(time_fwd_bwd(fn, (q, k, v), repeats, device))
    return name, seconds


def cp_attention_fn(device: torch.device, dtype):
    """(name, fn(q, k, v, cu_q, cu_k, max_q, max_k), kernel passes) for CP chunk shapes, or None
    when no varlen attention can be imported."""
    try:
        from wlbtrain.kernels import reference_varlen_attention, varlen_attention
        from wlbtrain.kernels.attention import backward_config, forward_config
    except ImportError:
        return None
    if device.type != "cuda":
        return "reference (smoke test)", reference_varlen_attention, KERNEL_PASSES
    probe = torch.empty(1, 1, 128, device=device, dtype=dtype)
    fwd, bwd = forward_config(probe), backward_config(probe)
    passes = (KernelPass("forward", fwd.block_m, fwd.block_n, 2),
              KernelPass("backward_dkdv", bwd.dkdv.block_m, bwd.dkdv.block_n, 4),
              KernelPass("backward_dq", bwd.dq.block_m, bwd.dq.block_n, 3))
    return "triton varlen_attention", varlen_attention, passes


def profile_cp(cfg, shapes, device, dtype, repeats) -> dict | None:
    """Time n chunks of (q_len, k_len) per call; fit call_s, chunk_s and the tile FLOP rate."""
    found = cp_attention_fn(device, dtype)
    if found is None:
        return None
    name, attention, passes = found
    m, tp = cfg.model, cfg.parallel.tp
    hq, hkv, hd = m.n_heads // tp, m.n_kv_heads // tp, m.dim // m.n_heads
    unit = ShardCostEstimator(heads=hq, head_dim=hd, flops_per_s=1.0, chunk_s=0.0, call_s=0.0,
                              passes=passes)
    seconds, tile_flops = [], []
    for q_len, k_len, n in shapes:
        q = torch.randn(n * q_len, hq, hd, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(n * k_len, hkv, hd, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(n * k_len, hkv, hd, device=device, dtype=dtype, requires_grad=True)
        cu_q = (torch.arange(n + 1, device=device) * q_len).to(torch.int32)
        cu_k = (torch.arange(n + 1, device=device) * k_len).to(torch.int32)

        def call(q, k, v):
            return attention(q, k, v, cu_q, cu_k, q_len, k_len, causal=True)
        seconds.append(time_fwd_bwd(call, (q, k, v), repeats, device))
        tile_flops.append(float(unit.chunk_costs([q_len], [k_len])[0]) * n)  # FLOPs at 1 FLOP/s
        del q, k, v
    counts = np.array([n for _, _, n in shapes], dtype=np.float64)
    columns = np.stack([np.ones_like(counts), counts, np.array(tile_flops)], axis=1)
    # relative errors: the shapes span 3 ms to 75 ms, and the short ones carry the overheads
    weight = 1.0 / np.array(seconds)
    call_s, chunk_s, s_per_flop = nonnegative_fit(columns * weight[:, None],
                                                  np.array(seconds) * weight)
    if s_per_flop <= 0:  # noise swallowed the work term: the mean rate instead
        s_per_flop = sum(seconds) / sum(tile_flops)
    return {"flops_per_s": 1.0 / s_per_flop, "chunk_s": chunk_s, "call_s": call_s,
            "heads": hq, "head_dim": hd, "passes": [list(p) for p in passes],
            "attention": name, "shapes": [list(s) for s in shapes], "seconds": seconds,
            "achieved_tflops": [f / t / 1e12 for f, t in zip(tile_flops, seconds)]}


def nonnegative_fit(a, y):
    """Least squares with every coefficient >= 0: the best of the fits on column subsets whose
    coefficients all come out >= 0 (exact for the few columns used here)."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y ** 2))
    for mask in range(1, 2 ** a.shape[1]):
        cols = [j for j in range(a.shape[1]) if mask >> j & 1]
        coef = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
        err = float(np.sum((a[:, cols] @ coef - y) ** 2))
        if (coef >= 0).all() and err < best_err:
            best, best_err = np.zeros(a.shape[1]), err
            best[cols] = coef
    return [float(c) for c in best]


def layer_matmuls(cfg, device, dtype):
    """One layer's TP-sharded weights, as a rank holds them: a function of x [T, dim]."""
    m, tp = cfg.model, cfg.parallel.tp
    kv = m.dim * m.n_kv_heads // m.n_heads

    def weight(rows, cols):
        return (torch.randn(rows, cols, device=device, dtype=dtype) * rows ** -0.5).requires_grad_()
    wqkv, wo = weight(m.dim, (m.dim + 2 * kv) // tp), weight(m.dim // tp, m.dim)
    w13, w2 = weight(m.dim, 2 * m.ffn_dim // tp), weight(m.ffn_dim // tp, m.dim)
    q_width = m.dim // tp

    def layer(x):
        attn_in = (x @ wqkv)[:, :q_width]  # attention itself is timed separately
        h = x + attn_in @ wo
        gate, up = (h @ w13).chunk(2, dim=-1)
        return h + (F.silu(gate) * up) @ w2
    return layer, [wqkv, wo, w13, w2]


def profile_linear(cfg, tokens, device, dtype, repeats):
    m, tp = cfg.model, cfg.parallel.tp
    layer, weights = layer_matmuls(cfg, device, dtype)
    head = (torch.randn(m.dim, m.vocab_size // tp, device=device, dtype=dtype) * 0.02).requires_grad_()
    layer_s, head_s = [], []
    for t in tokens:
        x = torch.randn(t, m.dim, device=device, dtype=dtype, requires_grad=True)
        layer_s.append(time_fwd_bwd(lambda x, *w: layer(x), (x, *weights), repeats, device))
        head_s.append(time_fwd_bwd(lambda x, w: x @ w, (x, head), repeats, device))
    return layer_s, head_s


def fit(x, y, powers):
    """Least-squares coefficients of y ≈ Σ c_p·x^p (+ an intercept: launch overhead, dropped).

    Noisy timings can make a coefficient negative; then the fit is redone through the origin,
    and what is still negative is clipped to 0.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    columns = [x ** p for p in powers]
    coef = np.linalg.lstsq(np.stack(columns + [np.ones_like(x)], axis=1), y, rcond=None)[0][:-1]
    if (coef < 0).any():
        coef = np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)[0]
    return [max(float(c), 0.0) for c in coef]


def build_profile(cfg, lengths, tokens, device, dtype, repeats, cp_shapes=None) -> dict:
    par = cfg.parallel
    layers = cfg.model.n_layers / par.pp
    backend, attn_s = profile_attention(cfg, lengths, device, dtype, repeats)
    layer_s, head_s = profile_linear(cfg, tokens, device, dtype, repeats)
    attn_sq, attn_lin = fit(lengths, attn_s, (2, 1))
    (per_token_layer,) = fit(tokens, layer_s, (1,))
    (per_token_head,) = fit(tokens, head_s, (1,))
    attn_coef = layers * attn_sq / par.cp
    linear_coef = (layers * (per_token_layer + attn_lin) + per_token_head) / par.cp
    if attn_coef == 0 and linear_coef == 0:
        raise RuntimeError("every fitted coefficient is 0: the timings are too noisy; raise "
                           "--repeats or use longer --lengths/--tokens")
    profile = {"attn_coef": attn_coef, "linear_coef": linear_coef,
            "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "attention": backend, "layers_per_stage": layers, "tp": par.tp, "cp": par.cp,
            "pp": par.pp, "lengths": list(lengths), "attention_s": attn_s,
            "tokens": list(tokens), "layer_s": layer_s, "head_s": head_s,
            "torch": torch.__version__}
    if cp_shapes:
        cp = profile_cp(cfg, cp_shapes, device, dtype, repeats)
        if cp is not None:
            profile["cp"] = cp
    return profile


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--lengths", type=_ints, help="attention document lengths")
    parser.add_argument("--tokens", type=_ints, help="token counts for the linear layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cp", action="store_true", dest="no_cp",
                        help="skip the CP chunk-shape section")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"profile_cost: {err}", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        print("profile_cost: --device cuda, but no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    lengths = args.lengths or [d for d in (GPU_LENGTHS if use_cuda else CPU_LENGTHS)
                               if d <= max(cfg.data.max_tokens_per_micro_batch, 64)]
    tokens = args.tokens or (GPU_TOKENS if use_cuda else CPU_TOKENS)
    if len(lengths) < 3 or len(tokens) < 2:
        print("profile_cost: need at least 3 --lengths and 2 --tokens to fit", file=sys.stderr)
        return 2
    cp_shapes = None if args.no_cp else (GPU_CP_SHAPES if use_cuda else CPU_CP_SHAPES)
    profile = build_profile(cfg, lengths, tokens, device, dtype, args.repeats, cp_shapes)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"attn_coef {profile['attn_coef']:.3e} s/token², linear_coef "
          f"{profile['linear_coef']:.3e} s/token ({profile['attention']}, {profile['device']}) "
          f"→ {args.out}")
    if "cp" in profile:
        cp = profile["cp"]
        print(f"cp: {cp['flops_per_s'] / 1e12:.0f} TFLOP/s per tile FLOP, chunk {cp['chunk_s'] * 1e6:.2f} "
              f"µs, call {cp['call_s'] * 1e6:.1f} µs ({cp['attention']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
