"""Seeded, stratified selection of rows: the validation hold-out and the max_*_samples caps."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, tag: str) -> int:
    """An independent 63-bit seed per purpose, so e.g. the train cap does not depend on the val split's draws."""
    digest = hashlib.sha256(f"richkd-data:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _by_class(targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions grouped by class in a seeded random order within each class, their class index, their rank
    within the class, the class counts). Deterministic for a seed on every platform (torch CPU RNG)."""
    _, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    perm = torch.randperm(int(targets.numel()), generator=torch.Generator().manual_seed(int(seed)))
    grouped = perm[torch.sort(inverse[perm], stable=True).indices]
    cls = inverse[grouped]
    return grouped, cls, torch.arange(grouped.numel()) - (torch.cumsum(counts, 0) - counts)[cls], counts


def stratified_take(targets: torch.Tensor, n_take: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick n_take of len(targets) positions, the same share from every class; return (taken, rest), sorted.

    Class quotas are n_take * n_c / N rounded by largest remainder (ties: lower class id first), so the totals
    are exact and class proportions survive even in tiny subsets; within a class the choice is seeded random.
    """
    targets = torch.as_tensor(targets, dtype=torch.int64)
    n = int(targets.numel())
    if not 0 <= n_take <= n:
        raise ValueError(f"cannot take {n_take} of {n} rows")
    if n_take == 0 or n == 0:
        return torch.empty(0, dtype=torch.int64), torch.arange(n)
    if n_take == n:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    grouped, cls, rank, counts = _by_class(targets, seed)
    quota = counts.double() * (n_take / n)
    k = quota.floor().long()
    short = n_take - int(k.sum())
    if short > 0:   # a stable sort on -remainder keeps lower class ids first among equal remainders
        k[torch.sort(-(quota - k.double()), stable=True).indices[:short]] += 1
    take = rank < k[cls]
    return torch.sort(grouped[take]).values, torch.sort(grouped[~take]).values


def cap_rows(rows: torch.Tensor, targets: torch.Tensor, cap: int | None, seed: int) -> torch.Tensor:
    """At most `cap` of `rows` (stratified by their targets, seeded); rows unchanged when cap is None/large."""
    if cap is None or cap >= rows.numel():
        return rows
    taken, _ = stratified_take(targets, int(cap), seed)
    return rows[taken]


def cap_per_class(rows: torch.Tensor, targets: torch.Tensor, cap: int | None, seed: int) -> torch.Tensor:
    """At most `cap` of `rows` from each class (seeded), sorted: data.max_train_per_class, the subset a sweep tunes
    on keeps the full label space (100 per class: 1/13 of ImageNet)."""
    if cap is None:
        return rows
    grouped, _, rank, _ = _by_class(torch.as_tensor(targets, dtype=torch.int64), seed)
    return rows[torch.sort(grouped[rank < cap]).values]
