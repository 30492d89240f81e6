"""CIFAR VGG with batch norm (vgg8/11/13/16/19 = mdistiller's vgg*_bn) with mdistiller parameter names."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from richkd.models.base import MODELS, ModelOutput, init_weights, pooled_output

# Conv widths per stage (block0..block4); RepDistiller/mdistiller configs "S", "A", "B", "D", "E".
_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    """[conv(bias), BN, ReLU] per width, without the final ReLU (applied by the caller).

    The ReLU modules hold no weights but they set the Sequential indices, so the checkpoint keys read
    `blockK.0.weight` (conv), `blockK.1.*` (BN), `blockK.3.weight` (second conv), ...
    """
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """block0 -> pool -> block1 -> pool -> block2 -> pool -> block3 -> [pool] -> block4 -> global pool -> `classifier`.

    As in the official code, the 4th max-pool is applied only for 64x64 inputs (Tiny-ImageNet): a 32x32
    image reaches block4 at 4x4. Input (B, 3, H, W) with H divisible by 8; feat (B, 512).
    """

    def __init__(self, cfg: list[list[int]], num_classes: int) -> None:
        super().__init__()
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _make_block(widths, prev[-1]) for widths, prev in zip(cfg, [[3], *cfg]))
        self.feat_dim = cfg[4][-1]
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        h = x.shape[2]
        out = F.max_pool2d(F.relu(self.block0(x)), 2)
        out = F.max_pool2d(F.relu(self.block1(out)), 2)
        out = F.max_pool2d(F.relu(self.block2(out)), 2)
        out = F.relu(self.block3(out))
        if h == 64:
            out = F.max_pool2d(out, 2)
        return pooled_output(self.classifier, F.relu(self.block4(out)))


for _name, _cfg in _CFGS.items():   # mdistiller's `<name>_bn`
    MODELS.register(_name)(functools.partial(VGG, _cfg))
