"""ShuffleNet V1 for CIFAR ("ShuffleV1": groups 3, widths 240/480/960) with mdistiller parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, pooled_output


class ShuffleUnit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1 (`conv1..3`, `bn1..3`).

    Stride 2 units concatenate the branch with a 3x3 average-pooled input (so the branch produces
    `out_planes - in_planes` channels); stride 1 units add. The first unit after the 24-channel stem uses
    an ungrouped first conv, as in the official code.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            # AvgPool2d(3, stride=2, padding=1) with count_include_pad=True, as in the official shortcut.
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """conv1 (1x1, 24) -> layer1..3 (each starts with a stride-2 unit) -> global pool -> `linear`.

    A 32x32 image ends at 4x4 (official: avg_pool2d(4), i.e. global). Input (B, 3, H, W); feat (B, 960).
    """

    def __init__(self, out_planes: tuple[int, int, int], num_blocks: tuple[int, int, int], groups: int,
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self._in_planes = 24
        self.layer1, self.layer2, self.layer3 = (self._make_layer(o, n, groups) for o, n in zip(out_planes, num_blocks))
        self.feat_dim = out_planes[2]
        self.linear = nn.Linear(self.feat_dim, num_classes)

    def _make_layer(self, out_planes: int, n: int, groups: int) -> nn.Sequential:
        first = ShuffleUnit(self._in_planes, out_planes - self._in_planes, 2, groups)   # concatenates its input
        self._in_planes = out_planes
        return nn.Sequential(first, *[ShuffleUnit(out_planes, out_planes, 1, groups) for _ in range(1, n)])

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = F.relu(self.bn1(self.conv1(x)))
        return pooled_output(self.linear, self.layer3(self.layer2(self.layer1(out))))


MODELS.register("ShuffleV1")(functools.partial(ShuffleNetV1, (240, 480, 960), (4, 8, 4), 3))
