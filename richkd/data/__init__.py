"""Datasets (CIFAR-10/100, Fashion-MNIST, ImageFolder, ImageNet layout), seeded splits, transforms and Batch loaders.

Default data folder when `data.root` is null: $RICHKD_DATA, else ~/.cache/richkd/data; Fashion-MNIST is also
found in Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist). See richkd.data.sources.
"""
from richkd.data.batch import Batch
from richkd.data.build import DataBundle, build_data
from richkd.data.classes import CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES
from richkd.data.datasets import SplitBase, SplitDataset
from richkd.data.loader import BatchLoader, make_loader
from richkd.data.sources import DatasetNotFoundError, default_data_root, read_idx
from richkd.data.transforms import DATASET_STATS, normalize, to_float_images
