"""Which device a run uses and how its random generators are seeded.

Foundation layer (imports torch only): the trainer, the cache builders, robustness evaluation and the CLI all
resolve `device:` and seed the same way, and none of them should have to import the training loop (or what it
imports) to do so.
"""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when visible, else cpu; an explicit cuda device that is not visible is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is visible; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from one run seed."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
