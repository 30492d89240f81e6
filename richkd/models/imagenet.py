"""ImageNet architectures: torchvision's ResNet18/34/50 and MobileNetV2, and MobileNetV1 as mdistiller defines it.

Why subclasses: a subclass keeps torchvision's parameter names, so a torchvision state_dict (what mdistiller's
ImageNet teachers are) loads with `strict=True`; only `forward` is re-stated, to return the pooled feature too
(docs/method.md#feature-fusion-and-crd). The CIFAR zoo's `ResNet18` / `MobileNetV2` (capitalised) are different,
32-px networks.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from richkd.models.base import FAMILIES, MODELS, ModelOutput, conv_bn, pooled_output

IMAGENET_INPUT_SIZE = 224


@functools.cache
def torchvision_classes() -> dict[str, type]:
    """The torchvision-based classes, defined on first use: importing torchvision's model package costs ~1.4 s,
    which CIFAR-only trial processes should not pay when they import the zoo."""
    from torchvision.models.mobilenetv2 import MobileNetV2 as TVMobileNetV2
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.resnet import ResNet as TVResNet

    class ResNet(TVResNet):
        """torchvision's ResNet; forward returns logits and the global-average-pooled feature (fc's input)."""

        def __init__(self, block: type, layers: list[int], num_classes: int) -> None:
            super().__init__(block, layers, num_classes=num_classes)
            self.feat_dim = 512 * block.expansion

        def forward(self, x: torch.Tensor) -> ModelOutput:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return pooled_output(self.fc, self.layer4(self.layer3(self.layer2(self.layer1(x)))))

    class MobileNetV2(TVMobileNetV2):
        """torchvision's MobileNetV2 (width 1.0); feat is the pooled 1280-d feature, the classifier's input."""

        def __init__(self, num_classes: int) -> None:
            super().__init__(num_classes=num_classes)
            self.feat_dim = self.last_channel

        def forward(self, x: torch.Tensor) -> ModelOutput:
            return pooled_output(self.classifier, self.features(x))

    return {"ResNet": ResNet, "MobileNetV2": MobileNetV2, "BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


def _resnet(block: str, layers: list[int], num_classes: int) -> nn.Module:
    c = torchvision_classes()
    return c["ResNet"](c[block], layers, num_classes)


class MobileNetV1(nn.Module):
    """MobileNet-V1 (Howard et al. 2017) with mdistiller's module layout: `model.0` ... `model.13`, then `fc`.

    mdistiller closes `model` with nn.AvgPool2d(7), which equals a global average over the 7x7 map of a 224-px
    input; an adaptive pool (no parameters, so the same state_dict) gives the same numbers at 224 and also
    accepts other input sizes. mdistiller hard-codes 1000 classes; here the head has `num_classes` outputs.
    """

    _PLAN = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
             (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
             (1024, 1024, 1))

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # mdistiller's conv_bn, then conv_dw: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (keys .0 ... .4)
        self.model = nn.Sequential(nn.Sequential(*conv_bn(3, 32, 3, 2)), *[
            nn.Sequential(*conv_bn(i, i, 3, s, groups=i), *conv_bn(i, o, 1)) for i, o, s in self._PLAN],
            nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)
        self.feat_dim = 1024

    def forward(self, x: torch.Tensor) -> ModelOutput:
        feat = torch.flatten(self.model(x), 1)
        return ModelOutput(self.fc(feat), feat)


for _name, _factory in {"resnet18": functools.partial(_resnet, "BasicBlock", [2, 2, 2, 2]),
                        "resnet34": functools.partial(_resnet, "BasicBlock", [3, 4, 6, 3]),
                        "resnet50": functools.partial(_resnet, "Bottleneck", [3, 4, 6, 3]),
                        "mobilenet_v2": lambda num_classes: torchvision_classes()["MobileNetV2"](num_classes),
                        "MobileNetV1": MobileNetV1}.items():
    MODELS.register(_name)(_factory)
    FAMILIES[_name] = ("imagenet", IMAGENET_INPUT_SIZE)
