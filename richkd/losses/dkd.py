"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022) on (fused) teacher logits.

See docs/method.md#other-distillation-losses: ``alpha * KL(b_T || b_S) + beta * KL(p~_T || p~_S)`` (target vs
non-target classes), in log space here; the official code masks the target logit with -1000 instead, which gives
the same value (a test compares them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from richkd.losses.kd import scaled_logits


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """The official linear ramp of the DKD weight: ``min(epoch / warmup, 1)`` for 1-based epochs."""
    return 1.0 if warmup_epochs <= 0 else min(epoch / float(warmup_epochs), 1.0)


def _binary_log_probs(z: torch.Tensor, gt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 2) log of [p(target), p(not target)] of softmax(z), without computing log(1 - p).
    The target logit is gathered (masked_select's data-dependent size would make a GPU wait for the host)."""
    lse_all = torch.logsumexp(z, dim=1)
    lse_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1)
    z_gt = z.gather(1, target.view(-1, 1)).squeeze(1)
    return torch.stack([z_gt - lse_all, lse_rest - lse_all], dim=1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, alpha: float,
             beta: float, temperature: float, logit_stand: bool = False) -> torch.Tensor:
    """``T^2 * mean_i [alpha * KL(b_T || b_S) + beta * KL(p~_T || p~_S)]``, a float32 scalar: b = [p_target,
    1 - p_target] of softmax(z / T), p~ = the softmax over the non-target classes; the ground-truth ``target``
    (B,) decides the split. Teacher logits are a constant target (not detached here); ``logit_stand`` z-scores
    both sides first."""
    z_s, z_t = scaled_logits("dkd_loss", student_logits, teacher_logits, temperature, logit_stand)
    if z_s.shape[1] < 2:
        raise ValueError("dkd_loss: needs at least 2 classes (it splits target and non-target classes)")
    target = target.long()
    gt = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)   # one-hot, no host check
    batch = z_s.shape[0]
    tckd = F.kl_div(_binary_log_probs(z_s, gt, target), _binary_log_probs(z_t, gt, target), log_target=True,
                    reduction="sum")
    log_q_s = F.log_softmax(z_s.masked_fill(gt, float("-inf")), dim=1)
    log_q_t = F.log_softmax(z_t.masked_fill(gt, float("-inf")), dim=1)
    # the target column is -inf on both sides (probability 0) and contributes nothing; masking the difference
    # keeps its undefined (-inf) - (-inf) out of the sum and of the gradients
    nckd = (log_q_t.exp() * (log_q_t - log_q_s).masked_fill(gt, 0.0)).sum()
    return (alpha * tckd + beta * nckd) * float(temperature) ** 2 / batch
