"""Device-resident datasets: a run's rows loaded once as uint8 on its device, batches gathered and augmented there.

Why: a small-image GPU step otherwise waits for the CPU to index, convert and crop a batch; CIFAR's 50k rows are
150 MB as uint8. Augmentation parameters are still drawn on the CPU from the loader's seeded generator
(SplitDataset.draw_augmentation), so a resident batch shows the same rows, crops, flips and views as BatchLoader's
and exact resume keeps working; on CUDA the float conversion and resize may differ in the last float bit.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from richkd.data.batch import Batch
from richkd.data.transforms import crop_flip, to_float_images

log = logging.getLogger(__name__)

# data.resident: auto keeps a split on a CUDA device when its uint8 pixels fit this budget (4 packed trials of
# CIFAR-100 use 0.6 GB of a GPU's memory; ImageFolder photos at 224 px stay on the host beyond ~6.6k images).
RESIDENT_AUTO_MAX_BYTES = 1 << 30
_LOAD_CHUNK = 4096  # rows decoded per chunk while filling the device tensor (bounds host memory for photos)


def wants_resident(setting, dataset, device: torch.device) -> bool:
    """data.resident -> on or off for this dataset and device. auto: CUDA and the rows fit the budget."""
    if dataset.decodes_per_batch:   # full-size photos (richkd.data.photos): never resident
        if setting is True:
            raise ValueError("data.resident: true needs a dataset of fixed-size rows; photo datasets such as imagenet "
                             "decode and crop each batch from the files: set data.resident: auto or false")
        return False
    if setting is True or setting is False:
        return setting
    if torch.device(device).type != "cuda":
        return False
    size = len(dataset) and len(dataset) * dataset.source.load(dataset.indices[:1])[0].numel()   # uint8 bytes
    if size > RESIDENT_AUTO_MAX_BYTES:
        log.info("data.resident=auto: %d rows take %.0f MB > %.0f MB; batches are built on the host", len(dataset),
                 size / 2**20, RESIDENT_AUTO_MAX_BYTES / 2**20)
        return False
    return True


class ResidentDataset:
    """A SplitDataset's rows (uint8, native size, position order) held once on `device`. BatchLoader calls
    `fetch` in the main process (device tensors cannot cross process boundaries, and a worker has nothing left to do).
    """

    def __init__(self, dataset, device: torch.device | str) -> None:
        self.dataset, self.device, self.image_size = dataset, torch.device(device), dataset.image_size
        n = len(dataset)
        self.rows = dataset.indices.to(self.device)             # (n,) split row of each position
        self.targets = dataset.targets.to(self.device)          # (n,) int64
        first = dataset.source.load(dataset.indices[:1]) if n else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        self.pixels = torch.empty((n, *first.shape[1:]), dtype=torch.uint8, device=self.device)
        for start in range(0, n, _LOAD_CHUNK):  # FileSource decodes each image once here instead of every epoch
            chunk = dataset.indices[start:start + _LOAD_CHUNK]
            self.pixels[start:start + len(chunk)].copy_(dataset.source.load(chunk))
        log.info("data.resident: %d %s rows (%.1f MB uint8) on %s", n, dataset.split,
                 self.pixels.numel() / 2**20, self.device)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.numel())

    def fetch(self, positions: torch.Tensor, aug_seed: int) -> Batch:
        """The Batch BatchLoader builds on the host for (positions, aug_seed), built on the device, with host copies
        of index and view for cache look-ups."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        host_rows = self.dataset.indices.index_select(0, positions)
        gen = torch.Generator().manual_seed(int(aug_seed))
        offsets, flip, views = self.dataset.draw_augmentation(host_rows, gen)
        # every per-batch integer in ONE host->device copy: positions, then crop (dy, dx, flip), then views
        parts = [positions[None]]
        if offsets is not None:
            parts += [offsets.t(), flip.to(torch.int64)[None]]
        if views is not None:
            parts.append(views[None])
        packed = torch.cat(parts).to(self.device, non_blocking=True)
        pos = packed[0]
        images = to_float_images(self.pixels.index_select(0, pos), self.image_size)
        if offsets is not None:
            images = crop_flip(images, packed[1:3].t(), packed[3].bool())
        return Batch(image=images, target=self.targets.index_select(0, pos), index=self.rows.index_select(0, pos),
                     view=None if views is None else packed[-1], host_index=host_rows, host_view=views)


def make_resident(dataset, setting, device: torch.device | str) -> Optional[ResidentDataset]:
    """A ResidentDataset when data.resident (`setting`: "auto", True or False) says so for this device, else None."""
    return ResidentDataset(dataset, device) if wants_resident(setting, dataset, device) else None
