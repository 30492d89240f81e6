"""Evaluation loops: clean, on-the-fly corrupted and corruption-folder accuracy/ECE of a classifier.

Also `robustness_metrics`, the pure function a sweep trial can call as an extra objective
(e.g. report `val_corruption_top1` next to `val_top1`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from richkd.data import normalize, to_float_images
from richkd.data.splits import derive_seed, stratified_take
from richkd.metrics import ClassificationMeter
from richkd.robustness.corruptions import CORRUPTION_NAMES, SEVERITIES, corrupt, parse_corruptions, parse_severities

log = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate_folder", "evaluate_model", "robustness_metrics", "select_positions"]


@dataclass
class EvalResult:
    """Outcome of one evaluation pass.

    clean: ClassificationMeter metrics on the clean images (top1/top5 in %, loss, ece, n, and the four
        confidence-category shares `*_pct` when a threshold was given).
    confidence / correct: (n,) max-softmax probability and correctness per clean image (reliability plot).
    corrupted: corruption -> severity -> {"top1", "top5", "loss", "ece", "n"}.
    positions: the dataset positions evaluated (after max_samples).
    """
    clean: dict
    confidence: torch.Tensor
    correct: torch.Tensor
    corrupted: dict = field(default_factory=dict)
    positions: Optional[torch.Tensor] = None

    def corruption_top1(self) -> Optional[float]:
        vals = [m["top1"] for by_sev in self.corrupted.values() for m in by_sev.values()]
        return sum(vals) / len(vals) if vals else None


def select_positions(n: int, targets: Optional[torch.Tensor], max_samples: Optional[int], seed: int) -> torch.Tensor:
    """Positions 0..n-1, or a seeded class-stratified subset of max_samples of them (sorted)."""
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if targets is None:
        gen = torch.Generator().manual_seed(derive_seed(seed, "robustness-cap"))
        return torch.sort(torch.randperm(n, generator=gen)[:max_samples]).values
    taken, _ = stratified_take(torch.as_tensor(targets), int(max_samples), derive_seed(seed, "robustness-cap"))
    return taken


def _dataset_targets(dataset) -> Optional[torch.Tensor]:
    t = getattr(dataset, "targets", None)
    return torch.as_tensor(t, dtype=torch.int64) if t is not None else None


def _batches(dataset, positions: torch.Tensor, batch_size: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images float (B,3,S,S) in [0,1], targets (B,), row index (B,)) for consecutive chunks of positions."""
    if getattr(dataset, "augment", False) and hasattr(dataset, "without_augmentation"):
        dataset = dataset.without_augmentation()
    for chunk in positions.split(batch_size):
        if hasattr(dataset, "get_batch"):
            images, targets, index = dataset.get_batch(chunk)
        else:  # any map-style dataset of (image, target, index) items
            items = [dataset[int(p)] for p in chunk]
            images = torch.stack([it[0] for it in items])
            targets = torch.as_tensor([int(it[1]) for it in items])
            index = torch.as_tensor([int(it[2]) for it in items])
        yield images, targets.to(torch.int64), index.to(torch.int64)


def _logits(model, images: torch.Tensor, mean, std) -> torch.Tensor:
    out = model(normalize(images, mean, std))
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


