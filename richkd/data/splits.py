"""Seeded, stratified selection of rows: the validation hold-out and the max_*_samples caps."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, tag: str) -> int:
    """An independent 63-bit seed per purpose, so e.g. the train cap does not depend on the val split's draws."""
    digest = hashlib.sha256(f"richkd-data:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stratified_take(targets: torch.Tensor, n_take: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick n_take of len(targets) positions, the same share from every class; return (taken, rest), sorted.

    Class quotas are n_take * n_c / N rounded by largest remainder (ties: lower class id first), so the
    totals are exact and class proportions survive even in tiny subsets. Within a class the choice is a
    seeded random permutation. targets: (N,) int64. Deterministic for a seed on every platform (torch CPU RNG).
    """
    targets = torch.as_tensor(targets, dtype=torch.int64)
    n = int(targets.numel())
    if not 0 <= n_take <= n:
        raise ValueError(f"cannot take {n_take} of {n} rows")
    if n_take == 0 or n == 0:
        return torch.empty(0, dtype=torch.int64), torch.arange(n)
    if n_take == n:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    classes, inverse, counts = torch.unique(targets, return_inverse=True, return_counts=True)
    quota = counts.double() * (n_take / n)
    k = quota.floor().long()
    short = n_take - int(k.sum())
    if short > 0:
        frac = quota - k.double()
        # stable sort on -frac keeps lower class ids first among equal remainders
        order = torch.sort(-frac, stable=True).indices
        k[order[:short]] += 1
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    grouped = perm[torch.sort(inverse[perm], stable=True).indices]       # by class, random within class
    starts = torch.cumsum(counts, 0) - counts
    cls_of = inverse[grouped]
    rank = torch.arange(n) - starts[cls_of]
    take_mask = rank < k[cls_of]
    taken = torch.sort(grouped[take_mask]).values
    rest = torch.sort(grouped[~take_mask]).values
    return taken, rest


def cap_rows(rows: torch.Tensor, targets: torch.Tensor, cap: int | None, seed: int) -> torch.Tensor:
    """At most `cap` of `rows` (stratified by their targets, seeded); rows unchanged when cap is None/large."""
    if cap is None or cap >= rows.numel():
        return rows
    taken, _ = stratified_take(targets, int(cap), seed)
    return rows[taken]


def cap_per_class(rows: torch.Tensor, targets: torch.Tensor, cap: int | None, seed: int) -> torch.Tensor:
    """At most `cap` of `rows` from each class (a seeded random choice within the class), in sorted order.

    The subset a sweep tunes on (data.max_train_per_class): every class keeps min(cap, its count) rows, so a
    100-per-class ImageNet subset has the full label space at 1/13 of the images. rows and targets: (N,).
    """
    if cap is None:
        return rows
    targets = torch.as_tensor(targets, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(int(targets.numel()), generator=gen)
    grouped = perm[torch.sort(targets[perm], stable=True).indices]      # by class, random within class
    classes, counts = torch.unique(targets, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    cls_pos = torch.searchsorted(classes, targets[grouped])
    keep = (torch.arange(grouped.numel()) - starts[cls_pos]) < cap
    return rows[torch.sort(grouped[keep]).values]
