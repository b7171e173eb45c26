"""CIFAR, Flowers-102, Pets, ImageFolder and VOC 2012 on miniatures in their real formats."""

import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from data_writers import PETS_TEST, PETS_TRAINVAL, write_jpeg
from PIL import Image

from spatial_entropy.data import DatasetError, DatasetNotFoundError, build_dataset
from spatial_entropy.data.base import open_image

# --- CIFAR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pixels_and_labels(tmp_path, write_cifar, hundred):
    folder, written = write_cifar(tmp_path, hundred=hundred)
    name = "cifar100" if hundred else "cifar10"
    train = build_dataset(name, "train", data_path=tmp_path)
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    assert len(train) == 12 * len(train_files) and train.num_classes == (100 if hundred else 10)
    assert train.targets == sum((written[f][1] for f in train_files), [])
    assert train.classes[3] == "class3"
    test = build_dataset(name, "val", data_path=folder)  # the folder itself works too
    pixels, labels = written["test" if hundred else "test_batch"]
    raw, _ = test.load(5)
    np.testing.assert_array_equal(np.asarray(raw), pixels[5])
    image, label = test[5]
    expected = (torch.from_numpy(pixels[5]).permute(2, 0, 1).float() / 255).sub(
        torch.tensor(test.mean).view(3, 1, 1)
    ) / torch.tensor(test.std).view(3, 1, 1)
    torch.testing.assert_close(image, expected)
    assert label == labels[5] and image.shape == (3, 32, 32)


