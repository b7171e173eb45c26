"""Data loaders whose order and augmentation are pure functions of (seed, epoch, sample)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from spatial_entropy.data.transforms import EvalTransform, SmallTrainTransform
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.rng import preserved_rng, seed_all

__all__ = [
    "DeviceTrainBatches",
    "EpochSeededDataset",
    "ResumableSampler",
    "TensorEvalBatches",
    "build_eval_loader",
    "build_train_loader",
    "device_data_reason",
]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for sample ``index`` of ``epoch`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1)[0])


class EpochSeededDataset(Dataset):
    """Wrap a dataset so that item ``(epoch, i)`` is ``dataset[i]`` under RNGs seeded from
    ``(seed, epoch, i)``.

    Random augmentations (timm's RandAugment, random erasing, torchvision transforms) draw from
    the global Python/NumPy/torch RNGs. Seeding them per sample makes an augmented batch
    independent of the worker that produced it, of the number of workers and of the world
    size, which is what lets a run resume mid-epoch bit for bit. The outer RNG states are
    restored after each item in the main process, so its streams (dropout, Mixup) are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        # DataLoader hands over a whole batch: the outer states are saved once per batch, and
        # not at all in a worker process, whose streams nobody else reads.
        with preserved_rng(enabled=get_worker_info() is None):
            items = []
            for epoch, index in keys:
                seed_all(sample_seed(self.seed, epoch, index))
                items.append(self.dataset[index])
        return items


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys and can start mid-epoch.

    The order of an epoch is the one ``DistributedSampler`` draws from ``seed + epoch``, so it
    does not depend on any global RNG; :meth:`set_position` skips the batches already consumed.
    Pair with :class:`EpochSeededDataset` and a loader with ``drop_last=True``.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, *, num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.start = 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start the next iteration at batch ``batch`` of epoch ``epoch``."""
        self.set_epoch(epoch)
        self.start = batch * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def _train_sampler(
    dataset: Dataset, batch_size: int, info: DistributedInfo, seed: int
) -> ResumableSampler:
    """This rank's resumable order of ``dataset``; refuses fewer images than one batch."""
    sampler = ResumableSampler(
        dataset, batch_size, num_replicas=info.world_size, rank=info.rank, seed=seed
    )
    if len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} training images give {len(sampler)} per process, fewer than "
            f"batch_size={batch_size}; lower batch_size or use more data"
        )
    return sampler


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    info: DistributedInfo,
    *,
    seed: int,
    num_workers: int = 0,
) -> DataLoader:
    """Shuffled, resumable training loader of ``batch_size`` per process (last partial batch
    dropped, so every step has the same global batch)."""
    sampler = _train_sampler(dataset, batch_size, info, seed)
    return DataLoader(
        EpochSeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        persistent_workers=num_workers > 0,
        # The loader draws its worker base seed from this generator instead of the global
        # torch RNG, which would otherwise shift with every new epoch iterator.
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    dataset: Dataset, batch_size: int, info: DistributedInfo, *, num_workers: int = 0
) -> DataLoader:
    """Ordered loader over this rank's shard (every ``world_size``-th image, no padding, so
    sums reduced over ranks count each image exactly once)."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    return DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=info.device.type == "cuda",
        generator=torch.Generator(),
    )


DEVICE_DATA_MAX_BYTES = 2**31
"""Largest copy of a dataset (uint8 training images, float evaluation images) kept on the
device by `DeviceTrainBatches` and `TensorEvalBatches`."""


def _base_positions(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under any (nested) ``Subset`` wrappers and the base index of each item."""
    positions = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        positions = [dataset.indices[i] for i in positions]
        dataset = dataset.dataset
    return dataset, positions


def device_data_reason(dataset: Dataset, is_train: bool) -> str | None:
    """Why ``dataset`` cannot be served from a tensor copy on the device (None: it can).

    Training: the small-image recipe (pad-crop-flip) followed by ``ToTensor`` + ``Normalize``
    only, no masks; evaluation: the deterministic evaluation transform of a small-image
    dataset, no masks. Both: at most `DEVICE_DATA_MAX_BYTES` of images.
    """
    base, positions = _base_positions(dataset)
    transform = getattr(base, "transform", None)
    if getattr(base, "with_masks", False):
        return "it carries masks"
    if is_train and not (isinstance(transform, SmallTrainTransform) and transform.pixelwise):
        return "its training transform is not pad-crop-flip + normalise alone"
    if not is_train and not isinstance(transform, EvalTransform):
        return "its transform is not the evaluation transform"
    native = getattr(base, "native_size", None)
    if native is None or native > 64 or not hasattr(base, "load"):
        return "its images are not small images of a fixed size"
    size = transform.geometry.size if is_train else transform.size
    per_image = len(getattr(base, "mean", (0,) * 3)) * size * size * (1 if is_train else 4)
    if per_image * len(positions) > DEVICE_DATA_MAX_BYTES:
        return f"its images would take more than {DEVICE_DATA_MAX_BYTES} bytes"
    return None


