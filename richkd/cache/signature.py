"""Which caches a config reads, as one short string: configs with equal signatures share every cache entry.

A sweep builds the caches of every distinct signature before its trials start, and stores the signatures in its
sweep files (so the string must never change for the same config). Keys under CACHE_AFFECTING_PREFIXES change
what a cache holds, so a sweep may sample them only from finite choices; CACHE_NEUTRAL_KEYS sit under those
prefixes but only change how rows reach the model, so they are left out of the signature.
"""
from __future__ import annotations

import hashlib
import json

from richkd.config import Config

CACHE_AFFECTING_PREFIXES = ("data.", "teacher.", "clip.", "teaching.")
CACHE_NEUTRAL_KEYS = ("data.resident",)
# Keys added after sweeps first stored signatures: left out while they hold their default, so every signature
# computed before they existed stays the same (a changed value still changes the signature).
ADDED_KEY_DEFAULTS = {"data.max_train_per_class": None, "data.bad_images": "error", "data.decode": "pil",
                      "data.class_names": None, "teaching.logit_topk": None}


def affects_cache(key: str) -> bool:
    """Whether a dotted config key (e.g. "clip.prompt_set") can change what a cache holds."""
    return key.startswith(CACHE_AFFECTING_PREFIXES) and key not in CACHE_NEUTRAL_KEYS


def cache_signature(cfg: Config) -> str:
    """What decides which caches a config reads: its cache-affecting keys and which teachers it uses."""
    flat = {k: v for k, v in cfg.to_flat_dict().items()
            if affects_cache(k) and (cfg.uses_clip or not k.startswith("clip."))
            and not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])}
    blob = json.dumps({"flat": flat, "method": cfg.loss.method, "uses_clip": cfg.uses_clip},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
