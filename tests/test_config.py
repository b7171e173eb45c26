"""Tests of the training config: YAML + overrides, typing, unknown keys, round trip."""

from pathlib import Path

import pytest
import yaml

from spatial_entropy.config import TrainConfig, config_keys, load_config, save_config


def test_defaults_are_the_deit_recipe():
    cfg = load_config()
    assert cfg == TrainConfig()
    assert (cfg.opt, cfg.weight_decay, cfg.smoothing, cfg.mixup, cfg.cutmix) == (
        "adamw",
        0.05,
        0.1,
        0.8,
        1.0,
    )
    assert (cfg.se.weight, cfg.se.schedule, cfg.se.warmup_epochs) == (0.01, "warmup_cosine", 10.0)


def test_yaml_then_values_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nepochs: 3\nse:\n  weight: 0.05\n  schedule: constant\n")
    cfg = load_config(path, ["se.weight=0", "max_steps=7", "model_ema=true"], {"epochs": 5})
    assert cfg.lr == 0.001 and cfg.epochs == 5 and cfg.max_steps == 7 and cfg.model_ema is True
    assert cfg.se.weight == 0.0 and isinstance(cfg.se.weight, float)
    assert cfg.se.schedule == "constant"


def test_dotted_and_nested_yaml_are_the_same(tmp_path):
    nested, dotted = tmp_path / "a.yaml", tmp_path / "b.yaml"
    nested.write_text("se:\n  warmup_epochs: 2\n")
    dotted.write_text("se.warmup_epochs: 2\n")
    assert load_config(nested) == load_config(dotted)


def test_dict_fields_pass_their_keys_through():
    cfg = load_config(overrides=["data_options={n_clutter: 2}", "model_kwargs={depth: 2}"])
    assert cfg.data_options == {"n_clutter": 2} and cfg.model_kwargs == {"depth": 2}


def test_image_size_is_the_config_value_else_the_model_default():
    assert load_config(overrides=["img_size=48"]).image_size() == 48
    assert load_config(overrides=["model=vit_small_patch16_224"]).image_size() == 224
    assert load_config(overrides=["model=se_vit_tiny_patch4_32"]).image_size() == 32


def test_null_overrides():
    assert load_config(overrides=["max_steps=null", "auto_augment="]).auto_augment is None


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key 'se\.wieght'.*se\.weight") as err:
        load_config(overrides=["se.wieght=1"])
    assert "batch_size" in str(err.value) and "checkpoint_every" in str(err.value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("lr=fast", "'lr' expects float"),
        ("max_steps=1e3", "'max_steps' expects int"),
        ("epochs=2.5", "'epochs' expects int"),
        ("model_ema=1", "'model_ema' expects bool"),
        ("amp=fp8", "'amp' must be one of"),
        ("se.schedule=linear", "'se.schedule' must be one of"),
        ("batch_size=0", "'batch_size' must be >= 1"),
        ("se.weight=-1", "'se.weight' must be >= 0"),
        ("nokey", "expects key=value"),
        ("model_kwargs={depth: [1", r"--set 'model_kwargs=\{depth: \[1': invalid YAML value"),
    ],
)
def test_bad_values_are_named(item, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[item])


@pytest.mark.parametrize(
    "items, key",
    [
        (["lr=-1e-3"], "lr"),
        (["lr=.inf"], "lr"),
        (["lr=.nan"], "lr"),
        (["weight_decay=-0.05"], "weight_decay"),
        (["min_lr=-1"], "min_lr"),
        (["warmup_lr=.nan"], "warmup_lr"),
        (["checkpoint_every=-1"], "checkpoint_every"),
        (["warmup_epochs=-2"], "warmup_epochs"),
        (["se.warmup_epochs=-1"], "se.warmup_epochs"),
        (["se.warmup_epochs=.inf"], "se.warmup_epochs"),
        (["se.weight=.inf"], "se.weight"),
        (["se.weight=.nan"], "se.weight"),
        (["n_per_class=0"], "n_per_class"),
        (["n_per_class=-5"], "n_per_class"),
        (["fraction=0"], "fraction"),
        (["fraction=1.5"], "fraction"),
        (["fraction=-0.1"], "fraction"),
        (["fraction=.nan"], "fraction"),
        (["val_fraction=2"], "val_fraction"),
        (["n_per_class=10", "fraction=0.5"], "fraction"),
        (["img_size=0"], "img_size"),
        (["num_workers=-1"], "num_workers"),
        (["drop_path=1"], "drop_path"),
        (["drop_path=-0.1"], "drop_path"),
        (["smoothing=1"], "smoothing"),
        (["reprob=1.5"], "reprob"),
        (["mixup=-1"], "mixup"),
        (["cutmix=-1"], "cutmix"),
        (["mixup_prob=2"], "mixup_prob"),
        (["mixup_switch_prob=-1"], "mixup_switch_prob"),
        (["clip_grad=0"], "clip_grad"),
        (["clip_grad=-1"], "clip_grad"),
        (["layer_decay=0"], "layer_decay"),
        (["layer_decay=1.5"], "layer_decay"),
        (["model_ema_decay=1.5"], "model_ema_decay"),
        (["keep_checkpoints=0"], "keep_checkpoints"),
        (["max_steps=0"], "max_steps"),
    ],
)
def test_out_of_range_values_are_one_line_naming_the_key(items, key):
    with pytest.raises(ValueError) as err:
        load_config(overrides=items)
    message = str(err.value)
    assert f"config key {key!r}" in message and "\n" not in message


def test_range_limits_themselves_are_accepted():
    items = ["fraction=1", "val_fraction=1", "checkpoint_every=0", "warmup_epochs=0"]
    items += ["se.warmup_epochs=0", "se.weight=0", "drop_path=0", "smoothing=0", "reprob=1"]
    items += ["mixup=0", "cutmix=0", "layer_decay=1", "model_ema_decay=1", "num_workers=0"]
    items += ["weight_decay=0", "min_lr=0", "warmup_lr=0", "lr=0"]
    config = load_config(overrides=items)
    assert config.fraction == 1.0 and config.checkpoint_every == 0
    assert load_config(overrides=["n_per_class=1"]).n_per_class == 1


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(overrides=["lr=3e-4", "n_per_class=50", "se.per_step=false"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["se"]["per_step"] is False and saved["n_per_class"] == 50


def test_required_keys_exist():
    required = {"model", "dataset", "data_path", "n_per_class", "epochs", "max_steps"}
    required |= {"batch_size", "lr", "seed", "num_workers", "se.weight", "se.schedule"}
    required |= {"no_last_skip", "checkpoint_every"}
    assert required <= set(config_keys())


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_name_real_models_and_datasets(path):
    import timm

    import spatial_entropy.models  # noqa: F401  (registers the presets)
    from spatial_entropy.data import dataset_names

    cfg = load_config(path)
    assert timm.is_model(cfg.model) and cfg.dataset in dataset_names()
