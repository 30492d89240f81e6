"""Batched tensor transforms: uint8 -> [0, 1] float at the model size, CIFAR-style augmentation, normalisation.

Everything works on whole batches of tensors (no per-sample PIL pipeline): on a 2-core machine the PIL path
costs more than a small student's forward pass. Augmentation draws its randomness from an explicit
`torch.Generator`, so a loader's seed fixes every crop and flip whatever the number of workers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Per-channel mean/std of each dataset's training split (for student/teacher inputs; CLIP uses its own).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # grayscale repeated to 3 channels, so the single-channel statistics are repeated too
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    # ImageFolder data is assumed to be natural photos: ImageNet statistics
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CROP_PADDING = 4  # RandomCrop(S, padding=4), the CIFAR recipe used by CRD / mdistiller / RichKD


def to_float_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, h, w) with C in {1, 3} -> float32 (B, 3, size, size) in [0, 1], resized (bilinear, antialiased)
    only when the native size differs (Fashion-MNIST 28 -> 32 px, so CIFAR-style networks apply unchanged), grayscale
    repeated to 3 channels so one model (and CLIP) takes every dataset."""
    if images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return x.contiguous()


def draw_crop_flip(batch_size: int, generator: Optional[torch.Generator] = None,
                   padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomCrop(S, padding, zero fill) + RandomHorizontalFlip(0.5) parameters, drawn on the CPU: offsets int64
    (B, 2) in [0, 2*padding], flips bool (B,). Apart from crop_flip so a device-resident dataset crops the same."""
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < 0.5
    return offsets, flip


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor,
              padding: int = CROP_PADDING) -> torch.Tensor:
    """Crop each zero-padded image at its (row, col) offset in [0, 2*padding] and flip where flip is True, on the
    images' device (CPU loaders and device-resident datasets alike)."""
    b, c, h, w = images.shape
    if b == 0:
        return images
    dev = images.device
    offsets, flip = offsets.to(dev), flip.to(dev)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)           # (B, h)
    cols = offsets[:, 1:2] + torch.arange(w, device=dev)           # (B, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)          # flipped crop: read columns backwards
    side = w + 2 * padding
    flat = (rows[:, :, None] * side + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def normalize(images: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(images - mean) / std per channel, on the images' device (not in the dataset: CLIP preprocesses the same
    un-normalised view itself). Per-step callers pass (C,) tensors already on the device, not tuples."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    if m.shape[1] != images.shape[1] or s.shape[1] != images.shape[1]:
        raise ValueError(f"mean/std have {m.shape[1]}/{s.shape[1]} channels but images have {images.shape[1]}")
    return (images - m) / s
