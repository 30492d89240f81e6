"""RichKD end to end on real (mini) Fashion-MNIST: variants, teaching modes, caches and their errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from richkd import cache as cache_mod
from richkd.cache import CacheError, prepare_caches
from richkd.config import ConfigError
from richkd.data import build_data
from richkd.objective import DistillationObjective
from richkd.models.base import ModelOutput
from richkd.teachers import TeacherOutputs, build_teacher_source
from richkd.trainer import Run, run_training
from richkd.validate import check_resources


@pytest.mark.parametrize("variant, overrides, terms", [
    ("L", {"loss.feat_weight": 0.0}, {"train_ce", "train_logit"}),
    ("F", {"loss.logit_weight": 0.0}, {"train_ce", "train_feat"}),
    ("L+F", {}, {"train_ce", "train_logit", "train_feat"}),
    ("KD", {"loss.method": "kd"}, {"train_ce", "train_kd"}),
])
def test_variants_train_with_exactly_their_terms(richkd_cfg, variant, overrides, terms):
    cfg = richkd_cfg.with_overrides(overrides)
    prepare_caches(cfg)
    result = run_training(cfg)
    got = {k for k in result.metrics if k.startswith("train_") and k != "train_loss"}
    assert got == terms, variant
    assert all(np.isfinite(result.metrics[k]) for k in terms)
    assert 0 <= result.metrics["val_top1"] <= 100


def test_online_mode_equals_cached_mode_on_unaugmented_views(richkd_cfg):
    cfg = richkd_cfg.with_overrides({"data.augment": "none"})
    prepare_caches(cfg)
    data = build_data(cfg.data)
    cached = build_teacher_source(cfg, data, torch.device("cpu"))
    online = build_teacher_source(cfg.with_overrides({"teaching.mode": "online"}), data, torch.device("cpu"))
    from richkd.data import make_loader, normalize

    batch = next(iter(make_loader(data.train, 32, shuffle=True, seed=0)))
    x = normalize(batch.image, data.mean, data.std)
    a, b = cached(batch, x), online(batch, x)
    # caches are fp16: agreement to fp16 precision, and the fused targets agree too
    assert torch.allclose(a.logits, b.logits, atol=2e-2, rtol=1e-2)
    assert torch.allclose(a.clip_feat, b.clip_feat, atol=2e-3)
    assert torch.allclose(a.clip_cosine, b.clip_cosine, atol=2e-3)


def test_online_mode_trains(richkd_cfg):
    result = run_training(richkd_cfg.with_overrides({"teaching.mode": "online"}))
    assert np.isfinite(result.metrics["train_logit"]) and np.isfinite(result.metrics["train_feat"])


def _teacher(logits, cosine):
    return TeacherOutputs(logits=logits, feat=torch.zeros(len(logits), 4), clip_cosine=cosine)


def test_alpha_only_control_and_alpha_one_reduce_to_kd(richkd_cfg):
    z_t, cos = torch.randn(5, 10), torch.rand(5, 10)
    student = ModelOutput(torch.randn(5, 10), torch.zeros(5, 8))
    target = torch.randint(0, 10, (5,))
    base = richkd_cfg.loss
    import dataclasses

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


def test_no_cache_tensor_in_checkpoints(richkd_cfg):
    prepare_caches(richkd_cfg)
    run = Run(richkd_cfg)
    state = run.state()
    n_rows = len(run.data.train_clean)
    for section in ("student", "objective"):
        for name, tensor in state[section].items():
            assert tensor.shape[:1] != (n_rows,) or "memory" in name, f"{section}.{name} looks like a cache"
    assert not any("class_of" in k or "row_position" in k for k in state["objective"])
    assert any("memory_student" in k for k in state["objective"])  # the CRD bank belongs in checkpoints


def test_cache_keys_are_stable_across_processes_and_prompt_sets(richkd_cfg):
    prepare_caches(richkd_cfg)
    data = build_data(richkd_cfg.data)
    ident = cache_mod.dataset_identity(data, "train")
    key = cache_mod.clip_image_entry(richkd_cfg, ident, "train", richkd_cfg.teaching.cache_dir).key
    code = ("from richkd.config import Config; from richkd.data import build_data; import richkd.cache as c, json,"
            " sys; cfg = Config.from_dict(json.loads(sys.argv[1])); d = build_data(cfg.data);"
            " print(c.clip_image_entry(cfg, c.dataset_identity(d, 'train'), 'train', cfg.teaching.cache_dir).key)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(richkd_cfg.to_dict())], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == key
    other_prompts = richkd_cfg.with_overrides({"clip.prompt_set": "single"})
    assert cache_mod.clip_image_entry(other_prompts, ident, "train", richkd_cfg.teaching.cache_dir).key == key
    other_data = richkd_cfg.with_overrides({"data.image_size": 28})
    ident28 = cache_mod.dataset_identity(build_data(other_data.data), "train")
    assert cache_mod.clip_image_entry(other_data, ident28, "train", richkd_cfg.teaching.cache_dir).key != key


def test_cache_for_other_data_or_truncated_is_an_error(richkd_cfg):
    built = prepare_caches(richkd_cfg)
    teacher_dir = next(p for p in built if p.name.startswith("teacher-"))
    # a cache built for other data, placed under this config's key: the manifest tells
    manifest = json.loads((teacher_dir / "manifest.json").read_text())
    manifest["fields"]["fingerprint"] = "0" * 64
    (teacher_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="built for different inputs.*fingerprint"):
        Run(richkd_cfg)
    shutil.rmtree(teacher_dir)
    prepare_caches(richkd_cfg)
    logits = teacher_dir / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:1000])
    with pytest.raises(CacheError, match="truncated"):
        Run(richkd_cfg)


def test_missing_cache_tells_how_to_build_it(richkd_cfg):
    with pytest.raises(CacheError, match="richkd cache --config"):
        Run(richkd_cfg)


def test_clip_dimension_mismatch_is_an_error(richkd_cfg):
    prepare_caches(richkd_cfg)
    text_dir = next(p for p in richkd_cfg_entries(richkd_cfg) if p.name.startswith("clip-text-"))
    arr = np.load(text_dir / "classifier.npy")
    np.save(text_dir / "classifier.npy", np.zeros((arr.shape[0], arr.shape[1] + 1), dtype=arr.dtype))
    manifest = json.loads((text_dir / "manifest.json").read_text())
    manifest["arrays"]["classifier"]["shape"][1] += 1
    (text_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="different CLIP models"):
        Run(richkd_cfg)


def richkd_cfg_entries(cfg):
    return sorted(p for p in Path(cfg.teaching.cache_dir).iterdir() if p.is_dir())


@pytest.mark.parametrize("overrides, message", [
    ({"clip.prompt_set": "richkd13"}, "(?i)did you mean 'richkd12'"),
    ({"student.arch": "resnet9"}, "student.arch"),
    ({"teacher.checkpoint": "/nonexistent/t.pt"}, "does not exist"),
    ({"clip.pretrained": "/nonexistent/clip.pt"}, "init-tiny"),
])
def test_bad_input_is_caught_before_training(richkd_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_resources(richkd_cfg.with_overrides(overrides))


def test_empty_and_malformed_prompt_files(richkd_cfg, tmp_path):
    for text, message in (("templates: []", "empty|no templates"), ("templates: ['a photo']", r"\{\}")):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            check_resources(richkd_cfg.with_overrides({"clip.prompt_set": str(path)}))


def test_subset_runs_cache_only_their_rows(richkd_cfg):
    from richkd.data import Batch

    cfg = richkd_cfg.with_overrides({"data.max_train_samples": 100})
    built = prepare_caches(cfg)
    rows = np.load(next(p for p in built if p.name.startswith("teacher-")) / "rows.npy")
    data = build_data(cfg.data)
    assert len(rows) == 100 + len(data.val) < len(data.train_clean)
    assert np.isfinite(run_training(cfg).metrics["train_logit"])
    source = build_teacher_source(cfg, data, torch.device("cpu"))
    outside = min(set(range(len(data.train_clean))) - set(rows.tolist()))
    batch = Batch(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long), torch.tensor([outside]))
    with pytest.raises(CacheError, match="not in the teacher cache"):
        source(batch, batch.image)
