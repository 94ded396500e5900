"""Cost model: the formula, FLOP-count defaults, profiles, and the profiling script's smoke run."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from wlbtrain.data.cost import CostModel, imbalance, layer_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_7B = SimpleNamespace(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                           vocab_size=32000)


def layout(tp=1, pp=1, cp=1, dp=1):
    return SimpleNamespace(tp=tp, pp=pp, cp=cp, dp=dp)


def test_micro_batch_cost_is_quadratic_plus_linear():
    cm = CostModel(attn_coef=2.0, linear_coef=3.0)
    assert cm.piece_cost(10) == 2 * 100 + 3 * 10
    assert cm.micro_batch_cost([10, 5]) == 230 + 65
    assert cm.micro_batch_cost([]) == 0
    # one long document costs more than the same tokens in short ones
    assert cm.micro_batch_cost([100]) > cm.micro_batch_cost([25] * 4)


def test_vectorised_costs_match_and_do_not_overflow():
    cm = CostModel(attn_coef=1e-11, linear_coef=1e-6)
    lengths = np.array([1, 4096, 131072, 3_000_000_000], dtype=np.int64)
    assert np.allclose(cm.piece_costs(lengths), [cm.piece_cost(int(d)) for d in lengths])
    assert cm.piece_costs(lengths)[-1] > 0


def test_from_model_counts_flops_of_one_pipeline_stage():
    peak = 1e15
    cm = CostModel.from_model(LLAMA_7B, layout(), peak_flops=peak)
    # causal attention: 2·dim·d² forward, 3.5× with the backward (which recomputes QKᵀ)
    assert cm.attn_coef == pytest.approx(32 * 3.5 * 2 * 4096 / peak)
    # linear: 6 FLOPs per weight and token (fwd+bwd), 32 layers of 4·dim² + 3·dim·ffn, and the head
    per_layer = 4 * 4096 ** 2 + 3 * 4096 * 11008
    assert layer_params(LLAMA_7B) == per_layer
    assert cm.linear_coef == pytest.approx(6 * (32 * per_layer + 32000 * 4096) / peak)
    # 6·params per token, ~7B params: attention equals the rest near 40K-token documents
    assert 30_000 < cm.crossover_length() < 50_000


def test_from_model_divides_by_the_layout():
    full = CostModel.from_model(LLAMA_7B, layout())
    split = CostModel.from_model(LLAMA_7B, layout(tp=8, cp=2, pp=4, dp=2))
    assert split.attn_coef == pytest.approx(full.attn_coef / (8 * 2 * 4))
    head = 6 * 32000 * 4096 / 989e12
    assert split.linear_coef == pytest.approx(((full.linear_coef - head) / 4 + head) / 16)


def test_grouped_query_attention_has_fewer_kv_weights():
    gqa = SimpleNamespace(**{**vars(LLAMA_7B), "n_kv_heads": 8})
    assert layer_params(gqa) == layer_params(LLAMA_7B) - 2 * 4096 * (4096 - 1024)
    assert CostModel.from_model(gqa, layout()).attn_coef == CostModel.from_model(LLAMA_7B, layout()).attn_coef


def test_profile_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"attn_coef": 1e-12, "linear_coef": 2e-7, "device": "x"}))
    assert CostModel.from_profile(path) == CostModel(1e-12, 2e-7)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "cannot read"),
    (json.dumps({"attn_coef": 1.0}), "linear_coef"),
    (json.dumps({"attn_coef": -1.0, "linear_coef": 1.0}), "attn_coef"),
])
def test_bad_profiles_are_refused(tmp_path, content, message):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        CostModel.from_profile(path)


def test_imbalance():
    assert imbalance([1.0, 1.0, 1.0]) == 1.0
    assert imbalance([3.0, 1.0]) == 1.5
    assert imbalance([0.0, 0.0]) == 1.0


def test_profile_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "profile_cost.py"),
         os.path.join(ROOT, "recipes", "debug.yaml"), "--out", str(out), "--device", "cpu",
         "--lengths", "32,64,128", "--tokens", "32,64", "--repeats", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    profile = json.loads(out.read_text())
    assert {"attn_coef", "linear_coef", "device", "attention_s", "layer_s"} <= profile.keys()
    cm = CostModel.from_profile(out)  # whatever the noise, it loads as a valid model
    assert cm.piece_cost(128) > 0
