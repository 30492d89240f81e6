"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) with mdistiller/RepDistiller parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, conv_bn, init_weights, pooled_output


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)).

    Submodule names `conv1, bn1, conv2, bn2, downsample.{0,1}` are those of the public checkpoints.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """3-stage CIFAR ResNet (He et al. 2016, the 6n+2 family) as in RepDistiller `models/resnet.py`.

    Input (B, 3, H, W) -> stages at H, H/2, H/4 -> global average pool -> `fc`.
    The official code pools with AvgPool2d(8), i.e. a global pool for 32x32 inputs; a global pool is used
    here so that other square sizes work too (identical for 32x32).
    """

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        n = (depth - 2) // 6    # depth 6n + 2
        self._inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1, self.layer2, self.layer3 = (self._make_layer(f, n, s) for f, s in zip(num_filters[1:], (1, 2, 2)))
        self.feat_dim = num_filters[3]
        self.fc = nn.Linear(self.feat_dim, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None   # or a 1x1 projection: checkpoint keys `layerK.0.downsample.0.weight` / `.1.*`
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(*conv_bn(self._inplanes, planes, 1, stride, relu=False))
        layers = [BasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = F.relu(self.bn1(self.conv1(x)))
        return pooled_output(self.fc, self.layer3(self.layer2(self.layer1(out))))


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" variants


for _depth in (8, 14, 20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}")(functools.partial(CifarResNet, _depth, _THIN))
MODELS.register("resnet8x4")(functools.partial(CifarResNet, 8, _WIDE))
MODELS.register("resnet32x4")(functools.partial(CifarResNet, 32, _WIDE))