class _Eval:
    """Puts a model in eval mode for the duration and restores its previous mode (a trial may be training)."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def evaluate_model(model, dataset, mean: Sequence[float], std: Sequence[float], device: torch.device | str, *,
                   corruptions: Sequence[str] = (), severities: Sequence[int] = SEVERITIES, seed: int = 0,
                   max_samples: Optional[int] = None, batch_size: int = 256,
                   confidence_threshold: Optional[float] = None, target_map: Optional[torch.Tensor] = None,
                   n_bins: int = 15) -> EvalResult:
    """Clean metrics and, per corruption and severity, metrics on on-the-fly corrupted copies of dataset items.

    dataset: items (image (3,S,S) float in [0,1], target, index), preferably with `get_batch` (SplitDataset).
    mean/std: the normalisation the model was trained with (the TRAINING dataset's, also for shifted data).
    target_map: optional (C_dataset,) int64 mapping dataset labels to the model's class ids (shift sets).
    Each batch is loaded once; corruptions are applied to it on `device` and keyed by the dataset row index
    (see corruptions.corrupt), so results do not depend on batch_size or on max_samples' other rows.
    """
    device = torch.device(device)
    corruptions = parse_corruptions(list(corruptions)) if corruptions else ()
    severities = parse_severities(list(severities)) if corruptions else ()
    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate_model: the dataset is empty (is the validation split empty? "
                         "set data.val_fraction > 0)")
    positions = select_positions(n, _dataset_targets(dataset), max_samples, seed)
    clean = ClassificationMeter(n_bins=n_bins, confidence_threshold=confidence_threshold)
    meters = {c: {s: ClassificationMeter(n_bins=n_bins) for s in severities} for c in corruptions}
    confidence, correct = [], []
    if target_map is not None:
        target_map = torch.as_tensor(target_map, dtype=torch.int64)
    with _Eval(model):
        for images, targets, index in _batches(dataset, positions, batch_size):
            if target_map is not None:
                targets = target_map[targets]
            images, targets = images.to(device), targets.to(device)
            logits = _logits(model, images, mean, std)
            clean.update(logits, targets)
            conf, pred = logits.softmax(dim=1).max(dim=1)
            confidence.append(conf.cpu())
            correct.append(pred.eq(targets).cpu())
            for c in corruptions:
                for s in severities:
                    meters[c][s].update(_logits(model, corrupt(images, c, s, seed=seed, index=index), mean, std),
                                        targets)
    corrupted = {c: {s: _short(meters[c][s].compute()) for s in severities} for c in corruptions}
    return EvalResult(clean=clean.compute(), confidence=torch.cat(confidence), correct=torch.cat(correct),
                      corrupted=corrupted, positions=positions)


def _short(m: dict) -> dict:
    return {k: m[k] for k in ("top1", "top5", "loss", "ece", "n")}


@torch.no_grad()
def evaluate_folder(model, folder, mean: Sequence[float], std: Sequence[float], device: torch.device | str, *,
                    image_size: int, corruptions: Sequence[str], severities: Sequence[int] = SEVERITIES,
                    seed: int = 0, max_samples: Optional[int] = None, batch_size: int = 256,
                    num_classes: Optional[int] = None, n_bins: int = 15) -> dict:
    """corruption -> severity -> metrics on a released corruption folder (`cifar_c.CorruptionFolder`).

    Images are converted like the dataset's own (uint8 -> [0, 1], resized to image_size, normalised with the
    training statistics). The same max_samples subset of the N test images is used at every severity.
    """
    device = torch.device(device)
    if num_classes is not None and len(folder.labels) and int(folder.labels.max()) >= num_classes:
        raise ValueError(f"{folder.root}: labels go up to {int(folder.labels.max())} but the model has "
                         f"{num_classes} classes; use the corruption folder of the dataset the model was trained on")
    positions = select_positions(folder.n, folder.labels, max_samples, seed)
    out: dict = {}
    with _Eval(model):
        for c in corruptions:
            out[c] = {}
            for s in severities:
                meter = ClassificationMeter(n_bins=n_bins)
                for chunk in positions.split(batch_size):
                    images = to_float_images(folder.images(c, s, chunk), image_size).to(device)
                    meter.update(_logits(model, images, mean, std), folder.labels[chunk].to(device))
                out[c][s] = _short(meter.compute())
    return out


def robustness_metrics(model, dataset, mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                       corruptions: Sequence[str] | str | None = CORRUPTION_NAMES,
                       severities: Sequence[int] | str | None = SEVERITIES, seed: int = 0,
                       max_samples: Optional[int] = None, batch_size: int = 256) -> dict:
    """Flat robustness metrics of a model on a dataset split, for use as a (secondary) sweep objective.

    Returns floats: `top1`, `top5`, `loss`, `ece` (clean), `corruption_top1` (mean top-1 % over every
    corruption x severity), `corruption_ece` (mean ECE over the same), `corruption_top1/<name>` (mean over
    severities) and `corruption_top1/<name>/<severity>`, plus `n`. Prefix the keys yourself when reporting
    (e.g. `val_corruption_top1`). The model's train/eval mode is restored afterwards. Deterministic for a seed.
    """
    names = parse_corruptions(corruptions)
    sevs = parse_severities(severities)
    res = evaluate_model(model, dataset, mean, std, device, corruptions=names, severities=sevs, seed=seed,
                         max_samples=max_samples, batch_size=batch_size)
    out = {k: float(res.clean[k]) for k in ("top1", "top5", "loss", "ece", "n")}
    eces = []
    for c, by_sev in res.corrupted.items():
        for s, m in by_sev.items():
            out[f"corruption_top1/{c}/{s}"] = float(m["top1"])
            eces.append(m["ece"])
        out[f"corruption_top1/{c}"] = sum(m["top1"] for m in by_sev.values()) / len(by_sev)
    out["corruption_top1"] = float(res.corruption_top1())
    out["corruption_ece"] = float(sum(eces) / len(eces))
    return out
