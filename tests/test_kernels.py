"""Triton varlen attention against the pure-torch reference.

Without a GPU the kernels run in Triton's interpreter (small shapes, fp32, tight tolerances that
a wrong mask or a wrong block range fails). GPU tests compare 16-bit kernels with an fp32
reference by relative L2 error.
"""

import os

import torch

# The interpreter must be chosen before the kernels are decorated; the kernels module also
# falls back to it on its own when no GPU is visible.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import wlbtrain.kernels.attention as attention  # noqa: E402
from wlbtrain.kernels import (  # noqa: E402
    merge_attention_partials,
    reference_varlen_attention,
    varlen_attention,
    varlen_attention_backward,
    varlen_attention_forward,
)
from wlbtrain.kernels.attention import BackwardConfig, KernelConfig  # noqa: E402

ATOL = 2e-5
RTOL = 2e-5
# Tests not marked gpu run in the interpreter: skipped where it cannot (conftest.py says why).
pytestmark = pytest.mark.interpreter
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def random_layout(gen, kind, num_segments=5, max_len=40):
    """Per-segment (lq, lk). kind: 'self' (lq == lk), 'prefix' (lq <= lk, a chunk against its
    document's prefix) or 'any' (lq > lk too: early rows of a causal segment see no key).
    Segments of length 0 and lengths that are not multiples of the tile are always present."""
    lq = torch.randint(1, max_len, (num_segments,), generator=gen).tolist()
    lq[int(torch.randint(0, num_segments, (1,), generator=gen))] = 0
    if kind == "self":
        lk = list(lq)
    elif kind == "prefix":
        lk = [q + int(torch.randint(0, max_len, (1,), generator=gen)) for q in lq]
    else:
        lk = torch.randint(0, max_len, (num_segments,), generator=gen).tolist()
    return lq, lk


def make_inputs(gen, lq, lk, num_heads=4, num_kv_heads=2, head_dim=32, pad_q=3, pad_k=2,
                dtype=torch.float32, device="cpu"):
    """q, k, v with pad_q / pad_k rows after the last segment that no segment owns."""
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(sum(lq) + pad_q, num_heads, head_dim).requires_grad_()
    k = rand(sum(lk) + pad_k, num_kv_heads, head_dim).requires_grad_()
    v = rand(sum(lk) + pad_k, num_kv_heads, head_dim).requires_grad_()
    return q, k, v, _cu(lq, device), _cu(lk, device)


def run_with_grads(fn, q, k, v, cu_q, cu_k, causal, gen):
    """Output, LSE and (dq, dk, dv) of a loss that uses both the output and the LSE."""
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int((cu_k[1:] - cu_k[:-1]).max())
    out, lse = fn(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, return_lse=True)
    grad_out = torch.randn(out.shape, generator=gen).to(out)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse)
    # -inf LSE rows have no keys: their LSE gradient is zero by definition.
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    loss = (out * grad_out).sum() + (finite_lse * grad_lse).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_lse_close(actual, expected):
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "rows without keys differ"
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite])


def check_against_reference(q, k, v, cu_q, cu_k, causal, seed, atol=ATOL, rtol=RTOL):
    out, lse, grads = run_with_grads(varlen_attention, q, k, v, cu_q, cu_k, causal,
                                     torch.Generator().manual_seed(seed))
    ref_out, ref_lse, ref_grads = run_with_grads(reference_varlen_attention, q, k, v, cu_q, cu_k,
                                                 causal, torch.Generator().manual_seed(seed))
    assert_close(out, ref_out, atol, rtol)
    assert_lse_close(lse, ref_lse)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        assert_close(got, want, atol, rtol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,num_kv_heads", [("self", 2), ("prefix", 1), ("any", 4)])
def test_forward_lse_and_gradients_match_reference(causal, kind, num_kv_heads):
    gen = torch.Generator().manual_seed(100 * causal + ["self", "prefix", "any"].index(kind))
    lq, lk = random_layout(gen, kind)
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, num_kv_heads=num_kv_heads)
    check_against_reference(q, k, v, cu_q, cu_k, causal, seed=int(gen.initial_seed()))


