"""ImageNet-style ResNet18/34/50 adapted to CIFAR (3x3 stem, no max-pool), mdistiller `resnetv2.py` names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, conv_bn, init_weights, pooled_output


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Shortcut: empty Sequential (identity, no weights) or 1x1 conv + BN (`shortcut.0`, `shortcut.1`)."""
    same = stride == 1 and in_planes == out_planes
    return nn.Sequential(*([] if same else conv_bn(in_planes, out_planes, 1, stride, relu=False)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    """conv1(3x3, 64) -> layer1..4 (64, 128, 256, 512 x expansion; strides 1, 2, 2, 2) -> global pool -> `linear`.

    Input (B, 3, H, W); feat (B, 512 * expansion): 512 for ResNet18/34, 2048 for ResNet50.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, int, int, int],
                 num_classes: int) -> None:
        super().__init__()
        self._in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, 64 << k, n, 1 if k == 0 else 2) for k, n in enumerate(num_blocks))
        self.feat_dim = 512 * block.expansion
        self.linear = nn.Linear(self.feat_dim, num_classes)
        init_weights(self)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        first = block(self._in_planes, planes, stride)
        self._in_planes = planes * block.expansion
        return nn.Sequential(first, *[block(self._in_planes, planes) for _ in range(1, n)])

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = F.relu(self.bn1(self.conv1(x)))
        return pooled_output(self.linear, self.layer4(self.layer3(self.layer2(self.layer1(out)))))


MODELS.register("ResNet18")(functools.partial(ResNetV2, BasicBlock, (2, 2, 2, 2)))
MODELS.register("ResNet34")(functools.partial(ResNetV2, BasicBlock, (3, 4, 6, 3)))
MODELS.register("ResNet50")(functools.partial(ResNetV2, Bottleneck, (3, 4, 6, 3)))   # a public mdistiller teacher
