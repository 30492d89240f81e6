"""Photos decoded per batch at full size and cropped to the model size through boxes (top, left, height, width,
flip) and torchvision's `resized_crop`: the ImageNet recipe of docs/architecture.md#imagenet-scale. PIL and
torchvision may decode differently in the last bit, so the decoder is part of the dataset's identity (and of every
cache key).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch

from richkd.data.datasets import SplitBase
from richkd.data.sources import DatasetNotFoundError
from richkd.data.views import view_hash

RRC_SCALE = (0.08, 1.0)            # torchvision's RandomResizedCrop defaults, the ImageNet recipe
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875         # Resize(round(S / 0.875)) + CenterCrop(S): 256 / 224
# What decides a view's box besides (seed, row, view, image size); a change re-keys every view cache.
BOX_RECIPE = f"rrc-getparams-scale{RRC_SCALE[0]}-{RRC_SCALE[1]}-ratio3:4-4:3-centre{EVAL_CROP_FRACTION}-v1"
# Columns of a stored box record (int32): the crop, the flip, and the decoded size the box was drawn for.
BOX_FIELDS = ("top", "left", "height", "width", "flip", "image_height", "image_width")


class BadImageError(DatasetNotFoundError):
    """An image file cannot be decoded, or no longer matches the crop boxes stored for it."""


# ----- decoding ---------------------------------------------------------------------------------------------

def decode_image(path: str, decoder: str = "pil"):
    """A PIL RGB image (decoder "pil") or a uint8 (3, H, W) tensor ("torchvision"); BadImageError if unreadable."""
    try:
        if decoder == "pil":
            from PIL import Image

            with Image.open(path) as im:
                return im.convert("RGB")
        from torchvision.io import ImageReadMode, decode_image as tv_decode

        return tv_decode(path, mode=ImageReadMode.RGB)     # by content: a PNG saved with a .JPEG name decodes too
    except (OSError, RuntimeError, ValueError) as exc:
        raise BadImageError(f"cannot decode image {path!r} ({exc}); replace or delete the file (it is then "
                            "left out when the folder is scanned again), or set data.bad_images: skip") from None


def image_hw(image) -> tuple[int, int]:
    """(height, width) of a decoded PIL image or (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image.size[1]), int(image.size[0])


def _uint8_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.contiguous()
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(image)


# ----- boxes ------------------------------------------------------------------------------------------------

