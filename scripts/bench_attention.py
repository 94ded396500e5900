"""Benchmark attention over packed documents on one GPU.

Compares the Triton kernel (wlbtrain.kernels.varlen_attention) with FlexAttention under a
document block mask, torch.nn.attention.varlen.varlen_attn (FlashAttention 2) and SDPA called once
per document, on packed sequences whose document lengths are drawn from real length samples.
Reports forward and forward+backward time and TFLOP/s (forward = 2·Hq·D·Σdᵢ², forward+backward
3.5× that), the relative L2 error of the output against an fp32 reference on a subset of rows, and
the per-batch preparation each method needs. The markdown table is printed last.

    python scripts/bench_attention.py                       # layouts from the JSON beside this
    python scripts/bench_attention.py --doclens-dir ../shared/data/doclens --write-layouts
    python scripts/bench_attention.py --sweep --out $OUT    # also tune Hopper tiles first
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import warnings

import numpy as np
import torch

# create_block_mask(_compile=True) warns on newer torch; it is the form every supported torch has.
warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")

HERE = Path(__file__).resolve().parent
LAYOUTS = HERE / "bench_attention_layouts.json"
SOURCES = {"wlbllm_fig3": "wlbllm_fig3.json", "wikipedia": "wikipedia_1m.txt"}
SIZES = (16384, 65536, 131072)
SEED = 1234
Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
ERROR_ROWS = 256  # query rows per checked document (the last ones: they see the most keys)
ERROR_DOCS = 3
BWD_FACTOR = 3.5


def import_kernels():
    try:
        import wlbtrain.kernels as kernels
    except ImportError:  # not installed: use the source tree
        sys.path.insert(0, str(HERE.parent))
        import kernels
    return kernels


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------

def read_lengths(path):
    path = Path(path)
    if path.suffix == ".json":
        return np.asarray(json.loads(path.read_text()), dtype=np.int64)
    return np.loadtxt(path, dtype=np.int64)


def pack(lengths, tokens, rng):
    """Draw documents until `tokens` are filled; documents are capped at the packed length and
    the last one is cut so that the sum is exactly `tokens`."""
    docs = []
    while sum(docs) < tokens:
        doc = int(min(rng.choice(lengths), tokens - sum(docs)))
        if doc > 0:
            docs.append(doc)
    return docs


def make_layouts(doclens_dir):
    layouts = []
    for name, file in SOURCES.items():
        lengths = read_lengths(Path(doclens_dir) / file)
        for tokens in SIZES:
            rng = np.random.default_rng([SEED, tokens, len(name)])
            layouts.append({"source": name, "tokens": tokens, "docs": pack(lengths, tokens, rng)})
    return layouts


# ------------------------------------------------------------------------------------------------
# Methods: each returns (prepare(docs) -> state, run(q, k, v, state) -> out [T, Hq, D])
# ------------------------------------------------------------------------------------------------

def triton_method(kernels):
    def prepare(docs):
        cu = torch.tensor([0] + docs, device="cuda").cumsum(0).to(torch.int32)
        return cu, max(docs)

    def run(q, k, v, state):
        cu, max_len = state
        return kernels.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=True)
    return prepare, run


def varlen_attn_method():
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        extra["enable_gqa"] = True

    def prepare(docs):
        cu = torch.tensor([0] + docs, device="cuda").cumsum(0).to(torch.int32)
        return cu, max(docs)

    def run(q, k, v, state):
        cu, max_len = state
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
    return prepare, run


def flex_method():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)

    def prepare(docs):
        doc_id = torch.repeat_interleave(torch.arange(len(docs), device="cuda"),
                                         torch.tensor(docs, device="cuda"))

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_id[q_idx] == doc_id[kv_idx]) & (q_idx >= kv_idx)
        total = sum(docs)
        return create_block_mask(document_causal, None, None, total, total, device="cuda",
                                 _compile=True)

    def run(q, k, v, block_mask):
        heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = flex(*heads_first, block_mask=block_mask, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)
    return prepare, run


def sdpa_method():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def prepare(docs):
        cu = torch.tensor([0] + docs, device="cuda").cumsum(0).to(torch.int32)
        return cu.tolist()  # the per-document loop needs the boundaries on the host

    def run(q, k, v, bounds):
        outs = []
        with sdpa_kernel(fast):
            for start, end in zip(bounds[:-1], bounds[1:]):
                qd, kd, vd = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                           enable_gqa=True))
        return torch.cat([o.squeeze(0).transpose(0, 1) for o in outs])
    return prepare, run


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------

def bench_ms(fn, budget_ms):
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(25, budget_ms // 4), rep=budget_ms, return_mode="median")


def forward_tflops(docs):
    return 2.0 * Q_HEADS * HEAD_DIM * sum(d * d for d in docs)


def make_qkv(tokens, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(heads):
        return torch.randn(tokens, heads, HEAD_DIM, device="cuda", generator=gen,
                           dtype=torch.bfloat16).requires_grad_()
    return rand(Q_HEADS), rand(KV_HEADS), rand(KV_HEADS)


def reference_subset(kernels, q, k, v, docs):
    """Row indices and an fp32 reference output for the last ERROR_ROWS queries of the longest
    document and of a few others."""
    starts = np.concatenate([[0], np.cumsum(docs)[:-1]])
    picks = sorted(set([int(np.argmax(docs))] + list(range(0, len(docs),
                                                        max(1, len(docs) // ERROR_DOCS)))))
    picks = picks[:ERROR_DOCS + 1]
    rows, outs = [], []
    for i in picks:
        start, length = int(starts[i]), int(docs[i])
        n = min(ERROR_ROWS, length)
        cu_q = torch.tensor([0, n], device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0, length], device="cuda", dtype=torch.int32)
        with torch.no_grad():
            out = kernels.reference_varlen_attention(
                q[start + length - n:start + length].float(), k[start:start + length].float(),
                v[start:start + length].float(), cu_q, cu_k, n, length, causal=True)
        rows.append(torch.arange(start + length - n, start + length, device="cuda"))
        outs.append(out)
    return torch.cat(rows), torch.cat(outs)


def rel_l2(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


def measure(name, method, layout, qkv, ref_rows, ref_out, budget_ms):
    prepare, run = method
    docs = layout["docs"]
    q, k, v = qkv
    prepare(docs)  # compile / warm up
    torch.cuda.synchronize()
    prep_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state = prepare(docs)
        torch.cuda.synchronize()
        prep_times.append((time.perf_counter() - t0) * 1e3)
    with torch.no_grad():
        out = run(q, k, v, state)
    error = rel_l2(out[ref_rows], ref_out)
    del out
    fwd_ms = bench_ms(lambda: run(q, k, v, state), budget_ms)
    grad = torch.randn(q.shape, device="cuda", dtype=q.dtype)

    def fwd_bwd():
        run(q, k, v, state).backward(grad)
    fwd_bwd_ms = bench_ms(fwd_bwd, 2 * budget_ms)
    for t in qkv:
        t.grad = None
    flops = forward_tflops(docs)
    return {"method": name, "source": layout["source"], "tokens": layout["tokens"],
            "docs": len(docs), "prep_ms": float(np.median(prep_times)), "fwd_ms": fwd_ms,
            "fwd_tflops": flops / fwd_ms / 1e9, "fwd_bwd_ms": fwd_bwd_ms,
            "fwd_bwd_tflops": BWD_FACTOR * flops / fwd_bwd_ms / 1e9, "rel_err": error}


# ------------------------------------------------------------------------------------------------
# Tile sweep (Hopper)
# ------------------------------------------------------------------------------------------------

# Candidate tiles (block_m, block_n, num_warps, num_stages) for --sweep. Tiles that spill
# registers or overflow shared memory are reported and skipped.
FORWARD_CANDIDATES = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                      (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3),
                      (128, 128, 4, 3)]
DKDV_CANDIDATES = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (128, 128, 8, 2),
                   (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 3),
                   (32, 128, 4, 3), (32, 128, 4, 2), (16, 128, 4, 3), (32, 128, 8, 3),
                   (16, 128, 8, 3), (16, 64, 4, 3), (32, 64, 4, 5), (128, 64, 8, 2),
                   (128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (32, 128, 4, 5)]
DQ_CANDIDATES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3),
                 (128, 128, 8, 2), (128, 32, 4, 3), (128, 32, 4, 5), (128, 32, 8, 3),
                 (64, 32, 4, 3), (128, 64, 4, 3), (64, 64, 8, 3)]
ATOMIC_DQ_CANDIDATES = [(32, 128, 8, 2)]
SPLIT_DKDV_CANDIDATES = [(64, 128, 8, 2), (64, 128, 8, 3), (128, 128, 8, 2)]


def log_kernel_times(fn, log):
    """CUDA time per kernel of one call, to see which part of the backward dominates."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
        log(f"kernel {event.key[:60]}: {event.device_time_total / 3e3:.3f} ms per call")


