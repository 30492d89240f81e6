"""Index-returning views of an underlying split: items (image (3, S, S) in [0, 1], target, row index)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset

from richkd.data.transforms import crop_flip, draw_crop_flip, to_float_images
from richkd.data.views import ViewSpec, view_params


def split_rows(indices, num_rows: int) -> torch.Tensor:
    """The rows a dataset reads, as a contiguous int64 tensor checked to lie in [0, num_rows)."""
    rows = torch.as_tensor(indices, dtype=torch.int64).contiguous()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise IndexError(f"row indices out of range for a split of {num_rows} rows")
    return rows


class SplitDataset(Dataset):
    """Some rows of one underlying split (train or test), optionally augmented.

    Item i is (image float32 (3, S, S) in [0, 1], target int, index int) where index = indices[i] is the row
    in the underlying torchvision split, so teacher/CLIP caches built over the full split (and CRD memory
    banks of N_train rows) stay valid for any validation seed or subset. Images are NOT normalised: the
    trainer normalises on the device, and CLIP preprocesses the same view itself.

    Loaders call get_batch (vectorised, augmentation from an explicit generator); __getitem__ is the
    single-item form and augments with torch's global RNG.
    """

    def __init__(self, source, indices: torch.Tensor, image_size: int, augment: bool, split: str,
                 views: Optional[ViewSpec] = None) -> None:
        self.source = source
        self.indices = split_rows(indices, len(source))
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.split = split
        self.views = views  # cached-view augmentation (richkd.data.views) instead of free random crops

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def targets(self) -> torch.Tensor:
        """int64 (len(self),) class ids in item order."""
        return self.source.targets.index_select(0, self.indices)

    def get_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items at `positions` (int64 (B,)) -> images float32 (B, 3, S, S) in [0, 1], targets (B,), index (B,)."""
        images, targets, rows, _ = self.get_view_batch(positions, generator)
        return images, targets, rows

    def get_view_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """get_batch plus the view id of each item (None unless the dataset shows cached views)."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        rows = self.indices.index_select(0, positions)
        images = to_float_images(self.source.load(rows), self.image_size)
        offsets, flip, views = self.draw_augmentation(rows, generator)
        if offsets is not None:
            images = crop_flip(images, offsets, flip)
        return images, self.source.targets.index_select(0, rows), rows, views

    def draw_augmentation(self, rows: torch.Tensor, generator: Optional[torch.Generator] = None
                          ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(crop offsets int64 (B, 2), flips bool (B,), view ids int64 (B,) or None) for these rows, on the CPU.

        Offsets and flips are None when the dataset does not augment. The one place that decides the
        augmentation: get_view_batch and the device-resident copy (richkd.data.resident) both crop with
        these values, so the two produce identical batches from the same generator.
        """
        if self.views is not None:
            if self.views.fixed_view is not None:
                views = torch.full_like(rows, self.views.fixed_view)
            else:
                views = torch.randint(0, self.views.num_views, rows.shape, generator=generator)
            offsets, flip = view_params(rows, views, self.views.seed)
            return offsets, flip, views
        if self.augment:
            offsets, flip = draw_crop_flip(int(rows.shape[0]), generator)
            return offsets, flip, None
        return None, None, None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        images, targets, rows = self.get_batch(torch.tensor([i]))
        return images[0], int(targets[0]), int(rows[0])

    def with_views(self, num_views: int, seed: int, fixed_view: Optional[int] = None) -> "SplitDataset":
        """The same rows shown as cached views: one of num_views per sample, or always fixed_view."""
        return SplitDataset(self.source, self.indices, self.image_size, True, self.split,
                            views=ViewSpec(num_views, seed, fixed_view))

    def without_augmentation(self) -> "SplitDataset":
        """The same rows, un-augmented (e.g. to evaluate a teacher on the clean training images)."""
        return SplitDataset(self.source, self.indices, self.image_size, False, self.split)

    def __repr__(self) -> str:
        return (f"SplitDataset(split={self.split!r}, n={len(self)}, size={self.image_size}, "
                f"augment={self.augment}, source={self.source.origin!r})")
