"""Transforms: the mask follows the image's geometry; recipes pick the right pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image

from spatial_entropy.data.transforms import (
    EvalTransform,
    ImageOnlyTransform,
    SmallTrainTransform,
    build_transform,
    canonical_augment,
)

GREY = ((0.0,), (1.0,))  # mean, std that leave pixel / 255 unchanged


def picture(side=16, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(1, 256, (side, side), dtype=np.uint8)  # no zeros: padding is visible
    return pixels, Image.fromarray(pixels), Image.fromarray((pixels > 128).astype(np.uint8))


def candidates(pixels, padding):
    """Every crop of the zero-padded image, flipped or not: what pad-crop-flip may return."""
    side = pixels.shape[0]
    padded = np.pad(pixels, padding)
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[top : top + side, left : left + side]
            yield crop
            yield crop[:, ::-1]


def test_pad_crop_flip_moves_mask_with_image():
    pixels, image, mask = picture()
    transform = build_transform(16, True, mean=GREY[0], std=GREY[1], native_size=16)
    assert isinstance(transform, SmallTrainTransform) and transform.geometry.padding == 2
    allowed = [c.tobytes() for c in candidates(pixels, 2)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out, out_mask = transform(image, mask)
        as_uint8 = (out[0] * 255).round().to(torch.uint8).numpy()
        assert as_uint8.tobytes() in allowed
        seen.add(as_uint8.tobytes())
        # the mask is (pixel > 128) of whatever the image became; padding is 0 in both
        np.testing.assert_array_equal(out_mask.numpy(), (as_uint8 > 128).astype(np.uint8))
    assert len(seen) > 5  # it is random


def test_mask_padding_uses_mask_fill():
    pixels, image, _ = picture()
    void = Image.fromarray(np.zeros_like(pixels))
    transform = build_transform(
        16, True, mean=GREY[0], std=GREY[1], native_size=16, augment={"padding": 4}, mask_fill=255
    )
    torch.manual_seed(1)
    for _ in range(10):
        out, out_mask = transform(image, void)
        padded = (out[0] == 0).numpy()
        np.testing.assert_array_equal(out_mask.numpy() == 255, padded)


def test_small_eval_is_identity_up_to_normalisation():
    pixels, image, mask = picture()
    transform = build_transform(16, False, mean=(0.5,), std=(0.25,), native_size=16)
    out, out_mask = transform(image, mask)
    torch.testing.assert_close(out[0], (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.25)
    np.testing.assert_array_equal(out_mask.numpy(), np.asarray(mask))


def test_small_eval_resizes_mask_nearest():
    _, image, _ = picture(side=8)
    labels = np.kron(np.arange(4).reshape(2, 2), np.ones((4, 4), np.uint8)).astype(np.uint8)
    transform = build_transform(16, False, mean=GREY[0], std=GREY[1], native_size=8)
    out, out_mask = transform(image, Image.fromarray(labels))
    assert out.shape == (1, 16, 16)
    np.testing.assert_array_equal(out_mask.numpy(), np.kron(labels, np.ones((2, 2), np.uint8)))


def test_large_eval_resize_and_center_crop():
    # 64x32 (W x H) image whose left half is class 1 and right half class 2
    labels = np.zeros((32, 64), np.uint8)
    labels[:, :32], labels[:, 32:] = 1, 2
    image = Image.fromarray(np.stack([labels * 100] * 3, -1))
    transform = build_transform(28, False, mean=(0, 0, 0), std=(1, 1, 1), native_size=None)
    assert isinstance(transform, EvalTransform) and transform.crop_pct == 0.875
    out, out_mask = transform(image, Image.fromarray(labels))
    # short side 32 -> floor(28 / 0.875) = 32 (no resize), center crop columns 18..45
    assert out.shape == (3, 28, 28)
    np.testing.assert_array_equal(out_mask.numpy(), labels[2:30, 18:46])


def test_large_training_uses_timm_deit_recipe():
    transform = build_transform(32, True, mean=(0.5,) * 3, std=(0.5,) * 3, native_size=None)
    assert isinstance(transform, ImageOnlyTransform)
    text = repr(transform.transform)
    assert "RandAugment" in text and "RandomErasing(p=0.25, mode=pixel" in text
    assert "RandomResizedCrop" in text
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8))
    out, no_mask = transform(image)
    assert out.shape == (3, 32, 32) and no_mask is None
    plain = build_transform(
        32, True, mean=(0.5,) * 3, std=(0.5,) * 3, native_size=None,
        augment={"auto_augment": None, "reprob": 0},
    )  # fmt: skip
    assert "RandAugment" not in repr(plain.transform)


def test_augment_keys():
    assert canonical_augment({"reprob": 0.1, "remode": "const"}) == {
        "re_prob": 0.1,
        "re_mode": "const",
    }
    with pytest.raises(ValueError, match="unknown augment key 'rand_aug'"):
        build_transform(32, True, mean=(0,), std=(1,), native_size=32, augment={"rand_aug": 1})
    with pytest.warns(UserWarning, match="ignores them"):
        build_transform(32, True, mean=(0,), std=(1,), native_size=32, augment={"scale": (0.5, 1)})


def test_auto_augment_with_masks_is_refused():
    _, image, mask = picture()
    transform = build_transform(
        16, True, mean=GREY[0], std=GREY[1], native_size=16,
        augment={"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25},
    )  # fmt: skip
    assert transform(image)[0].shape == (1, 16, 16)
    with pytest.raises(ValueError, match="misaligned"):
        transform(image, mask)


def _posterize_ops(transform) -> list:
    """Every timm AugmentOp named Posterize* inside a (nested) transform."""
    found, stack = [], [transform]
    while stack:
        item = stack.pop()
        stack += list(getattr(item, "transforms", None) or [])
        found += [op for op in getattr(item, "ops", None) or [] if "Posterize" in op.name]
    return found


@pytest.mark.parametrize("img_size", [32, 224])  # small-image recipe and timm's large one
def test_randaugment_posterize_at_full_magnitude(img_size: int) -> None:
    # DeiT's increasing posterize keeps 4 - int(level / 10 * 4) bits: 0 bits at magnitude 10,
    # which Pillow >= 13 refuses; the op must give a black image as older Pillow did.
    transform = build_transform(
        img_size,
        is_train=True,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        native_size=img_size,
        augment={"auto_augment": "rand-m10-mstd0-inc1"},
    )
    ops = _posterize_ops(getattr(transform, "photometric", None) or transform.transform)
    assert ops, "expected a PosterizeIncreasing op in the RandAugment stage"
    image = Image.fromarray(np.full((img_size, img_size, 3), 200, dtype=np.uint8))
    for op in ops:
        op.prob = 1.0
        assert np.asarray(op(image)).max() == 0  # all bits dropped: black
        op.magnitude = 5  # 4 - int(2) = 2 bits kept: 200 = 0b11001000 -> 0b11000000
        assert np.unique(np.asarray(op(image))).tolist() == [192]
