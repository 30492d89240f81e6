"""Hinton knowledge-distillation loss on (fused) teacher logits, and logit standardisation
(docs/method.md#logit-fusion, docs/method.md#other-distillation-losses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "standardize_logits", "STAND_EPS"]

STAND_EPS = 1e-7  # added to the standard deviation, as in the official code's normalize()


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row: ``(z - mean(z)) / (1e-7 + std(z))`` with the unbiased (n - 1) std, in float32.

    Logit standardisation (Sun et al., CVPR 2024; the official code's ``EXPERIMENT.LOGIT_STAND``): student and
    teacher logits are compared by their shape, not their scale, so the student need not match the teacher's
    logit range. The official code uses torch's default (unbiased) std; so does this.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (STAND_EPS + z.std(dim=1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            logit_stand: bool = False) -> torch.Tensor:
    """``T^2 * mean_i KL(softmax(z_T/T) || softmax(z_S/T))``, a float32 scalar.

    Args:
        student_logits: (B, C) student logits z_S (gradients flow through them).
        teacher_logits: (B, C) teacher logits z_T, e.g. the fused ``z_F`` (treated as a constant target by
            the caller; this function does not detach).
        temperature: T > 0, the same on both sides as in the official code.
        logit_stand: z-score both sides first (`standardize_logits`), as the official code does when
            ``EXPERIMENT.LOGIT_STAND`` is on (off in its RichKD configs).

    The official code computes ``kl_div(log_softmax(z_S/T), softmax(z_T/T)).sum(1).mean() * T**2``; here the
    target is passed in log space (``log_target=True``), which is the same value but stays finite when a
    teacher probability underflows to 0. Everything runs in float32 whatever the input dtype (fp16 caches).
    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same (batch, num_classes) shape")
    t = float(temperature)
    z_s, z_t = student_logits.float(), teacher_logits.float()
    if logit_stand:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    log_p_s = F.log_softmax(z_s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (t * t)
