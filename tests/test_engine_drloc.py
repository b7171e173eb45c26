"""The engine with DRLoc: its head is optimised and clipped with the model, kept out of the
inference weights and the EMA, saved in checkpoints, and the CLI trains, resumes and evaluates
with it, with or without a class token."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from spatial_entropy.checkpoint import latest_checkpoint, load_checkpoint
from spatial_entropy.cli import main
from spatial_entropy.config import load_config
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.engine import build_regularizers, build_training_run, train, train_step
from spatial_entropy.models import create_model
from spatial_entropy.regularizers import DRLocRegularizer, SpatialEntropyRegularizer

VIT = {
    "model": "se_vit_tiny_patch4_32",
    "img_size": 16,
    "model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
}


def _run(**values):
    config = load_config(values=VIT | {"drloc": {"weight": 0.1, "hidden": 8}} | values)
    return build_training_run(config, DistributedInfo(), num_classes=3, in_chans=1,
                              steps_per_epoch=4)  # fmt: skip


def _drloc(run) -> DRLocRegularizer:
    (drloc,) = [reg for reg in run.regularizers if reg.name == "drloc"]
    return drloc


def test_a_regularizer_the_model_cannot_take_names_its_off_switch():
    # DRLoc alone needs no [CLS]; spatial entropy, on by default, does: the error says how to
    # turn it off.
    no_cls = VIT | {"model_kwargs": VIT["model_kwargs"] | {"class_token": False,
                                                            "global_pool": "avg"}}  # fmt: skip
    with pytest.raises(ValueError, match=r"needs a \[CLS\] query.*; se.weight=0 turns se off"):
        _run(**no_cls)
    assert [reg.name for reg in _run(**no_cls, se={"weight": 0.0}).regularizers] == ["drloc"]


def test_regularizers_in_a_fixed_order_with_a_sampling_seed_per_rank():
    config = load_config(overrides=["seed=3", "se.weight=0.2", "drloc.weight=0.5",
                                    "drloc.pairs=7", "drloc.hidden=9"])  # fmt: skip
    se, drloc = build_regularizers(config, rank=2)
    assert isinstance(se, SpatialEntropyRegularizer) and isinstance(drloc, DRLocRegularizer)
    assert (drloc.weight, drloc.pairs, drloc.hidden, drloc.seed) == (0.5, 7, 9, 3 * 65536 + 2)
    (alone,) = build_regularizers(load_config(overrides=["se.weight=0", "drloc.weight=0.5"]))
    assert alone.name == "drloc" and alone.seed == 0


def test_head_is_optimised_with_the_model_and_decays_weights_not_biases():
    run = _run(weight_decay=0.05, se={"weight": 0.0})
    head = _drloc(run).module
    groups = {id(p): g for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in groups for p in head.parameters())
    assert sum(len(g["params"]) for g in run.optimizer.param_groups) == len(groups)  # each once
    for name, parameter in head.named_parameters():
        expected = 0.0 if name.endswith("bias") else 0.05
        assert groups[id(parameter)]["weight_decay"] == expected, name
    # every group follows the same schedule
    assert len({g["lr"] for g in run.optimizer.param_groups}) == 1
    model_count = sum(p.numel() for p in run.model.parameters())
    head_count = sum(p.numel() for p in head.parameters())
    assert sum(p.numel() for p in run.trainable_parameters()) == model_count + head_count


def test_head_takes_the_classifier_lr_under_layer_decay():
    run = _run(layer_decay=0.5, se={"weight": 0.0})
    head = {id(p) for p in _drloc(run).module.parameters()}
    classifier = {id(p) for p in run.model.head.parameters()}

    def lr_of(ids):
        return {g["lr"] for g in run.optimizer.param_groups if ids & {id(p) for p in g["params"]}}

    assert len(lr_of(head)) == 1 and lr_of(head) == lr_of(classifier)
    assert min(g["lr"] for g in run.optimizer.param_groups) < next(iter(lr_of(head)))


def test_gradient_clipping_covers_the_head():
    # Momentum SGD without weight decay: the first update is -lr * (clipped gradient), so the
    # norm of the update over model and head together is lr * clip_grad.
    run = _run(opt="momentum", lr=0.5, warmup_epochs=0, weight_decay=0.0, clip_grad=1e-3,
               mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0)  # fmt: skip
    before = [p.detach().clone() for p in run.trainable_parameters()]
    lr = run.optimizer.param_groups[0]["lr"]
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    train_step(run, images, torch.arange(4) % 3, progress=0.0)
    after = run.trainable_parameters()
    update = torch.cat([(a.detach() - b).flatten() for a, b in zip(after, before, strict=True)])
    head_update = sum(
        (p.detach() - b).norm() ** 2 for p, b in zip(after, before, strict=True)
        if any(p is q for q in _drloc(run).module.parameters())
    )  # fmt: skip
    assert head_update > 0
    assert update.norm().item() == pytest.approx(lr * 1e-3, rel=1e-3)


def test_ema_and_inference_weights_hold_the_model_only():
    run = _run(model_ema=True, se={"weight": 0.0})
    model_keys = set(create_model(VIT["model"], num_classes=3, img_size=16, in_chans=1,
                                  **VIT["model_kwargs"]).state_dict())  # fmt: skip
    assert set(run.ema.module.state_dict()) == model_keys
    ema_count = sum(p.numel() for p in run.ema.module.parameters())
    assert ema_count == sum(p.numel() for p in run.model.parameters())


class _Images(TensorDataset):
    num_classes, in_chans = 3, 1


def test_resume_with_other_regularizer_modules_is_refused(tmp_path):
    data = _Images(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                   torch.arange(8) % 3)  # fmt: skip
    recipe = dict(epochs=2, max_steps=1, batch_size=4, num_workers=0, mixup=0, cutmix=0)
    no_drloc = load_config(values=VIT | recipe | {"se": {"weight": 0}})
    train(no_drloc, tmp_path / "plain", datasets=(data, data))
    with_drloc = load_config(values=VIT | recipe | {"drloc": {"weight": 0.1}})
    (tmp_path / "plain" / "config.yaml").unlink()  # else the config check refuses it first
    with pytest.raises(ValueError, match=r"step_00000001 holds the regulariser modules \[\], "
                       r"this config trains \['drloc'\]"):  # fmt: skip
        train(with_drloc, tmp_path / "plain", resume=True, datasets=(data, data))

    train(with_drloc, tmp_path / "drloc", datasets=(data, data))
    (tmp_path / "drloc" / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"holds the regulariser modules \['drloc'\], "):
        train(no_drloc, tmp_path / "drloc", resume=True, datasets=(data, data))


TINY = [
    "model=se_vit_tiny_patch4_32",
    "img_size=16",
    "dataset=cluttered-fashion",
    "batch_size=10",
    "epochs=2",
    "num_workers=0",
    "model_ema=true",
    "drloc.weight=0.1",
    "drloc.pairs=8",
    "drloc.hidden=16",
]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_kwargs, se",
    [
        ({"depth": 1, "embed_dim": 16, "num_heads": 2, "class_token": False, "global_pool": "avg"},
         0),
        ({"depth": 1, "embed_dim": 16, "num_heads": 2}, 0.1),
    ],
    ids=["drloc-alone-no-class-token", "with-se"],
)  # fmt: skip
def test_cli_trains_resumes_and_evaluates_with_drloc(tmp_path, model_kwargs, se):
    run = tmp_path / "run"
    data = f"data_options={{train_per_class: 2, test_size: 30, cache_dir: {tmp_path / 'data'}}}"
    kwargs = yaml.safe_dump(model_kwargs, default_flow_style=True).strip()
    items = [*TINY, data, f"model_kwargs={kwargs}", f"se.weight={se}"]
    assert main(["train", "--output", str(run), *_sets([*items, "max_steps=2"])]) == 0
    assert main(["train", "--output", str(run), *_sets([*items, "max_steps=4"]),
                 "--resume", "auto"]) == 0  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["train_drloc"] > 0

    model_keys = set(create_model("se_vit_tiny_patch4_32", num_classes=10, img_size=16,
                                  in_chans=1, **model_kwargs).state_dict())  # fmt: skip
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert set(load_file(run / name)) == model_keys, name
    _, state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert set(state["regularizer_modules"]) == {"drloc"}
    assert state["ranks"][0]["regularizers"]["drloc"]["generator"] is not None

    assert main(["evaluate", str(run)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    # the final model on the test split: the training run's own final validation
    for key in ("top1", "top5", "loss"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-6), key
