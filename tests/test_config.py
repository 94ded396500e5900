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
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.dim=100"], "model.dim"),
    (["data.packing=greedy"], "data.packing"),
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


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config("recipes/debug.yaml", ["train.lr=3e-4", "data.packing=wlb",
                                             "data.outlier_thresholds=[8192, 32768]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.outlier_thresholds == [8192, 32768]
    assert cfg.data.max_tokens_per_micro_batch == cfg.data.context


def test_defaults_alone_are_valid():
    cfg = load_config(None)
    assert cfg.parallel.world_size == 1
    with pytest.raises(ConfigError):
        load_config(None, ["train.micro_batches=0"])


@pytest.mark.parametrize("recipe", sorted(__import__("glob").glob("recipes/**/*.yaml", recursive=True)))
def test_every_shipped_recipe_is_valid(recipe):
    cfg = load_config(recipe)
    assert cfg.data.context > 0
