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

GPU_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536, 131072]
GPU_TOKENS = [4096, 8192, 16384, 32768, 65536]
CPU_LENGTHS = [64, 128, 256, 512]
CPU_TOKENS = [64, 128, 256, 512]


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


def build_profile(cfg, lengths, tokens, device, dtype, repeats) -> dict:
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
    return {"attn_coef": attn_coef, "linear_coef": linear_coef,
            "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "attention": backend, "layers_per_stage": layers, "tp": par.tp, "cp": par.cp,
            "pp": par.pp, "lengths": list(lengths), "attention_s": attn_s,
            "tokens": list(tokens), "layer_s": layer_s, "head_s": head_s,
            "torch": torch.__version__}


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
    profile = build_profile(cfg, lengths, tokens, device, dtype, args.repeats)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"attn_coef {profile['attn_coef']:.3e} s/token², linear_coef "
          f"{profile['linear_coef']:.3e} s/token ({profile['attention']}, {profile['device']}) "
          f"→ {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