class DeviceTrainBatches:
    """The batches of `build_train_loader`, bit for bit, assembled on the device.

    For small-image datasets whose training transform is pad-crop-flip followed by
    ``ToTensor`` + ``Normalize`` (`device_data_reason`): every image is loaded and resized
    once and kept as padded uint8 on the device; a batch is one gather (crop and flips) and
    one table lookup (the transform's own ``ToTensor`` + ``Normalize`` of each pixel value),
    with each image's crop and flips drawn exactly as `EpochSeededDataset` draws them, from
    ``(seed, epoch, index)``. No worker processes, no per-image Python work but the draw.
    Same order, resume position (``sampler.set_position``) and length as the DataLoader.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, info: DistributedInfo, *, seed: int
    ) -> None:
        reason = device_data_reason(dataset, is_train=True)
        if reason is not None:
            raise ValueError(f"the training images cannot be kept on the device: {reason}")
        base, positions = _base_positions(dataset)
        self.geometry = base.transform.geometry
        self.seed, self.batch_size, self.device = seed, batch_size, info.device
        self.sampler = _train_sampler(dataset, batch_size, info, seed)
        images = [self.geometry.resize(base.load(i)[0])[0] for i in positions]
        pad = self.geometry.padding
        stacked = torch.stack([TF.pil_to_tensor(image) for image in images])
        self.images = F.pad(stacked, (pad, pad, pad, pad)).to(self.device)  # fill 0, as PIL's
        self.table = base.transform.value_table(images[0].mode).to(self.device)
        self.targets = torch.as_tensor(list(dataset.targets)).to(self.device)
        self._generator = torch.Generator()

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = list(self.sampler)
        for start in range(0, len(keys) - self.batch_size + 1, self.batch_size):
            yield self._batch(keys[start : start + self.batch_size])

    def _batch(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        draws = []
        for epoch, index in keys:
            self._generator.manual_seed(sample_seed(self.seed, epoch, index))
            draws.append(self.geometry.draw(self._generator))
        # One host-to-device copy a batch, from pinned memory and asynchronous: a copy from
        # pageable memory would wait for the GPU to finish the previous step.
        params = torch.tensor([(i, *draw) for (_, i), draw in zip(keys, draws, strict=True)])
        if self.device.type == "cuda":
            params = params.pin_memory()
        params = params.to(self.device, non_blocking=True)
        index, top, left, flip_h, flip_v = params.unbind(1)
        size, channels = self.geometry.size, self.images.shape[1]
        ar = torch.arange(size, device=self.device)
        rows = top[:, None] + torch.where(flip_v[:, None] != 0, size - 1 - ar, ar)
        cols = left[:, None] + torch.where(flip_h[:, None] != 0, size - 1 - ar, ar)
        channel = torch.arange(channels, device=self.device)[None, :, None, None]
        pixels = self.images[index[:, None, None, None], channel, rows[:, None, :, None],
                             cols[:, None, None, :]]  # fmt: skip
        return self.table[channel, pixels.long()], self.targets[index]


class TensorEvalBatches:
    """The batches of `build_eval_loader`, computed once by the dataset itself and kept on
    the device (deterministic evaluation transform, no masks: `device_data_reason`)."""

    def __init__(self, dataset: Dataset, batch_size: int, info: DistributedInfo) -> None:
        reason = device_data_reason(dataset, is_train=False)
        if reason is not None:
            raise ValueError(f"the evaluation images cannot be kept on the device: {reason}")
        shard = range(info.rank, len(dataset), info.world_size)
        items = [dataset[i] for i in shard]
        self.batch_size = batch_size
        self.images = torch.stack([image for image, _ in items]).to(info.device)
        self.targets = torch.as_tensor([label for _, label in items]).to(info.device)

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.targets), self.batch_size):
            end = start + self.batch_size
            yield self.images[start:end], self.targets[start:end]
