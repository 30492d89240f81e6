"""The model zoo (CIFAR and ImageNet families): registry, `create_model`, strict teacher loading and saving."""
from __future__ import annotations

import torch.nn as nn

from richkd.models import (imagenet, mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2,  # noqa: F401
                           vgg, wrn)  # (imported to register their architectures)
from richkd.models.base import ModelOutput
from richkd.models.checkpoint import CheckpointError, load_teacher, save_model_checkpoint
from richkd.models.registry import MODELS, family_of

__all__ = ["MODELS", "ModelOutput", "CheckpointError", "create_model", "family_of", "load_teacher",
           "save_model_checkpoint"]


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a registered architecture with a `num_classes`-way head.

    The returned module maps (B, 3, H, W) to `ModelOutput(logits (B, num_classes), feat (B, model.feat_dim))`.
    Raises ValueError naming the known architectures for an unknown `name`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        factory = MODELS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return factory(num_classes)
