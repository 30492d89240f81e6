"""The typed batch record the trainer consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def _on_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is not None and t.device.type == "cpu" else None


@dataclass
class Batch:
    # (B, 3, H, W) float in [0, 1], NOT normalised (see data.normalize); photo loaders yield uint8 (4x fewer
    # bytes to copy), which .to() turns into float in [0, 1] on the target device
    image: torch.Tensor
    target: torch.Tensor                    # (B,) int64 class ids
    index: torch.Tensor                     # (B,) int64 row of the sample in its split (cache look-ups, CRD)
    view: Optional[torch.Tensor] = None     # (B,) int64 augmented-view id when views are cached, else None
    contrast_index: Optional[torch.Tensor] = None  # (B, K+1) CRD indices when sampled by the dataset
    # CPU copies of index / view, kept by .to() and set by device-resident loaders: cache look-ups read rows on
    # the host, and index.cpu() on a CUDA batch would stall the step on a device->host sync.
    host_index: Optional[torch.Tensor] = field(default=None, repr=False)
    host_view: Optional[torch.Tensor] = field(default=None, repr=False)

    def _map(self, fn, **host) -> "Batch":
        tensors = (self.image, self.target, self.index, self.view, self.contrast_index)
        return Batch(*(None if t is None else fn(t) for t in tensors), **host)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The batch on `device`, images as float in [0, 1]."""
        out = self._map(lambda t: t.to(device, non_blocking=non_blocking),
                        host_index=self.host_index if self.host_index is not None else _on_host(self.index),
                        host_view=self.host_view if self.host_view is not None else _on_host(self.view))
        if out.image.dtype == torch.uint8:
            out.image = out.image.float().div_(255.0)
        return out

    def pin_memory(self) -> "Batch":
        """The batch in page-locked host memory, so that .to(cuda, non_blocking=True) copies asynchronously
        (DataLoader's pin_memory calls this)."""
        return self._map(lambda t: t.pin_memory() if t.device.type == "cpu" else None,
                         host_index=self.host_index, host_view=self.host_view)

    def index_on_host(self) -> torch.Tensor:
        """index as a CPU tensor, without a device sync when a host copy was kept."""
        return self.host_index if self.host_index is not None else self.index.cpu()

    def view_on_host(self) -> Optional[torch.Tensor]:
        """view as a CPU tensor (None without views), without a device sync when a host copy was kept."""
        if self.view is None:
            return None
        return self.host_view if self.host_view is not None else self.view.cpu()

    def __len__(self) -> int:
        return int(self.target.shape[0])
