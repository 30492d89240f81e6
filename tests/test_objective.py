"""richkd.objective: each RichKD variant trains with exactly its loss terms; fusion controls reduce to KD."""
import dataclasses

import numpy as np
import pytest
import torch

from richkd.cache import prepare_caches
from richkd.models.base import ModelOutput
from richkd.objective import DistillationObjective
from richkd.teachers import TeacherOutputs
from richkd.trainer import run_training


@pytest.mark.parametrize("variant, overrides, terms", [
    ("L", {"loss.feat_weight": 0.0}, {"train_ce", "train_logit"}),
    ("F", {"loss.logit_weight": 0.0}, {"train_ce", "train_feat"}),
    ("L+F", {}, {"train_ce", "train_logit", "train_feat"}),
    ("KD", {"loss.method": "kd"}, {"train_ce", "train_kd"}),
])
def test_variants_train_with_exactly_their_terms(richkd_cfg, variant, overrides, terms):
    cfg = richkd_cfg.with_overrides({**overrides, "data.max_train_samples": 192})          # 3 batches: the terms, not the size
    prepare_caches(cfg)
    result = run_training(cfg)
    got = {k for k in result.metrics if k.startswith("train_") and k != "train_loss"}
    assert got == terms, variant
    assert all(np.isfinite(result.metrics[k]) for k in terms)
    assert 0 <= result.metrics["val_top1"] <= 100


def _teacher(logits, cosine):
    return TeacherOutputs(logits=logits, feat=torch.zeros(len(logits), 4), clip_cosine=cosine)


def test_alpha_only_control_and_alpha_one_reduce_to_kd(richkd_cfg):
    z_t, cos = torch.randn(5, 10), torch.rand(5, 10)
    student = ModelOutput(torch.randn(5, 10), torch.zeros(5, 8))
    target = torch.randint(0, 10, (5,))
    base = richkd_cfg.loss
    control = DistillationObjective(dataclasses.replace(base, feat_weight=0.0, zero_clip_logits=True),
                                    student_dim=8)
    assert torch.allclose(control.teacher_logits(_teacher(z_t, cos)), 0.7 * z_t)
    scaled = DistillationObjective(dataclasses.replace(base, feat_weight=0.0, clip_logit_scale=100.0),
                                   student_dim=8)
    assert torch.allclose(scaled.teacher_logits(_teacher(z_t, cos)), 0.7 * z_t + 0.3 * 100.0 * cos, atol=1e-5)
    alpha_one = DistillationObjective(dataclasses.replace(base, feat_weight=0.0, fusion_alpha=1.0), student_dim=8)
    kd = DistillationObjective(dataclasses.replace(base, method="kd", feat_weight=0.0), student_dim=8)
    t = _teacher(z_t, cos)
    assert torch.allclose(alpha_one(student, target, t, torch.arange(5))["logit"],
                          kd(student, target, t, torch.arange(5))["kd"])


@pytest.mark.parametrize("sampling", ["other_class", "uniform"])
def test_the_crd_term_samples_negatives_as_configured(richkd_cfg, sampling):
    loss = dataclasses.replace(richkd_cfg.loss, nce_sampling=sampling, nce_k=8)
    obj = DistillationObjective(loss, student_dim=8, teacher_dim=4, train_targets=torch.arange(40) % 4,
                                train_rows=torch.arange(40))
    assert obj.crd.contrast.sampling == sampling
    torch.manual_seed(0)
    negatives = obj.crd.contrast.sample(torch.arange(40).repeat(20))[:, 1:]
    repeats = any(len(set(row)) < 8 for row in negatives.tolist())
    assert repeats == (sampling == "uniform")   # 8 of 30 rows: i.i.d. draws repeat, distinct ones never


def test_the_nce_settings_of_the_config_reach_the_crd_memory(richkd_cfg):
    """loss.nce_momentum / nce_temperature / nce_k are passed through, not left at CRD's defaults (0.5, 0.07)."""
    loss = dataclasses.replace(richkd_cfg.loss, feat_weight=0.8, nce_momentum=0.8, nce_temperature=0.1, nce_k=7)
    objective = DistillationObjective(loss, student_dim=8, teacher_dim=6, clip_dim=5,
                                      train_targets=torch.arange(40) % 4, train_rows=torch.arange(0, 40, 2))
    memory = objective.crd.contrast
    assert (memory.momentum, memory.temperature, memory.nce_k, memory.num_data) == (0.8, 0.1, 7, 20)
