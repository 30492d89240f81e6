"""Multi-view caches of ImageNet-layout folders: stored crop boxes the student is cut from, sharded and resumable
entries, top-k logits, the --plan estimate, a RichKD-L+F run that trains, resumes and evaluates, and bad caches."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from types import SimpleNamespace

from richkd.cache import CacheError, prepare_caches, read_entry, split_entries
from richkd.cache.entries import read_manifest
from richkd.cache.topk import compress_logits, reconstruct_logits
from richkd.config import ConfigError
from richkd.data import build_data, make_loader, normalize
from richkd.data.photos import BadImageError, view_box
from richkd.teachers import build_teacher_source
from richkd.trainer import Run, run_training
from tests.factories import ENV, REPO, imagenet_config, make_imagenet_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_imagenet_assets(tmp_path_factory.mktemp("inet_assets"))


@pytest.fixture(scope="module")
def built(assets, tmp_path_factory):
    """One cache of 3 views in shards of 5 rows (16 cached rows: 4 shards, the last one partial)."""
    work = tmp_path_factory.mktemp("inet_cache")
    cfg = imagenet_config(assets, work / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RICHKD_SHARD_ROWS", "5")
        prepare_caches(cfg, splits=("train", "test"))   # final runs read the test split's caches too
    return cfg


def _entries(cfg):
    """(data, {kind: the entry's folder, manifest and arrays}) of the config's sharded train entries."""
    data = build_data(cfg.data)
    return data, {k: SimpleNamespace(folder=e.path(cfg.teaching.cache_dir),
                                     manifest=read_manifest(e, cfg.teaching.cache_dir),
                                     arrays=read_entry(e, cfg.teaching.cache_dir))
                  for k, e in split_entries(cfg, data, "train").items()}


def test_student_crops_are_the_stored_boxes_and_teachers_saw_the_same_region(built):
    from PIL import Image, ImageOps

    cfg = built
    data, entries = _entries(cfg)
    teacher = entries["teacher"]
    assert teacher.manifest["shard_rows"] == 5 and len(teacher.manifest["shards"]) == 4
    run = Run(cfg)
    assert run.train_set.stored is not None          # the student reads the boxes stored in the cache
    batch = next(iter(make_loader(run.train_set, 12, shuffle=True, seed=3)))
    assert set(batch.view.tolist()) == {0, 1, 2}
    n = len(teacher.arrays["rows"])
    pos = np.searchsorted(teacher.arrays["rows"], batch.index.numpy())
    flat = batch.view.numpy() * n + pos
    boxes = teacher.arrays["boxes"][flat]
    np.testing.assert_array_equal(boxes, entries["clip-image"].arrays["boxes"][flat])
    source = data.train_clean.source
    for k in range(len(batch)):
        row, view = int(batch.index[k]), int(batch.view[k])
        top, left, h, w, flip, ih, iw = (int(v) for v in boxes[k])
        # the stored box is the view's fixed box (view 0: the centre crop) of an image of the stored size
        assert view_box(cfg.teaching.view_seed, row, view, ih, iw) == (top, left, h, w, flip)
        with Image.open(source.path(row)) as im:
            im = im.convert("RGB")
        assert im.size == (iw, ih)
        crop = im.crop((left, top, left + w, top + h)).resize((224, 224), Image.BILINEAR)
        crop = ImageOps.mirror(crop) if flip else crop
        expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1)
        assert torch.equal(batch.image[k], expected)            # uint8 from the loader (Batch.to: float)
    assert len({tuple(b[:4]) for b in teacher.arrays["boxes"][np.arange(n, 3 * n)]}) > n     # views differ per row
    # the cached outputs are the teachers' outputs on exactly that crop
    online = build_teacher_source(cfg.with_overrides({"teaching.mode": "online", "teaching.views": 1}), data,
                                  torch.device("cpu"))
    batch = batch.to("cpu")
    x = normalize(batch.image, data.mean, data.std)
    cached, fresh = run.teachers(batch, x), online(batch, x)
    torch.testing.assert_close(cached.logits, fresh.logits, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(cached.feat, fresh.feat, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(cached.clip_cosine, fresh.clip_cosine, atol=2e-3, rtol=0)


def test_a_richkd_l_f_run_on_cached_views_trains_resumes_exactly_and_evaluates(built):
    cfg = built
    straight = run_training(cfg, final=True)
    states = {}
    run_training(cfg, stop_after_epoch=1, on_epoch=lambda r: states.setdefault(r.epoch, r.state()))
    resumed = run_training(cfg, resume_state=states[1], final=True)
    assert straight.epochs_run == 2 and np.isfinite(straight.metrics["train_loss"])
    assert straight.metrics["train_feat"] > 0 and straight.metrics["train_logit"] > 0      # L + F
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-6)
    assert resumed.metrics["val_top1"] == straight.metrics["val_top1"]
    # the student's test metrics, and the teachers' Fig. 1 analysis on the test split (from the test caches)
    analysis = {f"{who}_test_{key}" for who in ("teacher", "fused")
                for key in ("top1", "ece", "confident_correct_pct", "confidently_wrong_pct")}
    assert set(straight.test_metrics) == ({"test_top1", "test_top5", "test_ece", "test_loss",
                                           "clip_zeroshot_test_top1"} | analysis)
    assert "teacher_val_top1" in straight.metrics and "clip_zeroshot_val_top1" in straight.metrics


def test_topk_reconstruction_keeps_the_full_logits_top_k():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((64, 100)) * 3).astype(np.float32)
    stored = compress_logits(z, 5)
    assert stored["topk_values"].dtype == np.float16 and stored["topk_index"].dtype == np.int16
    rebuilt = reconstruct_logits(stored["topk_values"], stored["topk_index"], stored["lse"], 100)
    full_top = np.argsort(-z, axis=1)[:, :5]
    np.testing.assert_array_equal(np.argsort(-rebuilt, axis=1, kind="stable")[:, :5], full_top)
    np.testing.assert_allclose(np.take_along_axis(rebuilt, full_top, 1), np.take_along_axis(z, full_top, 1),
                               atol=1e-2)
    p_full = torch.softmax(torch.from_numpy(z), 1).numpy()
    p_rebuilt = torch.softmax(torch.from_numpy(rebuilt), 1).numpy()
    np.testing.assert_allclose(np.take_along_axis(p_rebuilt, full_top, 1), np.take_along_axis(p_full, full_top, 1),
                               rtol=2e-2, atol=1e-4)
    rest = np.ones_like(z, dtype=bool)
    np.put_along_axis(rest, full_top, False, axis=1)
    tail = p_rebuilt[rest].reshape(64, 95)
    np.testing.assert_allclose(tail, tail[:, :1].repeat(95, 1), rtol=1e-5)      # FKD: the rest spread evenly
    # the tail's mass is what the top k leave, up to the fp16 rounding of the stored logits
    np.testing.assert_allclose(tail.sum(1), 1 - np.take_along_axis(p_full, full_top, 1).sum(1), rtol=0, atol=5e-3)


def test_a_topk_cache_keeps_the_teachers_top_k_and_shares_the_clip_entry(built):
    full_cfg = built
    topk_cfg = built.with_overrides({"teaching.logit_topk": 2})
    prepare_caches(topk_cfg)
    data = build_data(full_cfg.data)
    full, topk = (split_entries(c, data, "train") for c in (full_cfg, topk_cfg))
    assert full["clip-image"].path(full_cfg.teaching.cache_dir) == topk["clip-image"].path(topk_cfg.teaching.cache_dir)
    assert full["teacher"].key != topk["teacher"].key
    a = build_teacher_source(full_cfg, data, torch.device("cpu"))
    b = build_teacher_source(topk_cfg, data, torch.device("cpu"))
    flat = np.arange(a.logits.shape[0])
    za, zb = a.logits[flat].astype(np.float32), b.logits[flat]
    np.testing.assert_array_equal(np.argsort(-zb, 1, kind="stable")[:, :2], np.argsort(-za, 1, kind="stable")[:, :2])
    np.testing.assert_allclose(np.sort(zb, 1)[:, -2:], np.sort(za, 1)[:, -2:], atol=1e-2)
    assert (np.sort(zb, 1)[:, :-2] < np.sort(zb, 1)[:, -2:-1]).all()


def test_plan_sizes_equal_the_built_arrays_and_scale_to_full_imagenet(built, capsys):
    from richkd.cache.estimate import estimate_caches

    cfg = built
    plan = estimate_caches(cfg, calibrate=False)
    _, entries = _entries(cfg)
    for kind, entry in entries.items():
        stored = sum(np.load(f, mmap_mode="r").nbytes for f in entry.folder.glob("shard-*/*.npy"))
        assert plan.entry_bytes(kind) == stored
    full = estimate_caches(cfg.with_overrides({"teaching.views": 10}), images=1_281_167, num_classes=1000,
                           calibrate=False)
    # 1.28M x 10 views x (1000 fp16 logits + 64-d fp16 resnet8 feature + box) and (tiny CLIP's 64-d + box)
    assert full.entry_bytes("teacher") == 1_281_167 * 10 * (2000 + 128 + 28)
    assert full.entry_bytes("clip-image") == 1_281_167 * 10 * (128 + 28)
    from richkd.cli import main

    path = cfg.teaching.cache_dir + "/../plan.yaml"
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)
    assert main(["cache", "--config", path, "--plan", "--images", "1281167", "--classes", "1000"]) == 0
    out = capsys.readouterr().out
    assert "1,281,167 images x 3 views" in out and "313 shards of 4096 rows" in out
    assert "teacher-" not in out and "estimate" in out and "views/s" in out


def test_a_killed_cache_build_resumes_where_it_stopped(assets, built, tmp_path, monkeypatch):
    cfg = imagenet_config(assets, tmp_path / "cache")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    data = build_data(cfg.data)
    folder = split_entries(cfg, data, "train")["teacher"].path(cfg.teaching.cache_dir)
    env = {**os.environ, **ENV, "RICHKD_SHARD_ROWS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "richkd", "cache", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (folder / "shard-00002" / "manifest.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "manifest.json").is_file()              # really stopped half-way
    done = sorted(p.name for p in folder.glob("shard-*") if (p / "manifest.json").is_file())
    assert 3 <= len(done) < 16
    first = (folder / "shard-00000" / "feat.npy").stat().st_mtime_ns
    with pytest.raises(CacheError, match="a build was started and stopped; run it again to continue"):
        build_teacher_source(cfg, data, torch.device("cpu"))
    monkeypatch.setenv("RICHKD_SHARD_ROWS", "1")
    prepare_caches(cfg)
    assert (folder / "shard-00000" / "feat.npy").stat().st_mtime_ns == first       # kept, not rebuilt
    assert not list(folder.glob(".shard-*"))
    _, resumed = _entries(cfg)
    _, reference = _entries(built)
    layout = {"created", "shard_rows", "shards"}                # how the entry was written, not what it holds
    for kind in reference:
        assert ({k: v for k, v in resumed[kind].manifest.items() if k not in layout}
                == {k: v for k, v in reference[kind].manifest.items() if k not in layout})    # same key, boxes
        for name, arr in reference[kind].arrays.items():
            flat = np.arange(arr.shape[0])
            got, want = resumed[kind].arrays[name][flat], arr[flat]
            assert got.dtype == want.dtype, f"{kind}/{name}"
            if np.issubdtype(want.dtype, np.floating):
                # fp16 outputs of batches of 1 row here, 2 in the reference: a CPU GEMM's float32 result depends
                # on the batch size, so a value may round to the neighbouring fp16 (2**-10 relative; 1e-6 near 0)
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2**-10, atol=1e-6,
                                           err_msg=f"{kind}/{name}")
            else:                                                # boxes and rows: drawn or counted, not computed
                np.testing.assert_array_equal(got, want, err_msg=f"{kind}/{name}")


def test_caches_for_other_crops_sizes_or_images_are_clear_errors(built, tmp_path):
    cfg = built
    data = build_data(cfg.data)
    smaller = cfg.with_overrides({"data.image_size": 192})
    with pytest.raises(CacheError, match=r"is missing \(teacher-\w+ holds this data built for other settings: "
                                         r"(fingerprint .*, )?image_size 224 there vs 192 here\)"):
        build_teacher_source(smaller, build_data(smaller.data), torch.device("cpu"))
    # a manifest that does not match its key (edited, or from another version of the crop recipe)
    entry = split_entries(cfg, data, "train")["clip-image"]
    manifest = entry.path(cfg.teaching.cache_dir) / "manifest.json"
    original = manifest.read_text()
    try:
        manifest.write_text(json.dumps({**json.loads(original), "fields": {**entry.fields, "boxes": "other"}}))
        with pytest.raises(CacheError, match=r"built for different inputs \(differs in: boxes\)"):
            build_teacher_source(cfg, data, torch.device("cpu"))
    finally:
        manifest.write_text(original)

    class WrongSize:          # boxes drawn for an image of another size than the file decodes to
        origin = "/cache/teacher-x"

        def boxes(self, rows, views):
            return np.array([[0, 0, 10, 10, 0, 999, 998]] * len(rows), dtype=np.int32)

    shown = data.train.with_views(3, 7).with_view_boxes(WrongSize())
    with pytest.raises(BadImageError, match=r"decodes to \d+x\d+ px but the view boxes in /cache/teacher-x were drawn "
                                            r"for 999x998 px.*Delete that folder and rebuild"):
        shown.get_batch(torch.tensor([0]))
    with pytest.raises(ConfigError, match="teaching.logit_topk.*imagenet"):
        cfg.with_overrides({"data.dataset": "cifar100", "data.root": None, "teaching.logit_topk": 5})
