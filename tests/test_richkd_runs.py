"""RichKD end to end on real (mini) Fashion-MNIST: online teaching, checkpoint contents, bad input before training."""
import numpy as np
import pytest
import torch

from richkd.cache import prepare_caches
from richkd.config import ConfigError
from richkd.trainer import Run, run_training
from richkd.validate import check_resources


def test_online_mode_trains(richkd_cfg):
    result = run_training(richkd_cfg.with_overrides({"teaching.mode": "online"}))
    assert np.isfinite(result.metrics["train_logit"]) and np.isfinite(result.metrics["train_feat"])


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


def test_a_final_run_on_the_whole_split_reports_the_teachers_test_analysis(richkd_cfg):
    """data.val_fraction 0 (what `richkd finalize` runs): every row trains (and fills the CRD bank), no val_*
    metric exists, and the test split gets the teachers' Fig. 1 analysis from the test caches."""
    import torch

    from richkd.cache import CacheError
    from richkd.data import build_data, make_loader, normalize
    from richkd.models import load_teacher

    cfg = richkd_cfg.with_overrides({"data.val_fraction": 0.0})
    prepare_caches(cfg)
    run = Run(cfg)
    with pytest.raises(CacheError, match="missing"):   # the test caches: refused before the first epoch
        run.train(final=True)
    assert run.epoch == 0
    prepare_caches(cfg, splits=("train", "test"))
    assert len(run.train_set) == 600 and run.objective.crd.contrast.num_data == 600 and not run.has_val
    result = run.train(final=True)
    # no validation metric or validation analysis; the last report carries the test split's (final runs)
    assert not any(k.startswith(("val_", "best_val", "teacher_", "fused_")) and "_test_" not in k
                   for k in result.metrics)
    assert result.metrics["fused_test_top1"] == result.test_metrics["fused_test_top1"]
    assert np.isnan(result.best_val_top1)
    test = result.test_metrics
    assert 0 <= test["test_top1"] <= 100
    for who in ("teacher", "fused"):
        for key in ("test_top1", "test_ece", "test_confident_correct_pct", "test_confidently_wrong_pct"):
            assert np.isfinite(test[f"{who}_{key}"]), (who, key)
    # the cached teacher's test accuracy is the teacher network's own (fp16 cache: a tie may flip)
    model, _ = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, 10)
    data = build_data(cfg.data)
    with torch.no_grad():
        correct = sum(int((model(normalize(b.image, data.mean, data.std)).logits.argmax(1) == b.target).sum())
                      for b in make_loader(data.test, 100, shuffle=False, seed=0))
    assert test["teacher_test_top1"] == pytest.approx(100.0 * correct / len(data.test), abs=1.0)


def _tensors(state: dict, section: str) -> dict:
    return {k: v for k, v in state[section].items() if isinstance(v, torch.Tensor)}


def test_richkd_lf_resume_is_exact(richkd_cfg, tmp_path):
    """An L+F run stopped after epoch 1 and resumed from its saved state ends bit-identical to the uninterrupted
    run: the student, the CRD memory banks and their normalisers, the embedding heads and the optimizer's momentum
    buffers (which also train the heads) are all restored."""
    cfg = richkd_cfg.with_overrides({"train.epochs": 2, "loss.feat_weight": 0.8, "loss.feat_lambda": 0.4, "data.max_train_samples": 192})
    prepare_caches(cfg)
    straight = Run(cfg)
    straight.train()
    first = Run(cfg)
    first.train(stop_after_epoch=1)
    torch.save(first.state(), tmp_path / "last.pt")
    resumed = Run(cfg)
    resumed.load_state(torch.load(tmp_path / "last.pt", weights_only=True))
    result = resumed.train()
    a, b = straight.state(), resumed.state()
    objective = _tensors(a, "objective")
    assert {"crd.contrast.memory_student", "crd.contrast.memory_teacher", "crd.contrast.log_z_student",
            "crd.embed_student.linear.weight", "crd.embed_teacher.linear.weight",
            "crd.embed_clip.linear.weight"} <= set(objective)
    for section in ("student", "objective"):
        expected, got = _tensors(a, section), _tensors(b, section)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{section}.{key} differs after resume"
    for key, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]
    assert result.metrics["val_top1"] == straight.history[-1]["val_top1"]


def test_cached_teacher_outputs_are_memory_mapped_not_read_into_memory(richkd_cfg):
    """Trials on one machine share the cache files' pages; a copy per trial would multiply the memory by the
    number of concurrent trials (docs/architecture.md, "Caching")."""
    from pathlib import Path

    prepare_caches(richkd_cfg)
    run = Run(richkd_cfg)
    cache_dir = Path(richkd_cfg.teaching.cache_dir).resolve()
    arrays = {"logits": run.teachers.logits, "feat": run.teachers.feat, "clip_feat": run.teachers.clip_feat_rows}
    for name, arr in arrays.items():
        assert isinstance(arr, np.memmap), f"{name} was read into memory ({type(arr).__name__})"
        assert Path(arr.filename).resolve().is_relative_to(cache_dir), name
        assert not arr.flags.writeable, name                        # mmap_mode="r": a trial cannot corrupt it
