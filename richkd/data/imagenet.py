"""ImageNet-layout folders (`data.dataset: imagenet`): layout checks, class names, and the scan of every file
(relative path, size, label, header status), kept in the decoded-array cache (richkd.data.decoded) keyed by the
class folders' modification times, as docs/architecture.md#imagenet-scale describes.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from richkd.config import DataConfig
from richkd.data.decoded import cached_arrays
from richkd.data.photos import PhotoSource, PhotoSplit
from richkd.data.sources import DatasetNotFoundError, Splits

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
CLASS_MAP_FILE = "classes.txt"
STATUS = ("ok", "empty file", "neither a JPEG nor a PNG file", "truncated (no JPEG end-of-image marker)")
_TAIL = 1024    # a JPEG's end-of-image marker must be within its last bytes (trailing padding is tolerated)
_LAYOUT = "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (any subset of the ImageNet classes)"


class ImageNetLayoutError(DatasetNotFoundError):
    """The folder is not in ImageNet layout, its class names are unknown, or it holds bad image files."""


def _first(items: list, sep: str = ", ") -> str:
    return sep.join(map(str, items[:5])) + (" ..." if len(items) > 5 else "")


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in label order (sorted), shipped with richkd (timm ships the same list)."""
    text = importlib.resources.files("richkd.data").joinpath("imagenet_wnids.txt").read_text(encoding="ascii")
    return tuple(text.split())


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """open_clip's 1000 human-readable ImageNet class names, in label order, from its `zero_shot_metadata`
    module: plain data, but importing it through the package runs open_clip's __init__ (~3 s, torch and timm),
    and a cached-teaching trial needs only the names, so the module file is executed on its own."""
    module = sys.modules.get("open_clip.zero_shot_metadata")
    if module is None:
        path = Path(importlib.util.find_spec("open_clip").origin).parent / "zero_shot_metadata.py"
        spec = importlib.util.spec_from_file_location("richkd_open_clip_zero_shot_metadata", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return tuple(module.IMAGENET_CLASSNAMES)


# ----- layout -----------------------------------------------------------------------------------------------

def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(sub-folder names, image file names) directly in folder, sorted; hidden entries ignored."""
    dirs, images = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.name)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(e.name)
    return sorted(dirs), sorted(images)


def scan_folder(root: Path) -> dict[str, np.ndarray]:
    """The folder's index, from the decoded-array cache when it is current; ImageNetLayoutError naming what is
    wrong with its layout."""
    if not root.is_dir():
        raise ImageNetLayoutError(f"imagenet: data.root {str(root)!r} does not exist; point it at a folder with "
                                  f"{_LAYOUT}")
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir())[:8]
        raise ImageNetLayoutError(f"imagenet: {root} is not an ImageNet-layout folder: it has no "
                                  f"{' or '.join(m + '/' for m in missing)} (it holds {found}). Expected {_LAYOUT}; "
                                  "for other folder trees use data.dataset: imagefolder")
    classes = {}
    for split in ("train", "val"):
        dirs, loose = _entries(root / split)
        if loose and split == "val" and not dirs:
            raise ImageNetLayoutError(
                f"imagenet: {root / 'val'} holds {len(loose)} images directly (the flat ILSVRC2012 validation "
                "layout); sort them into val/<wnid>/ folders using the devkit's ground truth (e.g. Kaggle's "
                "LOC_val_solution.csv or the valprep.sh script), then run again")
        if loose:
            raise ImageNetLayoutError(f"imagenet: {root / split} holds image files directly ({loose[0]}, ...); "
                                      f"each image belongs in a class folder: {_LAYOUT}")
        if not dirs:
            raise ImageNetLayoutError(f"imagenet: {root / split} has no class folders; expected {_LAYOUT}")
        classes[split] = dirs
    unknown = sorted(set(classes["val"]) - set(classes["train"]))
    if unknown:
        raise ImageNetLayoutError(f"imagenet: {root / 'val'} has classes that train/ lacks: {_first(unknown)}; "
                                  "val/ classes must be a subset of train/'s")
    train_classes, val_classes = classes["train"], classes["val"]
    folders = [root / "train", root / "val"] + [root / "train" / c for c in train_classes] + \
              [root / "val" / c for c in val_classes]
    return cached_arrays("imagenet-index", folders, lambda: _scan(root, train_classes, val_classes))


def file_status(path: str) -> int:
    """Index into STATUS from the file's first and last bytes (cheap: two small reads)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if not head:
            return 1
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return 0
        if not head.startswith(b"\xff\xd8\xff"):
            return 2
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - _TAIL))
        return 0 if b"\xff\xd9" in fh.read() else 3


