"""richkd.cache: cache signatures (which caches a config reads)."""
import pytest

from richkd.cache import affects_cache, cache_signature
from richkd.config import Config

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
    ({}, "de4f43147f7d0bb5"),
    ({"loss.method": "kd"}, "b18d4f2759b9dddb"),            # no CLIP: clip.* keys leave the signature
    ({"loss.method": "supervised"}, "09ab3639e282653e"),
    ({"data.resident": True}, "de4f43147f7d0bb5"),          # cache-neutral key
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
