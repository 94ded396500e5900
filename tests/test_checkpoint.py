"""Checkpoints reshard (saved on one layout, resumed on another), are atomic on every rank, split
into several safetensors files with an index, and a run can start from Hugging Face weights.

Layout pairs are data: adding one to RESHARD is one line.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from test_parallel import TINY, free_port
from wlbtrain import checkpoint as ckpt
from wlbtrain.cli import main
from wlbtrain.config import ConfigError, load_config
from wlbtrain.models.llama import build_model, from_hf_state_dict, hf_state_dict
from wlbtrain.train import Trainer, build_optimizer

# (save layout, its processes, resume layout, its processes); dp × micro_batches stays 4
RESHARD = [
    (["parallel.dp=2", "train.micro_batches=2"], 2, ["train.micro_batches=4"], 1),
    (["train.micro_batches=4"], 1, ["parallel.dp=2", "train.micro_batches=2"], 2),
    (["parallel.dp=2", "train.micro_batches=2"], 2, ["parallel.tp=2", "train.micro_batches=4"], 2),
    (["parallel.pp=2", "train.micro_batches=4"], 2, ["train.micro_batches=4"], 1),
    (["parallel.pp=2", "train.micro_batches=4"], 2, ["parallel.pp=2", "train.micro_batches=4"], 2),
    (["parallel.cp=2", "train.micro_batches=4"], 2, ["parallel.dp=2", "train.micro_batches=2"], 2),
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def launch(out_dir, cache, overrides, nproc=1, script=None):
    """Train TINY with ``overrides`` as ``nproc`` processes (in this process when 1)."""
    args = [*TINY, f"train.out_dir={out_dir}", f"data.cache_dir={cache}", *overrides]
    if nproc == 1 and script is None:
        assert main(["train", "recipes/debug.yaml", *args]) == 0
        return None
    entry = [script] if script else ["-m", "wlbtrain.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *entry, "train", "recipes/debug.yaml", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def losses(out_dir) -> dict[int, float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def all_weights(step_dir) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint: one model.safetensors, or one file per pipeline stage."""
    files = sorted(step_dir.glob("model*.safetensors"))
    assert files and ((step_dir / ckpt.WEIGHTS).exists() == (len(files) == 1))
    return {name: t for f in files for name, t in load_file(f).items()}


def layout_id(case):
    save, n_save, resume, n_resume = case
    return f"{' '.join(save)} x{n_save} -> {' '.join(resume)} x{n_resume}"


@pytest.mark.slow
@pytest.mark.parametrize("case", RESHARD, ids=layout_id)
def test_resume_on_another_layout(tmp_path, cache, case):
    save, n_save, resume, n_resume = case
    steps = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3"]
    done = launch(tmp_path / "saved", cache, [*steps, *save], n_save)
    assert done is None or done.returncode == 0, done.stderr[-3000:]
    step2 = tmp_path / "saved/checkpoints/step-2"
    done = launch(tmp_path / "resumed", cache, [*steps, *resume, f"checkpoint.resume={step2}"],
                  n_resume)
    assert done is None or done.returncode == 0, done.stderr[-3000:]

    full, resumed = losses(tmp_path / "saved"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[3], full[4]], rel=1e-5)
    want = all_weights(tmp_path / "saved/checkpoints/step-4")
    got = all_weights(tmp_path / "resumed/checkpoints/step-4")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, cache, monkeypatch):
    """A failure inside the sharded (DCP) part of a save: no half checkpoint is listed or left
    behind, the previous one still loads, and the run resumes from it."""
    launch(tmp_path, cache, ["train.steps=2", "checkpoint.every=1", "checkpoint.resume=auto"])

    def broken(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", broken)
    with pytest.raises(RuntimeError, match="rank 0: OSError: no space left"):
        main(["train", "recipes/debug.yaml", *TINY, f"train.out_dir={tmp_path}",
              f"data.cache_dir={cache}", "train.steps=3", "checkpoint.every=1",
              "checkpoint.resume=auto"])
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]

    launch(tmp_path, cache, ["train.steps=3", "checkpoint.every=1", "checkpoint.resume=auto"])
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"


FAIL_ON_RANK_1 = """
import os, sys
from wlbtrain import checkpoint as ckpt
from wlbtrain.cli import main

save_rng = ckpt._save_rng
def broken(tmp):
    if os.environ["RANK"] == "1" and tmp.name == ".tmp-step-2":
        raise OSError("rank 1 cannot write")
    save_rng(tmp)
ckpt._save_rng = broken
try:
    sys.exit(main(sys.argv[1:]))
except RuntimeError as err:
    print(f"RANK {os.environ['RANK']} raised: {err}", file=sys.stderr, flush=True)
    raise
"""


@pytest.mark.slow
def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path, cache):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    done = launch(tmp_path / "run", cache, ["parallel.dp=2", "train.micro_batches=2",
                                            "train.steps=3", "checkpoint.every=1"], 2, script)
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"RANK {rank} raised: saving checkpoint" in done.stderr, done.stderr[-3000:]
        assert "rank 1: OSError: rank 1 cannot write" in done.stderr
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1]
    assert not list((tmp_path / "run/checkpoints").glob(".tmp-*"))


