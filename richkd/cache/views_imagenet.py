"""Multi-view caches of a photo dataset (data.dataset: imagenet): built in one resumable pass, read by trials.

FKD-style (docs/method.md#teaching-protocol): each training image has V fixed views, view 0 its centre crop and
the others RandomResizedCrop boxes fixed by (teaching.view_seed, row, view) (richkd/data/photos.py). The builder
decodes each image once, crops its V views, runs the conventional teacher and CLIP on them and stores, per row
and view, the view's box record next to the outputs, in sharded entries (richkd/cache/view_store.py):

    teacher-<key>     boxes (7,) int32, feat (d_T,) fp16, and logits (C,) fp16 or, with teaching.logit_topk = k,
                      topk_values / topk_index / lse (richkd/cache/topk.py)
    clip-image-<key>  boxes (7,) int32, feat (D,) fp16, L2-normalised

A trial crops the student's image from the stored box (`PhotoSplit.with_view_boxes`), so it sees exactly the
region both teachers saw. Both entries are written shard by shard in the same pass; a killed build continues
with the shards that are missing from either entry.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from richkd.cache.entries import CacheEntry, CacheError, ensure_cache_writable, entry_exists
from richkd.cache.identity import cached_rows, clip_image_entry, dataset_identity, teacher_entry
from richkd.cache.topk import TopKLogits, compress_logits
from richkd.cache.view_store import (SHARD_FORMAT, begin_entry, default_shard_rows, finish_entry, missing_shards,
                                     open_entry, write_shard)
from richkd.config import Config
from richkd.io import progress_bar

log = logging.getLogger(__name__)


def photo_entries(cfg: Config, data, split: str, cache_dir: Path) -> dict[str, CacheEntry]:
    """The sharded entries a config reads ("teacher", and "clip-image" when it uses CLIP)."""
    from richkd.data.photos import BOX_RECIPE

    ident = dataset_identity(data, split)
    extra = {"format": SHARD_FORMAT, "boxes": BOX_RECIPE}
    base = teacher_entry(cfg, ident, split, cache_dir)
    out = {"teacher": CacheEntry(base.kind, {**base.fields, **extra, "logit_topk": cfg.teaching.logit_topk})}
    if cfg.uses_clip:
        clip = clip_image_entry(cfg, ident, split, cache_dir)
        out["clip-image"] = CacheEntry(clip.kind, {**clip.fields, **extra})
    return out


class _ViewRows:
    """Rows -> (uint8 (V, 3, S, S) crops, int32 (V, 7) boxes); a map-style dataset so DataLoader workers decode."""

    def __init__(self, source, rows: np.ndarray, views: int, seed: int, size: int) -> None:
        self.source, self.rows, self.views, self.seed, self.size = source, rows, views, seed, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        import torch

        from richkd.data.photos import decode_views

        crops, boxes = decode_views(self.source, int(self.rows[k]), self.views, self.seed, self.size)
        return crops, torch.from_numpy(boxes)


def ensure_photo_caches(cfg: Config, data, split: str, cache_dir: Path, device, progress: bool = False,
                        shard_rows: Optional[int] = None) -> list[Path]:
    """Build what is missing of the config's sharded entries (resuming a stopped build); return their folders."""
    rows = cached_rows(data, split)
    views = cfg.teaching.views
    entries = photo_entries(cfg, data, split, cache_dir)
    for entry in entries.values():
        if entry_exists(entry, cache_dir):
            open_entry(entry, cache_dir, n_rows=len(rows), views=views)       # checks the manifest
    todo = {kind: e for kind, e in entries.items() if not entry_exists(e, cache_dir)}
    if todo:
        ensure_cache_writable(cache_dir)
        _build(cfg, data, split, rows, todo, cache_dir, device, progress, shard_rows or default_shard_rows())
    return [e.path(cache_dir) for e in entries.values()]