def _scan(root: Path, train_classes: list[str], val_classes: list[str]) -> dict[str, np.ndarray]:
    label = {c: i for i, c in enumerate(train_classes)}
    arrays: dict[str, np.ndarray] = {"classes": np.array(train_classes, dtype="S")}
    for split, classes in (("train", train_classes), ("val", val_classes)):
        rel, sizes, labels, status = [], [], [], []
        for c in classes:
            _, names = _entries(root / split / c)
            if not names and split == "train":
                raise ImageNetLayoutError(f"imagenet: {root / split / c} has no image files "
                                          f"({', '.join(IMAGE_EXTENSIONS)}); add its images or remove the folder")
            for name in names:
                path = root / split / c / name
                rel.append(f"{split}/{c}/{name}".encode("utf-8"))
                sizes.append(path.stat().st_size)
                labels.append(label[c])
                status.append(file_status(str(path)))
        arrays[f"{split}_rel"] = np.array(rel, dtype="S") if rel else np.zeros(0, dtype="S1")
        arrays[f"{split}_size"] = np.array(sizes, dtype=np.int64)
        arrays[f"{split}_label"] = np.array(labels, dtype=np.int64)
        arrays[f"{split}_status"] = np.array(status, dtype=np.uint8)
    return arrays


# ----- class names ------------------------------------------------------------------------------------------

def class_names_for(cfg: DataConfig, root: Path, classes: list[str]) -> list[str]:
    """Human-readable names of the class folders: from data.class_names, else <root>/classes.txt (files of
    `folder<whitespace>name` lines, # comments and blank lines ignored), else the ImageNet-1k names."""
    path = Path(cfg.class_names).expanduser() if cfg.class_names else root / CLASS_MAP_FILE
    if cfg.class_names and not path.is_file():
        raise ImageNetLayoutError(f"data.class_names: file {str(path)!r} does not exist; give a file of "
                                  "`folder<TAB>name` lines, or null to use the ImageNet-1k names")
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageNetLayoutError(f"class-name map {path} cannot be read ({exc}); it must be a UTF-8 text file "
                                      "with one `folder<TAB>name` line per class") from None
        mapping = {}
        for n, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                parts = line.strip().split(None, 1)
                if len(parts) != 2:
                    raise ImageNetLayoutError(f"{path}:{n}: expected `folder<TAB>name`, got {line.strip()!r}")
                mapping[parts[0]] = parts[1].strip()
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise ImageNetLayoutError(f"class-name map {path} has no line for {len(missing)} class folder(s): "
                                      f"{_first(missing)}; add `folder<TAB>name` lines for them")
        return [mapping[c] for c in classes]
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ImageNetLayoutError(
            f"imagenet: no class-name map for {root}: folder(s) {_first(unknown)} are not ImageNet-1k wnids, and "
            f"there is no {root / CLASS_MAP_FILE}."
            f" CLIP's prompts need a name per class: write {CLASS_MAP_FILE} there (one `folder<TAB>name` line per "
            "class) or set data.class_names to such a file")
    names = imagenet_class_names()
    return [names[index[c]] for c in classes]


# ----- splits -----------------------------------------------------------------------------------------------

def load_imagenet_splits(cfg: DataConfig) -> Splits:
    """The train (train/) and test (val/) splits of an ImageNet-layout folder as PhotoSources."""
    root = Path(cfg.root or "").expanduser().resolve()
    arrays = scan_folder(root)
    classes = [bytes(c).decode() for c in arrays["classes"]]
    names = class_names_for(cfg, root, classes)
    sources, skipped = {}, 0
    for split in ("train", "val"):   # bad files are an error, or skipped, as data.bad_images says
        status = np.asarray(arrays[f"{split}_status"])
        bad = np.flatnonzero(status != 0)
        named = [f"{bytes(arrays[f'{split}_rel'][i]).decode()}: {STATUS[status[i]]}" for i in bad[:6]]
        if len(bad) and cfg.bad_images == "error":
            raise ImageNetLayoutError(
                f"imagenet: {len(bad)} unreadable image file(s) under {root}: {_first(named, '; ')}. Replace or "
                "delete them, or set data.bad_images: skip to leave them out (the count is logged)")
        if len(bad):
            log.warning("imagenet: skipping %d unreadable %s image(s) under %s (data.bad_images: skip), e.g. %s",
                        len(bad), split, root, named[0])
        keep = np.flatnonzero(status == 0)
        skipped += len(bad)
        rel = arrays[f"{split}_rel"] if len(keep) == len(arrays[f"{split}_rel"]) else arrays[f"{split}_rel"][keep]
        sources[split] = PhotoSource(str(root), rel, np.asarray(arrays[f"{split}_size"])[keep],
                                     torch.from_numpy(np.asarray(arrays[f"{split}_label"])[keep]), cfg.decode,
                                     origin=f"{root / split}")
    if len(sources["train"]) == 0:
        raise ImageNetLayoutError(f"imagenet: {root / 'train'} has no readable images")
    log.info("imagenet: %d train / %d val images in %d classes under %s (%d skipped)", len(sources["train"]),
             len(sources["val"]), len(classes), root, skipped)
    return Splits(sources["train"], sources["val"], names, str(root), dataset_class=PhotoSplit,
                  skipped=skipped)
