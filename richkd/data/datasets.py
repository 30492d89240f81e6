"""Views of some rows of an underlying split: items (image (3, S, S) in [0, 1], target, row index)."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch.utils.data import Dataset

from richkd.data.transforms import crop_flip, draw_crop_flip, to_float_images
from richkd.data.views import ViewSpec, view_params


class SplitBase(Dataset):
    """Some rows of one underlying split (train or test), optionally augmented or shown as cached views.

    Item i is (image float32 (3, S, S) in [0, 1], not normalised; target; index = indices[i], the row in the
    underlying split, so caches built over the full split stay valid for any validation seed or subset).
    Subclasses: SplitDataset (CIFAR-style crops), richkd.data.photos.PhotoSplit (ImageNet).
    """

    decodes_per_batch = False    # True: rows are decoded from files per batch, never device-resident

    def __init__(self, source, indices: torch.Tensor, image_size: int, augment: bool, split: str,
                 views: Optional[ViewSpec] = None) -> None:
        self.indices = torch.as_tensor(indices, dtype=torch.int64).contiguous()
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= len(source)):
            raise IndexError(f"row indices out of range for a split of {len(source)} rows")
        self.source, self.image_size, self.augment, self.split = source, int(image_size), bool(augment), split
        self.views = views  # FKD-style cached views (richkd.data.views) instead of free random crops

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def targets(self) -> torch.Tensor:
        """int64 (len(self),) class ids in item order."""
        return self.source.targets.index_select(0, self.indices)

    def get_view_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Items at positions (int64 (B,)) -> (images (B, 3, S, S), targets, rows, view ids or None); images are
        float32 in [0, 1], or uint8 that Batch.to turns into those on the device."""
        raise NotImplementedError

    def get_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Items at positions -> (images float32 (B, 3, S, S) in [0, 1], targets, rows)."""
        images, targets, rows, _ = self.get_view_batch(positions, generator)
        if images.dtype == torch.uint8:
            images = to_float_images(images, self.image_size)
        return images, targets, rows

    def draw_views(self, rows: torch.Tensor, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
        """The cached view of each row: the fixed one, else one of num_views drawn; None without views."""
        if self.views is None:
            return None
        if self.views.fixed_view is not None:
            return torch.full_like(rows, self.views.fixed_view)
        return torch.randint(0, self.views.num_views, rows.shape, generator=generator)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        n, i = len(self), int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} items")
        images, targets, rows = self.get_batch(torch.tensor([i % n]))
        return images[0], int(targets[0]), int(rows[0])

    def _with(self, **attrs) -> "SplitBase":
        out = copy.copy(self)
        out.__dict__.update(attrs)
        return out

    def with_views(self, num_views: int, seed: int, fixed_view: Optional[int] = None) -> "SplitBase":
        """The same rows shown as cached views: one of num_views per sample, or always fixed_view."""
        return self._with(augment=True, views=ViewSpec(num_views, seed, fixed_view))

    def without_augmentation(self) -> "SplitBase":
        """The same rows, un-augmented (e.g. to evaluate a teacher on the clean training images)."""
        return self._with(augment=False, views=None)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, size={self.image_size}, "
                f"augment={self.augment}, views={self.views}, source={self.source.origin!r})")


class SplitDataset(SplitBase):
    """Rows of a source that loads uint8 images (in memory, or decoded at the model size), CIFAR-style crops."""

    def get_view_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        positions = torch.as_tensor(positions, dtype=torch.int64)
        rows = self.indices.index_select(0, positions)
        images = to_float_images(self.source.load(rows), self.image_size)
        offsets, flip, views = self.draw_augmentation(rows, generator)
        if offsets is not None:
            images = crop_flip(images, offsets, flip)
        return images, self.source.targets.index_select(0, rows), rows, views

    def draw_augmentation(self, rows: torch.Tensor, generator: Optional[torch.Generator] = None
                          ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(crop offsets int64 (B, 2), flips bool (B,), view ids int64 (B,) or None) on the CPU; offsets and flips
        are None without augmentation. get_view_batch and the device-resident copy (richkd.data.resident) both crop
        with these values, so the two produce identical batches."""
        views = self.draw_views(rows, generator)
        if views is not None:
            return (*view_params(rows, views, self.views.seed), views)
        if self.augment:
            return (*draw_crop_flip(int(rows.shape[0]), generator), None)
        return None, None, None
