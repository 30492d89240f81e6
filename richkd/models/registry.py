"""The model registry: architecture name (mdistiller spelling) -> factory `f(num_classes) -> nn.Module`."""
from __future__ import annotations

from richkd.registry import Registry

# Names follow mdistiller's `cifar_model_dict` (mdistiller/models/cifar/__init__.py), so a teacher folder
# such as `resnet32x4_vanilla/ckpt_epoch_240.pth` pairs with the registered name `resnet32x4`.
MODELS = Registry("model")