@pytest.mark.parametrize("config", [
    (KernelConfig(32, 16, 1, 1), BackwardConfig(KernelConfig(16, 32, 1, 1),
                                                KernelConfig(32, 16, 1, 1))),
    (KernelConfig(16, 32, 1, 1), BackwardConfig(KernelConfig(32, 16, 1, 1),
                                                KernelConfig(16, 32, 1, 1), atomic_dq=True)),
    (KernelConfig(16, 16, 1, 1), BackwardConfig(KernelConfig(16, 32, 1, 1),
                                                KernelConfig(16, 16, 1, 1), split_dkdv=True)),
], ids=["tall", "wide-atomic-dq", "split-dkdv"])
@pytest.mark.parametrize("causal", [True, False])
def test_other_tile_shapes(monkeypatch, config, causal):
    """Block ranges and diagonal masks must hold when BLOCK_M != BLOCK_N, and the atomic-dQ
    and split dK/dV backward variants must agree with the reference too."""
    forward, backward = config
    monkeypatch.setattr(attention, "forward_config", lambda q: forward)
    monkeypatch.setattr(attention, "backward_config", lambda q: backward)
    gen = torch.Generator().manual_seed(7 + causal)
    lq, lk = random_layout(gen, "any", max_len=70)
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, num_heads=2, num_kv_heads=1)
    check_against_reference(q, k, v, cu_q, cu_k, causal, seed=11)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    lq, lk = random_layout(gen, "prefix", num_segments=3, max_len=36)
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, num_heads=2, num_kv_heads=1,
                                      head_dim=head_dim)
    check_against_reference(q, k, v, cu_q, cu_k, True, seed=3)


def test_rows_outside_segments_and_rows_without_keys():
    """Padding rows and causal rows that see no key: output 0, LSE -inf, zero gradients."""
    gen = torch.Generator().manual_seed(5)
    lq, lk = [20, 0, 9], [4, 6, 0]  # segment 0: rows 0..15 see nothing; segment 2: no keys
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, pad_q=5, pad_k=4)
    out, lse, (dq, dk, dv) = run_with_grads(varlen_attention, q, k, v, cu_q, cu_k, True, gen)
    blind = torch.cat([torch.arange(0, 16), torch.arange(20, 34)])
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.isneginf(lse[:, blind]).all()
    assert torch.isfinite(lse[:, 16:20]).all()
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    assert torch.equal(dk[10:], torch.zeros_like(dk[10:]))
    assert torch.equal(dv[10:], torch.zeros_like(dv[10:]))


def test_no_segments():
    gen = torch.Generator().manual_seed(0)
    q, k, v, _, _ = make_inputs(gen, [], [], pad_q=4, pad_k=3)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = varlen_attention(q, k, v, cu, cu, 0, 0, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (out.sum()).backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))


def test_strided_inputs():
    """q, k, v as views into one fused projection, as a model produces them."""
    gen = torch.Generator().manual_seed(9)
    lq = [13, 30, 7]
    qkv = torch.randn(sum(lq), 4 + 2 + 2, 32, generator=gen).requires_grad_()
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    cu = _cu(lq)
    out = varlen_attention(q, k, v, cu, cu, 30, 30)
    ref = reference_varlen_attention(q, k, v, cu, cu, 30, 30)
    assert_close(out, ref)
    grad = torch.randn(out.shape, generator=gen)
    (got,) = torch.autograd.grad((out * grad).sum(), qkv)
    (want,) = torch.autograd.grad((ref * grad).sum(), qkv)
    assert_close(got, want)


def test_block_tables_built_once_per_micro_batch(monkeypatch):
    """Calls sharing a block_tables dict (one micro-batch's layers) build the tile tables on the
    first call only and compute what calls without it compute."""
    built = []
    build = attention._block_table
    monkeypatch.setattr(attention, "_block_table", lambda *a: built.append(a) or build(*a))
    gen = torch.Generator().manual_seed(21)
    lq = [19, 40, 6]
    cu = _cu(lq)
    tables, shared_builds = {}, []
    for layer in range(2):
        q, k, v, _, _ = make_inputs(gen, lq, lq, pad_q=0, pad_k=0)
        before = len(built)
        shared = run_with_grads(lambda *a, **kw: varlen_attention(*a, **kw, block_tables=tables),
                                q, k, v, cu, cu, True, torch.Generator().manual_seed(layer))
        shared_builds.append(len(built) - before)
        plain = run_with_grads(varlen_attention, q, k, v, cu, cu, True,
                               torch.Generator().manual_seed(layer))
        for got, want in zip(shared[2] + shared[:2], plain[2] + plain[:2]):
            assert torch.equal(got, want)
    # forward, dK/dV and dQ tables (two are the same table where their tiles are) on the first
    # layer, none on the second
    assert 2 <= shared_builds[0] <= 3 and len(tables) == shared_builds[0]
    assert shared_builds[1] == 0