def test_cifar_bad_inputs(tmp_path, write_cifar):
    folder, _ = write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError, match="test_batch: cannot unpickle"):
        build_dataset("cifar10", "test", data_path=tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_batch: not found"):
        build_dataset("cifar10", "test", data_path=tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_2: label 10 of item 1.*0\.\.9"):
        build_dataset("cifar10", "train", data_path=tmp_path)
    with pytest.warns(UserWarning, match="skipped 1"):
        train = build_dataset("cifar10", "train", data_path=tmp_path, skip_bad=True)
    assert train.skipped == 1 and len(train) == 12 * 4 + 1
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_3.*expected uint8 \(N, 3072\)"):
        build_dataset("cifar10", "train", data_path=tmp_path, skip_bad=True)
    with pytest.raises(DatasetNotFoundError, match="batches.meta"):
        build_dataset("cifar10", "train", data_path=tmp_path / "nowhere")


class _RunsCodeOnLoad:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for any code a file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_cifar_refuses_pickles_that_would_run_code(tmp_path, write_cifar):
    folder, _ = write_cifar(tmp_path)
    marker = tmp_path / "code_ran"
    with open(folder / "data_batch_4", "wb") as f:
        pickle.dump({b"data": _RunsCodeOnLoad(marker), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"data_batch_4: .*refus.*(posix|os)\.mkdir"):
        build_dataset("cifar10", "train", data_path=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_cifar_reads_the_official_pickle_protocols(tmp_path, write_cifar, protocol):
    # The official batches are Python 2 pickles (protocol 2, numpy 1's `numpy.core` names);
    # files re-saved by Python 3 use the later protocols and numpy 2's `numpy._core`.
    folder, _ = write_cifar(tmp_path)
    pixels = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"batch_label": "testing batch 1 of 1", b"data": pixels, b"labels": [4, 7]}
    batch[b"filenames"] = [b"cat_1.png", "dog_2.png"]
    content = pickle.dumps(batch, protocol=protocol)
    if protocol == 2:
        content = content.replace(b"numpy._core.", b"numpy.core.")
    (folder / "test_batch").write_bytes(content)
    test = build_dataset("cifar10", "test", data_path=tmp_path)
    assert test.targets == [4, 7]
    np.testing.assert_array_equal(
        np.asarray(test.load(1)[0]), pixels[1].reshape(3, 32, 32).transpose(1, 2, 0)
    )


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16_bit_png_keeps_its_grey_levels(tmp_path, mode):
    # A 16-bit greyscale ramp: 8-bit conversion used to clip everything above 255 to white.
    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    image = np.asarray(open_image(path, mode), dtype=np.float64)
    expected = ramp / 257.0  # 65535 -> 255
    if mode == "RGB":
        assert image.shape == (16, 64, 3)
        expected = np.repeat(expected[..., None], 3, axis=-1)
    np.testing.assert_allclose(image, expected, atol=0.5 + 1e-9)


# --- Flowers-102 ---------------------------------------------------------------------------


def test_flowers_splits_and_labels(flowers_dir):
    # imagelabels: [5, 1, 102, 5, 7, 1, 3, 3, 102] (1-based classes of images 1..9)
    splits = {"train": [4, 0, 101], "val": [4, 6], "test": [0, 2, 2, 101]}
    for split, targets in splits.items():
        dataset = build_dataset("flowers102", split, data_path=flowers_dir, img_size=32)
        assert dataset.targets == targets and dataset.num_classes == 102
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label == 2
    assert dataset.classes[0] == "pink primrose"


def test_flowers_bad_inputs(flowers_dir):
    (flowers_dir / "jpg" / "image_00007.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dataset = build_dataset("flowers102", "test", data_path=flowers_dir)
    with pytest.raises(DatasetError, match="image_00007.jpg: cannot decode image"):
        dataset[1]
    with pytest.raises(DatasetError, match="image_00007.jpg"):
        dataset.verify()
    with pytest.warns(UserWarning, match="skipped 1"):
        dataset = build_dataset("flowers102", "test", data_path=flowers_dir, skip_bad=True)
    assert dataset.targets == [0, 2, 101] and dataset.skipped == 1
    scipy.io.savemat(flowers_dir / "imagelabels.mat", {"labels": np.array([[5, 1, 0, 5, 7]])})
    with pytest.raises(DatasetError, match=r"imagelabels.mat: label 0 of image 3.*1\.\.102"):
        build_dataset("flowers102", "train", data_path=flowers_dir)
    with pytest.raises(DatasetError, match=r"setid.mat: image id 6 .*expected 1\.\.5"):
        build_dataset("flowers102", "test", data_path=flowers_dir)
    (flowers_dir / "setid.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match="setid.mat: not found"):
        build_dataset("flowers102", "train", data_path=flowers_dir)


def test_flowers_matlab_v73_file_names_the_file(flowers_dir):
    # MATLAB's -v7.3 files are HDF5, which scipy cannot read (NotImplementedError).
    header = b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM"
    (flowers_dir / "setid.mat").write_bytes(header + bytes(512))
    with pytest.raises(DatasetError, match=r"setid\.mat: cannot read .*v7\.3"):
        build_dataset("flowers102", "train", data_path=flowers_dir)


def test_truncated_jpeg_names_the_file(flowers_dir):
    path = flowers_dir / "jpg" / "image_00002.jpg"
    write_jpeg(path, np.random.default_rng(0), size=(64, 64))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    dataset = build_dataset("flowers102", "train", data_path=flowers_dir)
    with pytest.raises(DatasetError, match="image_00002.jpg: cannot decode image.*truncated"):
        dataset[1]


# --- Oxford-IIIT Pets ----------------------------------------------------------------------


def test_pets_splits_classes_and_masks(pets_dir):
    train = build_dataset("pets", "train", data_path=pets_dir, img_size=32)
    assert train.targets == [0, 1, 0] and train.num_classes == 37
    assert train.classes[:2] == ["Abyssinian", "American Bulldog"]
    test = build_dataset("pets", "test", data_path=pets_dir, img_size=30, with_masks=True)
    assert test.targets == [1, 36] and test.classes[36] == "Yorkshire Terrier"
    image, label, mask = test[0]
    assert image.shape == (3, 30, 30) and mask.dtype == torch.bool
    # trimap 40x30 (W x H), pet+border at rows 5:20, cols 10:30. Eval: short side to
    # floor(30 / 0.875) = 34, so 45x34, nearest neighbour; then the center 30x30 crop
    # starts at row 2, col round(7.5) = 8. The expected mask, computed by hand:
    source = np.zeros((30, 40), bool)
    source[5:20, 10:30] = True
    rows = np.floor((np.arange(34) + 0.5) * 30 / 34).astype(int)
    cols = np.floor((np.arange(45) + 0.5) * 40 / 45).astype(int)
    expected = source[rows][:, cols][2:32, 8:38]
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_pets_bad_inputs(pets_dir):
    notes = pets_dir / "annotations" / "trainval.txt"
    notes.write_text("\n".join(PETS_TRAINVAL + ["Abyssinian_9 38 1 1", "broken"]) + "\n")
    with pytest.raises(DatasetError, match=r"trainval.txt:4: class id 38 out of range"):
        build_dataset("pets", "train", data_path=pets_dir)
    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = build_dataset("pets", "train", data_path=pets_dir, skip_bad=True)
    assert len(dataset) == 3
    (pets_dir / "images" / "Abyssinian_2.jpg").unlink()
    notes.write_text("\n".join(PETS_TRAINVAL) + "\n")
    with pytest.raises(DatasetNotFoundError, match="Abyssinian_2.jpg: image file not found"):
        build_dataset("pets", "train", data_path=pets_dir)
    (pets_dir / "annotations" / "trimaps" / "american_bulldog_3.png").unlink()
    test = build_dataset("pets", "test", data_path=pets_dir, with_masks=True)
    with pytest.raises(DatasetNotFoundError, match="american_bulldog_3.png: label map not found"):
        test[0]
    (pets_dir / "annotations" / "test.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="test.txt: not found"):
        build_dataset("pets", "test", data_path=pets_dir)
    assert PETS_TEST  # the fixture's test split existed before


# --- ImageFolder ---------------------------------------------------------------------------


def test_imagefolder_classes_from_train(imagefolder_dir):
    train = build_dataset("imagefolder", "train", data_path=imagefolder_dir, img_size=32)
    assert train.classes == ["n01", "n02", "n03"] and train.targets == [0] * 3 + [1] * 2 + [2] * 4
    image, _ = train[0]
    assert image.shape == (3, 32, 32)
    (imagefolder_dir / "train" / "n04").mkdir()  # class known to train but absent from val
    val = build_dataset("imagefolder", "val", data_path=imagefolder_dir, img_size=32)
    assert val.num_classes == 4 and val.targets == [0, 1, 2, 2]
    assert build_dataset("imagefolder", "test", data_path=imagefolder_dir).targets == val.targets


def test_imagefolder_classes_file(imagefolder_dir, tmp_path):
    (tmp_path / "subset.txt").write_text("n03\nn01\n")
    options = {"classes_file": str(tmp_path / "subset.txt")}
    val = build_dataset("imagefolder", "val", data_path=imagefolder_dir, options=options)
    assert val.classes == ["n01", "n03"] and val.targets == [0, 1, 1]


def test_imagefolder_bad_inputs(imagefolder_dir):
    (imagefolder_dir / "train" / "n02" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="left out 1 file"):
        build_dataset("imagefolder", "train", data_path=imagefolder_dir)
    (imagefolder_dir / "train" / "n05").mkdir()
    with pytest.raises(DatasetError, match="n05: empty class folder"):
        build_dataset("imagefolder", "train", data_path=imagefolder_dir)
    (imagefolder_dir / "val" / "n09").mkdir()
    write_jpeg(imagefolder_dir / "val" / "n09" / "x.jpg", np.random.default_rng(0))
    with pytest.raises(DatasetError, match="val/n09: class folder not in .*train"):
        build_dataset("imagefolder", "val", data_path=imagefolder_dir)
    with pytest.raises(DatasetNotFoundError, match="inputs0/train: not found; expected a folder"):
        build_dataset("imagefolder", "train", data_path=imagefolder_dir.parent)


# --- PASCAL VOC 2012 -----------------------------------------------------------------------


def test_voc_labels_are_dominant_classes(voc_dir):
    train = build_dataset("voc2012", "train", data_path=voc_dir, img_size=32)
    assert train.targets == [14, 19] and train.classes[14] == "person"
    val = build_dataset("voc2012", "val", data_path=voc_dir / "VOCdevkit" / "VOC2012")
    assert val.targets == [11, 2] and val.num_classes == 20


def test_voc_masks_follow_the_eval_geometry(voc_dir):
    val = build_dataset("voc2012", "val", data_path=voc_dir, img_size=28, with_masks=True)
    image, label, mask = val[1]
    assert image.shape == (3, 28, 28) and mask.shape == (28, 28) and mask.dtype == torch.uint8
    # 48x32 map; short side 32 -> floor(28 / 0.875) = 32: no resize, center crop 28x28 starts
    # at row 2, col 10. Written map: row 3 void, rows 4:28 class 3 in cols 0:12 and 36:48.
    expected = np.zeros((32, 48), np.uint8)
    expected[3] = 255
    expected[4:28, :12] = 3
    expected[4:28, 36:] = 3
    np.testing.assert_array_equal(mask.numpy(), expected[2:30, 10:38])


def test_large_training_transform_refuses_masks(voc_dir):
    train = build_dataset("voc2012", "train", data_path=voc_dir, img_size=32, with_masks=True)
    with pytest.raises(ValueError, match="cannot carry a mask"):
        train[0]


def test_voc_bad_inputs(voc_dir):
    folder = voc_dir / "VOCdevkit" / "VOC2012"
    from data_writers import write_voc_map

    values = np.zeros((32, 48), np.uint8)
    values[:, :5] = 21
    write_voc_map(folder / "SegmentationClass" / "2007_000033.png", values)
    with pytest.raises(DatasetError, match=r"2007_000033.png: class value 21 out of range"):
        build_dataset("voc2012", "val", data_path=voc_dir)
    write_voc_map(folder / "SegmentationClass" / "2007_000033.png", np.zeros((32, 48)))
    with pytest.raises(DatasetError, match="2007_000033.png: no object pixels"):
        build_dataset("voc2012", "val", data_path=voc_dir)
    with pytest.warns(UserWarning, match="skipped 1"):
        assert build_dataset("voc2012", "val", data_path=voc_dir, skip_bad=True).targets == [2]
    Image.new("RGB", (48, 32)).save(folder / "SegmentationClass" / "2007_000033.png")
    with pytest.raises(DatasetError, match=r"2007_000033.png: mode 'RGB'; expected a palette"):
        build_dataset("voc2012", "val", data_path=voc_dir)
    (folder / "ImageSets" / "Segmentation" / "train.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="Segmentation/train.txt: not found"):
        build_dataset("voc2012", "train", data_path=voc_dir)


# --- shared contract -----------------------------------------------------------------------


def test_masks_only_where_the_dataset_has_them(tmp_path, write_cifar):
    write_cifar(tmp_path)
    with pytest.raises(ValueError, match="no masks"):
        build_dataset("cifar10", "test", data_path=tmp_path, with_masks=True)


def test_unknown_names_splits_and_options(tmp_path, write_cifar):
    write_cifar(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("cifar10", "holdout", data_path=tmp_path)
    with pytest.raises(ValueError, match="unknown option.*'distractors'"):
        build_dataset("cifar10", "train", data_path=tmp_path, options={"distractors": 2})
