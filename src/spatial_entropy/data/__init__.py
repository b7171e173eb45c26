"""Datasets, the cluttered-fashion benchmark, stratified subsets and transforms."""

# importing the loaders registers them
from spatial_entropy.data import (  # noqa: F401
    cifar,
    cluttered,
    fashion_mnist,
    flowers,
    imagefolder,
    pets,
    voc,
)
from spatial_entropy.data.base import DatasetError, DatasetNotFoundError, VisionDataset
from spatial_entropy.data.cluttered import generate_cluttered
from spatial_entropy.data.fashion_mnist import find_fashion_mnist, load_fashion_mnist, read_idx
from spatial_entropy.data.registry import (
    build_dataset,
    dataset_class,
    dataset_names,
    dataset_options,
    register_dataset,
)
from spatial_entropy.data.subsets import ClassSubset, stratified_indices, stratified_subset
from spatial_entropy.data.transforms import build_transform

__all__ = [
    "ClassSubset",
    "DatasetError",
    "DatasetNotFoundError",
    "VisionDataset",
    "build_dataset",
    "build_transform",
    "dataset_class",
    "dataset_names",
    "dataset_options",
    "find_fashion_mnist",
    "generate_cluttered",
    "load_fashion_mnist",
    "read_idx",
    "register_dataset",
    "stratified_indices",
    "stratified_subset",
]
