"""Data kept on the device: the batches are the DataLoader's, bit for bit (the DataLoader path,
per-image PIL transforms under per-sample seeds, is the oracle), and a run trained from them
is the run trained through DataLoaders."""

import csv
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import spatial_entropy.engine as engine
from spatial_entropy.config import load_config
from spatial_entropy.data import build_dataset
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.loader import (
    DeviceTrainBatches,
    TensorEvalBatches,
    build_eval_loader,
    build_train_loader,
    device_data_reason,
)

PLAIN = {"auto_augment": None, "reprob": 0.0}


def _fashion(split: str, **kwargs):
    return build_dataset("fashion-mnist", split, **kwargs)


def _equal_batches(first, second) -> None:
    first, second = list(first), list(second)
    assert len(first) == len(second) > 0
    for (x, y), (u, v) in zip(first, second, strict=True):
        assert x.dtype == u.dtype and x.shape == u.shape and torch.equal(x, u)
        assert torch.equal(y, v)


@pytest.mark.parametrize(
    ("img_size", "in_chans", "augment", "rank"),
    [
        (28, 1, PLAIN, 0),  # native size: pad-crop-flip only
        (32, 3, PLAIN | {"vflip": 0.5, "padding": 3}, 1),  # resized, RGB, both flips, rank 1/2
    ],
)
def test_device_batches_are_the_dataloader_batches(img_size, in_chans, augment, rank):
    data = _fashion(
        "train", img_size=img_size, is_train=True, augment=augment, n_per_class=5, seed=2,
        options={"in_chans": in_chans},
    )  # fmt: skip
    info = DistributedInfo(rank=rank, world_size=2)
    on_device = DeviceTrainBatches(data, 4, info, seed=9)
    reference = build_train_loader(data, 4, info, seed=9)
    assert len(on_device) == len(reference) == 6  # 25 images per rank, batches of 4
    for epoch, batch in ((0, 0), (3, 2)):  # a fresh epoch, and a resume mid-epoch
        on_device.sampler.set_position(epoch, batch)
        reference.sampler.set_position(epoch, batch)
        _equal_batches(on_device, reference)


def test_device_batches_follow_the_data_order_of_nested_subsets():
    # evidence_v2's λ selection trains on a subset of a subset
    from spatial_entropy.data.subsets import ClassSubset

    data = _fashion("train", is_train=True, augment=PLAIN, n_per_class=6, seed=1)
    part = ClassSubset(data, list(range(0, 60, 2)))
    info = DistributedInfo()
    _equal_batches(
        DeviceTrainBatches(part, 8, info, seed=0), build_train_loader(part, 8, info, seed=0)
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_eval_batches_are_the_dataloader_batches(rank):
    data = _fashion("test", img_size=32)  # resized by the evaluation transform
    data = torch.utils.data.Subset(data, range(37))  # a last partial batch
    data.transform = data.dataset.transform
    info = DistributedInfo(rank=rank, world_size=2)
    _equal_batches(TensorEvalBatches(data, 8, info), build_eval_loader(data, 8, info))


def test_datasets_that_cannot_stay_on_the_device_say_why():
    rand_m9 = {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.0}
    randaugment = _fashion("train", is_train=True, augment=rand_m9, n_per_class=2)
    erasing = _fashion("train", is_train=True, augment={"reprob": 0.25}, n_per_class=2)
    masks = build_dataset("cluttered-fashion", "test", with_masks=True)
    assert "not pad-crop-flip + normalise alone" in device_data_reason(randaugment, True)
    assert "not pad-crop-flip + normalise alone" in device_data_reason(erasing, True)
    assert device_data_reason(masks, False) == "it carries masks"
    assert "not the evaluation transform" in device_data_reason(randaugment, False)
    assert device_data_reason(_fashion("test"), False) is None
    with pytest.raises(ValueError, match="cannot be kept on the device: its training transform"):
        DeviceTrainBatches(randaugment, 2, DistributedInfo(), seed=0)


def test_run_from_device_data_equals_run_through_dataloaders(tmp_path):
    values = dict(
        model="se_vit_tiny_patch4_32", img_size=28, dataset="fashion-mnist", n_per_class=4,
        val_fraction=0.005, batch_size=8, epochs=2, warmup_epochs=1, num_workers=1,
        mixup=0, cutmix=0, drop_path=0.1, se={"weight": 0.1, "warmup_epochs": 1},
        model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, **PLAIN,
    )  # fmt: skip
    built = []

    class Spy(DeviceTrainBatches):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    with mock.patch.object(engine, "DeviceTrainBatches", Spy):
        on_device = engine.train(load_config(values=values), tmp_path / "device")
        loaders = engine.train(
            load_config(values=values | {"data_on_device": "off"}), tmp_path / "loaders"
        )
    assert len(built) == 1, "only the auto run keeps its data on the device"
    assert on_device["top1"] == loaders["top1"] and on_device["steps"] == loaders["steps"] == 10

    def rows(run):
        with open(tmp_path / run / "log.csv", newline="") as f:
            timing = ("epoch_time_s", "images_per_s")
            return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(f)]

    assert rows("device") == rows("loaders")
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("device", "loaders")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize(
    ("padding", "hflip", "vflip"), [(3, 0.5, 0.0), (0, 0.3, 0.7), (7, 1.0, 0.0)]
)
def test_crop_and_flip_draws_follow_torch_tensor_comparisons(padding, hflip, vflip):
    from spatial_entropy.data.transforms import PadCropFlip

    geometry = PadCropFlip(28, padding, hflip, vflip)
    for seed in range(500):
        torch.manual_seed(seed)
        expected = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        expected += (torch.rand(2) < torch.tensor([hflip, vflip])).tolist()
        assert list(geometry.draw(torch.Generator().manual_seed(seed))) == expected
