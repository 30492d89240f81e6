"""FKD-style cached views: view v of row i is a fixed crop offset + flip derived from (seed, i, v).

With V views cached per image (docs/method.md#teaching-protocol), the student and both frozen teachers see the
*same* augmented image (Beyer et al.'s consistency) while no teacher runs during training: each epoch a
sample draws one of its V views and the cache row `view * N + index` holds the teachers' outputs for it.
View 0 is the clean, centred image, so look-ups without a view (validation rows) read clean outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from richkd.data.transforms import CROP_PADDING


@dataclass(frozen=True)
class ViewSpec:
    num_views: int
    seed: int
    fixed_view: Optional[int] = None   # every row shown as this view (cache building); None: draw per sample


def view_hash(seed: int, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """uint64 (B,) splitmix64 hash of each (seed, row, view): what fixes a view's crop, here and in
    richkd.data.photos (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x100000001B3)) ^ (np.asarray(rows).astype(np.uint64) << np.uint64(20)) \
            ^ np.asarray(views).astype(np.uint64)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def view_params(rows: torch.Tensor, views: torch.Tensor, seed: int,
                padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets int64 (B, 2) in [0, 2*padding] and flips bool (B,) of each (row, view); view 0 is clean."""
    v = views.cpu().numpy()
    h = view_hash(seed, rows.cpu().numpy(), v)
    span = np.uint64(2 * padding + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(16)) % span).astype(np.int64)
    flip = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool)
    clean = v == 0
    dy[clean], dx[clean], flip[clean] = padding, padding, False
    return torch.from_numpy(np.stack([dy, dx], axis=1)), torch.from_numpy(flip)