def sweep(kernels, layout, log):
    """Time candidate tiles on one layout; returns the fastest forward and backward configs."""
    attention = sys.modules[kernels.varlen_attention.__module__]
    K, B = attention.KernelConfig, attention.BackwardConfig
    docs = layout["docs"]
    q, k, v = (t.detach() for t in make_qkv(layout["tokens"], 0))
    cu = torch.tensor([0] + docs, device="cuda").cumsum(0).to(torch.int32)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    flops = forward_tflops(docs)
    results = {"forward": [], "backward": []}
    expected = {}

    def time_config(kind, config, fn):
        """Time one candidate; its results must match the first candidate's of the same kind
        (a variant that computes something else is reported, not kept)."""
        try:
            got = [t.float() for t in fn()]
            want = expected.setdefault(kind, got)
            err = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(got, want))
            ms = bench_ms(fn, 300)
            rate = (1.0 if kind == "forward" else BWD_FACTOR - 1) * flops / ms / 1e9
            if err > 1e-2:
                log(f"sweep {kind} {config}: WRONG (rel. L2 {err:.1e} against the first)")
                return
            results[kind].append((ms, config))
            log(f"sweep {kind} {config}: {ms:.3f} ms {rate:.0f} TFLOP/s (rel. L2 {err:.1e})")
        except Exception as exc:  # a tile that does not fit is skipped, not fatal
            log(f"sweep {kind} {config}: failed {type(exc).__name__}: {str(exc)[:200]}")

    for cfg in map(K._make, FORWARD_CANDIDATES):
        time_config("forward", cfg, lambda cfg=cfg: attention._forward(
            q, k, v, cu, cu, True, scale, q.dtype, cfg))
    best_fwd = min(results["forward"])[1]
    out, lse = attention._forward(q, k, v, cu, cu, True, scale, q.dtype, best_fwd)
    dout = torch.randn_like(out)

    def backward(cfg):
        return lambda: attention._backward(dout, q, k, v, out, lse, cu, cu, True, scale, None,
                                           q.dtype, cfg)
    shipped = attention.backward_config(q)
    for cfg in map(K._make, DKDV_CANDIDATES):
        time_config("backward", B(cfg, shipped.dq), backward(B(cfg, shipped.dq)))
    best_dkdv = min(results["backward"])[1].dkdv
    for cfg in map(K._make, DQ_CANDIDATES):
        time_config("backward", B(best_dkdv, cfg), backward(B(best_dkdv, cfg)))
    best_dq = min(results["backward"])[1].dq
    for cfg in map(K._make, ATOMIC_DQ_CANDIDATES):
        time_config("backward", B(cfg, best_dq, True), backward(B(cfg, best_dq, True)))
    for cfg in map(K._make, SPLIT_DKDV_CANDIDATES):
        time_config("backward", B(cfg, best_dq, split_dkdv=True),
                    backward(B(cfg, best_dq, split_dkdv=True)))
    best_bwd = min(results["backward"])[1]
    log_kernel_times(backward(best_bwd), log)
    log(f"sweep best forward {best_fwd} backward {best_bwd}")
    return best_fwd, best_bwd


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def markdown(rows):
    lines = ["| data | tokens / docs | method | prep ms | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
             "fwd+bwd TFLOP/s | rel. L2 err |", "|" + " --- |" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['source']} | {r['tokens'] // 1024}K / {r['docs']} | "
                         f"{r['method']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['source']} | {r['tokens'] // 1024}K / {r['docs']} | {r['method']} | "
                     f"{r['prep_ms']:.2f} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | "
                     f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.0f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def speedups(rows):
    """Triton fwd+bwd against the best of FlexAttention and varlen_attn, per layout."""
    lines = []
    keys = sorted({(r["source"], r["tokens"]) for r in rows}, key=lambda x: (x[0], x[1]))
    for source, tokens in keys:
        by = {r["method"]: r for r in rows
              if r["source"] == source and r["tokens"] == tokens and "error" not in r}
        rivals = [by[m]["fwd_bwd_ms"] for m in ("flex", "varlen_attn") if m in by]
        if "triton" in by and rivals:
            lines.append(f"- {source} {tokens // 1024}K: triton fwd+bwd "
                         f"{min(rivals) / by['triton']['fwd_bwd_ms']:.2f}× the best of "
                         f"FlexAttention and varlen_attn")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doclens-dir", help="folder with wlbllm_fig3.json and wikipedia_1m.txt; "
                        "draws new layouts instead of reading " + LAYOUTS.name)
    parser.add_argument("--write-layouts", action="store_true",
                        help="save the drawn layouts to " + LAYOUTS.name)
    parser.add_argument("--methods", default="triton,flex,varlen_attn,sdpa_per_doc")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--sweep", action="store_true", help="tune Triton tiles first (64K)")
    parser.add_argument("--heads", default="32,8", help="query heads,KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget-ms", type=int, default=400, help="timing budget per number")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for logs and table")
    args = parser.parse_args()

    heads = [int(h) for h in args.heads.split(",")]
    globals().update(Q_HEADS=heads[0], KV_HEADS=heads[1], HEAD_DIM=args.head_dim)
    layouts = make_layouts(args.doclens_dir) if args.doclens_dir else json.loads(
        LAYOUTS.read_text())
    if args.write_layouts:
        LAYOUTS.write_text(json.dumps(layouts) + "\n")
        print(f"wrote {LAYOUTS}")
        if not torch.cuda.is_available():
            return
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "bench_attention.log", "a") if out_dir else None

    def log(msg):
        print(msg, flush=True)
        if log_file:
            log_file.write(msg + "\n")
            log_file.flush()

    kernels = import_kernels()
    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"triton {__import__('triton').__version__} heads {Q_HEADS}/{KV_HEADS} dim {HEAD_DIM}")
    sizes = [int(s) for s in args.sizes.split(",")]
    sources = args.sources.split(",")
    layouts = [lay for lay in layouts if lay["tokens"] in sizes and lay["source"] in sources]
    # The target sizes first, so that a run cut short still has them.
    layouts.sort(key=lambda lay: (lay["tokens"] == min(sizes), lay["tokens"]))

    if args.sweep:
        attention = sys.modules[kernels.varlen_attention.__module__]
        target = next(lay for lay in layouts if lay["tokens"] == 65536) if any(
            lay["tokens"] == 65536 for lay in layouts) else layouts[0]
        try:
            best_fwd, best_bwd = sweep(kernels, target, log)
            attention.forward_config = lambda q: best_fwd
            attention.backward_config = lambda q: best_bwd
        except Exception as exc:  # keep the shipped tiles and still run the comparison
            log(f"sweep failed: {type(exc).__name__}: {exc}")

    factories = {"triton": lambda: triton_method(kernels), "flex": flex_method,
                 "varlen_attn": varlen_attn_method, "sdpa_per_doc": sdpa_method}
    methods = {}
    for name in args.methods.split(","):
        try:
            methods[name] = factories[name]()
        except Exception as exc:
            log(f"{name}: unavailable ({type(exc).__name__}: {exc})")
    rows = []
    for layout in layouts:
        qkv = make_qkv(layout["tokens"], layout["tokens"])
        ref_rows, ref_out = reference_subset(kernels, *(t.detach() for t in qkv), layout["docs"])
        for name, method in methods.items():
            try:
                row = measure(name, method, layout, qkv, ref_rows, ref_out, args.budget_ms)
            except Exception as exc:
                row = {"method": name, "source": layout["source"], "tokens": layout["tokens"],
                       "docs": len(layout["docs"]), "error": f"{type(exc).__name__}: {exc}"}
            torch.cuda.empty_cache()
            rows.append(row)
            log(json.dumps(row))
            write_report(out_dir, rows)
        del qkv
        torch.cuda.empty_cache()
    print(write_report(out_dir, rows))


def write_report(out_dir, rows):
    """The table so far; rewritten after every row so that a run cut short keeps its results."""
    table = markdown(rows) + "\n\n" + speedups(rows)
    if out_dir:
        (out_dir / "bench_attention.md").write_text(table + "\n")
        (out_dir / "bench_attention.json").write_text(json.dumps(rows, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
