"""Cheap checks of everything a config points at, run before any expensive work (training, Ray, caches)."""
from __future__ import annotations

from pathlib import Path

import torch

from richkd.clip import ClipLoadError, load_prompt_set
from richkd.clip.loading import check_weights
from richkd.config import Config, ConfigError
from richkd.data import build_data
from richkd.losses.crd import check_negatives
from richkd.models import MODELS, pretrained_source


def check_resources(cfg: Config) -> None:
    """Raise ConfigError naming the key and the fix for unknown models/prompt sets and missing files.

    Datasets are checked by building them (richkd.data raises DatasetNotFoundError), which is cheap.
    """
    for key, arch in (("student.arch", cfg.student.arch), ("teacher.arch", cfg.teacher.arch)):
        if arch is not None and arch not in MODELS:
            try:
                MODELS.get(arch)
            except KeyError as exc:
                raise ConfigError(f"{key}: {exc.args[0]} (see `richkd models`)") from None
    if cfg.loss.uses_teacher:
        if cfg.teacher.arch is None:
            raise ConfigError(f"teacher.arch: loss.method={cfg.loss.method} needs a teacher; set teacher.arch "
                              "and teacher.checkpoint")
        ckpt = Path(cfg.teacher.checkpoint or "").expanduser()
        if not ckpt.is_file():
            raise ConfigError(f"teacher.checkpoint: file {str(ckpt)!r} does not exist; "
                              f"{pretrained_source(cfg.teacher.arch)}, or train a teacher with "
                              "loss.method=supervised")
    if cfg.uses_clip:
        try:
            load_prompt_set(cfg.clip.prompt_set)
        except ValueError as exc:
            raise ConfigError(f"clip.prompt_set: {exc}") from None
        try:   # an unknown architecture or tag, a missing file or folder, weights neither cached nor downloadable
            check_weights(cfg.clip.model, cfg.clip.pretrained)
        except ClipLoadError as exc:
            raise ConfigError(str(exc)) from None


def check_data_fit(cfg: Config) -> None:
    """Rules between the config and the size of its data, checked before caches are built or Ray starts: CRD's
    loss.nce_k negatives per row must exist in the training rows (a small data.max_train_samples may not hold
    them). Builds the dataset (memoised in richkd.data, so the run itself does not load it again)."""
    if cfg.loss.uses_crd:
        data = build_data(cfg.data)
        check_negatives(data.train_targets[torch.as_tensor(data.train.indices)], cfg.loss.nce_k)
