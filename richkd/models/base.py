"""The output contract every zoo model follows: logits plus the pooled penultimate feature."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes)
    feat: torch.Tensor    # (B, feat_dim): pooled penultimate feature, input of the final linear layer
