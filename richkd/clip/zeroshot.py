"""Zero-shot top-1 accuracy of a CLIP teacher against a (C, D) text classifier, over batches or tensors."""
from __future__ import annotations

from typing import Any, Iterable

import torch


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(batch, "image") and hasattr(batch, "target"):  # richkd.data.batch.Batch (.to: float images)
        batch = batch.to(batch.image.device)
        return batch.image, batch.target
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:  # (image, target, index, ...)
        return batch[0], batch[1]
    raise TypeError(f"zero_shot_accuracy: a batch must be a Batch or an (image, target, ...) tuple, "
                    f"got {type(batch).__name__}")


def zero_shot_accuracy(teacher: Any, loader_or_images: Iterable[Any] | tuple[torch.Tensor, torch.Tensor],
                       class_embeddings: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of argmax(image_features @ class_embeddings.T).

    `loader_or_images`: an iterable of batches (Batch objects or (image, target, ...) tuples with images in [0, 1],
    un-normalised, as the data loaders yield them), or one `(images, targets)` pair of tensors. The logit scale does
    not change an argmax, so raw cosines are used.
    """
    if (isinstance(loader_or_images, tuple) and len(loader_or_images) == 2
            and all(isinstance(t, torch.Tensor) for t in loader_or_images)):
        batches: Iterable[Any] = [loader_or_images]
    else:
        batches = loader_or_images
    correct, total = 0, 0
    for batch in batches:
        images, targets = _split_batch(batch)
        feats = teacher.encode_images(images)
        pred = (feats @ class_embeddings.to(feats.device, torch.float32).t()).argmax(dim=1)
        correct += int((pred.cpu() == targets.reshape(-1).cpu()).sum())
        total += int(targets.numel())
    if total == 0:
        raise ValueError("zero_shot_accuracy: no samples (empty loader)")
    return correct / total
