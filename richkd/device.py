"""Which device a run uses, how its random generators are seeded, and why a GPU it was given is unusable.

Foundation layer (imports torch only): the trainer, the cache builders, robustness evaluation and the CLI all
resolve `device:` and seed the same way, and none of them should have to import the training loop (or what it
imports) to do so.
"""
from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

TORCH_BUILD_FIX = ("install the torch build for this node's CUDA from PyTorch's wheel index for that CUDA version "
                   "(README, \"Running on a cluster\"), or set tune.resources.gpu: 0")


class CudaUnusableError(RuntimeError):
    """A process that was given a GPU (Ray's tune.resources.gpu) cannot use it: torch sees no CUDA device."""


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when visible, else cpu; an explicit cuda device that is not visible is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is visible; use device: auto or cpu")
    return device


def nvidia_driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version on this machine (e.g. "550.54.14"), or None when there is none."""
    try:
        found = re.search(r"\b(\d{3,}\.\d+(?:\.\d+)?)\b", Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def cuda_problem(where: str) -> Optional[str]:
    """None when torch can use a CUDA device here, else one line naming `where`, the NVIDIA driver, the CUDA
    version torch was built for, and the fix. For processes that were given a GPU: `device: auto` would
    otherwise quietly train on the CPU."""
    if torch.cuda.is_available():
        return None
    driver, built = nvidia_driver_version(), torch.version.cuda
    if built is None:
        cause = f"torch {torch.__version__} is a CPU-only build (NVIDIA driver {driver or 'not found'})"
    elif driver is None:
        cause = f"no NVIDIA driver was found, and torch {torch.__version__} is built for CUDA {built}"
    else:
        cause = (f"NVIDIA driver {driver} does not run torch {torch.__version__}'s CUDA {built} (a driver older than "
                 "that CUDA needs), or the GPU is not visible")
    return f"{where} was given a GPU but torch cannot use it: {cause}; {TORCH_BUILD_FIX}"


def require_cuda(where: str) -> None:
    """CudaUnusableError (one line, see cuda_problem) unless torch can use a CUDA device here."""
    problem = cuda_problem(where)
    if problem:
        raise CudaUnusableError(problem)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators from one run seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
