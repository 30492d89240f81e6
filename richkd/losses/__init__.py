"""Distillation losses: Hinton KD and DKD on (fused) logits, CRD on (fused) features; CE is F.cross_entropy."""
from richkd.losses.crd import ContrastMemory, EmbedHead, FusedCRD, nce_loss
from richkd.losses.dkd import dkd_loss, dkd_warmup
from richkd.losses.kd import kd_loss, standardize_logits

__all__ = ["kd_loss", "dkd_loss", "dkd_warmup", "standardize_logits", "EmbedHead", "ContrastMemory", "FusedCRD",
           "nce_loss"]
