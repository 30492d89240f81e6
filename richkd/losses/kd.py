"""Hinton knowledge-distillation loss on (fused) teacher logits, and logit standardisation
(docs/method.md#logit-fusion, docs/method.md#other-distillation-losses)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

STAND_EPS = 1e-7  # added to the standard deviation, as in the official code's normalize()


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each row z-scored, ``(z - mean(z)) / (1e-7 + std(z))`` with
    the unbiased std as the official ``normalize``, in float32 (docs/method.md#other-distillation-losses)."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (STAND_EPS + z.std(dim=1, keepdim=True))


def scaled_logits(loss: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  logit_stand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (B, C) logits in float32 (whatever the input dtype: fp16 caches), z-scored with ``logit_stand``,
    divided by T; a ValueError naming `loss` unless they have the same 2-D shape."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"{loss}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same (batch, num_classes) shape")
    z_s, z_t = student_logits.float(), teacher_logits.float()
    if logit_stand:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    return z_s / float(temperature), z_t / float(temperature)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            logit_stand: bool = False) -> torch.Tensor:
    """``T^2 * mean_i KL(softmax(z_T/T) || softmax(z_S/T))``, a float32 scalar, of (B, C) student logits and
    (e.g. fused) teacher logits, which the caller treats as a constant; ``logit_stand`` z-scores both first.
    The official value, with the target in log space (``log_target=True``): it stays finite when a teacher
    probability underflows to 0."""
    z_s, z_t = scaled_logits("kd_loss", student_logits, teacher_logits, temperature, logit_stand)
    return F.kl_div(F.log_softmax(z_s, dim=1), F.log_softmax(z_t, dim=1), log_target=True,
                    reduction="batchmean") * float(temperature) ** 2
