"""Data loaders whose order and augmentation are pure functions of (seed, epoch, sample)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.rng import preserved_rng, seed_all

__all__ = ["EpochSeededDataset", "ResumableSampler", "build_train_loader", "build_eval_loader"]


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
    sampler = ResumableSampler(
        dataset, batch_size, num_replicas=info.world_size, rank=info.rank, seed=seed
    )
    if len(sampler) < batch_size:
        raise ValueError(
            f"{len(dataset)} training images give {len(sampler)} per process, fewer than "
            f"batch_size={batch_size}; lower batch_size or use more data"
        )
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
