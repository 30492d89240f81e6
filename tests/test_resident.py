"""The fast per-trial data path: device-resident batches equal the host loader's, host index copies, decoded cache."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from richkd.config import Config, ConfigError, DataConfig
from richkd.data import Batch, build_data, make_loader, to_float_images
from richkd.data import resident as resident_mod
from richkd.data import sources
from richkd.data.decoded import decoded_cache_dir
from richkd.data.resident import ResidentDataset, make_resident, wants_resident
from richkd.teachers import CachedTeachers, is_conv_tower
from richkd.trainer import Run, run_training


def _data(root: Path, **kw):
    return build_data(DataConfig(dataset="fashion_mnist", root=str(root), **kw))


def _assert_same_batches(host_loader, dev_loader, epochs=(0, 3)) -> list[Batch]:
    seen = []
    for epoch in epochs:
        host_loader.set_epoch(epoch)
        dev_loader.set_epoch(epoch)
        pairs = list(zip(host_loader, dev_loader, strict=True))
        assert len(pairs) == len(host_loader) > 1
        for a, b in pairs:
            assert torch.equal(a.image, b.image)            # bit-exact pixels, not merely close
            assert torch.equal(a.target, b.target) and torch.equal(a.index, b.index)
            assert (a.view is None) == (b.view is None)
            if a.view is not None:
                assert torch.equal(a.view, b.view) and torch.equal(b.host_view, a.view)
            assert torch.equal(b.host_index, a.index)
            seen.append(b)
    return seen


def test_resident_augmented_batches_equal_the_host_loader(mini_fashion_root):
    data = _data(mini_fashion_root, max_train_samples=200)   # 28 px rows resized to 32 on the fly
    res = ResidentDataset(data.train, "cpu")
    assert res.pixels.dtype == torch.uint8 and res.pixels.shape == (200, 1, 28, 28) and res.nbytes == 200 * 784
    host = make_loader(data.train, 64, shuffle=True, seed=7)
    dev = make_loader(res, 64, shuffle=True, seed=7)
    batches = _assert_same_batches(host, dev)
    # the comparison is not vacuous: crops/flips are on, and the two epochs differ
    clean = to_float_images(data.train.source.load(batches[0].index), 32)
    assert not torch.equal(clean, batches[0].image)
    assert not torch.equal(batches[0].index, batches[len(batches) // 2].index)


def test_resident_cached_views_and_clean_rows_equal_the_host_loader(mini_fashion_root):
    data = _data(mini_fashion_root, max_train_samples=150, max_eval_samples=100)
    views = data.train.with_views(4, seed=3)
    _assert_same_batches(make_loader(views, 32, shuffle=True, seed=1),
                         make_loader(ResidentDataset(views, "cpu"), 32, shuffle=True, seed=1))
    assert any(int(v.max()) > 0 for v in (b.view for b in make_loader(ResidentDataset(views, "cpu"), 32, True, 1)))
    _assert_same_batches(make_loader(data.val, 40, shuffle=False, seed=0),
                         make_loader(ResidentDataset(data.val, "cpu"), 40, shuffle=False, seed=0), epochs=(0,))


def test_resident_loader_ignores_workers_and_auto_is_off_on_cpu(mini_fashion_root, monkeypatch):
    data = _data(mini_fashion_root, max_train_samples=100)
    res = ResidentDataset(data.train, "cpu")
    assert make_loader(res, 32, shuffle=True, seed=0, num_workers=2).num_workers == 0
    assert wants_resident("auto", data.train, torch.device("cpu")) is False
    assert wants_resident(True, data.train, torch.device("cpu")) is True
    assert wants_resident(False, data.train, torch.device("cuda")) is False
    # auto on CUDA: on while the rows fit the budget (only the device type is looked at: no GPU needed)
    assert wants_resident("auto", data.train, torch.device("cuda")) is True
    monkeypatch.setattr(resident_mod, "RESIDENT_AUTO_MAX_BYTES", 100 * 784 - 1)
    assert wants_resident("auto", data.train, torch.device("cuda")) is False
    assert make_resident(data.train, "auto", "cpu") is None


def test_data_resident_config_key_is_validated_and_cache_neutral():
    assert Config.from_dict({"data": {"resident": True}}).data.resident is True
    assert Config.from_dict({"data": {"resident": "false"}}).data.resident is False
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match=r"data\.resident: .* not one of auto, true, false"):
            Config.from_dict({"data": {"resident": bad}})
    from richkd.cache.signature import cache_signature

    base = Config()
    assert cache_signature(base.with_overrides({"data.resident": True})) == cache_signature(base)
    assert cache_signature(base.with_overrides({"data.batch_size": 32})) != cache_signature(base)  # still keyed


def _tiny(root: Path, **over) -> Config:
    cfg = Config.from_dict({
        "device": "cpu", "seed": 3,
        "data": {"dataset": "fashion_mnist", "root": str(root), "max_train_samples": 160, "max_eval_samples": 60,
                 "batch_size": 32, "eval_batch_size": 60},
        "student": {"arch": "resnet8"}, "loss": {"method": "supervised"},
        "optim": {"lr": 0.05, "schedule": "cosine"}, "train": {"epochs": 2},
    })
    return cfg.with_overrides(over)


def test_resident_run_trains_the_identical_model_and_resumes_exactly(mini_fashion_root):
    host = Run(_tiny(mini_fashion_root, **{"data.resident": False}))
    assert host.resident_train is None
    host.train()
    states = {}
    cfg = _tiny(mini_fashion_root, **{"data.resident": True})
    first = Run(cfg)
    assert isinstance(first.resident_train, ResidentDataset)
    first.train(stop_after_epoch=1, on_epoch=lambda r: states.setdefault(r.epoch, r.state()))
    resumed = Run(cfg)
    resumed.load_state(states[1])
    resumed.train()
    assert resumed.history[-1]["train_loss"] == host.history[-1]["train_loss"]
    for (name, a), b in zip(host.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_resident_run_with_cached_views_matches_host_run(richkd_cfg):
    from richkd.cache import prepare_caches

    cfg = richkd_cfg.with_overrides({"teaching.views": 2, "loss.feat_weight": 0.0, "data.max_train_samples": 128})
    prepare_caches(cfg)
    a = run_training(cfg.with_overrides({"data.resident": False}))
    b = run_training(cfg.with_overrides({"data.resident": True}))
    assert b.metrics["train_loss"] == a.metrics["train_loss"]
    assert b.metrics["val_loss"] == a.metrics["val_loss"]


def test_batch_keeps_host_copies_and_cached_teachers_use_them():
    idx, view = torch.tensor([4, 0, 2]), torch.tensor([1, 0, 1])
    batch = Batch(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long), idx, view=view).to("cpu")
    assert batch.host_index is idx and batch.host_view is view
    # a device batch whose index cannot be read back (meta tensors): only the host copies can serve look-ups
    on_device = Batch(torch.zeros(3, 3, 8, 8), torch.zeros(3, dtype=torch.long), torch.empty(3, dtype=torch.long,
                      device="meta"), view=torch.empty(3, dtype=torch.long, device="meta"), host_index=idx, host_view=view)
    moved = on_device.to("meta")
    assert moved.host_index is idx and moved.index_on_host() is idx and moved.view_on_host() is view
    n, rows = 5, np.arange(10, dtype=np.float32)
    logits = np.stack([rows, -rows], axis=1)                   # row r of view v is at v * n + r
    feat = rows[:, None].repeat(3, axis=1)
    teachers = CachedTeachers(logits, feat, None, None, torch.device("cpu"), num_rows=n)
    out = teachers(moved, torch.zeros(3))
    assert out.logits[:, 0].tolist() == [9.0, 0.0, 7.0] and out.feat[:, 2].tolist() == [9.0, 0.0, 7.0]


def test_channels_last_reaches_the_online_teacher_and_only_conv_clip_towers(richkd_cfg):
    from open_clip.modified_resnet import ModifiedResNet

    from richkd.teachers import build_teacher_source

    cfg = richkd_cfg.with_overrides({"teaching.mode": "online", "train.channels_last": True})
    data = build_data(cfg.data)
    teachers = build_teacher_source(cfg, data, torch.device("cpu"))
    convs = [m.weight for m in teachers.teacher.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not is_conv_tower(teachers.clip.model.visual)        # the tiny CLIP is a ViT: left alone
    assert is_conv_tower(ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=32, width=8))
    plain = build_teacher_source(richkd_cfg.with_overrides({"teaching.mode": "online"}), data, torch.device("cpu"))
    w = next(m.weight for m in plain.teacher.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert not w.is_contiguous(memory_format=torch.channels_last)


# ----- decoded-array cache ---------------------------------------------------------------------------

def _load(root: Path):
    return sources.load_fashion_mnist(DataConfig(dataset="fashion_mnist", root=str(root)))


def test_decoded_cache_is_written_once_then_memory_mapped(mini_fashion_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RICHKD_DECODED_CACHE", str(tmp_path / "dec"))
    sources._read_fashion_idx.cache_clear()
    first = _load(mini_fashion_root)
    entries = list((tmp_path / "dec").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("fashion_mnist-")
    assert sorted(p.name for p in entries[0].iterdir()) == ["manifest.json", "test_images.npy", "test_labels.npy",
                                                            "train_images.npy", "train_labels.npy"]
    sources._read_fashion_idx.cache_clear()
    monkeypatch.setattr(sources, "read_idx", lambda *a: pytest.fail("decoded again despite the cache"))
    second = _load(mini_fashion_root)
    assert torch.equal(second.train.images, first.train.images) and torch.equal(second.test.targets, first.test.targets)
    assert second.train.images.shape == (600, 1, 28, 28) and second.train.digest == first.train.digest


def test_decoded_cache_rekeys_on_change_and_survives_damage(mini_fashion_root, tmp_path, monkeypatch, caplog):
    import shutil

    root = tmp_path / "fm"
    shutil.copytree(mini_fashion_root, root)
    monkeypatch.setenv("RICHKD_DECODED_CACHE", str(tmp_path / "dec"))
    sources._read_fashion_idx.cache_clear()
    good = _load(root).train.images.clone()
    (entry,) = list((tmp_path / "dec").iterdir())
    (entry / "train_images.npy").write_bytes(b"\x93NUMPY garbage")   # damaged: decoded again, entry rewritten
    sources._read_fashion_idx.cache_clear()
    with caplog.at_level(logging.WARNING, logger="richkd.data.decoded"):
        assert torch.equal(_load(root).train.images, good)
    assert "damaged" in caplog.text
    st = (root / "t10k-labels-idx1-ubyte.gz").stat()
    os.utime(root / "t10k-labels-idx1-ubyte.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    sources._read_fashion_idx.cache_clear()
    _load(root)
    assert len(list((tmp_path / "dec").glob("fashion_mnist-*"))) == 2       # a changed file gets a new entry


def test_decoded_cache_off_or_unwritable_still_loads(mini_fashion_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RICHKD_DECODED_CACHE", "off")
    assert decoded_cache_dir() is None
    sources._read_fashion_idx.cache_clear()
    ref = _load(mini_fashion_root).train.images
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RICHKD_DECODED_CACHE", str(blocker / "dec"))
    sources._read_fashion_idx.cache_clear()
    assert torch.equal(_load(mini_fashion_root).train.images, ref)
    monkeypatch.delenv("RICHKD_DECODED_CACHE")
    monkeypatch.setenv("RICHKD_CACHE", str(tmp_path / "shared"))
    assert decoded_cache_dir() == tmp_path / "shared" / "decoded"
    monkeypatch.delenv("RICHKD_CACHE")
    assert decoded_cache_dir() == Path("~/.cache/richkd/decoded").expanduser()
