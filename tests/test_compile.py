"""Regional compilation: the compiled model computes what the eager one does, and packed
micro-batches of ever-changing lengths and documents do not make it recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

from wlbtrain.config import ModelConfig
import wlbtrain.kernels.attention as kernel_module
from wlbtrain.models.attention import (KernelAttention, reference_attention, segment_attention,
                                       triton_attention)
from wlbtrain.models.llama import (apply_activation_checkpointing, apply_compile, build_model)

CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97)


def make_model(compiled: bool, checkpointing: str = "none", whole_layers: bool = True,
               device: str = "cpu"):
    model = build_model(CFG)
    apply_activation_checkpointing(model, checkpointing, every=2)
    if compiled:
        apply_compile(model, whole_layers)
    model.to_empty(device=device)
    model.init_weights(0)
    return model


def documents(total: int, gen: torch.Generator):
    """``total`` tokens in 1-4 documents of random lengths: tokens, positions, cu_seqlens and
    the longest document's length."""
    cuts = torch.randint(1, total, (int(torch.randint(0, 4, (), generator=gen)),), generator=gen)
    bounds = sorted({0, total, *cuts.tolist()})
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    tokens = torch.randint(0, CFG.vocab_size, (total,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return tokens, positions, torch.tensor(bounds, dtype=torch.int32), max(lengths)


def micro_batch(total: int, gen: torch.Generator):
    tokens, positions, cu, longest = documents(total, gen)
    return tokens, positions, segment_attention(reference_attention, cu, longest)


def loss_and_grads(model, batch):
    tokens, positions, attention = batch
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, attention, labels=tokens.roll(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# whole layers, or (as under tensor parallelism) only RoPE and SwiGLU
@pytest.mark.parametrize("checkpointing,whole_layers", [("none", True), ("selective", True),
                                                         ("none", False)])
def test_compiled_layers_match_eager_and_compile_a_bounded_number_of_graphs(checkpointing,
                                                                            whole_layers):
    torch._dynamo.reset()
    counters.clear()
    eager = make_model(False, checkpointing)
    compiled = make_model(True, checkpointing, whole_layers)
    gen = torch.Generator().manual_seed(0)
    lengths = [40, 57, 64, 91, 33, 120, 77, 200, 45, 150]
    graphs = []
    for total in lengths:
        batch = micro_batch(total, gen)
        loss_e, grads_e = loss_and_grads(eager, batch)
        loss_c, grads_c = loss_and_grads(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-4, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    # two regions per layer (either side of attention) and the loss, shared by all layers (or
    # the two elementwise functions); no new graph for a new length
    assert graphs[-1] <= 6, graphs
    assert graphs[1] == graphs[-1], f"recompiled for a new length: {graphs}"
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled at all


# the interpreter on the CPU; compiled kernels and Inductor where there is a GPU
@pytest.mark.interpreter
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_kernel_attention_compiles_into_one_graph_per_layer(device, checkpointing, monkeypatch):
    """The Triton backend is a registered operator: a compiled layer is one graph (no break at
    the attention), new lengths and documents do not recompile it, gradients match the eager
    reference, and a micro-batch's tile tables are built once for all its layers and passes
    (with full checkpointing too, whose backward runs the operator's forward again)."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    builds = []
    build = kernel_module._block_table
    monkeypatch.setattr(kernel_module, "_block_table", lambda *a: builds.append(a) or build(*a))
    torch._dynamo.reset()
    counters.clear()
    eager = make_model(False, device=device)
    compiled = make_model(True, checkpointing, device=device)
    gen = torch.Generator().manual_seed(0)
    # under checkpointing two lengths show the same (a second one does not recompile)
    for total in (40, 57, 33, 91) if checkpointing == "none" else (40, 91):
        tokens, positions, cu, longest = (x.to(device) if torch.is_tensor(x) else x
                                          for x in documents(total, gen))
        reference = segment_attention(reference_attention, cu, longest)
        kernel = segment_attention(triton_attention, cu, longest, covered=True)
        assert isinstance(kernel, KernelAttention)
        loss_e, grads_e = loss_and_grads(eager, (tokens, positions, reference))
        builds.clear()
        loss_c, grads_c = loss_and_grads(compiled, (tokens, positions, kernel))
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-4, msg=name)
        # forward, dK/dV and dQ tables (two coincide at the interpreter's tiles), not per layer
        assert 1 <= len(builds) <= 3, len(builds)
        # one graph for every layer, one for the loss
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.interpreter
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_segment_attention_operator_passes_opcheck(device, monkeypatch):
    """Schema, fake tensors (shapes for the compiler), autograd registration and AOT dispatch of
    the registered operator, as torch checks them."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(40, 4, 16, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(40, 2, 16, generator=gen).to(device).requires_grad_() for _ in range(2))
    cu = torch.tensor([0, 13, 31, 40], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.wlbtrain.segment_attention.default, (q, k, v, cu, 18, True))
