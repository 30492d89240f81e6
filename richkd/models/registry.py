"""The model registry: architecture name (mdistiller spelling) -> factory `f(num_classes) -> nn.Module`."""
from __future__ import annotations

from richkd.registry import Registry

# Names follow mdistiller's `cifar_model_dict` (mdistiller/models/cifar/__init__.py), so a teacher folder
# such as `resnet32x4_vanilla/ckpt_epoch_240.pth` pairs with the registered name `resnet32x4`.
MODELS = Registry("model")

# Family and input size each definition is made for. CIFAR-family models (the default) are built for 32-px
# inputs; ImageNet-family ones (richkd/models/imagenet.py) for 224 px and register themselves here.
CIFAR_FAMILY = ("cifar", 32)
FAMILIES: dict[str, tuple[str, int]] = {}


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
