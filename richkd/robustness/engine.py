"""Evaluation loops: clean, on-the-fly corrupted and corruption-folder accuracy/ECE of a classifier, and the
flat numbers a sweep trial reports as extra objectives (`val_robustness_metrics`)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from richkd.data import normalize, to_float_images
from richkd.data.splits import derive_seed, stratified_take
from richkd.metric_names import PER_CORRUPTION_PREFIX, VAL_CORRUPT_ECE, VAL_CORRUPT_TOP1
from richkd.metrics import ClassificationMeter
from richkd.robustness.corruptions import SEVERITIES, corrupt

SHORT = ("top1", "top5", "loss", "ece", "n")   # the metrics kept per corruption and severity


@dataclass
class EvalResult:
    """clean: ClassificationMeter metrics on the clean images; calibration: their reliability bins; corrupted:
    corruption -> severity -> SHORT metrics."""
    clean: dict
    calibration: dict
    corrupted: dict = field(default_factory=dict)


def select_positions(n: int, targets: torch.Tensor, max_samples: Optional[int], seed: int) -> torch.Tensor:
    """Positions 0..n-1, or a seeded class-stratified subset of max_samples of them (sorted)."""
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    taken, _ = stratified_take(torch.as_tensor(targets), int(max_samples), derive_seed(seed, "robustness-cap"))
    return taken


def _logits(model, images: torch.Tensor, mean, std) -> torch.Tensor:
    out = model(normalize(images, mean, std))
    return getattr(out, "logits", out).float()


@contextmanager
def _eval_mode(model):
    """The model in eval mode for the duration, then back in its previous mode (a trial may be training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _short(meter: ClassificationMeter) -> dict:
    m = meter.compute()
    return {k: m[k] for k in SHORT}


@torch.no_grad()
def evaluate_model(model, dataset, mean: Sequence[float], std: Sequence[float], device: torch.device | str, *,
                   corruptions: Sequence[str] = (), severities: Sequence[int] = SEVERITIES, seed: int = 0,
                   max_samples: Optional[int] = None, batch_size: int = 256,
                   confidence_threshold: Optional[float] = None, target_map: Optional[torch.Tensor] = None,
                   n_bins: int = 15) -> EvalResult:
    """Clean metrics and, per corruption and severity, metrics on on-the-fly corrupted copies of a dataset split
    (without augmentation). mean/std: the TRAINING dataset's normalisation, also for shifted data; target_map:
    (C_dataset,) int64 dataset label -> model class id (shift sets). Corruptions are keyed by the dataset row
    index (corruptions.corrupt), so results do not depend on batch_size or on max_samples' other rows."""
    device = torch.device(device)
    dataset = dataset.without_augmentation()
    positions = select_positions(len(dataset), dataset.targets, max_samples, seed)
    clean = ClassificationMeter(n_bins=n_bins, confidence_threshold=confidence_threshold)
    meters = {c: {s: ClassificationMeter(n_bins=n_bins) for s in severities} for c in corruptions}
    target_map = None if target_map is None else torch.as_tensor(target_map, dtype=torch.int64)   # once
    with _eval_mode(model):
        for chunk in positions.split(batch_size):
            images, targets, index = dataset.get_batch(chunk)
            if target_map is not None:
                targets = target_map[targets]
            images, targets = images.to(device), targets.to(device)
            clean.update(_logits(model, images, mean, std), targets)
            for c in corruptions:
                for s in severities:
                    meters[c][s].update(_logits(model, corrupt(images, c, s, seed=seed, index=index), mean, std),
                                        targets)
    return EvalResult(clean=clean.compute(), calibration=clean.bins(),
                      corrupted={c: {s: _short(meters[c][s]) for s in severities} for c in corruptions})


@torch.no_grad()
def evaluate_folder(model, folder, mean: Sequence[float], std: Sequence[float], device: torch.device | str, *,
                    image_size: int, corruptions: Sequence[str], severities: Sequence[int] = SEVERITIES,
                    seed: int = 0, max_samples: Optional[int] = None, batch_size: int = 256,
                    num_classes: Optional[int] = None, n_bins: int = 15) -> dict:
    """corruption -> severity -> SHORT metrics on a released corruption folder (`cifar_c.CorruptionFolder`).

    Images are converted like the dataset's own (uint8 -> [0, 1], resized to image_size, normalised with the
    training statistics). The same max_samples subset of the N test images is used at every severity.
    """
    device = torch.device(device)
    if num_classes is not None and len(folder.labels) and int(folder.labels.max()) >= num_classes:
        raise ValueError(f"{folder.root}: labels go up to {int(folder.labels.max())} but the model has "
                         f"{num_classes} classes; use the corruption folder of the dataset the model was trained on")
    positions = select_positions(folder.n, folder.labels, max_samples, seed)
    out: dict = {}
    with _eval_mode(model):
        for c in corruptions:
            out[c] = {}
            for s in severities:
                meter = ClassificationMeter(n_bins=n_bins)
                for chunk in positions.split(batch_size):
                    images = to_float_images(folder.images(c, s, chunk), image_size).to(device)
                    meter.update(_logits(model, images, mean, std), folder.labels[chunk].to(device))
                out[c][s] = _short(meter)
    return out


def corruption_metrics(corrupted: dict) -> dict:
    """corruption -> severity -> metrics as flat floats: `corruption_top1` and `corruption_ece` (means over every
    corruption x severity), `corruption_top1/<name>` (mean over severities), `corruption_top1/<name>/<severity>`."""
    cells = [m for by_sev in corrupted.values() for m in by_sev.values()]
    out = {f"corruption_top1/{c}/{s}": float(m["top1"]) for c, by_sev in corrupted.items() for s, m in by_sev.items()}
    out.update({f"corruption_top1/{c}": sum(m["top1"] for m in by_sev.values()) / len(by_sev)
                for c, by_sev in corrupted.items()})
    out["corruption_top1"] = sum(m["top1"] for m in cells) / len(cells)
    out["corruption_ece"] = sum(m["ece"] for m in cells) / len(cells)
    return out


def val_robustness_metrics(model, dataset, mean, std, device, rcfg, batch_size: int = 256) -> dict:
    """The sweep objectives val_corrupt_top1, val_corrupt_ece and val_corrupt_top1_<name> (richkd.metric_names) for
    a RobustnessEvalConfig `rcfg`. `dataset` is the validation split: these metrics select models. The images,
    subset and noise are the ones `richkd evaluate` uses for the same seed, so the value is the same at every epoch
    and in every trial for the same weights."""
    res = evaluate_model(model, dataset, mean, std, device, corruptions=rcfg.corruptions, severities=rcfg.severities,
                         seed=rcfg.seed, max_samples=rcfg.max_samples, batch_size=batch_size)
    out = corruption_metrics(res.corrupted)
    return {VAL_CORRUPT_TOP1: out["corruption_top1"], VAL_CORRUPT_ECE: out["corruption_ece"],
            **{PER_CORRUPTION_PREFIX + name: out[f"corruption_top1/{name}"] for name in rcfg.corruptions}}
