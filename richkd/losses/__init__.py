"""Distillation losses: Hinton KD on (fused) logits and CRD on (fused) features; CE is F.cross_entropy."""
from richkd.losses.crd import ContrastMemory, EmbedHead, FusedCRD, nce_loss
from richkd.losses.kd import kd_loss

__all__ = ["kd_loss", "EmbedHead", "ContrastMemory", "FusedCRD", "nce_loss"]
