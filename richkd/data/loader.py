"""Seeded, resumable batch iteration that yields `Batch` records (order and augmentation fixed by seed + epoch)."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from richkd.data.batch import Batch
from richkd.data.resident import ResidentDataset
from richkd.data.splits import derive_seed


class _Fetcher(torch.utils.data.Dataset):
    """Key (positions, aug_seed) -> the Batch of a SplitBase, its augmentation drawn from a generator seeded by
    aug_seed (what DataLoader workers see); a device-resident dataset (richkd.data.resident) builds it itself."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[torch.Tensor, int]) -> Batch:
        positions, aug_seed = key
        if isinstance(self.dataset, ResidentDataset):
            return self.dataset.fetch(positions, aug_seed)
        gen = torch.Generator().manual_seed(int(aug_seed))
        images, targets, index, view = self.dataset.get_view_batch(positions, gen)
        return Batch(image=images, target=targets, index=index, view=view)


class _PlanSampler:
    """Yields the current epoch's batch keys; iterated in the main process by DataLoader."""

    def __init__(self, owner: "BatchLoader") -> None:
        self.owner = owner

    def __iter__(self):
        return iter(self.owner._current_plan)

    def __len__(self) -> int:
        return len(self.owner)


class BatchLoader:
    """Iterable of `Batch` over a dataset; `len()` is the number of batches per epoch.

    Epoch e's order and augmentation come from a generator seeded by (seed, e), independent of torch's global RNG
    and of num_workers. Each `iter()` uses the current epoch and then advances it; `set_epoch(e)` resumes exactly
    at epoch e. A device-resident dataset (richkd.data.resident) is fetched in the main process on its device.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), bool(shuffle), int(seed)
        resident = isinstance(dataset, ResidentDataset)
        self.num_workers = 0 if resident else int(num_workers)
        self.drop_last = bool(drop_last)
        # host batches in page-locked memory for a CUDA run (a device-resident dataset's are on the device)
        self.pin_memory = bool(pin_memory) and not resident
        self.epoch = 0
        self._current_plan: list[tuple[torch.Tensor, int]] = []
        self._loader: Optional[torch.utils.data.DataLoader] = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        """The (positions int64 (B,), augmentation seed) of every batch of an epoch."""
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, f"loader-epoch-{epoch}"))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        n_batches = len(self)
        aug_seeds = torch.randint(0, 2**62, (n_batches,), generator=gen).tolist()
        return [(order[b * self.batch_size:(b + 1) * self.batch_size], aug_seeds[b]) for b in range(n_batches)]

    def __iter__(self) -> Iterator[Batch]:
        self._current_plan = self.plan(self.epoch)
        self.epoch += 1
        if self.num_workers == 0:
            fetcher = _Fetcher(self.dataset)
            batches = (fetcher[key] for key in self._current_plan)
            return (b.pin_memory() for b in batches) if self.pin_memory else batches
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _Fetcher(self.dataset), batch_size=None, sampler=_PlanSampler(self), num_workers=self.num_workers,
                persistent_workers=True, pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(derive_seed(self.seed, "workers")))
        return iter(self._loader)


make_loader = BatchLoader   # the name every caller uses
