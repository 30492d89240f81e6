"""The typed batch record the trainer consumes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    image: torch.Tensor                     # (B, 3, H, W) float in [0, 1], NOT normalised (see data.normalize)
    target: torch.Tensor                    # (B,) int64 class ids
    index: torch.Tensor                     # (B,) int64 row of the sample in its split (cache look-ups, CRD)
    view: Optional[torch.Tensor] = None     # (B,) int64 augmented-view id when views are cached, else None
    contrast_index: Optional[torch.Tensor] = None  # (B, K+1) CRD indices when sampled by the dataset

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return Batch(move(self.image), move(self.target), move(self.index), move(self.view),
                     move(self.contrast_index))

    def __len__(self) -> int:
        return int(self.target.shape[0])