def test_large_weights_split_into_files_with_an_index(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(ckpt, "SHARD_BYTES", 100_000)  # the 64 KiB embedding fills one file
    launch(tmp_path, cache, ["train.steps=1", "checkpoint.every=1"])
    step = tmp_path / "checkpoints/step-1"
    index = json.loads((step / ckpt.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (step / ckpt.WEIGHTS).exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                     for i in range(1, len(files) + 1)]
    shards = {}
    for name in files:
        part = load_file(step / name)
        assert all(index["weight_map"][k] == name for k in part)
        assert os.path.getsize(step / name) < 100_000 + 70_000  # one tensor may overflow a file
        shards.update(part)
    assert sum(t.numel() * 4 for t in shards.values()) == index["metadata"]["total_size"]

    # The split weights are the trained ones: those the sharded training state restores.
    cfg = load_config("recipes/debug.yaml", TINY)
    model = _cpu_model(cfg)
    ckpt.load_checkpoint(step, model, build_optimizer(model, cfg))
    trained = hf_state_dict(model.state_dict())
    assert shards.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(shards[name], trained[name], rtol=0, atol=0)


def _cpu_model(cfg, **stage):
    model = build_model(cfg.model, **stage)
    model.to_empty(device="cpu")
    model.init_weights(cfg.train.seed)
    return model


PIPELINE_SAVE = """
import os, sys, torch, torch.distributed as dist
from wlbtrain import checkpoint as ckpt
from wlbtrain.config import load_config
from wlbtrain.models.llama import build_model
from wlbtrain.train import build_optimizer

dist.init_process_group("gloo")
stage = dist.get_rank()
cfg = load_config("recipes/debug.yaml", sys.argv[2:])
model = build_model(cfg.model, layer_ids=[stage], embed=stage == 0, head=stage == 1)
model.to_empty(device="cpu")
model.init_weights(cfg.train.seed)
optimizer = build_optimizer(model, cfg)
for p in model.parameters():
    p.grad = torch.full_like(p, 0.01 * (stage + 1))
optimizer.step()
ckpt.save_checkpoint(sys.argv[1], 1, model, optimizer, {"world": 2}, keep=1,
                     stage=stage, stages=2, weights_writer=stage)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_pipeline_stages_each_write_a_file_and_any_layout_loads_them(tmp_path):
    """Two stages (layer 0 with the embedding, layer 1 with the head) save one file each; one
    process holding the whole model, and one holding only the last stage, load the result."""
    script = tmp_path / "pipeline_save.py"
    script.write_text(PIPELINE_SAVE)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         f"--master-port={free_port()}", str(script), str(tmp_path), *TINY],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step = tmp_path / "checkpoints/step-1"
    index = json.loads((step / ckpt.INDEX).read_text())["weight_map"]
    assert index["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    assert index["model.layers.0.mlp.up_proj.weight"] == "model-00001-of-00002.safetensors"
    assert index["model.layers.1.mlp.up_proj.weight"] == "model-00002-of-00002.safetensors"
    assert index["lm_head.weight"] == "model-00002-of-00002.safetensors"

    cfg = load_config("recipes/debug.yaml", TINY)
    fresh = hf_state_dict(_cpu_model(cfg).state_dict())  # init is keyed by name: as the stages
    whole = _cpu_model(cfg)
    optimizer = build_optimizer(whole, cfg)
    assert ckpt.load_checkpoint(step, whole, optimizer)["world"] == 2
    from_files = _cpu_model(cfg)
    ckpt.load_hf_weights(step, from_files)
    for name, value in hf_state_dict(whole.state_dict()).items():
        torch.testing.assert_close(value, from_files.state_dict()[name.removeprefix("model.")])
        assert not torch.equal(value, fresh[name]), name  # the stages' optimizer step is in
    # Stage 1's gradients were 0.02: Adam's first moment after one step is (1 - 0.9) · 0.02.
    state = {name: optimizer.state[p] for name, p in whole.named_parameters()}
    assert torch.allclose(state["layers.1.mlp.up_proj.weight"]["exp_avg"], torch.tensor(0.002))
    assert torch.allclose(state["layers.0.mlp.up_proj.weight"]["exp_avg"], torch.tensor(0.001))

    last = _cpu_model(cfg, layer_ids=[1], embed=False, head=True)
    ckpt.load_checkpoint(step, last, build_optimizer(last, cfg))
    for name, value in last.state_dict().items():
        torch.testing.assert_close(value, whole.state_dict()[name])


def test_a_checkpoint_without_training_state_is_refused(tmp_path, cache):
    step = tmp_path / "checkpoints/step-3"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 3}))
    cfg = load_config("recipes/debug.yaml", [*TINY, f"train.out_dir={tmp_path}",
                                             f"data.cache_dir={cache}", "checkpoint.resume=auto"])
    with pytest.raises(ConfigError, match="checkpoint.resume: .* no dcp/"):
        ckpt.resume_point(cfg, 1)


# ---------------------------------------------------------------------------------------------
# checkpoint.init_from


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, cache):
    """A checkpoint this project wrote, laid out as Hugging Face saves LlamaForCausalLM: one
    model.safetensors, or two files with model.safetensors.index.json."""
    root = tmp_path_factory.mktemp("init_from")
    launch(root / "run", cache, ["train.steps=2", "checkpoint.every=2"])
    weights = root / "run/checkpoints/step-2/model.safetensors"
    single = root / "hf_single"
    single.mkdir()
    shutil.copy(weights, single / "model.safetensors")
    (single / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    split = root / "hf_split"
    split.mkdir()
    tensors = load_file(weights)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, split / file, metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (split / ckpt.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    first_loss = losses(root / "run")[1]
    return {"single": single, "split": split, "weights": weights, "root": root,
            "first_loss": first_loss}


@pytest.fixture(scope="module")
def reference_first_loss(hf_dirs, cache):
    """Step 1's loss from the trained weights, put in place directly (not by init_from)."""
    cfg = load_config("recipes/debug.yaml", [
        *TINY, f"train.out_dir={hf_dirs['root'] / 'reference'}", f"data.cache_dir={cache}",
        "train.micro_batches=4"])
    trainer = Trainer(cfg)
    try:
        trainer.model.load_state_dict(from_hf_state_dict(load_file(hf_dirs["weights"])))
        loss = trainer.train_step(trainer.packer.pack(trainer.stream))[0].item()
    finally:
        dist.destroy_process_group()
    assert abs(loss - hf_dirs["first_loss"]) > 0.05  # trained weights: another loss than init
    return loss


DP2 = ["parallel.dp=2", "train.micro_batches=2"]
TP2 = ["parallel.tp=2", "train.micro_batches=4"]


@pytest.mark.parametrize("source,layout,nproc", [
    pytest.param("single", ["train.micro_batches=4"], 1, id="one file"),
    pytest.param("split", ["train.micro_batches=4"], 1, id="two files and an index"),
    pytest.param("split", DP2, 2, id="two files, dp 2", marks=pytest.mark.slow),
    pytest.param("split", TP2, 2, id="two files, tp 2", marks=pytest.mark.slow),
])
def test_init_from_hugging_face_weights_gives_their_first_loss(tmp_path, cache, hf_dirs,
                                                               reference_first_loss, source,
                                                               layout, nproc):
    done = launch(tmp_path, cache, ["train.steps=1", f"checkpoint.init_from={hf_dirs[source]}",
                                    *layout], nproc)
    assert done is None or done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path)[1] == pytest.approx(reference_first_loss, rel=1e-5)


def test_init_from_with_tied_embeddings_uses_them_for_the_head(tmp_path):
    cfg = load_config("recipes/debug.yaml", [*TINY, f"checkpoint.init_from={tmp_path}"])
    source = hf_state_dict(_cpu_model(cfg).state_dict())
    del source["lm_head.weight"]
    save_file(source, tmp_path / "model.safetensors")
    ckpt.check_init_from(cfg)
    model = build_model(cfg.model)
    model.to_empty(device="cpu")
    ckpt.load_hf_weights(tmp_path, model)
    assert torch.equal(model.lm_head.weight, source["model.embed_tokens.weight"])
    assert torch.equal(model.layers["1"].mlp.down_proj.weight,
                       source["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("change,message", ids=["fewer layers", "more layers", "other ffn_dim"], argvalues=[
    ("model.n_layers=3", r"lacks model\.layers\.2\.input_layernorm\.weight \(and 8 more\)"),
    ("model.n_layers=1", r"has model\.layers\.1\.\S+ \(and 8 more\), which the recipe's model"),
    ("model.ffn_dim=96", r"model\.layers\.0\.mlp\.gate_proj\.weight of shape \[128, 64\], the "
                         r"recipe's model needs \[96, 64\]"),
])
def test_init_from_that_does_not_fit_the_model(hf_dirs, change, message):
    cfg = load_config("recipes/debug.yaml", [*TINY, change,
                                             f"checkpoint.init_from={hf_dirs['split']}"])
    with pytest.raises(ConfigError, match=f"^checkpoint.init_from: .*{message}"):
        ckpt.check_init_from(cfg)


def test_init_from_with_other_shapes_exits_2_naming_the_tensor(tmp_path, cache, hf_dirs):
    done = subprocess.run(
        [sys.executable, "-m", "wlbtrain.cli", "train", "recipes/debug.yaml", *TINY,
         "model.dim=128", f"train.out_dir={tmp_path}", f"data.cache_dir={cache}",
         f"checkpoint.init_from={hf_dirs['single']}"],
        env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "checkpoint.init_from" in lines[0] and "model.embed_tokens.weight" in lines[0]
    assert "[256, 64]" in lines[0] and "[256, 128]" in lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()
