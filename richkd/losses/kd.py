"""Hinton knowledge-distillation loss on (fused) teacher logits (docs/method.md#logit-fusion)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_i KL(softmax(z_T/T) || softmax(z_S/T))``, a float32 scalar.

    Args:
        student_logits: (B, C) student logits z_S (gradients flow through them).
        teacher_logits: (B, C) teacher logits z_T, e.g. the fused ``z_F`` (treated as a constant target by
            the caller; this function does not detach).
        temperature: T > 0, the same on both sides as in the official code (no logit standardisation).

    The official code computes ``kl_div(log_softmax(z_S/T), softmax(z_T/T)).sum(1).mean() * T**2``; here the
    target is passed in log space (``log_target=True``), which is the same value but stays finite when a
    teacher probability underflows to 0. Everything runs in float32 whatever the input dtype (fp16 caches).
    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same (batch, num_classes) shape")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)
