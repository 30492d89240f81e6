"""richkd.cache: entry keys, stale/damaged/mismatched caches and their errors, subset caches, signatures."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from richkd import cache as cache_mod
from richkd.cache import CacheError, affects_cache, cache_signature, prepare_caches
from richkd.config import Config
from richkd.data import build_data
from richkd.teachers import build_teacher_source
from richkd.trainer import Run, run_training

# A fixed config whose signature must never change: sweep files store signatures, and a changed signature
# would make an existing sweep rebuild (or not find) its caches. The values were computed with the original
# implementation in richkd/tune/space.py before cache_signature moved into richkd.cache.
PINNED = Config.from_dict({
    "name": "pin", "device": "cpu", "seed": 1,
    "data": {"dataset": "fashion_mnist", "root": "/data/fmnist", "batch_size": 64, "eval_batch_size": 200},
    "student": {"arch": "resnet8"},
    "teacher": {"arch": "resnet8", "checkpoint": "/ckpt/teacher.pt"},
    "clip": {"model": "richkd-tiny", "pretrained": "/weights/tiny_clip.pt", "prompt_set": "simple"},
    "loss": {"method": "richkd", "nce_k": 64},
    "teaching": {"mode": "cached", "cache_dir": "/cache"},
})


@pytest.mark.parametrize("overrides, signature", [
    ({}, "699120bf578719c3"),
    # PINNED leaves clip.clean_class_names at its default, which became false (the official code's names): the
    # same config with the old default spelt out keeps the signature pinned before the change
    ({"clip.clean_class_names": True}, "de4f43147f7d0bb5"),
    ({"loss.method": "kd"}, "b18d4f2759b9dddb"),            # no CLIP: clip.* keys leave the signature
    ({"loss.method": "supervised"}, "09ab3639e282653e"),
    ({"data.resident": True}, "699120bf578719c3"),          # cache-neutral key
])
def test_cache_signature_is_pinned(overrides, signature):
    assert cache_signature(PINNED.with_overrides(overrides)) == signature


def test_cache_signature_follows_cache_affecting_keys_only():
    sig = cache_signature(PINNED)
    assert cache_signature(PINNED.with_overrides({"clip.prompt_set": "richkd12"})) != sig
    assert cache_signature(PINNED.with_overrides({"teaching.views": 4})) != sig
    assert cache_signature(PINNED.with_overrides({"loss.fusion_alpha": 0.5, "optim.lr": 0.01})) == sig
    kd = PINNED.with_overrides({"loss.method": "kd"})
    assert cache_signature(kd.with_overrides({"clip.prompt_set": "richkd12"})) == cache_signature(kd)


@pytest.mark.parametrize("key, affects", [
    ("data.dataset", True), ("data.batch_size", True), ("teacher.checkpoint", True), ("clip.pretrained", True),
    ("teaching.views", True), ("data.resident", False), ("loss.fusion_alpha", False), ("optim.lr", False),
    ("dataset", False), ("clip", False),
])
def test_affects_cache(key, affects):
    assert affects_cache(key) is affects


def test_cache_keys_are_stable_across_processes_and_prompt_sets(richkd_cfg):
    prepare_caches(richkd_cfg)
    data = build_data(richkd_cfg.data)
    key = cache_mod.split_entries(richkd_cfg, data, "train")["clip-image"].key
    code = ("from richkd.config import Config; from richkd.data import build_data; import richkd.cache as c, json,"
            " sys; cfg = Config.from_dict(json.loads(sys.argv[1])); d = build_data(cfg.data);"
            " print(c.split_entries(cfg, d, 'train')['clip-image'].key)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(richkd_cfg.to_dict())], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == key
    other_prompts = richkd_cfg.with_overrides({"clip.prompt_set": "single"})
    assert cache_mod.split_entries(other_prompts, data, "train")["clip-image"].key == key
    other_data = richkd_cfg.with_overrides({"data.image_size": 28})
    assert cache_mod.split_entries(other_data, build_data(other_data.data), "train")["clip-image"].key != key


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


def test_two_prompt_sets_get_two_text_entries_with_their_own_class_embeddings(richkd_cfg):
    """A sweep over clip.prompt_set: were the text entry's identity to forget the templates, every trial would
    read whichever classifier was built first. Each set's teacher source holds CLIP's classifier of its own
    templates (the same fp32 computation, so equal to float rounding)."""
    from richkd.clip import load_clip, load_prompt_set

    data = build_data(richkd_cfg.data)
    clip = load_clip(richkd_cfg.clip.model, richkd_cfg.clip.pretrained)
    held = {}
    for prompt_set in ("simple", "richkd12"):
        cfg = richkd_cfg.with_overrides({"clip.prompt_set": prompt_set})
        prepare_caches(cfg)
        held[prompt_set] = build_teacher_source(cfg, data, torch.device("cpu")).class_embeddings
        want = clip.encode_text_classifier(data.class_names, load_prompt_set(prompt_set).templates,
                                           clean=cfg.clip.clean_class_names)
        torch.testing.assert_close(held[prompt_set], want.float(), rtol=1e-5, atol=1e-6)
    assert len([p for p in richkd_cfg_entries(richkd_cfg) if p.name.startswith("clip-text-")]) == 2
    assert (held["simple"] - held["richkd12"]).abs().max() > 1e-3
