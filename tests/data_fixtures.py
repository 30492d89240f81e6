"""Tiny on-disk datasets in the real formats (CIFAR-100 pickles, IDX files, ImageFolder PNG trees) for tests."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np

from richkd.data.classes import CIFAR100_CLASSES


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_tiny_cifar100(root: Path, per_class: int = 12, classes: tuple[int, ...] = (0, 1, 2, 3, 4),
                        test_per_class: int = 4, seed: int = 0) -> dict:
    """Write root/cifar-100-python/{train,test,meta} exactly as the official release lays them out.

    Returns {"train_data": (N, 3072) uint8, "train_labels": (N,) int64, "test_data", "test_labels",
    "md5": {file: md5}}. Labels are interleaved (0,1,2,3,4,0,1,...) so class order != row order.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {"md5": {}}
    for split, n_per in (("train", per_class), ("test", test_per_class)):
        labels = np.tile(np.asarray(classes, dtype=np.int64), n_per)
        data = rng.integers(0, 256, size=(labels.size, 3 * 32 * 32), dtype=np.uint8)
        entry = {
            "filenames": [f"img_{i}.png" for i in range(labels.size)],
            "batch_label": f"{split} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data,
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        out[f"{split}_data"] = data
        out[f"{split}_labels"] = labels
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": list(CIFAR100_CLASSES),
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, fh, protocol=2)
    for name in ("train", "test", "meta"):
        out["md5"][name] = _md5(folder / name)
    return out


def patch_cifar100_md5(monkeypatch, md5: dict) -> None:
    """Make torchvision's CIFAR100 integrity check expect our tiny files' md5 (test-only; real files unchanged)."""
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def write_tiny_fashion(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[prefix] = (images, labels)
    return out


COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}


def write_image_tree(root: Path, splits: dict[str, dict[str, int]], size=(40, 24)) -> None:
    """root/<split>/<class>/<k>.png solid-colour images (colour = COLORS[class]); splits {"train": {"cat": 3}}."""
    from PIL import Image

    for split, counts in splits.items():
        for cls, n in counts.items():
            d = Path(root) / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.new("RGB", size, COLORS[cls]).save(d / f"{k}.png")


# Fashion-MNIST's classes as ImageNet-1k wnids (label order of Fashion-MNIST): real wnids, so an ImageNet-layout
# tree of them gets open_clip's class names (T-shirt, jeans, sweatshirt, gown, fur coat, sandal, cardigan, ...).
FMNIST_WNIDS = ("n03595614", "n03594734", "n04370456", "n03450230", "n03404251", "n04133789", "n02963159",
                "n04120489", "n04026417", "n03124043")
PHOTO_SIZES = ((240, 224), (224, 264), (256, 256))   # (width, height) cycled: photos are rarely square


def write_imagenet_tree(root: Path, train_per_class: int = 4, val_per_class: int = 2, num_classes: int = 4,
                        folder_names=None, offset: int = 0) -> dict:
    """root/{train,val}/<wnid>/<k>.JPEG: real Fashion-MNIST images upscaled to ~224 px and saved as JPEG.

    Every third image is saved as a grayscale JPEG (decoders must convert it to RGB). Returns
    {"classes": sorted folder names, "files": {relative path: fashion-mnist label}}.
    """
    from PIL import Image

    from richkd.data import read_idx
    from richkd.data.sources import DEBIAN_FASHION_MNIST_DIR as src

    images = read_idx(src / "train-images-idx3-ubyte.gz")
    labels = read_idx(src / "train-labels-idx1-ubyte.gz")
    names = list(folder_names or FMNIST_WNIDS[:num_classes])
    files, k = {}, 0
    for label, folder in enumerate(names):
        rows = np.flatnonzero(labels == label)[offset:offset + train_per_class + val_per_class]
        for j, row in enumerate(rows):
            split = "train" if j < train_per_class else "val"
            d = Path(root) / split / folder
            d.mkdir(parents=True, exist_ok=True)
            size = PHOTO_SIZES[k % len(PHOTO_SIZES)]
            im = Image.fromarray(images[row]).resize(size, Image.BICUBIC)
            im = im if k % 3 == 0 else Image.merge("RGB", (im, im.transpose(Image.FLIP_LEFT_RIGHT), im))
            im.save(d / f"{folder}_{row}.JPEG", quality=90)
            files[f"{split}/{folder}/{folder}_{row}.JPEG"] = label
            k += 1
    return {"classes": sorted(names), "files": files}
