"""richkd.teachers: the cached and the online teacher source give the same outputs on the same views; the
official protocol mixes them (teacher online on the student's view, CLIP of the clean image from the cache)."""
import numpy as np
import pytest
import torch

from richkd.cache import prepare_caches
from richkd.data import build_data
from richkd.teachers import build_teacher_source
from richkd.trainer import Run, run_training


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


# ----- teaching.mode: official ---------------------------------------------------------------------------------

def test_official_mode_runs_the_teacher_on_the_students_view_and_reads_clip_of_the_clean_image(richkd_cfg):
    """The official data flow: teacher outputs of the augmented view (as online teaching), CLIP outputs of the
    clean image by row (as cached teaching), on one augmented batch."""
    from richkd.data import make_loader, normalize
    from richkd.teachers import OfficialTeachers

    cfg = richkd_cfg.with_overrides({"teaching.mode": "official"})
    built = prepare_caches(cfg)
    assert sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in built) == ["clip-image", "clip-text"]
    data = build_data(cfg.data)
    cpu = torch.device("cpu")
    official = build_teacher_source(cfg, data, cpu)
    assert isinstance(official, OfficialTeachers)
    online = build_teacher_source(cfg.with_overrides({"teaching.mode": "online"}), data, cpu)
    prepare_caches(richkd_cfg)
    clean = build_teacher_source(richkd_cfg, data, cpu)            # cached: both teachers of the clean image
    batch = next(iter(make_loader(data.train, 32, shuffle=True, seed=0)))   # random crops + flips
    x = normalize(batch.image, data.mean, data.std)
    got, on, cached = official(batch, x), online(batch, x), clean(batch, x)
    torch.testing.assert_close(got.logits, on.logits)               # same network, same augmented input
    torch.testing.assert_close(got.feat, on.feat)
    torch.testing.assert_close(got.clip_feat, cached.clip_feat)     # the clean image's row, from the cache
    torch.testing.assert_close(got.clip_cosine, cached.clip_cosine)
    assert not torch.allclose(got.logits, cached.logits, atol=1e-2)    # the view matters for the teacher
    assert not torch.allclose(got.clip_feat, on.clip_feat, atol=1e-3)  # and CLIP did not see the crop


@pytest.mark.parametrize("variant, overrides, terms", [
    ("L", {"loss.feat_weight": 0.0}, {"train_ce", "train_logit"}),
    ("F", {"loss.logit_weight": 0.0}, {"train_ce", "train_feat"}),
    ("L+F", {}, {"train_ce", "train_logit", "train_feat"}),
    ("alpha-only", {"loss.feat_weight": 0.0, "loss.zero_clip_logits": True}, {"train_ce", "train_logit"}),
])
def test_official_mode_trains_every_variant(richkd_cfg, variant, overrides, terms):
    cfg = richkd_cfg.with_overrides({"teaching.mode": "official", "data.max_train_samples": 192, **overrides})   # 3 batches
    prepare_caches(cfg)
    run = Run(cfg)
    assert (run.teachers.clip_feat_rows is None) == (not cfg.uses_clip)   # alpha-only: no CLIP cache read
    result = run.train()
    assert {k for k in result.metrics if k.startswith("train_") and k != "train_loss"} == terms, variant
    assert all(np.isfinite(result.metrics[k]) for k in terms)


def test_official_mode_is_exactly_resumable(richkd_cfg):
    cfg = richkd_cfg.with_overrides({"teaching.mode": "official", "train.epochs": 2, "data.max_train_samples": 192})
    prepare_caches(cfg)
    straight = run_training(cfg)
    states = {}
    run_training(cfg, stop_after_epoch=1, on_epoch=lambda r: states.setdefault(r.epoch, r.state()))
    resumed = run_training(cfg, resume_state=states[1])
    for key in ("train_loss", "train_feat", "val_top1", "val_loss"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], rel=1e-6), key


def test_official_mode_without_its_clip_cache_is_a_clear_error(richkd_cfg):
    from richkd.cache import CacheError

    cfg = richkd_cfg.with_overrides({"teaching.mode": "official"})
    with pytest.raises(CacheError, match="clip-image cache .* is missing; build it with `richkd cache"):
        build_teacher_source(cfg, build_data(cfg.data), torch.device("cpu"))
