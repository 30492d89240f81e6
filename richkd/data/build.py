"""build_data: a DataConfig -> the train / validation / test datasets, class names and normalisation stats."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from richkd.config import DataConfig
from richkd.data.datasets import SplitBase
from richkd.data.imagenet import load_imagenet_splits
from richkd.data.sources import Splits, load_cifar, load_fashion_mnist, load_imagefolder
from richkd.data.splits import cap_per_class, cap_rows, derive_seed, stratified_take
from richkd.data.transforms import DATASET_STATS

log = logging.getLogger(__name__)

# The full train and test splits of each data.dataset: in memory at native size (CIFAR, Fashion-MNIST), files
# decoded at the model size (ImageFolder), or photos decoded per batch (docs/architecture.md#imagenet-scale)
LOADERS: dict[str, Callable[[DataConfig], Splits]] = {
    "cifar10": load_cifar, "cifar100": load_cifar, "fashion_mnist": load_fashion_mnist,
    "imagefolder": load_imagefolder, "imagenet": load_imagenet_splits,
}


@dataclass(frozen=True)
class DataBundle:
    """Everything the trainer and the cache builder need from one dataset.

    train: augmented (if data.augment == "standard") rows of the train split not held out for validation,
        capped by max_train_samples. val: the seeded hold-out (un-augmented, capped by max_eval_samples; empty
        when val_fraction == 0). test: the test split (un-augmented, capped by max_eval_samples).
    train_clean / test_clean: the FULL underlying splits, un-augmented, index == row (for building caches).
    train_targets: int64 (N_train,) labels of every underlying train row (CRD negatives are other-class rows).
    mean/std: per-channel normalisation for student and teacher inputs (CLIP normalises itself).
    """
    name: str
    train: SplitBase
    val: SplitBase
    test: SplitBase
    train_clean: SplitBase
    test_clean: SplitBase
    class_names: list[str]
    num_classes: int
    train_targets: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    origin: str

    def fingerprint(self) -> str:
        """sha256 of the underlying data (pixels or file list, labels, class names, image size), for cache keys."""
        h = hashlib.sha256(json.dumps({"name": self.name, "image_size": self.image_size,
                                       "class_names": self.class_names}).encode())
        h.update(self.train_clean.source.digest.encode())
        h.update(self.test_clean.source.digest.encode())
        return h.hexdigest()


def build_data(cfg: DataConfig) -> DataBundle:
    """Load cfg.dataset and carve the seeded validation split (see DataBundle). Raises DatasetNotFoundError."""
    splits = LOADERS[cfg.dataset](cfg)
    train_src, test_src, size = splits.train, splits.test, cfg.image_size
    n_train, targets, num_classes = len(train_src), train_src.targets, len(splits.class_names)
    if n_train and int(targets.max()) >= num_classes:
        raise ValueError(f"{cfg.dataset}: a train label is {int(targets.max())} but there are only {num_classes} "
                         f"class names ({splits.origin})")

    n_val = int(round(n_train * cfg.val_fraction))
    val_pos, train_pos = stratified_take(targets, n_val, derive_seed(cfg.split_seed, "val"))
    if cfg.val_fraction > 0 and n_val == 0:
        log.warning("%s: val_fraction %.3g of %d train rows is 0 rows; the validation split is empty",
                    cfg.dataset, cfg.val_fraction, n_train)
    train_pos = cap_per_class(train_pos, targets[train_pos], cfg.max_train_per_class,
                              derive_seed(cfg.split_seed, "train-per-class"))
    train_rows = cap_rows(train_pos, targets[train_pos], cfg.max_train_samples,
                          derive_seed(cfg.split_seed, "train-cap"))
    val_rows = cap_rows(val_pos, targets[val_pos], cfg.max_eval_samples, derive_seed(cfg.split_seed, "val-cap"))
    all_test = torch.arange(len(test_src))
    test_rows = cap_rows(all_test, test_src.targets, cfg.max_eval_samples, derive_seed(cfg.split_seed, "test-cap"))

    augment = cfg.augment == "standard"
    mean, std = DATASET_STATS[cfg.dataset]
    dataset = splits.dataset_class
    bundle = DataBundle(
        name=cfg.dataset,
        train=dataset(train_src, train_rows, size, augment, "train"),
        val=dataset(train_src, val_rows, size, False, "train"),
        test=dataset(test_src, test_rows, size, False, "test"),
        train_clean=dataset(train_src, torch.arange(n_train), size, False, "train"),
        test_clean=dataset(test_src, all_test, size, False, "test"),
        class_names=list(splits.class_names),
        num_classes=num_classes,
        train_targets=targets.clone(),
        mean=tuple(mean),
        std=tuple(std),
        image_size=size,
        origin=splits.origin,
    )
    log.info("%s from %s: %d train / %d val / %d test (of %d train, %d test rows), %d classes, %dx%d",
             cfg.dataset, splits.origin, len(bundle.train), len(bundle.val), len(bundle.test), n_train,
             len(test_src), num_classes, size, size)
    return bundle
