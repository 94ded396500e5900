"""Regional compilation: the compiled model computes what the eager one does, and packed
micro-batches of ever-changing lengths and documents do not make it recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

from wlbtrain.config import ModelConfig
from wlbtrain.models.attention import reference_attention, segment_attention
from wlbtrain.models.llama import (apply_activation_checkpointing, apply_compile, build_model)

CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97)


def make_model(compiled: bool, checkpointing: str = "none", whole_layers: bool = True):
    model = build_model(CFG)
    apply_activation_checkpointing(model, checkpointing, every=2)
    if compiled:
        apply_compile(model, whole_layers)
    model.to_empty(device="cpu")
    model.init_weights(0)
    return model


def micro_batch(total: int, gen: torch.Generator):
    """``total`` tokens in 1-4 documents of random lengths."""
    cuts = torch.randint(1, total, (int(torch.randint(0, 4, (), generator=gen)),), generator=gen)
    bounds = sorted({0, total, *cuts.tolist()})
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    tokens = torch.randint(0, CFG.vocab_size, (total,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor(bounds, dtype=torch.int32)
    return tokens, positions, segment_attention(reference_attention, cu, max(lengths))


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
