"""Image (and mask) transforms: timm's DeiT recipe for large images, pad-crop-flip for small ones.

Every transform here takes ``(image, mask)`` (PIL images; ``mask`` of mode "L" or None) and
returns ``(image_tensor, mask_tensor)``: a normalised float ``(C, H, W)`` tensor and, when a
mask was given, a uint8 ``(H, W)`` tensor that went through the same geometry (nearest
neighbour), so attention maps can be scored against it.

- small images (native side <= 64, e.g. Fashion-MNIST, CIFAR): training = random crop with zero
  padding (``padding``, default size / 8, i.e. 4 px at 32 px as in the authors' CIFAR runs) and
  horizontal flip, then timm's photometric part (``auto_augment``, ``color_jitter``) and random
  erasing (``reprob``), all off unless asked for; evaluation = resize if needed + normalise;
- large images: training = timm's ``create_transform(is_training=True)`` with DeiT's defaults
  (RandAugment rand-m9-mstd0.5-inc1, bicubic, random erasing 0.25 in pixel mode), each
  overridable through ``augment``; evaluation = resize the short side to size / crop_pct
  (crop_pct 0.875) + center crop.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from timm.data.transforms_factory import transforms_imagenet_train
from torchvision.transforms import InterpolationMode, Normalize, ToTensor

SMALL_IMAGE_MAX = 64
"""Images whose native side is at most this many pixels get the small-image recipe."""

DEIT_TRAIN_DEFAULTS: dict[str, Any] = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "interpolation": "bicubic",
    "color_jitter": 0.3,
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
}
"""DeiT's large-image training recipe (timm ignores color_jitter while auto_augment is on)."""

# DeiT's command-line spellings of timm's random-erasing keywords; both are accepted.
_DEIT_NAMES = {"reprob": "re_prob", "remode": "re_mode", "recount": "re_count"}
_AUGMENT_KEYS = {
    "auto_augment",
    "color_jitter",
    "interpolation",
    "re_prob",
    "re_mode",
    "re_count",
    "hflip",
    "vflip",
    "scale",
    "ratio",
    "crop_pct",
    "padding",
}
_LARGE_TRAIN_ONLY = {"scale", "ratio"}
_SMALL_TRAIN_ONLY = {"padding"}


def canonical_augment(augment: dict[str, Any] | None) -> dict[str, Any]:
    """Return ``augment`` with DeiT spellings (``reprob``...) mapped to timm's (``re_prob``...).

    Raises ValueError for a key that no transform here understands, listing the known ones.
    """
    result = {}
    for key, value in (augment or {}).items():
        name = _DEIT_NAMES.get(key, key)
        if name not in _AUGMENT_KEYS:
            known = sorted(_AUGMENT_KEYS | set(_DEIT_NAMES))
            raise ValueError(f"unknown augment key {key!r}; expected one of {known}")
        result[name] = value
    return result


def _interpolation(name: str | None, default: str) -> InterpolationMode:
    # timm's "random" only exists for its RandomResizedCrop; deterministic resizes use default
    return str_to_interp_mode(default if name in (None, "random") else name)


def mask_to_tensor(mask: Image.Image | None) -> torch.Tensor | None:
    """PIL mask of mode "L" -> uint8 ``(H, W)`` tensor (None stays None)."""
    return None if mask is None else torch.from_numpy(np.array(mask, dtype=np.uint8))


