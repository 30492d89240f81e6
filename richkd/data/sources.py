"""Finding and loading the underlying train/test splits of each dataset (CIFAR-10/100, Fashion-MNIST, ImageFolder).

Where data is looked for when `data.root` is null:
  * the folder named by the environment variable RICHKD_DATA, else `~/.cache/richkd/data`
    (CIFAR: `<root>/cifar-10-batches-py/`, `<root>/cifar-100-python/`; Fashion-MNIST: `<root>/FashionMNIST/raw/`,
    torchvision's layouts, so `data.download: true` fills them);
  * Fashion-MNIST additionally: `<root>/fashion-mnist/` and Debian's `dataset-fashion-mnist` package files in
    `/usr/share/datasets/fashion-mnist/` (gzip IDX), read directly, which works offline.
In-memory datasets are held as one uint8 tensor (N, C, h, w); ImageFolder images are decoded lazily.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from richkd.config import DataConfig
from richkd.data.classes import CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES
from richkd.data.datasets import SplitBase, SplitDataset
from richkd.data.decoded import cached_arrays
from richkd.data.splits import stratified_take

log = logging.getLogger(__name__)

DATA_ENV_VAR = "RICHKD_DATA"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# ImageFolder without test/ or val/: this fixed share of train/ becomes the test split. The carve uses a fixed
# seed (not data.split_seed) so the underlying splits, and caches keyed on them, never change between runs.
IMAGEFOLDER_TEST_FRACTION = 0.1
IMAGEFOLDER_CARVE_SEED = 0


class DatasetNotFoundError(ValueError):
    """The dataset's files are missing or damaged; the message names the folder searched and the fix."""


def default_data_root() -> Path:
    """$RICHKD_DATA if set, else ~/.cache/richkd/data (used when data.root is null)."""
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else Path("~/.cache/richkd/data").expanduser()


def resolve_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_data_root()


# ----- sources: one underlying split each ----------------------------------------------------------

class TensorSource:
    """A split held in memory: images uint8 (N, C, h, w) with C in {1, 3}, targets int64 (N,)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, origin: str) -> None:
        self.images, self.targets, self.origin = images.contiguous(), targets.to(torch.int64).contiguous(), origin

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, h, w) for the given rows."""
        return self.images.index_select(0, rows)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of pixels and labels (~0.1 s per 50 MB)."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(self.targets.numpy().tobytes())
        return h.hexdigest()


class FileSource:
    """A split of image files decoded on demand to uint8 (3, S, S) (Resize(S) + CenterCrop(S): batches stack)."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, origin: str) -> None:
        self.paths, self.targets = [p for p, _ in samples], torch.tensor([t for _, t in samples], dtype=torch.int64)
        self.image_size, self.origin = int(image_size), origin

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        s, out = self.image_size, []
        for path in (self.paths[int(r)] for r in rows):
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except OSError as exc:
                raise DatasetNotFoundError(f"cannot read image {path!r} ({exc}); remove or replace the file") from None
            out.append(TF.pil_to_tensor(TF.center_crop(TF.resize(im, s), [s, s])))   # Pillow's bilinear, antialiased
        return torch.stack(out) if out else torch.empty(0, 3, s, s, dtype=torch.uint8)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 over (relative path, size, mtime, label) of every file: cheap, catches edits and moves."""
        # the decode recipe is part of the identity: caches of the earlier rounding (PIL resize) are not reused
        h = hashlib.sha256(f"size={self.image_size}|decode=torchvision-resize-center_crop".encode())
        base = os.path.commonpath(self.paths) if self.paths else ""
        for p, t in zip(self.paths, self.targets.tolist()):
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, base)}|{st.st_size}|{st.st_mtime_ns}|{t}\n".encode())
        return h.hexdigest()


@dataclass
class Splits:
    """The loaded underlying splits of one dataset, and the SplitBase class that shows their rows."""
    train: Any
    test: Any
    class_names: list[str]
    origin: str
    dataset_class: type[SplitBase] = SplitDataset
    skipped: int = 0              # unreadable files left out (data.bad_images: skip)


