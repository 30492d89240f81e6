"""The ImageNet recipes: mdistiller's ImageNet recipe in both configs, and the subset sweep whose finalists re-run
on the full set, validated against a tiny real ImageNet-layout folder (files, data and caches it would build)."""
from __future__ import annotations

import pytest

from richkd.config import Config
from richkd.tune.spec import load_spec
from tests.factories import REPO, make_imagenet_assets


@pytest.mark.parametrize("name, student, teacher", [
    ("imagenet_resnet34_resnet18_richkd", "resnet18", "resnet34"),
    ("imagenet_resnet50_mobilenetv1_richkd", "MobileNetV1", "resnet50")])
def test_configs_hold_mdistillers_imagenet_recipe(name, student, teacher):
    cfg = Config.from_yaml(REPO / "configs" / f"{name}.yaml")
    assert (cfg.student.arch, cfg.teacher.arch) == (student, teacher)
    assert (cfg.data.dataset, cfg.data.image_size, cfg.data.augment) == ("imagenet", 224, "standard")
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (512, 0.2, 0.9, 1e-4)
    assert (cfg.train.epochs, cfg.optim.schedule, cfg.optim.milestones) == (100, "step", (30, 60, 90))
    assert cfg.optim.gamma == 0.1
    assert (cfg.loss.temperature, cfg.loss.ce_weight, cfg.loss.logit_weight) == (1.0, 0.5, 0.5)
    assert cfg.teaching.mode == "cached" and cfg.teaching.views > 1 and cfg.uses_clip


def test_subset_sweep_trains_on_100_per_class_and_finalises_on_the_full_set(tmp_path, monkeypatch):
    assets = make_imagenet_assets(tmp_path / "assets", train_per_class=3, val_per_class=1, num_classes=2,
                                  teacher_arch="resnet18")
    monkeypatch.setenv("RICHKD_IMAGENET", str(assets / "imagenet"))
    monkeypatch.setenv("RICHKD_TEACHER_R34", str(assets / "teacher_resnet18.pth"))
    monkeypatch.setenv("RICHKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RICHKD_STORAGE", str(tmp_path / "runs"))
    monkeypatch.chdir(REPO)
    # the tiny folder's teacher is a resnet18, and its 6 training rows hold fewer CRD negatives than the recipe's
    # nce_k; files, data and the space are checked as for a real run
    spec = load_spec(REPO / "search_spaces" / "imagenet_subset.yaml", overrides=["config.teacher.arch=resnet18",
                     "config.clip.model=richkd-tiny", f"config.clip.pretrained={assets / 'tiny_clip.pt'}",
                     "config.loss.nce_k=2"])
    trial = spec.trial_config(spec.points[0])
    assert trial.data.max_train_per_class == 100 and trial.data.root == str(assets / "imagenet")
    assert (trial.train.epochs, trial.optim.milestones) == (20, (6, 12, 18))          # 30/60/90 of 100, scaled
    assert spec.tune.scheduler.type == "asha" and spec.tune.scheduler.grace_period == 4
    assert spec.trial_config(spec.points[1]).loss.fusion_alpha == 1.0                  # the alpha = 1 control
    final = trial.with_overrides(spec.finalize.overrides)
    assert final.data.max_train_per_class is None and final.data.max_eval_samples is None
    assert (final.train.epochs, final.optim.milestones) == (100, (30, 60, 90))
