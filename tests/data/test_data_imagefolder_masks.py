"""ImageFolder with the user's own masks: layout, void pixels, bad masks, Jaccard, CLI."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from data_writers import write_jpeg
from PIL import Image
from torch.utils.data import DataLoader

from spatial_entropy.checkpoint import save_weights
from spatial_entropy.cli import main
from spatial_entropy.config import load_config, save_config
from spatial_entropy.data import DatasetError, DatasetNotFoundError, build_dataset, dataset_class
from spatial_entropy.evaluation import evaluate_attention, evaluate_run
from spatial_entropy.models import create_model
from spatial_entropy.visualize import PANEL_INCHES

SIZE = 28
"""Output side: 32-pixel images are resized to floor(28 / 0.875) = 32 (unchanged) and centre-
cropped to rows and columns 2..29, so the hand counts below are made inside that window."""
WINDOW = SIZE * SIZE
# Per masked val image, object and non-void pixels inside the 28x28 window:
# c0: object [8:24, 8:24] whose first row is void (255), plus a void row 2 across the window.
C0 = (15 * 16, WINDOW - 28 - 16)
# c1: 16-bit object [4:12, 4:20] (value 1000), no void.
C1 = (8 * 16, WINDOW)
# d0: a 16x16 palette mask with its top half object, upsampled (nearest) to 32x32: rows 0..15.
D0 = (14 * 28, WINDOW)
SHARES = [inside / valid for inside, valid in (C0, C1, D0)]
CLASS = {"c": "cat", "d": "dog"}


def write_mask(path, values, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values, mode) if mode else Image.fromarray(values)
    if image.mode == "P":
        image.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (256 * 3 - 12))
    image.save(path)


@pytest.fixture
def masked_dir(tmp_path):
    """train/ and val/ of colour 32x32 JPEGs; masks/val/ misses d1, and d0's mask is 16x16."""
    rng = np.random.default_rng(15)
    root = tmp_path / "birds"
    for split, names in (("train", ("c0", "d0")), ("val", ("c0", "c1", "d0", "d1"))):
        for name in names:
            write_jpeg(root / split / CLASS[name[0]] / f"{name}.jpg", rng, (32, 32))
    masks = root / "masks" / "val"
    c0 = np.zeros((32, 32), np.uint8)
    c0[8:24, 8:24] = 1
    c0[8, 8:24] = 255
    c0[2, :] = 255
    write_mask(masks / "cat" / "c0.png", c0)
    c1 = np.zeros((32, 32), np.uint16)
    c1[4:12, 4:20] = 1000
    write_mask(masks / "cat" / "c1.png", c1)
    d0 = np.zeros((16, 16), np.uint8)
    d0[:8] = 3
    write_mask(masks / "dog" / "d0.png", d0, "P")
    for name in ("c0", "d0"):  # train masks: the whole image is the object
        write_mask(
            root / "masks" / "train" / CLASS[name[0]] / f"{name}.png", np.ones((32, 32), np.uint8)
        )
    return root


def masked(root, split="val", **kwargs):
    options = {"void_value": 255} | kwargs.pop("options", {})
    return build_dataset(
        "imagefolder", split, data_path=root, img_size=SIZE, with_masks=True, options=options,
        **kwargs,
    )  # fmt: skip


def test_masks_follow_the_images_with_void_and_16_bit(masked_dir):
    # skip_bad decodes every item once (verify), then the items are read twice more
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = masked(masked_dir, skip_bad=True)
        items = [dataset[i] for i in range(len(dataset))] + [dataset[2]]
    assert dataset.skipped == 1 and "d1.png: mask file not found" in dataset.skipped_reasons[0]
    resized = [w for w in caught if "resized with nearest neighbour" in str(w.message)]
    assert len(resized) == 1 and "d0.png" in str(resized[0].message)
    for (image, _, mask), (inside, valid) in zip(items, (C0, C1, D0), strict=False):
        assert image.shape == (3, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
        assert mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1, 255}
        assert (mask == 1).sum() == inside and (mask != 255).sum() == valid
    assert [label for _, label, _ in items[:3]] == [0, 0, 1]
    # without masks requested, the mask tree is not read at all
    assert len(build_dataset("imagefolder", "val", data_path=masked_dir)[0]) == 2