def _stat_signature(paths: Sequence[Path]) -> tuple:
    """What the in-process memo of a dataset (trials reusing a process load it once) adds to its key."""
    return tuple((str(p), *((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ())) for p in paths)


# ----- CIFAR ----------------------------------------------------------------------------------------

def load_cifar(cfg: DataConfig) -> Splits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if cfg.dataset == "cifar100" else CIFAR10
    root = resolve_root(cfg)
    folder = root / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    files = [folder / f for f in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing and not cfg.download:
        where = "data.root" if cfg.root else f"the default data folder (data.root is null; set ${DATA_ENV_VAR} to move it)"
        raise DatasetNotFoundError(
            f"{cfg.dataset}: no dataset in {folder} ({where}); missing {', '.join(missing)}. torchvision expects "
            f"{cls.base_folder}/ with {', '.join(names)} inside {root}. Fix: set `data.download: true` to fetch "
            f"{cls.url} there, or extract {cls.filename} into {root} (data.root: {root}).")
    return _read_cifar(cls, cfg.dataset, root, folder, cfg.download, _stat_signature(files))


@functools.lru_cache(maxsize=4)
def _read_cifar(cls, dataset: str, root: Path, folder: Path, download: bool, stamp: tuple) -> Splits:
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except OSError as exc:   # a URLError too
        raise DatasetNotFoundError(
            f"{dataset}: downloading {cls.url} into {root} failed ({exc}). Without network access, download "
            f"{cls.filename} elsewhere and extract it into {root} so that {folder} exists.") from None
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"{dataset}: the files in {folder} failed torchvision's md5 check ({exc}). They are incomplete or "
            f"not the official CIFAR release: delete {folder} and set `data.download: true`, or re-extract "
            f"{cls.filename}.") from None

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)

    classes = list(train.classes)
    if classes != list(CIFAR100_CLASSES if dataset == "cifar100" else CIFAR10_CLASSES):
        log.warning("%s: class names in %s differ from the official list; using the file's names", dataset, folder)
    log.info("%s: loaded %d train / %d test images from %s", dataset, len(train), len(test), folder)
    return Splits(TensorSource(*tensors(train), origin=f"{folder} (train)"),
                  TensorSource(*tensors(test), origin=f"{folder} (test)"), classes, str(folder))


