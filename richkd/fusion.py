"""Pure RichKD teacher fusion: conventional-teacher logits/embeddings mixed with CLIP's.

See docs/method.md#logit-fusion and docs/method.md#feature-fusion-and-crd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fuse_logits", "fuse_features"]


def fuse_logits(teacher_logits: torch.Tensor, clip_cosine: torch.Tensor, alpha: float,
                clip_logit_scale: float) -> torch.Tensor:
    """Fused teacher logits ``z_F = alpha * z_T + (1 - alpha) * s * cos_C``, shape (B, C), float32.

    Args:
        teacher_logits: (B, C) conventional-teacher logits z_T (any float dtype).
        clip_cosine: (B, C) cosine similarity between the L2-normalised CLIP image embedding and the
            L2-normalised prompt-averaged class embeddings, in [-1, 1] (any float dtype).
        alpha: weight of the conventional teacher, in [0, 1].
        clip_logit_scale: ``s``. The official code uses ``s = 1`` (raw cosine; it never applies CLIP's
            learned ``logit_scale`` of about 100, docs/method.md#logit-fusion). Consequence: with alpha=0.7 and T=3,
            ``z_F/T = z_T/4.29 + 0.1*cos``, so CLIP moves any tempered logit by at most 0.1 and the main
            effect is a teacher softened to T~4.29. ``s ~ 100`` is CLIP's own convention.

    The result is always float32, even when both inputs are fp16 (cached teacher/CLIP outputs are fp16,
    as in the official cache): mixing in fp16 would round the logits before the softmax.
    With ``alpha == 1`` the result equals ``teacher_logits`` exactly (the CLIP term is an exact zero).
    """
    if teacher_logits.shape != clip_cosine.shape:
        raise ValueError(
            f"fuse_logits: teacher logits have shape {tuple(teacher_logits.shape)} but CLIP cosines have "
            f"{tuple(clip_cosine.shape)}; both must be (batch, num_classes) for the same classes "
            "(check that the CLIP text classifier was built from this dataset's class names)")
    z_t = teacher_logits.float()
    cos = clip_cosine.float()
    return alpha * z_t + ((1.0 - alpha) * clip_logit_scale) * cos


def fuse_features(e_teacher: torch.Tensor, e_clip: torch.Tensor, lam: float) -> torch.Tensor:
    """Fused teacher embedding ``normalize(lam * e_T + (1 - lam) * e_C)``, shape (B, d), unit rows.

    Args:
        e_teacher: (B, d) projected conventional-teacher embedding (output of its embedding head).
        e_clip: (B, d) projected CLIP image embedding (output of the CLIP embedding head).
        lam: teacher weight. The official code ties it to the logit-fusion alpha; the paper has a separate
            lambda (docs/method.md#feature-fusion-and-crd). Fusion happens after projection to the common CRD dimension.
    """
    if e_teacher.shape != e_clip.shape:
        raise ValueError(
            f"fuse_features: teacher embedding {tuple(e_teacher.shape)} and CLIP embedding "
            f"{tuple(e_clip.shape)} must have the same shape (project both to loss.feat_dim first)")
    return F.normalize(lam * e_teacher + (1.0 - lam) * e_clip, dim=1)
