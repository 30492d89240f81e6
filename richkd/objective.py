"""The one place that knows RichKD: student and teacher outputs -> named, weighted loss terms."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from richkd.config import LossConfig
from richkd.fusion import fuse_logits
from richkd.losses.crd import FusedCRD
from richkd.losses.dkd import dkd_loss, dkd_warmup
from richkd.losses.kd import kd_loss
from richkd.models.base import ModelOutput
from richkd.teachers import TeacherOutputs


class DistillationObjective(nn.Module):
    """CE + (KD | RichKD logit term) + RichKD feature term; a zero-weight term is skipped entirely.

    Variants (docs/method.md#the-method): RichKD-L (feat_weight 0), RichKD-F (logit_weight 0), RichKD-L+F, plain KD
    (method kd, or richkd with alpha 1), and the alpha-only control (zero_clip_logits: the teacher is only
    softened by alpha, no CLIP information). The trainable projection heads and CRD memory banks live here so
    they are optimised and checkpointed with the student.

    The logit term is Hinton's KL or DKD (`loss.kd_form`), optionally on standardised logits (`loss.logit_stand`;
    docs/method.md#other-distillation-losses). DKD's warm-up reads `epoch` (1-based), which the trainer sets at
    the start of every epoch; it is derived from the loop, so a resumed run sets it again.
    """
    epoch: int = 1

    def __init__(self, cfg: LossConfig, *, student_dim: int, teacher_dim: Optional[int] = None,
                 clip_dim: Optional[int] = None, train_targets: Optional[torch.Tensor] = None,
                 train_rows: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.crd = None
        if cfg.uses_crd:
            if teacher_dim is None or train_targets is None or train_rows is None:
                raise ValueError("the RichKD feature term needs teacher features and the training targets")
            # CRD's memory bank covers the rows the student trains on (validation rows are never negatives);
            # dataset indices are mapped to compact positions 0..n_train-1.
            position = torch.full((int(train_targets.numel()),), -1, dtype=torch.long)
            position[train_rows] = torch.arange(train_rows.numel())
            self.register_buffer("row_position", position, persistent=False)
            uses_clip_feat = clip_dim is not None and cfg.resolved_feat_lambda < 1
            self.crd = FusedCRD(student_dim, teacher_dim, clip_dim if uses_clip_feat else None, cfg.feat_dim,
                                train_targets[train_rows], cfg.nce_k, cfg.nce_temperature, cfg.nce_momentum,
                                nce_sampling=cfg.nce_sampling)

    @property
    def needs_teacher(self) -> bool:
        c = self.cfg
        return c.uses_teacher and (c.logit_weight > 0 or self.crd is not None)

    def teacher_logits(self, teacher: TeacherOutputs) -> torch.Tensor:
        """The logits the student is distilled from: the teacher's (KD) or the fused teacher's (RichKD)."""
        c = self.cfg
        if not c.fused_teacher:
            return teacher.logits.float()
        cosine = teacher.clip_cosine
        if cosine is None or c.zero_clip_logits:
            cosine = torch.zeros_like(teacher.logits, dtype=torch.float32)
        return fuse_logits(teacher.logits, cosine, c.fusion_alpha, c.clip_logit_scale)

    def logit_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   target: torch.Tensor) -> torch.Tensor:
        """The unweighted logit term: KL (kd_form kl) or DKD times its warm-up factor (kd_form dkd)."""
        c = self.cfg
        if c.kd_form == "dkd":
            return dkd_warmup(self.epoch, c.dkd_warmup_epochs) * dkd_loss(
                student_logits, teacher_logits, target, c.dkd_alpha, c.dkd_beta, c.temperature, c.logit_stand)
        return kd_loss(student_logits, teacher_logits, c.temperature, c.logit_stand)

    def forward(self, student: ModelOutput, target: torch.Tensor, teacher: Optional[TeacherOutputs],
                index: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if c.ce_weight > 0:
            terms["ce"] = c.ce_weight * F.cross_entropy(student.logits.float(), target)
        if not c.uses_teacher:
            return terms
        if teacher is None:
            raise ValueError(f"loss.method={c.method} needs teacher outputs")
        if c.logit_weight > 0:
            name = "logit" if c.fused_teacher else "kd"
            terms[name] = c.logit_weight * self.logit_loss(student.logits.float(), self.teacher_logits(teacher),
                                                           target)
        if self.crd is not None:
            positions = self.row_position[index]
            terms["feat"] = c.feat_weight * self.crd(student.feat.float(), teacher.feat, teacher.clip_feat,
                                                     c.resolved_feat_lambda, positions)
        return terms