# ----- Fashion-MNIST --------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes: 2 zero bytes, type code 0x08, the number of dimensions,
    each dimension as a big-endian uint32, then the data (LeCun's MNIST format)."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetNotFoundError(f"cannot read {p} ({exc}); the file is damaged: reinstall or re-download it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFoundError(f"{p} is not an IDX file of unsigned bytes; reinstall or re-download it")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetNotFoundError(f"{p} is truncated ({arr.size} values, header says {dims}); reinstall or re-download it")
    return arr.reshape(dims)


def _idx_files(folder: Path) -> Optional[tuple[tuple[str, Path], ...]]:
    """The four Fashion-MNIST IDX files in folder (plain or .gz) as (name, path) pairs, or None if any is missing."""
    found = [(name, next((c for c in (folder / name, folder / f"{name}.gz") if c.is_file()), None))
             for names in FASHION_MNIST_FILES.values() for name in names]
    return None if any(path is None for _, path in found) else tuple(sorted(found))


def load_fashion_mnist(cfg: DataConfig) -> Splits:
    root = resolve_root(cfg)
    candidates = [root / "FashionMNIST" / "raw", *([root] if cfg.root else
                                                   [root / "fashion-mnist", DEBIAN_FASHION_MNIST_DIR])]
    if cfg.download and not any(_idx_files(folder) for folder in candidates):
        from torchvision.datasets import FashionMNIST

        try:    # torchvision's download, kept unzipped in root/FashionMNIST/raw, the first candidate
            FashionMNIST(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:   # URLError is an OSError
            raise DatasetNotFoundError(
                f"fashion_mnist: downloading into {root} failed ({exc}). Offline, install Debian's package instead: "
                "`sudo apt-get install dataset-fashion-mnist` and keep data.root null.") from None
    for folder in candidates:
        files = _idx_files(folder)
        if files is not None:
            return _read_fashion_idx(files, folder, _stat_signature([path for _, path in files]))
    searched = ", ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        "fashion_mnist: the files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f"t10k-labels-idx1-ubyte (plain or .gz) were not found in any of {searched}. "
        "Fix: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; used automatically when data.root "
        "is null), or set `data.download: true` to let torchvision fetch them into "
        f"{root / 'FashionMNIST' / 'raw'}, or put the four files in a folder and set data.root to it.")


@functools.lru_cache(maxsize=4)
def _read_fashion_idx(files: tuple[tuple[str, Path], ...], folder: Path, stamp: tuple) -> Splits:
    def decode() -> dict[str, np.ndarray]:   # "<split>_images" (N, 28, 28) and "<split>_labels" (N,), checked
        arrays = {}
        for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
            images, labels = (read_idx(dict(files)[name]) for name in (img_name, lbl_name))
            if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
                raise DatasetNotFoundError(f"{folder}: {img_name} {images.shape} and {lbl_name} {labels.shape} do "
                                           "not match; reinstall or re-download the files")
            arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
        return arrays

    # fresh trial processes memory-map the decoded arrays instead of un-gzipping ~30 MB each (richkd.data.decoded)
    arrays = cached_arrays("fashion_mnist", [path for _, path in files], decode)
    sources = {}
    for split in FASHION_MNIST_FILES:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        # cached maps are writable (copy-on-write) and taken as they are; freshly decoded bytes are read-only
        img = torch.from_numpy(images if images.flags.writeable else images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
        sources[split] = TensorSource(img, torch.from_numpy(labels.astype(np.int64)), origin=f"{folder} ({split})")
    log.info("fashion_mnist: loaded %d train / %d test images from %s", len(sources["train"]), len(sources["test"]), folder)
    return Splits(sources["train"], sources["test"], list(FASHION_MNIST_CLASSES), str(folder))


# ----- ImageFolder ----------------------------------------------------------------------------------

def load_imagefolder(cfg: DataConfig) -> Splits:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = resolve_root(cfg)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder: {train_dir} does not exist. data.root ({root}) must contain train/<class>/<image> "
            "folders (class names are the folder names), and optionally test/ (or val/) with the same classes.")
    try:
        classes, class_to_idx = find_classes(train_dir)
        train_samples = make_dataset(str(train_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"imagefolder: {train_dir}: {exc}. Each class needs a folder of images "
                                   f"({', '.join(IMG_EXTENSIONS)}).") from None
    size = cfg.image_size
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is not None:
        try:
            test_classes, _ = find_classes(test_dir)
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"imagefolder: {test_dir}: {exc}") from None
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DatasetNotFoundError(f"imagefolder: {test_dir} has classes not in {train_dir}: {', '.join(unknown)}; "
                                       "the test classes must be a subset of the train classes")
        test_samples = make_dataset(str(test_dir), {c: class_to_idx[c] for c in test_classes},
                                    extensions=IMG_EXTENSIONS, allow_empty=True)
        origin = f"{train_dir} + {test_dir}"
    else:
        n_test = int(round(len(train_samples) * IMAGEFOLDER_TEST_FRACTION))
        held, kept = stratified_take(torch.tensor([t for _, t in train_samples]), n_test, IMAGEFOLDER_CARVE_SEED)
        log.warning("imagefolder: %s has no test/ or val/ folder; holding out a fixed %d%% of train/ (%d images, "
                    "seed %d) as the test split", root, round(100 * IMAGEFOLDER_TEST_FRACTION), n_test,
                    IMAGEFOLDER_CARVE_SEED)
        test_samples = [train_samples[i] for i in held.tolist()]
        train_samples = [train_samples[i] for i in kept.tolist()]
        origin = f"{train_dir} (test carved from train)"
    return Splits(FileSource(train_samples, size, origin=f"{origin} (train)"),
                  FileSource(test_samples, size, origin=f"{origin} (test)"), classes, origin)
