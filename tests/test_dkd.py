"""DKD and logit standardisation against the official code's formulas, and their wiring into the objective.

The reference functions below are the official mdistiller / RichKD-repository formulas written out again with
plain torch ops (masks, softmax, torch.log, kl_div with a summed reduction divided by the batch, the target
logit pushed down by 1000), so the product's log-space implementation is checked against an independent one.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from richkd.config import ConfigError, LossConfig
from richkd.losses import dkd_loss, dkd_warmup, kd_loss, standardize_logits
from richkd.models.base import ModelOutput
from richkd.objective import DistillationObjective
from richkd.teachers import TeacherOutputs


def official_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kd(z_s, z_t, temperature, logit_stand):
    z_s = official_normalize(z_s) if logit_stand else z_s
    z_t = official_normalize(z_t) if logit_stand else z_t
    log_pred_student = F.log_softmax(z_s / temperature, dim=1)
    pred_teacher = F.softmax(z_t / temperature, dim=1)
    return F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean() * temperature ** 2


def official_dkd(z_s, z_t, target, alpha, beta, temperature, logit_stand):
    z_s = official_normalize(z_s) if logit_stand else z_s
    z_t = official_normalize(z_t) if logit_stand else z_t
    gt_mask = torch.zeros_like(z_s).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(z_s).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(z_s / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(z_t / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature ** 2 / target.shape[0]
    pred_teacher_part2 = F.softmax(z_t / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(z_s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature ** 2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _tensors(seed=0, b=16, c=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g), scale * torch.randn(b, c, generator=g),
            torch.randint(0, c, (b,), generator=g))


@pytest.mark.parametrize("logit_stand", [False, True])
@pytest.mark.parametrize("alpha, beta, t", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 3.0), (0.0, 6.0, 2.0)])
def test_dkd_equals_the_official_formula(alpha, beta, t, logit_stand):
    z_s, z_t, y = _tensors()
    got = dkd_loss(z_s, z_t, y, alpha, beta, t, logit_stand)
    want = official_dkd(z_s.double(), z_t.double(), y, alpha, beta, t, logit_stand)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 3.0, 4.0])
def test_logit_standardised_kd_equals_the_official_formula(t):
    z_s, z_t, _ = _tensors(seed=1, scale=5.0)
    got = kd_loss(z_s, z_t, t, logit_stand=True)
    assert got.item() == pytest.approx(official_kd(z_s.double(), z_t.double(), t, True).item(), rel=1e-5)
    # standardisation changes the value (it is not a no-op) and removes the logits' scale and shift
    assert kd_loss(z_s, z_t, t).item() != pytest.approx(got.item(), rel=1e-3)
    assert kd_loss(3 * z_s + 2, 0.5 * z_t - 1, t, logit_stand=True).item() == pytest.approx(got.item(), rel=1e-4)


def test_standardize_uses_the_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, std = 3.0, ((4 + 1 + 0 + 9) / 3) ** 0.5
    torch.testing.assert_close(standardize_logits(z), (z - mean) / (1e-7 + std))


def test_dkd_decomposes_kd_when_alpha_and_beta_are_one_minus_the_target_mass():
    """DKD's identity (Zhao et al.): KD = TCKD + (1 - p_t^T) NCKD; with one sample, beta = 1 - p_t^T."""
    z_s, z_t, y = _tensors(seed=2, b=1)
    p_gt = F.softmax(z_t / 3.0, dim=1)[0, y[0]].item()
    assert dkd_loss(z_s, z_t, y, 1.0, 1.0 - p_gt, 3.0).item() == pytest.approx(kd_loss(z_s, z_t, 3.0).item(),
                                                                               rel=1e-5)


def test_dkd_gradients_are_finite_and_match_the_official_formula():
    z_s, z_t, y = _tensors(seed=3, scale=20.0)   # saturated softmaxes
    a = z_s.clone().requires_grad_(True)
    b = z_s.clone().double().requires_grad_(True)
    dkd_loss(a, z_t, y, 1.0, 8.0, 4.0).backward()
    official_dkd(b, z_t.double(), y, 1.0, 8.0, 4.0, False).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-7)


def test_warmup_is_the_official_linear_ramp():
    assert [dkd_warmup(e, 20) for e in (1, 10, 20, 21, 240)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert dkd_warmup(1, 0) == 1.0


def test_objective_uses_the_configured_form_on_the_fused_teacher():
    z_s, z_t, y = _tensors(seed=4)
    cos = torch.rand(16, 10)
    teacher = TeacherOutputs(logits=z_t, feat=torch.zeros(16, 4), clip_cosine=cos)
    student = ModelOutput(z_s, torch.zeros(16, 8))
    base = LossConfig(feat_weight=0.0, logit_weight=2.0, kd_form="dkd", dkd_alpha=1.0, dkd_beta=8.0,
                      dkd_warmup_epochs=20, temperature=4.0, logit_stand=True)
    obj = DistillationObjective(base, student_dim=8)
    fused = 0.7 * z_t + 0.3 * cos
    want = official_dkd(z_s.double(), fused.double(), y, 1.0, 8.0, 4.0, True).item()
    obj.epoch = 5
    assert obj(student, y, teacher, torch.arange(16))["logit"].item() == pytest.approx(2.0 * 0.25 * want, rel=1e-5)
    obj.epoch = 30
    assert obj(student, y, teacher, torch.arange(16))["logit"].item() == pytest.approx(2.0 * want, rel=1e-5)
    kd = DistillationObjective(dataclasses.replace(base, method="kd", kd_form="kl"), student_dim=8)
    assert kd(student, y, teacher, torch.arange(16))["kd"].item() == pytest.approx(
        2.0 * official_kd(z_s.double(), z_t.double(), 4.0, True).item(), rel=1e-5)


@pytest.mark.parametrize("key, value", [("kd_form", "dist"), ("dkd_beta", -1.0), ("dkd_warmup_epochs", -1),
                                        ("nce_sampling", "exact")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"loss.{key}"):
        LossConfig(**{key: value})


def test_the_trainer_tells_the_objective_the_epoch(tmp_path, mini_fashion_root, mini_teacher):
    """DKD's warm-up reads the objective's epoch, which only the trainer sets: a DKD run through the trainer sees
    1, 2, 3 (a trainer that stopped setting it would run DKD at the first epoch's warm-up weight throughout)."""
    from richkd.config import Config
    from richkd.trainer import Run

    cfg = Config.from_dict({
        "device": "cpu", "seed": 0,
        "data": {"dataset": "fashion_mnist", "root": str(mini_fashion_root), "batch_size": 64,
                 "max_train_samples": 128, "max_eval_samples": 64},
        "student": {"arch": "resnet8"}, "teacher": {"arch": "resnet8", "checkpoint": str(mini_teacher)},
        "loss": {"method": "kd", "kd_form": "dkd", "dkd_warmup_epochs": 3},
        "teaching": {"mode": "online"}, "train": {"epochs": 3}})
    run = Run(cfg)
    seen, logit_loss = [], run.objective.logit_loss

    def spy(*args, **kwargs):
        seen.append(run.objective.epoch)
        return logit_loss(*args, **kwargs)

    run.objective.logit_loss = spy
    run.train()
    assert sorted(set(seen)) == [1, 2, 3] and seen == sorted(seen)
    assert [dkd_warmup(e, 3) for e in (1, 2, 3)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
