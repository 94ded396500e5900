"""Bad recipes and overrides end with exit status 2 and one line naming the key."""

import pytest

from wlbtrain.cli import main
from wlbtrain.config import ConfigError, load_config

BAD_OVERRIDES = [
    (["train.nosuch=1"], "train.nosuch"),
    (["nosuch.key=1"], "nosuch"),
    (["train.steps=ten"], "train.steps"),
    (["train.steps=-1"], "train.steps"),
    (["train.lr=0"], "train.lr"),
    (["train.gc_every=-1"], "train.gc_every"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.dim=100"], "model.dim"),
    (["data.packing=greedy"], "data.packing"),
    (["data.balance=tokens"], "data.balance"),
    (["data.max_token_delay=-1"], "data.max_token_delay"),
    (["data.outlier_thresholds=[4096,8192]", "data.max_token_delay=0.5"], "data.max_token_delay"),
    (["data.balance=ranks", "parallel.pp=2"], "data.balance"),
    (["data.source=/no/such/store"], "data.source"),
    (["data.tokenizer=/no/tokenizer.json"], "data.tokenizer"),
    (["checkpoint.resume=/no/such/ckpt"], "checkpoint.resume"),
    (["parallel.tp=3"], "parallel.tp"),
    (["train.tensorboard=maybe"], "train.tensorboard"),
    (["steps=3"], "section.key=value"),
]


@pytest.mark.parametrize("overrides,key", BAD_OVERRIDES)
def test_bad_override_exits_2_naming_the_key(overrides, key, capsys, tmp_path):
    code = main(["train", "recipes/debug.yaml", f"train.out_dir={tmp_path}/run", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists(), "nothing may be written before validation passes"


@pytest.mark.parametrize("text,key", [
    ("model: {dim: 64, bogus: 1}\n", "model.bogus"),
    ("train: {steps: 1.5}\n", "train.steps"),
    ("data: [1, 2]\n", "data"),
    ("model: {dim: [\n", "line"),
    ("- just a list\n", "mapping"),
])
def test_bad_recipe_file(tmp_path, capsys, text, key):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 2
    assert key in capsys.readouterr().err


def test_missing_recipe(capsys):
    assert main(["train", "no/such/recipe.yaml"]) == 2
    assert "no/such/recipe.yaml" in capsys.readouterr().err


def test_world_size_mismatch(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    code = main(["train", "recipes/debug.yaml", "parallel.dp=2", f"train.out_dir={tmp_path}/r"])
    assert code == 2 and "number of processes" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,world,key", [
    # 3 KV heads over 4 ranks: neither split nor replicated evenly
    (["parallel.tp=4", "parallel.dp=1", "model.dim=96", "model.n_heads=12", "model.n_kv_heads=3"],
     4, "model.n_kv_heads"),
    (["parallel.tp=3", "parallel.dp=1", "model.n_heads=4", "model.n_kv_heads=2"], 3, "parallel.tp"),
    (["parallel.tp=2", "parallel.dp=2"], 2, "number of processes"),
    (["parallel.pp=2", "parallel.dp=1", "train.micro_batches=1"], 2, "train.micro_batches"),
    (["parallel.pp=2", "parallel.pp_virtual=2", "parallel.dp=1"], 2, "parallel.pp_schedule"),
    (["parallel.pp=4", "parallel.pp_virtual=2", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.dp=1", "train.micro_batches=4"], 4, "parallel.pp"),
])
def test_bad_layouts_exit_2_naming_the_key(monkeypatch, capsys, tmp_path, overrides, world, key):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["train", "recipes/debug.yaml", *overrides, f"train.out_dir={tmp_path}/r",
                 "--check"])
    err = capsys.readouterr().err
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1, err


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config("recipes/debug.yaml", ["train.lr=3e-4", "data.packing=wlb",
                                             "data.outlier_thresholds=[8192, 32768]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.outlier_thresholds == [8192, 32768]
    assert cfg.data.max_tokens_per_micro_batch == cfg.data.context


def test_defaults_alone_are_valid():
    cfg = load_config(None)
    assert cfg.parallel.data_parallel(4) == 1
    assert load_config(None, ["parallel.dp=-1"]).parallel.data_parallel(4) == 4
    with pytest.raises(ConfigError):
        load_config(None, ["train.micro_batches=0"])


@pytest.mark.parametrize("recipe", sorted(__import__("glob").glob("recipes/**/*.yaml", recursive=True)))
def test_every_shipped_recipe_is_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.data.context > 0


def test_non_utf8_recipe(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("train: {out_dir: caf\xe9}\n".encode("latin-1"))
    assert main(["train", str(recipe)]) == 2
    assert "latin1.yaml" in capsys.readouterr().err


TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=128", "data.context=256", "train.micro_batches=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run with a checkpoint, to resume from with other settings."""
    out = tmp_path_factory.mktemp("trained")
    cache = tmp_path_factory.mktemp("cache")
    args = [*TINY, f"train.out_dir={out}", f"data.cache_dir={cache}", "train.steps=2"]
    assert main(["train", "recipes/debug.yaml", *args]) == 0
    return args


@pytest.mark.parametrize("change,key", [
    ("data.packing=wlb", "data.packing"),
    ("model.dim=128", "model.dim"),
    ("train.micro_batches=4", "train.micro_batches"),
    ("train.seed=5", "train.seed"),
])
def test_resume_with_other_settings_exits_2(trained, capsys, change, key):
    assert main(["train", "recipes/debug.yaml", *trained, "train.steps=3", change]) == 2
    err = capsys.readouterr().err
    assert key in err and "trained with" in err and len(err.strip().splitlines()) == 1


def test_resume_from_a_directory_that_is_no_checkpoint(trained, tmp_path, capsys):
    assert main(["train", "recipes/debug.yaml", *trained, f"checkpoint.resume={tmp_path}"]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_bad_cost_profile(trained, tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text('{"attn_coef": 1e-10}')
    assert main(["train", "recipes/debug.yaml", *trained, "checkpoint.resume=none",
                 f"data.cost_profile={profile}"]) == 2
    assert "data.cost_profile" in capsys.readouterr().err


def test_head_size_the_kernel_lacks(trained, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["train", "recipes/debug.yaml", *trained, "train.attention=triton",
                 "model.dim=96", "checkpoint.resume=none"]) == 2
    assert "model.dim" in capsys.readouterr().err


def test_train_sh_stops_bad_input_before_torchrun(tmp_path):
    import subprocess

    done = subprocess.run(["scripts/train.sh", "recipes/debug.yaml", "train.nosuch=1",
                           f"train.out_dir={tmp_path}/run"], capture_output=True, text=True,
                          env={**__import__("os").environ, "NPROC": "1"}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "train.nosuch" in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value,ok", [("auto", True), ("false", True), ("true", True),
                                      ("1", False), ("yes please", False)])
def test_compile_key_takes_auto_or_a_boolean(value, ok):
    if ok:
        load_config(None, [f"train.compile={value}"])
    else:
        with pytest.raises(ConfigError, match="train.compile"):
            load_config(None, [f"train.compile={value}"])
