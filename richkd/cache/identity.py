"""What identifies a cache entry's inputs (weights, data rows, views, prompts), and which entries a config reads.

Everything that changes what an entry holds goes into its fields (and so its key): the teacher checkpoint's and
CLIP weights' sha256 (not their file names), the dataset's content fingerprint and the cached rows (not the
folder it is in), the cached views and CLIP's preprocessing version. Anything else (prompt set for image
features, the loss knobs a sweep samples) is left out, so trials that differ only there share the entries.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import suppress
from pathlib import Path

import numpy as np

from richkd.cache.entries import SHARD_FORMAT, CacheEntry, CacheError
from richkd.clip import parse_pretrained, prompt_set_hash
from richkd.config import ClipConfig, Config
from richkd.data.photos import BOX_RECIPE
from richkd.data.transforms import CROP_PADDING
from richkd.io import OutputError, atomic_write_text, sha256_file

# The un-augmented, centred image. The official code caches CLIP's outputs of it (teaching.mode official);
# cached teaching with one view also reads the teacher's (docs/method.md#teaching-protocol).
CLEAN_VIEW = "clean"
# Bumped whenever richkd.clip's image preprocessing changes, so old CLIP image caches are not reused.
CLIP_PREPROCESS_VERSION = "torch-bicubic-antialias-v1"


def file_sha256_memo(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """sha256 of a (possibly large) file, memoised by (path, size, mtime) so trials don't re-hash CLIP weights."""
    p = Path(path).resolve()
    st = p.stat()
    memo_file = Path(memo_dir) / "sha256-memo.json"
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if ident not in memo:
        memo[ident] = sha256_file(p)
        with suppress(OSError, OutputError):   # a read-only cache folder still works, just without the memo
            atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return memo[ident]


def clip_weights_id(clip: ClipConfig, memo_dir: str | os.PathLike) -> str:
    """What identifies CLIP's weights: the file's sha256 for local files, else the open_clip tag."""
    ref = parse_pretrained(clip.pretrained)
    if ref.kind == "dir":
        if not ref.path.is_dir():
            raise CacheError(f"clip.pretrained: folder {str(ref.path)!r} does not exist")
        parts = [f"{f.name}:{file_sha256_memo(f, memo_dir)}" for f in sorted(ref.path.iterdir()) if f.is_file()]
        return "dir-" + hashlib.sha256("|".join(parts).encode()).hexdigest()
    if ref.kind == "file" and ref.path.is_file():
        return "file-" + file_sha256_memo(ref.path, memo_dir)
    # a missing file keeps the tag form: validate and load_clip report it before anything is cached under it
    return f"tag-{clip.model}/{clip.pretrained}"


def cached_rows(data, split: str) -> np.ndarray:
    """Sorted rows of the underlying split whose teacher outputs a run reads: its train and validation rows (a
    subset run, data.max_train_samples, caches just its subset, under another key); the whole test split."""
    if split == "train":
        return np.union1d(data.train.indices.numpy(), data.val.indices.numpy()).astype(np.int64)
    return np.arange(len(data.test_clean), dtype=np.int64)


def split_entries(cfg: Config, data, split: str) -> dict[str, CacheEntry]:
    """The entries of one split's rows a config reads: "teacher" (cached teaching) and "clip-image" (cached or
    official teaching with CLIP). A photo dataset's fields also name the sharded layout, the box recipe and top-k."""
    if cfg.teaching.mode == "online":
        return {}
    memo, t = cfg.teaching.cache_dir, cfg.teaching
    total = len(data.train_clean if split == "train" else data.test_clean)
    cached = cached_rows(data, split)
    # the data's content fingerprint, not the folder it is in
    rows = {"dataset": data.name, "fingerprint": data.fingerprint(), "image_size": data.image_size, "n": total,
            "rows": "all" if len(cached) == total else hashlib.sha256(cached.tobytes()).hexdigest()[:16],
            "n_rows": int(len(cached)), "num_classes": data.num_classes, "split": split,
            "view": CLEAN_VIEW if t.views == 1 else f"views{t.views}-seed{t.view_seed}-pad{CROP_PADDING}"}
    photo = {"format": SHARD_FORMAT, "boxes": BOX_RECIPE} if data.train_clean.decodes_per_batch else {}
    out = {}
    if cfg.teaching.mode == "cached":
        ckpt = Path(cfg.teacher.checkpoint or "").expanduser()
        if not ckpt.is_file():
            raise CacheError(f"teacher.checkpoint: file {str(ckpt)!r} does not exist")
        out["teacher"] = CacheEntry("teacher", {
            "arch": cfg.teacher.arch, "checkpoint_sha256": file_sha256_memo(ckpt, memo), **rows, **photo,
            **({"logit_topk": cfg.teaching.logit_topk} if photo else {})})
    if cfg.uses_clip:
        out["clip-image"] = CacheEntry("clip-image", {
            "model": cfg.clip.model, "weights": clip_weights_id(cfg.clip, memo), "preprocess": CLIP_PREPROCESS_VERSION,
            **rows, **photo})
    return out


def clip_text_entry(cfg: Config, templates: tuple[str, ...], class_names: list[str]) -> CacheEntry:
    """The text classifier of a prompt set's templates and the class names."""
    return CacheEntry("clip-text", {
        "model": cfg.clip.model, "weights": clip_weights_id(cfg.clip, cfg.teaching.cache_dir),
        "templates_sha": prompt_set_hash(templates), "class_names_sha": prompt_set_hash(class_names),
        "clean_class_names": cfg.clip.clean_class_names,
    })