def _build(cfg, data, split, rows, todo, cache_dir, device, progress, shard_rows) -> None:
    import torch

    from richkd.data import normalize

    views, size = cfg.teaching.views, data.image_size
    teacher = clip = None
    specs = {}
    if "teacher" in todo:
        from richkd.models import load_teacher

        teacher, sha = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
        teacher.to(device)
        k = cfg.teaching.logit_topk
        if k is not None and k > data.num_classes:
            raise CacheError(f"teaching.logit_topk={k} exceeds the {data.num_classes} classes of {cfg.data.root}")
        logits = ({"logits": ((data.num_classes,), "float16")} if k is None else
                  {"topk_values": ((k,), "float16"), "topk_index": ((k,), "int16"), "lse": ((), "float32")})
        specs["teacher"] = {"boxes": ((7,), "int32"), "feat": ((teacher.feat_dim,), "float16"), **logits}
    if "clip-image" in todo:
        from richkd.clip import load_clip

        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=device)
        specs["clip-image"] = {"boxes": ((7,), "int32"), "feat": ((clip.embed_dim,), "float16")}
    folders = {kind: begin_entry(todo[kind], cache_dir, rows, views, specs[kind], shard_rows) for kind in todo}
    n_shards = -(-len(rows) // shard_rows)
    pending = {kind: set(missing_shards(folder, n_shards)) for kind, folder in folders.items()}
    shards = sorted(set().union(*pending.values()))
    log.info("caching %d views of %d %s rows (%s) in %d of %d shards", views, len(rows), split, ", ".join(todo),
             len(shards), n_shards)
    source = (data.train_clean if split == "train" else data.test_clean).source
    bar = progress_bar(len(shards), f"cache views {split}", unit="shard") if progress else None
    per_batch = max(1, cfg.data.eval_batch_size // views)
    for i in shards:
        chunk = rows[i * shard_rows:(i + 1) * shard_rows]
        loader = torch.utils.data.DataLoader(_ViewRows(source, chunk, views, cfg.teaching.view_seed, size),
                                             batch_size=per_batch, num_workers=cfg.data.num_workers)
        parts: dict[str, dict[str, list[np.ndarray]]] = {kind: {} for kind in todo}
        with torch.inference_mode():
            for crops, boxes in loader:
                n = crops.shape[0]
                images = crops.reshape(n * views, 3, size, size).to(device).float().div_(255.0)
                out = {}
                if teacher is not None:
                    t = teacher(normalize(images, data.mean, data.std))
                    z = t.logits.float().cpu().numpy()
                    stored = {"logits": z.astype(np.float16)} if cfg.teaching.logit_topk is None else \
                        compress_logits(z, cfg.teaching.logit_topk)
                    out["teacher"] = {"feat": t.feat.half().cpu().numpy(), **stored}
                if clip is not None:
                    out["clip-image"] = {"feat": clip.encode_images(images).half().cpu().numpy()}
                for kind, arrays in out.items():
                    arrays["boxes"] = boxes.reshape(n * views, 7).numpy()
                    for name, arr in arrays.items():
                        parts[kind].setdefault(name, []).append(arr.reshape(n, views, *arr.shape[1:]))
        for kind, folder in folders.items():
            if i in pending[kind]:
                write_shard(folder, i, {name: np.concatenate(p) for name, p in parts[kind].items()})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for kind, entry in todo.items():
        extra = {"embed_dim": clip.embed_dim, "preprocess_id": clip.preprocess_id} if kind == "clip-image" else {}
        finish_entry(entry, cache_dir, extra={**extra, "num_classes": data.num_classes})


class StoredBoxes:
    """The view boxes a cache stores, by dataset row and view (richkd.data.photos.ViewBoxTable)."""

    def __init__(self, entry, origin: str) -> None:
        self.rows = np.asarray(entry.rows)
        self.records = entry["boxes"]
        self.origin = origin

    def boxes(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        if not np.array_equal(self.rows[pos], rows):
            raise CacheError(f"rows {rows[self.rows[pos] != rows][:5].tolist()} have no stored views in {self.origin};"
                             " it was built for other rows: rebuild it with `richkd cache`")
        return self.records[np.asarray(views, dtype=np.int64) * len(self.rows) + pos]


def open_photo_caches(cfg: Config, data, split: str, cache_dir: Path) -> dict:
    """What CachedTeachers reads from sharded entries: logits, feat, clip_feat (or None), rows and the boxes."""
    rows = cached_rows(data, split)
    entries = photo_entries(cfg, data, split, cache_dir)
    teacher = open_entry(entries["teacher"], cache_dir, n_rows=len(rows), views=cfg.teaching.views)
    if not np.array_equal(teacher.rows, rows):
        raise CacheError(f"the teacher cache {teacher.folder} covers other rows than this run reads; delete it and "
                         "rebuild with `richkd cache`")
    logits = teacher["logits"] if "logits" in teacher.arrays else TopKLogits(
        teacher["topk_values"], teacher["topk_index"], teacher["lse"], data.num_classes)
    clip_feat = None
    if "clip-image" in entries:
        clip = open_entry(entries["clip-image"], cache_dir, n_rows=len(rows), views=cfg.teaching.views)
        if teacher.manifest.get("boxes_sha256") != clip.manifest.get("boxes_sha256"):
            raise CacheError(f"{teacher.folder} and {clip.folder} store different view boxes, so the teachers saw "
                             "different crops; delete both and rebuild with `richkd cache`")
        clip_feat = clip["feat"]
    return {"logits": logits, "feat": teacher["feat"], "clip_feat": clip_feat, "rows": rows,
            "boxes": StoredBoxes(teacher, str(teacher.folder))}
