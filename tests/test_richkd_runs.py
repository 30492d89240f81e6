"""RichKD end to end on real (mini) Fashion-MNIST: online teaching, checkpoint contents, bad input before training."""
import numpy as np
import pytest

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
