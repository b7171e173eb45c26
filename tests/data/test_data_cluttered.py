"""cluttered-fashion: determinism, exact masks, balance, distractor placement, cache, dataset."""

from pathlib import Path

import numpy as np
import pytest
import torch

from spatial_entropy.data import build_dataset, fashion_mnist, generate_cluttered


@pytest.fixture(autouse=True)
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    monkeypatch.setenv("SPATIAL_ENTROPY_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def scenes(fashion_dir):
    return generate_cluttered(200, "test", seed=3, data_path=fashion_dir, cache=False)


def test_shapes_dtypes_and_class_balance(scenes):
    assert scenes["images"].shape == (200, 64, 64) and scenes["images"].dtype == np.uint8
    assert scenes["masks"].shape == (200, 64, 64) and scenes["masks"].dtype == bool
    assert scenes["boxes"].shape == (200, 4) and scenes["distractor_boxes"].shape == (200, 4, 4)
    np.testing.assert_array_equal(np.bincount(scenes["labels"], minlength=10), [20] * 10)
    # every object is a distinct item of the source split
    assert len(np.unique(scenes["source_index"])) == 200


def test_same_seed_same_bytes_other_seed_differs(fashion_dir, scenes):
    again = generate_cluttered(200, "test", seed=3, data_path=fashion_dir, cache=False)
    for name, array in scenes.items():
        assert array.tobytes() == again[name].tobytes(), name
    other = generate_cluttered(200, "test", seed=4, data_path=fashion_dir, cache=False)
    assert other["images"].tobytes() != scenes["images"].tobytes()


def test_mask_is_exactly_the_pasted_object(fashion_dir):
    # black background and no fragments: the only non-zero pixels are the object's, and a pasted
    # pixel is > 0.05 * 255, so (image > 0) is an independent oracle for the mask
    scenes = generate_cluttered(
        100, "train", seed=0, data_path=fashion_dir, dim=0.0, distractors=0, cache=False
    )
    np.testing.assert_array_equal(scenes["images"] > 0, scenes["masks"])
    assert (scenes["images"][scenes["masks"]] >= 13).all()


def test_object_size_and_box_is_tight(scenes, fashion_dir):
    from data_writers import fashion_arrays

    masks = scenes["masks"]
    for mask, (x0, y0, x1, y1) in zip(masks, scenes["boxes"], strict=True):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (x0, y0, x1, y1) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    # the fixture's rectangles span 12..24 of 28 px; rescaled to [24, 40] they span >= 10 px
    _, labels = fashion_arrays("test", seed=4)
    np.testing.assert_array_equal(labels[scenes["source_index"]], scenes["labels"])
    heights = scenes["boxes"][:, 3] - scenes["boxes"][:, 1]
    assert heights.min() >= 10 and heights.max() <= 40


def test_distractors_hardly_overlap_the_object(scenes):
    masks = scenes["masks"]
    worst = 0.0
    for mask, windows in zip(masks, scenes["distractor_boxes"], strict=True):
        for x0, y0, x1, y1 in windows:
            assert (x1 - x0, y1 - y0) == (10, 10) and 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64
            worst = max(worst, mask[y0:y1, x0:x1].mean())
    assert worst <= 0.1
    # fragments are visible outside the object and never inside it
    assert scenes["clutter"].any(axis=(1, 2)).mean() > 0.9
    assert not (scenes["clutter"] & masks).any()


def test_background_is_textured_and_dimmed(fashion_dir):
    scenes = generate_cluttered(
        50, "train", seed=1, data_path=fashion_dir, distractors=0, cache=False
    )
    background = scenes["images"][~scenes["masks"]]
    assert background.max() <= round(0.6 * 255)
    pairs = zip(scenes["images"], scenes["masks"], strict=True)
    assert np.median([image[~mask].std() for image, mask in pairs]) > 5


def test_cache_round_trip_is_atomic(fashion_dir, tmp_path):
    cache = tmp_path / "c"
    first = generate_cluttered(100, "train", seed=2, data_path=fashion_dir, cache_dir=cache)
    files = list((cache / "cluttered-fashion").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind
    second = generate_cluttered(100, "train", seed=2, data_path=fashion_dir, cache_dir=cache)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    files[0].write_bytes(b"corrupt")
    with pytest.warns(UserWarning, match="unreadable cache"):
        third = generate_cluttered(100, "train", seed=2, data_path=fashion_dir, cache_dir=cache)
    np.testing.assert_array_equal(first["images"], third["images"])


def test_too_many_scenes_for_the_source_split(fashion_dir):
    with pytest.raises(ValueError, match="need 26 items of class 0.*has 25"):
        generate_cluttered(260, "test", data_path=fashion_dir, cache=False)


def test_dataset_items_subsets_and_masks(fashion_dir, tmp_path):
    options = {"train_per_class": 20, "test_size": 60, "cache_dir": str(tmp_path / "c")}
    train = build_dataset(
        "cluttered-fashion", "train", data_path=fashion_dir, options=options, n_per_class=5, seed=1
    )
    assert (len(train), train.num_classes, train.in_chans) == (50, 10, 1)
    assert np.bincount(train.targets).tolist() == [5] * 10
    image, label = train[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32

    test = build_dataset(
        "cluttered-fashion", "test", data_path=fashion_dir, options=options, with_masks=True
    )
    image, label, mask = test[4]
    arrays = test.arrays
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    np.testing.assert_array_equal(mask.numpy(), arrays["masks"][4])
    expected = (torch.from_numpy(arrays["images"][4]).float() / 255 - test.mean[0]) / test.std[0]
    torch.testing.assert_close(image[0], expected)
    assert label == arrays["labels"][4]


def test_training_transform_keeps_mask_on_object(fashion_dir, tmp_path):
    # black background, no clutter: after the random crop/flip the mask must still be exactly
    # the non-black pixels of the transformed image
    options = {
        "train_per_class": 2,
        "dim": 0.0,
        "distractors": 0,
        "cache_dir": str(tmp_path / "c"),
    }
    train = build_dataset(
        "cluttered-fashion", "train", data_path=fashion_dir, options=options, with_masks=True
    )
    torch.manual_seed(0)
    background = (0 - train.mean[0]) / train.std[0]
    for index in range(len(train)):
        image, _, mask = train[index]
        np.testing.assert_array_equal((image[0] > background + 1e-4).numpy(), mask.numpy())


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_items_masks_are_exact():
    scenes = generate_cluttered(
        200, "test", seed=0, data_path=REAL, dim=0.0, distractors=0, cache=False
    )
    np.testing.assert_array_equal(scenes["images"] > 0, scenes["masks"])
    sides = scenes["boxes"][:, 2:] - scenes["boxes"][:, :2]
    assert sides.max() <= 40 and np.bincount(scenes["labels"]).tolist() == [20] * 10


def test_scene_settings_are_one_recipe_for_generator_and_dataset(fashion_dir):
    from spatial_entropy.data.cluttered import SCENE_OPTIONS, SceneSettings
    from spatial_entropy.data.registry import dataset_options

    by_name = generate_cluttered(
        30, "test", seed=5, data_path=fashion_dir, distractors=1, dim=0.5, cache=False
    )
    scene = SceneSettings(distractors=1, dim=0.5)
    by_object = generate_cluttered(
        30, "test", seed=5, data_path=fashion_dir, scene=scene, cache=False
    )
    for name in by_name:
        np.testing.assert_array_equal(by_name[name], by_object[name])
    assert by_object["distractor_boxes"].shape == (30, 1, 4)
    assert set(SCENE_OPTIONS) == {
        "canvas", "object_size", "distractors", "fragment_size", "dim", "max_overlap"
    }  # fmt: skip
    assert set(SCENE_OPTIONS) <= set(dataset_options("cluttered-fashion"))
    with pytest.raises(ValueError, match="not both"):
        generate_cluttered(30, "test", data_path=fashion_dir, scene=scene, dim=0.5, cache=False)
    with pytest.raises(TypeError, match="unknown scene setting"):
        generate_cluttered(30, "test", data_path=fashion_dir, colour=1, cache=False)
    with pytest.raises(ValueError, match="object_size"):
        SceneSettings(object_size=(30, 70))
