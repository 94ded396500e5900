"""The model on packed documents equals the model on each document alone."""

import torch

from wlbtrain.config import ModelConfig
from wlbtrain.models.attention import reference_attention, segment_attention
from wlbtrain.models.llama import build_model, from_hf_state_dict, hf_state_dict, num_params

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97)


def make_model(seed=0):
    model = build_model(CFG)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def run(model, docs):
    tokens = torch.cat(docs)
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    return model(tokens, positions, segment_attention(reference_attention, cu, max(map(len, docs))))


def test_packed_equals_each_document_alone():
    torch.manual_seed(0)
    model = make_model()
    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (7, 1, 30, 12)]
    packed = run(model, docs)
    alone = torch.cat([run(model, [d]) for d in docs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # and the mask matters: one segment over everything differs
    joined = run(model, [torch.cat(docs)])
    assert not torch.allclose(joined[7:], packed[7:], atol=1e-3)


def test_changing_a_document_leaves_the_others_alone():
    model = make_model()
    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (9, 11)]
    base = run(model, docs)
    docs2 = [docs[0], docs[1].clone()]
    docs2[1][0] = (docs2[1][0] + 1) % CFG.vocab_size
    torch.testing.assert_close(run(model, docs2)[:9], base[:9])


def test_init_is_seeded_and_names_are_hugging_face():
    a, b = make_model(1), make_model(1)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(make_model(2).lm_head.weight, a.lm_head.weight)
    hf = hf_state_dict(a.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in hf
    assert "model.layers.1.mlp.down_proj.weight" in hf
    assert "model.embed_tokens.weight" in hf and "lm_head.weight" in hf
    assert set(from_hf_state_dict(hf)) == set(a.state_dict())
    assert sum(p.numel() for p in a.parameters()) == num_params(CFG, embedding=True)


def test_loss_within_the_logits_budget_runs_whole(monkeypatch):
    from wlbtrain.models import llama

    recomputed = []
    monkeypatch.setattr(llama, "checkpoint", lambda *a, **kw: recomputed.append(1) or a[0](*a[1:]))
    model = make_model()
    tokens = torch.randint(0, CFG.vocab_size, (22,))
    cu = torch.tensor([0, 22], dtype=torch.int32)
    attention = segment_attention(reference_attention, cu, 22)
    model(tokens, torch.arange(22), attention, labels=torch.roll(tokens, -1))
    assert recomputed == []
    monkeypatch.setattr(llama, "LOSS_LOGITS", 10 * CFG.vocab_size)
    model(tokens, torch.arange(22), attention, labels=torch.roll(tokens, -1))
    assert len(recomputed) == 3  # slices of 10, 10 and 2 tokens


def test_chunked_loss_equals_full_cross_entropy(monkeypatch):
    import torch.nn.functional as F

    from wlbtrain.models import llama

    monkeypatch.setattr(llama, "LOSS_LOGITS", 7 * CFG.vocab_size)  # slices of 7, the last short
    model = make_model()
    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (9, 13)]
    tokens = torch.cat(docs)
    labels = torch.roll(tokens, -1)
    labels[[8, 21]] = -100
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.tensor([0, 9, 22], dtype=torch.int32)
    attention = segment_attention(reference_attention, cu, 13)
    loss = model(tokens, positions, attention, labels=labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(tokens, positions, attention), labels, reduction="sum")
    full.backward()
    torch.testing.assert_close(loss, full)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_pipeline_stages_hold_the_whole_models_weights_and_compose():
    """Stages built with some layers each start from the whole model's weights (init keyed by
    name) and, run one after another, give the whole model's logits."""
    from wlbtrain.models.llama import Llama

    whole = make_model(3)
    stages = []
    for ids, embed, head in (((0,), True, False), ((1,), False, True)):
        with torch.device("meta"):
            stage = Llama(CFG, ids, embed, head)
        stage.to_empty(device="cpu")
        stage.init_weights(3)
        stages.append(stage)
    for stage in stages:
        for name, p in stage.named_parameters():
            assert torch.equal(p, whole.get_parameter(name)), name
    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (5, 8)]
    tokens, positions = torch.cat(docs), torch.cat([torch.arange(len(d)) for d in docs])
    attention = segment_attention(reference_attention, torch.tensor([0, 5, 13], dtype=torch.int32), 8)
    hidden = stages[0](tokens, positions, attention)
    torch.testing.assert_close(stages[1](hidden, positions, attention), run(whole, docs))


def test_activation_checkpointing_keeps_loss_and_gradients():
    from wlbtrain.models.llama import apply_activation_checkpointing

    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (9, 13)]
    tokens, positions = torch.cat(docs), torch.cat([torch.arange(len(d)) for d in docs])
    labels = torch.roll(tokens, -1)
    attention = segment_attention(reference_attention, torch.tensor([0, 9, 22], dtype=torch.int32), 13)
    results = {}
    for mode in ("none", "selective", "full"):
        model = make_model(4)
        apply_activation_checkpointing(model, mode, every=2)
        assert [layer.recompute for layer in model.layers.values()] == \
            {"none": [False, False], "selective": [True, False], "full": [True, True]}[mode]
        loss = model(tokens, positions, attention, labels=labels)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    for mode in ("selective", "full"):
        torch.testing.assert_close(results[mode][0], results["none"][0])
        for name, grad in results[mode][1].items():
            torch.testing.assert_close(grad, results["none"][1][name], msg=name)


def test_checkpointing_lets_the_device_initialise_inside_a_recomputed_layer(monkeypatch):
    # A CPU run on a GPU host initialises CUDA when the first checkpointed layer compiles; torch
    # refuses that if the checkpoint stashed RNG states (seen on the GPU image). Simulate that
    # host (checkpoint's default device is then CUDA) and the initialisation inside the first
    # recomputed layer: forward and backward must still run.
    from torch.utils.checkpoint import DefaultDeviceType

    from wlbtrain.models.llama import apply_activation_checkpointing

    monkeypatch.setattr(DefaultDeviceType, "_default_device_type", "cuda")

    model = make_model(5)
    apply_activation_checkpointing(model, "full", every=1)
    model.layers["0"].register_forward_pre_hook(
        lambda *_: monkeypatch.setattr(torch.cuda, "_initialized", True))
    monkeypatch.setattr(torch.cuda, "_initialized", False)
    tokens = torch.randint(0, CFG.vocab_size, (16,))
    attention = segment_attention(reference_attention, torch.tensor([0, 16], dtype=torch.int32), 16)
    loss = model(tokens, torch.arange(16), attention, labels=torch.roll(tokens, -1))
    loss.backward()
    assert torch.cuda._initialized and model.layers["0"].input_layernorm.weight.grad is not None


def test_residual_stream_is_in_the_autocast_dtype():
    """Under autocast the embedding (fp32 weights) is cast to the compute dtype, as FSDP's bf16
    weights make it, so every layer reads and adds bf16; without autocast nothing changes."""
    model = make_model(2)
    seen = []
    for layer in model.layers.values():
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    docs = [torch.randint(0, CFG.vocab_size, (n,)) for n in (9, 13)]
    full = run(model, docs)
    assert seen == [torch.float32] * CFG.n_layers and full.dtype == torch.float32
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(model, docs)
    assert seen == [torch.bfloat16] * CFG.n_layers
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.05)
