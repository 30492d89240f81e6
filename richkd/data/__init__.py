"""Datasets (CIFAR-10/100, Fashion-MNIST, ImageFolder, ImageNet layout), seeded splits, transforms and Batch loaders.

Default data folder when `data.root` is null: $RICHKD_DATA, else ~/.cache/richkd/data; Fashion-MNIST is also
found in Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist). See richkd.data.sources.
"""
from richkd.data.batch import Batch
from richkd.data.build import DataBundle, build_data
from richkd.data.classes import (CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES,
                                 known_class_names)
from richkd.data.datasets import SplitDataset
from richkd.data.loader import BatchLoader, make_loader
from richkd.data.sources import DatasetNotFoundError, default_data_root, read_idx
from richkd.data.transforms import DATASET_STATS, normalize, random_crop_flip, to_float_images

__all__ = [
    "Batch", "BatchLoader", "CIFAR10_CLASSES", "CIFAR100_CLASSES", "DATASET_STATS", "DataBundle",
    "DatasetNotFoundError", "FASHION_MNIST_CLASSES", "SplitDataset", "build_data", "default_data_root",
    "known_class_names", "make_loader", "normalize", "random_crop_flip", "read_idx", "to_float_images",
]
