"""CIFAR Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) with mdistiller/RepDistiller parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, init_weights, pooled_output


class WideBasicBlock(nn.Module):
    """Pre-activation block (Zagoruyko & Komodakis 2016) as coded in RepDistiller `models/wrn.py`.

    When the width changes, the pre-activated input relu(bn1(x)) also feeds the 1x1 `convShortcut`;
    otherwise the shortcut is the raw input. Names: `bn1, conv1, bn2, conv2[, convShortcut]`.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.convShortcut: nn.Conv2d | None = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of `n` blocks; exists only so that keys read `blockK.layer.I.*` like the checkpoints."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv1 -> block1..3 (widths 16k, 32k, 64k) -> relu(bn1) -> global pool -> `fc`.

    Input (B, 3, H, W); feat (B, 64k). Official code pools with avg_pool2d(8) (global for 32x32).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int) -> None:
        super().__init__()
        n = (depth - 4) // 6    # depth 6n + 4
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1, self.block2, self.block3 = (NetworkBlock(n, widths[k - 1], widths[k], 1 if k == 1 else 2)
                                                 for k in (1, 2, 3))
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feat_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return pooled_output(self.fc, F.relu(self.bn1(out)))


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"wrn_{_depth}_{_k}")(functools.partial(WideResNet, _depth, _k))
