"""ShuffleNet V2 1x for CIFAR ("ShuffleV2": widths 116/232/464, 1024 head) with mdistiller parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, pooled_output


class BasicUnit(nn.Module):
    """Stride-1 unit: split channels in half; right half -> 1x1 -> dw 3x3 (no ReLU) -> 1x1; concat; shuffle(2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return F.channel_shuffle(torch.cat([x1, out], 1), 2)


class DownUnit(nn.Module):
    """Stride-2 unit: left dw 3x3 -> 1x1 (`conv1, conv2`), right 1x1 -> dw 3x3 -> 1x1 (`conv3..5`); concat; shuffle(2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return F.channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """conv1 (1x1, 24) -> layer1..3 ([DownUnit, BasicUnit x n]) -> conv2 (1x1) -> global pool -> `linear`.

    A 32x32 image ends at 4x4 (official: avg_pool2d(4), i.e. global). Input (B, 3, H, W); feat (B, 1024).
    """

    def __init__(self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int],
                 num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1, self.layer2, self.layer3 = (
            nn.Sequential(DownUnit(in_ch, ch), *[BasicUnit(ch) for _ in range(n)])
            for in_ch, ch, n in zip((24, *out_channels[:2]), out_channels[:3], num_blocks))
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.feat_dim = out_channels[3]
        self.linear = nn.Linear(self.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return pooled_output(self.linear, F.relu(self.bn2(self.conv2(out))))


MODELS.register("ShuffleV2")(functools.partial(ShuffleNetV2, (116, 232, 464, 1024), (3, 7, 3)))   # net_size 1
