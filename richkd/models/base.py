"""What every zoo model shares: the output contract, the registry (architecture name -> factory
`f(num_classes) -> nn.Module`), `create_model`, and each architecture's family and input size."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.registry import Registry


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes)
    feat: torch.Tensor    # (B, feat_dim): pooled penultimate feature, input of the final linear layer


# Names follow mdistiller's `cifar_model_dict` (mdistiller/models/cifar/__init__.py), so a teacher folder
# such as `resnet32x4_vanilla/ckpt_epoch_240.pth` pairs with the registered name `resnet32x4`.
MODELS = Registry("model")

# Family and input size each definition is made for. CIFAR-family models (the default) are built for 32-px
# inputs; ImageNet-family ones (richkd/models/imagenet.py) for 224 px and register themselves here.
CIFAR_FAMILY = ("cifar", 32)
FAMILIES: dict[str, tuple[str, int]] = {}


def create_model(name: str, num_classes: int) -> nn.Module:
    """A registered architecture with a `num_classes`-way head, mapping (B, 3, H, W) to
    `ModelOutput(logits (B, num_classes), feat (B, model.feat_dim))`. An unknown name is a ValueError listing them."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        factory = MODELS.get(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return factory(num_classes)


def family_of(name: str) -> tuple[str, int]:
    """(family, input size in px) of a registered architecture, e.g. ("imagenet", 224) for resnet18."""
    return FAMILIES.get(name, CIFAR_FAMILY)


def pretrained_source(name: str) -> str:
    """Where pretrained weights of a teacher architecture come from (for "checkpoint not found" messages)."""
    if family_of(name)[0] == "cifar":
        return f"download mdistiller's cifar_teachers.tar ({name}_vanilla/ckpt_epoch_240.pth)"
    if name == "MobileNetV1":   # mdistiller's definition: no published weights for it
        return f"train a {name} teacher first"
    return (f"save torchvision's ImageNet weights of {name} (torch.save(torchvision.models.get_model_weights("
            f"'{name}').DEFAULT.get_state_dict(), PATH): they load as they are)")


def conv_bn(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    """Conv (no bias, padding kernel // 2) + BN (+ ReLU), to splice into an nn.Sequential: its indices are the
    checkpoints' keys (`.0` conv, `.1` BN, the ReLU holds no weights but takes index 2)."""
    return [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup),
            *([nn.ReLU(inplace=True)] if relu else [])]


def pooled_output(head: nn.Module, maps: torch.Tensor) -> ModelOutput:
    """Global average pool of the last feature maps, then the classifier: feat is exactly the head's input."""
    feat = torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)
    return ModelOutput(head(feat), feat)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """The CIFAR zoo's initialisation: He-normal convolutions (fan_out), zero conv biases, and, with
    `linear_std`, N(0, linear_std^2) linear weights with zero biases (BatchNorm keeps torch's 1 and 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
