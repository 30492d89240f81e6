"""Multi-view caches of a photo dataset (data.dataset: imagenet), built in one resumable pass
(docs/architecture.md#imagenet-scale): each image is decoded once, its V views (richkd.data.photos.view_box) are
cropped and run through the teacher and CLIP, and each view's box record is stored next to the outputs, shard by
shard, in both sharded entries; a killed build continues with the shards either entry lacks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from richkd.cache.entries import (CacheError, begin_entry, default_shard_rows, ensure_cache_writable, entry_exists,
                                  finish_entry, missing_shards, write_shard)
from richkd.cache.identity import cached_rows, split_entries
from richkd.cache.topk import compress_logits
from richkd.clip import load_clip
from richkd.config import Config
from richkd.data import normalize
from richkd.data.photos import decode_views
from richkd.io import progress_bar
from richkd.models import load_teacher

log = logging.getLogger(__name__)


class _ViewRows(torch.utils.data.Dataset):
    """Rows -> (uint8 (V, 3, S, S) crops, int32 (V, 7) boxes); a map-style dataset so DataLoader workers decode."""

    def __init__(self, source, rows: np.ndarray, views: int, seed: int, size: int) -> None:
        self.source, self.rows, self.views, self.seed, self.size = source, rows, views, seed, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        crops, boxes = decode_views(self.source, int(self.rows[k]), self.views, self.seed, self.size)
        return crops, torch.from_numpy(boxes)


def build_photo_entries(cfg: Config, data, split: str, cache_dir: Path, device, progress: bool = False,
                        shard_rows: Optional[int] = None) -> None:
    """Build what is missing of a photo split's sharded entries, resuming a stopped build."""
    todo = {kind: e for kind, e in split_entries(cfg, data, split).items() if not entry_exists(e, cache_dir)}
    if not todo:
        return
    ensure_cache_writable(cache_dir)
    shard_rows = shard_rows or default_shard_rows()
    rows = cached_rows(data, split)
    views, size = cfg.teaching.views, data.image_size
    teacher, clip, specs = None, None, {}
    if "teacher" in todo:
        teacher, _ = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
        teacher.to(device)
        k = cfg.teaching.logit_topk
        if k is not None and k > data.num_classes:
            raise CacheError(f"teaching.logit_topk={k} exceeds the {data.num_classes} classes of {cfg.data.root}")
        logits = ({"logits": ((data.num_classes,), "float16")} if k is None else
                  {"topk_values": ((k,), "float16"), "topk_index": ((k,), "int16"), "lse": ((), "float32")})
        specs["teacher"] = {"boxes": ((7,), "int32"), "feat": ((teacher.feat_dim,), "float16"), **logits}
    if "clip-image" in todo:
        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=device)
        specs["clip-image"] = {"boxes": ((7,), "int32"), "feat": ((clip.embed_dim,), "float16")}
    folders = {kind: begin_entry(todo[kind], cache_dir, rows, views, specs[kind], shard_rows) for kind in todo}
    n_shards = -(-len(rows) // shard_rows)
    pending = {kind: set(missing_shards(folder, n_shards)) for kind, folder in folders.items()}
    shards = sorted(set().union(*pending.values()))
    log.info("caching %d views of %d %s rows (%s) in %d of %d shards", views, len(rows), split, ", ".join(todo),
             len(shards), n_shards)
    source = (data.train_clean if split == "train" else data.test_clean).source
    bar = progress_bar(len(shards), f"cache views {split}", unit="shard", disable=not progress)
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
        bar.update(1)
    bar.close()
    for kind, entry in todo.items():
        extra = {"embed_dim": clip.embed_dim, "preprocess_id": clip.preprocess_id} if kind == "clip-image" else {}
        finish_entry(entry, cache_dir, extra={**extra, "num_classes": data.num_classes})
