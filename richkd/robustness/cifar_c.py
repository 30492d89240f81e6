"""Reading a CIFAR-10-C / CIFAR-100-C style folder: `<corruption>.npy` (5 N, H, W, 3) uint8 + `labels.npy`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from richkd.robustness.corruptions import SEVERITIES


class CorruptionFolderError(ValueError):
    """The corruption folder is missing, incomplete or inconsistent; the message names the file and the fix."""


class CorruptionFolder:
    """A released corruption benchmark folder (Hendrycks & Dietterich), read lazily with memory mapping.

    Layout (CIFAR-10-C / CIFAR-100-C release): `labels.npy` (5 N,) integer labels and one `<corruption>.npy`
    per corruption of shape (5 N, H, W, 3) uint8, whose rows [(s-1) N, s N) are the N test images at
    severity s (README of the release: "the first 10,000 images in each .npy are the test set images
    corrupted at severity 1"). A `labels.npy` of length N (one copy) is accepted too.
    These images come from the TEST split, so use them for final reporting, never for model selection.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise CorruptionFolderError(f"corruption folder {str(self.root)!r} does not exist; point it at an "
                                        "unpacked CIFAR-10-C / CIFAR-100-C folder (labels.npy + <corruption>.npy)")
        labels_path = self.root / "labels.npy"
        if not labels_path.is_file():
            raise CorruptionFolderError(f"{labels_path} is missing; a corruption folder needs labels.npy next to "
                                        "the <corruption>.npy files")
        labels = np.load(labels_path, mmap_mode="r", allow_pickle=False)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise CorruptionFolderError(f"{labels_path}: expected a 1-D integer array, got {labels.dtype} "
                                        f"{labels.shape}")
        self.corruptions: tuple[str, ...] = tuple(sorted(p.stem for p in self.root.glob("*.npy")
                                                         if p.stem != "labels"))
        if not self.corruptions:
            raise CorruptionFolderError(f"{self.root} holds labels.npy but no <corruption>.npy files")
        self.shape: Optional[tuple] = None       # (5 N, H, W, 3), set by the first file; every other must match
        self.shape = self._open(self.corruptions[0]).shape
        total, n_sev = self.shape[0], len(SEVERITIES)
        if total % n_sev:
            raise CorruptionFolderError(f"{self.root / (self.corruptions[0] + '.npy')}: {total} rows is not "
                                        f"{n_sev} severities x N images")
        self.n = total // n_sev
        if labels.shape[0] not in (total, self.n):
            raise CorruptionFolderError(f"{labels_path}: {labels.shape[0]} labels for {total} images "
                                        f"({n_sev} x {self.n}); expected {total} or {self.n}")
        per_sev = np.asarray(labels[:self.n])
        if per_sev.size and per_sev.min() < 0:
            raise CorruptionFolderError(f"{labels_path}: negative labels")
        self.labels = torch.from_numpy(per_sev.astype(np.int64))

    def _open(self, name: str) -> np.ndarray:
        path = self.root / f"{name}.npy"
        if not path.is_file():
            raise CorruptionFolderError(f"{path} does not exist; corruptions in {self.root}: "
                                        f"{', '.join(self.corruptions)}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise CorruptionFolderError(f"{path}: not a plain .npy array ({exc})") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise CorruptionFolderError(f"{path}: expected uint8 (5 N, H, W, 3) images, got {arr.dtype} "
                                        f"{arr.shape}")
        if self.shape not in (None, arr.shape):
            raise CorruptionFolderError(f"{path}: shape {arr.shape} differs from the folder's {self.shape}")
        return arr

    def images(self, name: str, severity: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images of `name` at `severity` for test-image positions (default: all N)."""
        if positions is None:
            positions = torch.arange(self.n)
        rows = (severity - 1) * self.n + torch.as_tensor(positions, dtype=torch.int64).numpy()
        block = np.array(self._open(name)[rows])          # a writable in-memory copy of the rows
        return torch.from_numpy(block).permute(0, 3, 1, 2).contiguous()