def test_uniform_attention_scores_the_object_share_of_the_valid_pixels(masked_dir):
    # Zero q/k weights make every [CLS] attention map uniform: all patches tie, the 60%-mass
    # mask keeps the whole image, and the Jaccard of a mask is |object| / |non-void pixels|.
    model = create_model("se_vit_tiny_patch4_32", num_classes=2, img_size=SIZE, depth=1,
                         embed_dim=24)  # fmt: skip
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight[: 2 * 24].zero_()
        model.blocks[-1].attn.qkv.bias[: 2 * 24].zero_()
    with pytest.warns(UserWarning):
        dataset = masked(masked_dir, skip_bad=True)
        result = evaluate_attention(model, DataLoader(dataset, batch_size=2))
    assert result["jaccard_images"] == 3
    assert result["jaccard"] == pytest.approx(sum(SHARES) / 3, abs=1e-9)


def test_has_masks_looks_for_the_masks_folder(masked_dir, voc_dir):
    imagefolder, voc, cifar = (dataset_class(n) for n in ("imagefolder", "voc2012", "cifar10"))
    assert imagefolder.has_masks(masked_dir) and voc.has_masks(voc_dir)
    assert not cifar.has_masks(masked_dir) and not imagefolder.has_masks(None)
    (masked_dir / "masks").rename(masked_dir / "elsewhere")
    assert not imagefolder.has_masks(masked_dir)
    assert imagefolder.has_masks(masked_dir, masks_path=str(masked_dir / "elsewhere"))


def test_a_missing_mask_is_an_error_naming_it(masked_dir):
    with pytest.raises(DatasetNotFoundError, match=r"masks/val/dog/d1\.png: mask file not found"):
        masked(masked_dir)
    (masked_dir / "masks").rename(masked_dir / "elsewhere")
    with pytest.raises(DatasetNotFoundError, match=r"birds/masks: not found; expected a masks"):
        masked(masked_dir)
    # masks_path points at the moved tree; only d1's mask is still missing
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        dataset = masked(masked_dir, skip_bad=True,
                         options={"masks_path": str(masked_dir / "elsewhere")})  # fmt: skip
    assert len(dataset) == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("text", "cannot decode mask"),
        ("truncated", "cannot decode mask"),
        ("rgb", "mask of mode 'RGB'; expected a greyscale or palette PNG"),
    ],
)
def test_a_malformed_mask_is_a_one_line_error_naming_it(masked_dir, content, expected):
    path = masked_dir / "masks" / "val" / "cat" / "c1.png"
    if content == "text":
        path.write_text("not a mask")
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        write_mask(path, np.zeros((32, 32, 3), np.uint8))
    (masked_dir / "val" / "dog" / "d1.jpg").unlink()
    dataset = masked(masked_dir)
    with pytest.raises(DatasetError, match=re.escape(f"{path}: {expected}")) as error:
        dataset[1]
    assert "\n" not in str(error.value)
    # with skip_bad, the bad mask's item is dropped and counted
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        assert len(masked(masked_dir, skip_bad=True)) == 2


def test_void_value_must_be_a_positive_pixel_value(masked_dir):
    with pytest.raises(ValueError, match="void_value must be a positive pixel value"):
        masked(masked_dir, options={"void_value": 0})


