"""Datasets (CIFAR-10/100, Fashion-MNIST, ImageFolder, ImageNet layout), seeded splits, transforms and Batch loaders;
where data is found: richkd.data.sources."""
from richkd.data.batch import Batch
from richkd.data.build import DataBundle, build_data
from richkd.data.classes import CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES
from richkd.data.datasets import SplitBase, SplitDataset
from richkd.data.loader import BatchLoader, make_loader
from richkd.data.sources import DatasetNotFoundError, default_data_root, read_idx
from richkd.data.transforms import DATASET_STATS, normalize, to_float_images