def test_rows_covered_skips_only_work_that_is_not_needed():
    """rows_covered (segments span every row) gives what the filled path gives, with gradients
    through the output alone, the LSE alone, or both; a layout it does not hold for is refused
    where cu_seqlens is on the host."""
    gen = torch.Generator().manual_seed(23)
    lq = [19, 40, 6]
    cu = _cu(lq)
    q, k, v, _, _ = make_inputs(gen, lq, lq, pad_q=0, pad_k=0)
    covered = run_with_grads(lambda *a, **kw: varlen_attention(*a, **kw, rows_covered=True),
                             q, k, v, cu, cu, True, torch.Generator().manual_seed(1))
    plain = run_with_grads(varlen_attention, q, k, v, cu, cu, True,
                           torch.Generator().manual_seed(1))
    for got, want in zip(covered[2] + covered[:2], plain[2] + plain[:2]):
        assert torch.equal(got, want)
    ref_out, ref_lse = reference_varlen_attention(q, k, v, cu, cu, 40, 40, return_lse=True)
    for pick in (lambda out, lse: out.square().sum(), lambda out, lse: lse.sum()):
        out, lse = varlen_attention(q, k, v, cu, cu, 40, 40, return_lse=True, rows_covered=True)
        got = torch.autograd.grad(pick(out, lse), (q, k, v))
        want = torch.autograd.grad(pick(ref_out, ref_lse), (q, k, v), retain_graph=True,
                                   allow_unused=True)  # the LSE does not depend on v
        for a, b, x in zip(got, want, (q, k, v)):
            assert_close(a, torch.zeros_like(x) if b is None else b)
    q, k, v, _, _ = make_inputs(gen, lq, lq, pad_q=3, pad_k=2)
    with pytest.raises(ValueError, match="rows_covered"):
        varlen_attention(q, k, v, cu, cu, 40, 40, rows_covered=True)


def test_heads_first_storage():
    """q, k, v stored [heads, tokens, D] and viewed [tokens, heads, D]: dense, not contiguous."""
    gen = torch.Generator().manual_seed(12)
    lq = [21, 9, 30]
    q = torch.randn(4, sum(lq), 32, generator=gen).transpose(0, 1).requires_grad_()
    k = torch.randn(2, sum(lq), 32, generator=gen).transpose(0, 1).requires_grad_()
    v = torch.randn(2, sum(lq), 32, generator=gen).transpose(0, 1).requires_grad_()
    cu = _cu(lq)
    check_against_reference(q, k, v, cu, cu, True, seed=13)


def split_keys(gen, cu_q, cu_k, causal):
    """Per segment a split point s: keys [0, s) form part A, [s, lk) part B. With a causal
    mask every query must see all of A, so s <= lk - lq; A is then attended without a mask
    and B with the bottom-right causal mask, which together equal causal attention."""
    lq = (cu_q[1:] - cu_q[:-1]).tolist()
    lk = (cu_k[1:] - cu_k[:-1]).tolist()
    starts = cu_k[:-1].tolist()
    index_a, index_b, len_a, len_b = [], [], [], []
    for start, q_len, k_len in zip(starts, lq, lk):
        limit = max(k_len - q_len, 0) if causal else k_len
        split = int(torch.randint(0, limit + 1, (1,), generator=gen))
        index_a += range(start, start + split)
        index_b += range(start + split, start + k_len)
        len_a.append(split)
        len_b.append(k_len - split)
    return (torch.tensor(index_a, dtype=torch.long), _cu(len_a),
            torch.tensor(index_b, dtype=torch.long), _cu(len_b))


@pytest.mark.parametrize("causal", [True, False])
def test_merge_of_key_halves_equals_full_attention(causal):
    gen = torch.Generator().manual_seed(21 + causal)
    lq, lk = random_layout(gen, "prefix" if causal else "any")
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk)
    index_a, cu_a, index_b, cu_b = split_keys(gen, cu_q, cu_k, causal)
    with torch.no_grad():
        out_a, lse_a = varlen_attention_forward(q, k[index_a], v[index_a], cu_q, cu_a, 40, 80,
                                                causal=False, out_dtype=torch.float32)
        out_b, lse_b = varlen_attention_forward(q, k[index_b], v[index_b], cu_q, cu_b, 40, 80,
                                                causal=causal)
        out, lse = merge_attention_partials(out_a, lse_a, out_b, lse_b)
        ref_out, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, 40, 80, causal=causal,
                                                      return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, ref_out)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("causal", [True, False])