class PadCropFlip:
    """Resize to ``size`` if needed, random crop with padding, random flips: same for the mask.

    Image padding is 0, mask padding is ``mask_fill`` (0 = background, 255 = VOC's void).
    Randomness comes from torch's generator so DataLoader workers get distinct streams.
    """

    def __init__(
        self,
        size: int,
        padding: int,
        hflip: float = 0.5,
        vflip: float = 0.0,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        mask_fill: int = 0,
    ) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0; got {padding}")
        self.size, self.padding, self.hflip, self.vflip = size, padding, hflip, vflip
        self._hflip32, self._vflip32 = (float(np.float32(p)) for p in (hflip, vflip))
        self.interpolation, self.mask_fill = interpolation, mask_fill

    def resize(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[Image.Image, Image.Image | None]:
        """The deterministic part: the image (and mask) at ``size`` x ``size``."""
        size = self.size
        if image.size != (size, size):
            image = TF.resize(image, [size, size], self.interpolation)
            if mask is not None:
                mask = TF.resize(mask, [size, size], InterpolationMode.NEAREST)
        return image, mask

    def draw(self, generator: torch.Generator | None = None) -> tuple[int, int, bool, bool]:
        """The random part: ``(top, left, flip_h, flip_v)`` of one image, drawn from
        ``generator`` (default: torch's global one)."""
        top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=generator).tolist()
        u_h, u_v = torch.rand(2, generator=generator).tolist()
        # float32 draws against the float32 probabilities, as a tensor comparison would do
        return top, left, u_h < self._hflip32, u_v < self._vflip32

    def __call__(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[Image.Image, Image.Image | None]:
        size, pad = self.size, self.padding
        image, mask = self.resize(image, mask)
        top, left, flip_h, flip_v = self.draw()
        pairs = [(image, 0)] + ([] if mask is None else [(mask, self.mask_fill)])
        out = []
        for picture, fill in pairs:
            if pad:
                picture = TF.pad(picture, pad, fill=fill)
                picture = TF.crop(picture, top, left, size, size)
            if flip_h:
                picture = TF.hflip(picture)
            if flip_v:
                picture = TF.vflip(picture)
            out.append(picture)
        return out[0], (out[1] if mask is not None else None)


class SmallTrainTransform:
    """Training transform for images of side <= 64: `PadCropFlip`, then timm's photometric
    augmentation, ``ToTensor`` + ``Normalize`` and random erasing on the image only."""

    def __init__(
        self,
        size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: dict[str, Any] | None = None,
        mask_fill: int = 0,
    ) -> None:
        options = canonical_augment(augment)
        ignored = sorted(set(options) & _LARGE_TRAIN_ONLY)
        if ignored:
            warnings.warn(
                f"augment keys {ignored} apply to the large-image RandomResizedCrop; the "
                f"small-image recipe (pad-crop-flip) at {size} px ignores them",
                stacklevel=2,
            )
        self.geometry = PadCropFlip(
            size,
            padding=int(options.get("padding", round(size / 8))),
            hflip=float(options.get("hflip", 0.5)),
            vflip=float(options.get("vflip", 0.0)),
            interpolation=_interpolation(options.get("interpolation"), "bilinear"),
            mask_fill=mask_fill,
        )
        self.auto_augment = options.get("auto_augment")
        # timm builds the photometric and tensor stages; its own crop stage is not used
        _, photometric, self.final = transforms_imagenet_train(
            size,
            separate=True,
            auto_augment=self.auto_augment,
            color_jitter=options.get("color_jitter"),
            interpolation=options.get("interpolation", "bilinear"),
            re_prob=float(options.get("re_prob", 0.0)),
            re_mode=options.get("re_mode", "pixel"),
            re_count=int(options.get("re_count", 1)),
            mean=tuple(mean),
            std=tuple(std),
        )
        self.photometric = guard_posterize(photometric)

    @property
    def pixelwise(self) -> bool:
        """Whether everything after the geometry maps each pixel value on its own (no
        photometric augmentation, no random erasing: ``ToTensor`` + ``Normalize``), so that a
        value table (`value_table`) reproduces it."""
        tail = list(self.photometric.transforms) + list(self.final.transforms)
        return all(isinstance(op, (MaybeToTensor, ToTensor, Normalize)) for op in tail)

    def value_table(self, mode: str) -> torch.Tensor:
        """``(C, 256)`` float table: what this transform's tail makes of pixel value v in
        channel c, for images of PIL ``mode``; computed by the tail itself on an image that
        holds every value once. Only meaningful when `pixelwise`."""
        values = np.arange(256, dtype=np.uint8)[None, :]
        channels = len(Image.new(mode, (1, 1)).getbands())
        if channels > 1:
            values = np.repeat(values[..., None], channels, axis=-1)
        table = self.final(self.photometric(Image.fromarray(values, mode=mode)))
        return table[:, 0, :]

    def __call__(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is not None and self.auto_augment:
            raise ValueError(
                "auto_augment rotates, shears and translates the image, which would leave its "
                "mask misaligned; drop auto_augment when training with masks"
            )
        image, mask = self.geometry(image, mask)
        return self.final(self.photometric(image)), mask_to_tensor(mask)


def _posterize_or_black(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op as Pillow < 13 ran it: keeping 0 bits gives a black image.

    timm's increasing-magnitude RandAugment (DeiT's ``rand-m9-mstd0.5-inc1``) asks for 0 bits
    whenever the sampled magnitude reaches 10; Pillow 13 raises for that, which would stop a
    training run at a random step."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep < 1:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def guard_posterize(transform: Any) -> Any:
    """Swap timm's posterize for `_posterize_or_black` in every RandAugment/AutoAugment op
    inside ``transform`` (nested ``Compose`` included); returns ``transform``."""
    stack = [transform]
    while stack:
        item = stack.pop()
        stack += list(getattr(item, "transforms", None) or [])
        ops = list(getattr(item, "ops", None) or [])
        for sub_policy in getattr(item, "policy", None) or []:
            ops += list(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is timm_auto_augment.posterize:
                op.aug_fn = _posterize_or_black
    return transform


class ImageOnlyTransform:
    """Adapts an image-only transform (timm's training pipeline) to ``(image, mask)`` calls."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, mask: Image.Image | None = None) -> tuple[Any, None]:
        if mask is not None:
            raise ValueError(
                "the large-image training transform (RandomResizedCrop + RandAugment) cannot "
                "carry a mask; request masks with is_train=False (evaluation)"
            )
        return self.transform(image), None


class EvalTransform:
    """Evaluation: resize the short side to ``floor(size / crop_pct)``, center crop ``size``,
    normalise; the mask gets the same resize (nearest) and crop. Images already at ``size``
    with ``crop_pct=1`` pass through unchanged."""

    def __init__(
        self,
        size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crop_pct: float = 1.0,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct}")
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation
        self.mean, self.std = list(mean), list(std)

    def __call__(
        self, image: Image.Image, mask: Image.Image | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.size
        if image.size != (size, size) or self.crop_pct != 1:
            short_side = math.floor(size / self.crop_pct)
            image = TF.center_crop(TF.resize(image, short_side, self.interpolation), size)
            if mask is not None:
                mask = TF.resize(mask, short_side, InterpolationMode.NEAREST)
                mask = TF.center_crop(mask, size)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, mask_to_tensor(mask)


def build_transform(
    img_size: int,
    is_train: bool,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    native_size: int | None,
    augment: dict[str, Any] | None = None,
    mask_fill: int = 0,
) -> SmallTrainTransform | ImageOnlyTransform | EvalTransform:
    """The ``(image, mask) -> (tensor, mask)`` transform for one dataset split.

    Args:
        img_size: side of the square output image.
        is_train: random training augmentation if True, else the deterministic eval transform.
        mean, std: per-channel normalisation (length = number of channels).
        native_size: side of the dataset's images if fixed; <= 64 selects the small recipe.
        augment: recipe keys (DeiT or timm spellings: auto_augment, color_jitter,
            interpolation, reprob/re_prob, remode, recount, hflip, vflip, scale, ratio,
            crop_pct, padding). See the module docstring for the defaults of each recipe.
        mask_fill: mask value of padded pixels.
    """
    if img_size < 1:
        raise ValueError(f"img_size must be a positive number of pixels; got {img_size}")
    options = canonical_augment(augment)
    small = native_size is not None and native_size <= SMALL_IMAGE_MAX
    if is_train and small:
        return SmallTrainTransform(
            img_size, mean=mean, std=std, augment=augment, mask_fill=mask_fill
        )
    if is_train:
        ignored = sorted(set(options) & _SMALL_TRAIN_ONLY)
        if ignored:
            warnings.warn(
                f"augment keys {ignored} apply to the small-image recipe only; ignored",
                stacklevel=2,
            )
        recipe = {**DEIT_TRAIN_DEFAULTS, **{k: v for k, v in options.items() if k != "padding"}}
        recipe.pop("crop_pct", None)
        timm_transform = create_transform(
            img_size, is_training=True, mean=tuple(mean), std=tuple(std), **recipe
        )
        return ImageOnlyTransform(guard_posterize(timm_transform))
    return EvalTransform(
        img_size,
        mean=mean,
        std=std,
        crop_pct=float(options.get("crop_pct", 1.0 if small else 0.875)),
        interpolation=_interpolation(
            options.get("interpolation"), "bilinear" if small else "bicubic"
        ),
    )
