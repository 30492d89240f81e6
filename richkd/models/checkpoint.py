"""Teacher/student weight files: strict loading with one readable error, and atomic saving."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from richkd.io import atomic_torch_save, load_problem, quiet_torch_load, sha256_file
from richkd.models.base import create_model, pretrained_source

logger = logging.getLogger(__name__)

_MAX_LISTED = 10  # keys shown per category before the list is truncated


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not fit the requested architecture."""


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def load_teacher(name: str, path: str | os.PathLike, num_classes: int,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """Build `name`, load `path` strictly (a half-loaded teacher teaches noise), freeze it; return (model in eval
    mode, sha256 of the file, so caches and run records name the exact teacher)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"teacher checkpoint not found: {p}; {pretrained_source(name)}, or fix teacher.checkpoint in the "
            "config"
        )
    model = create_model(name, num_classes)
    try:
        with quiet_torch_load():
            obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types on a bad file (UnpicklingError, EOFError, ...)
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({load_problem(exc)}); it may be truncated, "
                              "or hold more than weights: re-save just those with "
                              "torch.save({'model': model.state_dict()}, path)") from exc
    # the weights: `{"model": sd}` (mdistiller/RepDistiller), `{"state_dict": sd}`, or sd
    candidates = [obj.get("model"), obj.get("state_dict"), obj] if isinstance(obj, Mapping) else []
    sd = next((dict(c) for c in candidates if _is_state_dict(c)), None)
    if sd is None:
        top = sorted(map(str, obj.keys()))[:_MAX_LISTED] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{p}: no state_dict found (top-level content: {top}). Expected a file written by "
            f"torch.save({{'model': model.state_dict()}}) as in mdistiller's ckpt_epoch_240.pth, "
            f"{{'state_dict': ...}}, or a bare state_dict.")
    consume_prefix_in_state_dict_if_present(sd, "module.")   # a model saved from inside nn.DataParallel
    # BatchNorm `num_batches_tracked` counters missing from old (PyTorch < 0.4.1) checkpoints are filled with 0,
    # exactly what PyTorch itself does for such files; they never affect eval
    expected = model.state_dict()
    sd.update({k: torch.zeros((), dtype=torch.long) for k in expected
               if k.endswith("num_batches_tracked") and k not in sd})
    problems = {"missing": [k for k in expected if k not in sd], "unexpected": [k for k in sd if k not in expected],
                "mis-shaped": [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                               for k, v in expected.items() if k in sd and sd[k].shape != v.shape]}
    lines = [f"  {what} keys ({len(keys)}): {', '.join(keys[:_MAX_LISTED])}"
             + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
             for what, keys in problems.items() if keys]
    if lines:   # ONE error listing every problem
        raise CheckpointError("\n".join([
            f"checkpoint {p} does not fit model {name!r} with num_classes={num_classes}:", *lines,
            "  Hint: the architecture name or num_classes is probably wrong for this file (e.g. a resnet32x4 "
            "checkpoint needs name 'resnet32x4' and num_classes=100 for CIFAR-100)."]))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied; keys and shapes were checked above
        raise CheckpointError(f"{p}: loading into {name!r} failed: {exc}") from exc
    model.to(map_location)
    model.eval()
    model.requires_grad_(False)
    digest = sha256_file(p)
    logger.info("loaded teacher %s (num_classes=%d) from %s sha256=%s", name, num_classes, p, digest)
    return model, digest


def save_model_checkpoint(model: nn.Module, path: str | os.PathLike, /, **extra: Any) -> None:
    """Atomically write `{"model": state_dict, **extra}`, the layout load_teacher and mdistiller read."""
    if "model" in extra:
        raise ValueError("save_model_checkpoint: 'model' is reserved for the state_dict; rename the extra field")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, **extra}, path)