def test_external_out_lse_backward_over_key_halves(causal):
    """Backward of each key half with the merged out and LSE, summed, is the full gradient."""
    gen = torch.Generator().manual_seed(31 + causal)
    lq, lk = random_layout(gen, "prefix" if causal else "any")
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, num_kv_heads=1)
    index_a, cu_a, index_b, cu_b = split_keys(gen, cu_q, cu_k, causal)
    out, lse = reference_varlen_attention(q, k, v, cu_q, cu_k, 40, 80, causal=causal,
                                          return_lse=True)
    dout = torch.randn(out.shape, generator=gen)
    want = torch.autograd.grad((out * dout).sum(), (q, k, v))
    out, lse = out.detach(), lse.detach()
    with torch.no_grad():
        dq_a, dk_a, dv_a = varlen_attention_backward(dout, q, k[index_a], v[index_a], out, lse,
                                                     cu_q, cu_a, 40, 80, causal=False,
                                                     grad_dtype=torch.float32)
        dq_b, dk_b, dv_b = varlen_attention_backward(dout, q, k[index_b], v[index_b], out, lse,
                                                     cu_q, cu_b, 40, 80, causal=causal)
    dk = torch.zeros_like(k).index_copy(0, index_a, dk_a).index_copy(0, index_b, dk_b)
    dv = torch.zeros_like(v).index_copy(0, index_a, dv_a).index_copy(0, index_b, dv_b)
    assert_close(dq_a + dq_b, want[0])
    assert_close(dk, want[1])
    assert_close(dv, want[2])


def test_merge_handles_rows_without_keys_on_either_side():
    gen = torch.Generator().manual_seed(2)
    out_a, out_b = torch.randn(4, 2, 8, generator=gen), torch.randn(4, 2, 8, generator=gen)
    lse_a, lse_b = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    inf = float("-inf")
    lse_a[:, 1] = inf  # only B sees keys
    lse_b[:, 2] = inf  # only A sees keys
    lse_a[:, 3] = inf  # neither does
    lse_b[:, 3] = inf
    for t in (out_a, out_b, lse_a, lse_b):
        t.requires_grad_()
    out, lse = merge_attention_partials(out_a, lse_a, out_b, lse_b)
    assert_close(out[1], out_b[1].detach())
    assert_close(out[2], out_a[2].detach())
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isneginf(lse[:, 3]).all()
    assert_close(lse[:, 0], torch.logaddexp(lse_a[:, 0], lse_b[:, 0]).detach())
    (out.sum() + torch.where(torch.isinf(lse), 0, lse).sum()).backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), "head dim 24"),
    (lambda q, k, v: (q, k.double(), v), "dtype"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple"),
])
def test_bad_inputs_raise(change, match):
    gen = torch.Generator().manual_seed(0)
    q, k, v, cu_q, cu_k = make_inputs(gen, [5], [5], pad_q=0, pad_k=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match=match):
            varlen_attention(*change(q, k, v), cu_q, cu_k, 5, 5)
        with pytest.raises(ValueError, match="int32"):
            varlen_attention(q, k, v, cu_q.long(), cu_k, 5, 5)


def rel_l2(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,head_dim,causal", [
    (torch.bfloat16, 128, True), (torch.bfloat16, 128, False), (torch.bfloat16, 64, True),
    (torch.float16, 128, True), (torch.float16, 64, False), (torch.float32, 128, True),
    (torch.float32, 64, False)])
def test_gpu_matches_fp32_reference(dtype, head_dim, causal):
    """Tiles of the tuned GPU path, long and short segments, GQA, lq < lk and lq > lk."""
    gen = torch.Generator().manual_seed(head_dim + causal)
    lq = [1500, 0, 333, 129, 1, 700]
    lk = [1500, 17, 900, 129, 64, 300]
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lk, num_heads=8, num_kv_heads=2,
                                      head_dim=head_dim, dtype=dtype, device="cuda")
    out, lse, grads = run_with_grads(varlen_attention, q, k, v, cu_q, cu_k, causal,
                                     torch.Generator().manual_seed(1))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse, ref_grads = run_with_grads(reference_varlen_attention, q32, k32, v32,
                                                 cu_q, cu_k, causal,
                                                 torch.Generator().manual_seed(1))
    limit = 2e-5 if dtype == torch.float32 else 1e-2
    assert rel_l2(out, ref_out) < limit
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    lse_tol = 1e-4 if dtype == torch.float32 else 2e-3  # scores accumulate in fp32 either way
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < lse_tol
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert rel_l2(got, want) < 2 * limit


@gpu
@needs_cuda
def test_gpu_atomic_dq_matches_separate_dq(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    lq = [700, 260, 1200]
    q, k, v, cu_q, cu_k = make_inputs(gen, lq, lq, num_heads=8, num_kv_heads=2, head_dim=128,
                                      dtype=torch.bfloat16, device="cuda")
    base = run_with_grads(varlen_attention, q, k, v, cu_q, cu_k, True,
                          torch.Generator().manual_seed(1))[2]
    config = attention.backward_config(q)
    monkeypatch.setattr(attention, "backward_config",
                        lambda q: BackwardConfig(KernelConfig(16, 128, 8, 2), config.dq, True))
    atomic = run_with_grads(varlen_attention, q, k, v, cu_q, cu_k, True,
                            torch.Generator().manual_seed(1))[2]
    for got, want in zip(atomic, base):
        assert rel_l2(got, want) < 1e-2
