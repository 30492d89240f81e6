"""MobileNetV2 for CIFAR, the half-width `mobile_half` (T=6, width 0.5) of RepDistiller/mdistiller, as "MobileNetV2"."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from richkd.models.base import MODELS, ModelOutput, conv_bn, init_weights, pooled_output


class InvertedResidual(nn.Module):
    """pw expand -> dw 3x3 -> pw-linear, residual when stride 1 and widths match.

    Unlike torchvision, the 1x1 expansion conv exists even for expand ratio 1 (official code), so the
    `conv` Sequential always holds indices 0..7 (convs at 0, 3, 6; BNs at 1, 4, 7).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(*conv_bn(inp, hidden, 1), *conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *conv_bn(hidden, oup, 1, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """conv1 (stride 2) -> 7 stages `blocks[i]` -> conv2 (1x1 to 1280) -> global pool -> `classifier.0`.

    Overall stride 16: a 32x32 image ends at 2x2 (official code: AvgPool2d(2, ceil_mode=True), i.e.
    global). Input (B, 3, H, W); feat (B, 1280) (the last width stays 1280 for width_mult <= 1).
    """

    def __init__(self, expand: int, width_mult: float, num_classes: int) -> None:
        super().__init__()
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),   # expand ratio t,
                   (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]   # channels c, repeats n, stride s
        in_ch = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn(3, in_ch, 3, 2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            out_ch = int(c * width_mult)
            self.blocks.append(nn.Sequential(
                *[InvertedResidual(in_ch if i == 0 else out_ch, out_ch, s if i == 0 else 1, t) for i in range(n)]))
            in_ch = out_ch
        self.feat_dim = 1280   # for width_mult <= 1, as mdistiller's mobile_half
        self.conv2 = nn.Sequential(*conv_bn(in_ch, self.feat_dim, 1))
        self.classifier = nn.Sequential(nn.Linear(self.feat_dim, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        return pooled_output(self.classifier, self.conv2(out))


MODELS.register("MobileNetV2")(functools.partial(MobileNetV2, 6, 0.5))   # mdistiller's `mobile_half`