def test_data_info_reports_the_masks(masked_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = ["data", "info", "imagefolder", "--data-path", str(masked_dir), "--split", "val",
            "--img-size", str(SIZE), "--set", "void_value=255", "--masks", "--skip-bad",
            "--grid", str(grid)]  # fmt: skip
    with pytest.warns(UserWarning):
        assert main(argv) == 0
    out = capsys.readouterr().out
    found = re.search(r"masks: (\d+) images with masks; mean object share ([0-9.]+)", out)
    assert found and int(found[1]) == 3
    assert float(found[2]) == pytest.approx(sum(SHARES) / 3, abs=5e-5)
    assert "skipped 1 bad item(s); first: " in out and "d1.png: mask file not found" in out
    assert grid.stat().st_size > 0
    # without --skip-bad the missing mask stops the command with its name
    assert main(argv[:-3]) == 1
    assert "d1.png: mask file not found" in capsys.readouterr().err


def folder_run(tmp_path, data_path, num_classes, set_weights=None, **values):
    """A run directory (config + weights, not trained) of a tiny ViT on an image folder;
    ``set_weights(model)`` may change the weights before they are saved."""
    config = load_config(
        values={
            "model": "se_vit_tiny_patch4_32",
            "model_kwargs": {"depth": 1, "embed_dim": 24},
            "dataset": "imagefolder",
            "data_path": str(data_path),
            "img_size": SIZE,
            "num_workers": 0,
        }
        | values
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    model = create_model(config.model, num_classes=num_classes, img_size=SIZE, in_chans=3,
                         **config.model_kwargs)  # fmt: skip
    if set_weights is not None:
        with torch.no_grad():
            set_weights(model)
    save_weights(model, run_dir / "model.safetensors")
    return run_dir


def test_attention_picture_with_a_mask_folder(masked_dir, tmp_path, capsys):
    run_dir = folder_run(tmp_path, masked_dir, 2)
    images, masks = masked_dir / "val" / "cat", masked_dir / "masks" / "val" / "cat"
    out = tmp_path / "attention.png"
    argv = ["attention", str(run_dir), "--images", str(images), "--masks", str(masks)]
    assert main([*argv, "--out", str(out)]) == 0
    # input + 3 heads + kept patches + object mask = 6 panels wide, 2 rows; 100 dpi
    with Image.open(out) as picture:
        assert picture.size == (
            round(6 * PANEL_INCHES * 100),
            round((2 * PANEL_INCHES + 0.4) * 100),
        )
    (masks / "c1.png").unlink()
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert re.fullmatch(
        r"spatial-entropy attention: .*cat/c1\.png: mask file not found for.*\n", error
    )
    assert main(["attention", str(run_dir), "--masks", str(masks), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert re.fullmatch(
        r"spatial-entropy attention: .*masks_dir \(--masks\) needs images_dir.*\n", error
    )


def uniform_run(tmp_path, classes, favoured, **values):
    """A run trained on a folder of ``classes`` whose every [CLS] attention map is uniform
    (zero q/k weights) and whose head always predicts class index ``favoured``."""
    rng = np.random.default_rng(0)
    own = tmp_path / "own"
    for name in classes:
        write_jpeg(own / "val" / name / "x.jpg", rng, (32, 32))

    def uniform(model):
        model.blocks[-1].attn.qkv.weight[: 2 * 24].zero_()
        model.blocks[-1].attn.qkv.bias[: 2 * 24].zero_()
        model.head.weight.zero_()
        model.head.bias.copy_(torch.eye(len(classes))[favoured])

    return folder_run(tmp_path, own, len(classes), uniform, **values)


def evaluate_folder(run_dir, folder, *more):
    argv = ["evaluate", str(run_dir), "--device", "cpu", "--attention", "--data-path",
            str(folder), "--set", "void_value=255", *more]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped image and the resized mask
        assert main(argv) == 0
    return json.loads((run_dir / "eval.json").read_text())


def test_evaluate_a_run_on_a_masked_folder(masked_dir, tmp_path, capsys):
    # The run knows bird, cat, dog; the folder has cat and dog, renumbered 1 and 2 by name.
    run_dir = uniform_run(tmp_path, ["bird", "cat", "dog"], favoured=1)
    result = evaluate_folder(run_dir, masked_dir, "--skip-bad")
    assert result == json.loads(capsys.readouterr().out)
    assert result["jaccard_images"] == result["images"] == 3
    assert result["jaccard"] == pytest.approx(sum(SHARES) / 3, abs=1e-9)
    assert result["top1"] == pytest.approx(100 * 2 / 3)  # c0 and c1 are cats, d0 a dog
    # uniform logits have no foreground: no region, zero entropy
    assert result["se_mean"] == 0 and result["regions_mean"] == 0
    assert "omitted" not in result and result["data_path"] == str(masked_dir)
    # without --skip-bad, the image without its mask stops the command, naming the mask
    with pytest.raises(DatasetNotFoundError, match=r"dog/d1\.png: mask file not found") as error:
        evaluate_run(run_dir, attention=True, data_path=masked_dir)
    assert "\n" not in str(error.value)


def test_evaluate_on_other_classes_leaves_accuracy_out(masked_dir, tmp_path, capsys):
    run_dir = uniform_run(tmp_path, ["ant", "bee"], favoured=0)
    result = evaluate_folder(run_dir, masked_dir, "--skip-bad")
    assert "top1" not in result and "loss" not in result
    assert result["jaccard"] == pytest.approx(sum(SHARES) / 3, abs=1e-9)
    assert (
        "classes the run lacks (2: cat, dog; the run has 2: ant, bee)"
        in (result["omitted"]["accuracy"])
    )
    assert "no accuracy: imagefolder at" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"would mean nothing; only --attention statistics can"):
        evaluate_run(run_dir, data_path=masked_dir)


def test_evaluate_on_a_folder_without_masks_or_without_a_folder(masked_dir, tmp_path, capsys):
    run_dir = uniform_run(tmp_path, ["cat", "dog"], favoured=0)
    (masked_dir / "masks").rename(tmp_path / "elsewhere")
    result = evaluate_folder(run_dir, masked_dir)
    assert "jaccard" not in result and result["images"] == 4 and result["top1"] == 50.0
    assert "masks/ folder" in result["omitted"]["jaccard"]
    assert "spatial-entropy evaluate: no jaccard: imagefolder at" in capsys.readouterr().err
    # masks_path finds the moved tree
    moved = evaluate_folder(run_dir, masked_dir, "--set", f"masks_path={tmp_path / 'elsewhere'}",
                            "--skip-bad")  # fmt: skip
    assert moved["jaccard"] == pytest.approx(sum(SHARES) / 3, abs=1e-9)
    with pytest.raises(DatasetNotFoundError, match=r"nowhere/val: not found; expected a folder"):
        evaluate_run(run_dir, attention=True, data_path=tmp_path / "nowhere")


def test_evaluate_a_grey_run_on_a_colour_folder_is_an_error(masked_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    options = {"test_size": 2, "cache_dir": str(tmp_path / "cache")}
    config = load_config(
        values={
            "model": "se_vit_tiny_patch4_32",
            "model_kwargs": {"depth": 1, "embed_dim": 24},
            "dataset": "cluttered-fashion",
            "data_options": options,
        }  # fmt: skip
    )
    save_config(config, run_dir / "config.yaml")
    model = create_model(config.model, num_classes=10, in_chans=1, **config.model_kwargs)
    save_weights(model, run_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"trained on 1-channel images; imagefolder at .* gives 3"):
        evaluate_run(run_dir, dataset="imagefolder", data_path=masked_dir)


def test_attention_masks_folder_takes_a_void_value(masked_dir, tmp_path, capsys):
    # c0 inside the 28x28 window (rows and columns 2..29 of 32): object rows 9..23 x cols
    # 8..23 = 240 pixels; void (255) on row 8 (16 pixels) and row 2 (28): 44 pixels.
    from spatial_entropy.data.base import VOID
    from spatial_entropy.visualize import _folder_images

    with pytest.warns(UserWarning):  # d1 has no mask (skipped), d0 a smaller one
        transform = masked(masked_dir, skip_bad=True).transform
    images, masks = masked_dir / "val" / "cat", masked_dir / "masks" / "val" / "cat"
    _, names, plain = _folder_images(images, transform, 3, 1, masks)
    _, _, voided = _folder_images(images, transform, 3, 1, masks, void_value=255)
    assert names == ["c0.jpg"]
    assert int((plain[0] == 1).sum()) == 240 + 44 and not (plain[0] == VOID).any()
    assert int((voided[0] == 1).sum()) == 240 and int((voided[0] == VOID).sum()) == 44
    # the command line takes it; without --masks it is refused in one line
    run_dir = folder_run(tmp_path, masked_dir, 2)
    (masks / "c1.png").unlink()  # the first image only: --count 1
    out = tmp_path / "a.png"
    argv = ["attention", str(run_dir), "--images", str(images), "--count", "1", "--out", str(out)]
    assert main([*argv, "--masks", str(masks), "--void-value", "255"]) == 0 and out.is_file()
    capsys.readouterr()
    assert main([*argv, "--void-value", "255"]) == 1
    assert "void_value (--void-value) needs masks_dir" in capsys.readouterr().err