def rrc_box(height: int, width: int, seed: int) -> tuple[int, int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (and a flip coin) under `seed`: (top, left, h, w, flip)."""
    from torchvision.transforms import RandomResizedCrop

    shape_only = torch.empty(1, 1, 1).expand(1, height, width)   # get_params reads only the size
    # get_params draws from torch's global CPU generator: seed only that one (torch.manual_seed would reseed
    # every CUDA generator too, and fork_rng(devices=[]) would not restore them), restored on exit
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        top, left, h, w = RandomResizedCrop.get_params(shape_only, list(RRC_SCALE), list(RRC_RATIO))
        flip = int(torch.rand(1).item() < 0.5)
    return int(top), int(left), int(h), int(w), flip


def view_box(seed: int, row: int, view: int, height: int, width: int) -> tuple[int, ...]:
    """The fixed box of FKD-style view `view` of `row`: view 0 the centre crop, others RandomResizedCrop."""
    if view == 0:   # the region Resize(S / 0.875) + CenterCrop(S) shows, unflipped
        side = max(1, min(height, width, int(round(min(height, width) * EVAL_CROP_FRACTION))))
        return (height - side) // 2, (width - side) // 2, side, side, 0
    return rrc_box(height, width, int(view_hash(seed, np.array([row]), np.array([view]))[0] >> np.uint64(1)))


def crop_box(image, box: Sequence[int], size: int) -> torch.Tensor:
    """uint8 (3, S, S): torchvision's resized_crop (bilinear, antialiased) of the box, flipped if box[4]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    top, left, h, w, flip = (int(v) for v in box[:5])
    out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if flip:
        out = TF.hflip(out)
    return _uint8_tensor(out)


def eval_crop(image, size: int) -> torch.Tensor:
    """uint8 (3, S, S): Resize(S / 0.875) of the shorter side (bilinear, antialiased) + CenterCrop(S)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    resized = TF.resize(image, int(round(size / EVAL_CROP_FRACTION)), InterpolationMode.BILINEAR, antialias=True)
    return _uint8_tensor(TF.center_crop(resized, [size, size]))


def decode_views(source: "PhotoSource", row: int, num_views: int, seed: int, size: int
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """All V views of one row from a single decode: uint8 (V, 3, S, S) crops and int32 (V, 7) box records."""
    image = source.decode(row)
    h, w = image_hw(image)
    boxes = np.asarray([(*view_box(seed, row, v, h, w), h, w) for v in range(num_views)], dtype=np.int32)
    return torch.stack([crop_box(image, box, size) for box in boxes]), boxes


# ----- the split ------------------------------------------------------------------------------------------

class PhotoSource:
    """One underlying split of image files under `root`: relative paths (a bytes array memory-mapped from the
    folder index, so 1.28M paths cost ~50 MB shared by every trial on a node), file sizes, targets, the decoder."""

    def __init__(self, root: str, relpaths: np.ndarray, sizes: np.ndarray, targets: torch.Tensor, decoder: str,
                 origin: str) -> None:
        self.root, self.relpaths, self.sizes = str(root), relpaths, np.asarray(sizes, dtype=np.int64)
        self.targets = torch.as_tensor(targets, dtype=torch.int64).contiguous()
        self.decoder, self.origin = decoder, origin

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def path(self, row: int) -> str:
        return os.path.join(self.root, bytes(self.relpaths[row]).decode("utf-8"))

    def decode(self, row: int):
        return decode_image(self.path(row), self.decoder)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the decoder and every file's relative path, size and label: a copy elsewhere keeps it."""
        h = hashlib.sha256(f"decoder={self.decoder}|n={len(self)}".encode())
        h.update(np.ascontiguousarray(self.relpaths).tobytes())
        h.update(np.ascontiguousarray(self.sizes).tobytes())
        h.update(self.targets.numpy().tobytes())
        return h.hexdigest()


class PhotoSplit(SplitBase):
    """Rows of a PhotoSource, decoded per batch at full size and cropped to the model size: a seeded
    RandomResizedCrop + flip (augment), the evaluation crop, or FKD-style fixed views, from the boxes a cache
    stores when `stored` is given (richkd.teachers.StoredBoxes)."""

    decodes_per_batch = True    # full-size photos are never device-resident (richkd.data.resident)
    stored: Optional[Any] = None

    def get_view_batch(self, positions: torch.Tensor, generator: Optional[torch.Generator] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Images as uint8 (B, 3, S, S): the loader's workers send a quarter of float32's bytes."""
        positions = torch.as_tensor(positions, dtype=torch.int64)
        rows = self.indices.index_select(0, positions)
        images = [self.source.decode(int(r)) for r in rows]
        size, views = self.image_size, self.draw_views(rows, generator)
        if views is not None:   # int32 (B, 7) box records (BOX_FIELDS), stored or drawn for each image's size
            dims = [image_hw(im) for im in images]
            if self.stored is None:
                boxes = [(*view_box(self.views.seed, r, v, h, w), h, w)
                         for r, v, (h, w) in zip(rows.tolist(), views.tolist(), dims)]
            else:
                boxes = np.asarray(self.stored.boxes(rows.numpy(), views.numpy()), dtype=np.int32)
                for k, (hw, rec) in enumerate(zip(dims, boxes)):
                    if tuple(int(v) for v in rec[5:7]) != hw:
                        raise BadImageError(
                            f"{self.source.path(int(rows[k]))} decodes to {hw[0]}x{hw[1]} px but the view boxes in "
                            f"{self.stored.origin} were drawn for {rec[5]}x{rec[6]} px: the cache was built for "
                            "other images. Delete that folder and rebuild it with `richkd cache`")
            crops = [crop_box(im, box, size) for im, box in zip(images, boxes)]
        elif self.augment:
            seeds = torch.randint(0, 2**62, rows.shape, generator=generator).tolist()
            crops = [crop_box(im, rrc_box(*image_hw(im), s), size) for im, s in zip(images, seeds)]
        else:
            crops = [eval_crop(im, size) for im in images]
        batch = torch.stack(crops) if crops else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return batch, self.source.targets.index_select(0, rows), rows, views

    def with_view_boxes(self, table) -> "PhotoSplit":
        """The same views, cropped with the boxes stored in a cache instead of recomputed ones."""
        if self.views is None:
            raise ValueError("with_view_boxes needs a dataset showing views (call with_views first)")
        return self._with(stored=table)
