"""`richkd cache --plan`: the size of a photo dataset's multi-view caches (exact: rows x views x the bytes of each
stored array) and their build time, measured on this machine on a few real images and on the teacher and CLIP
architectures with random weights (docs/architecture.md#imagenet-scale). Decoding runs in `data.num_workers`
processes alongside the models, so the slower of the two sides decides the estimate.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from richkd.cache.identity import cached_rows
from richkd.cache.topk import topk_nbytes
from richkd.clip import ClipTeacher, register_tiny_config
from richkd.config import Config
from richkd.data import build_data, normalize
from richkd.data.photos import decode_views
from richkd.device import resolve_device
from richkd.models import create_model

BOX_BYTES = 7 * 4   # one int32 box record per view, in every entry (richkd.data.photos.BOX_FIELDS)


@dataclass
class CacheEstimate:
    images: int
    views: int
    num_classes: int
    entries: dict = field(default_factory=dict)     # kind -> {array name: bytes per view}
    seconds: dict = field(default_factory=dict)     # part -> estimated seconds for the whole build
    rates: dict = field(default_factory=dict)       # what was measured
    device: str = "cpu"
    workers: int = 0

    def entry_bytes(self, kind: str) -> int:
        return self.images * self.views * sum(self.entries[kind].values())

    @property
    def total_bytes(self) -> int:
        return sum(self.entry_bytes(kind) for kind in self.entries)

    @property
    def estimate_s(self) -> Optional[float]:
        if not self.seconds:
            return None
        decode = self.seconds.get("decode", 0.0) / max(1, self.workers)
        return max(decode, self.seconds.get("teacher", 0.0) + self.seconds.get("clip", 0.0))


def _measure(est: CacheEstimate, part: str, fn, batch: torch.Tensor, repeats: int = 2) -> None:
    """Views per second of fn(batch) after one warm-up call (on CUDA the clock stops when the kernels are done, not
    when they are launched), and the seconds the build's `part` takes at that rate."""
    sync = (lambda: torch.cuda.synchronize(batch.device)) if batch.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(batch)
        sync()
        started = time.perf_counter()
        for _ in range(repeats):
            fn(batch)
        sync()
    rate = repeats * batch.shape[0] / max(time.perf_counter() - started, 1e-9)
    est.rates[f"{part}_views_per_s"] = rate
    est.seconds[part] = est.images * est.views / rate


def estimate_caches(cfg: Config, images: Optional[int] = None, num_classes: Optional[int] = None,
                    calibrate: bool = True, calibration_images: int = 8) -> CacheEstimate:
    """The estimate for cfg's photo caches; images / num_classes override the dataset's (e.g. all of ImageNet)."""
    data = build_data(cfg.data)
    rows = cached_rows(data, "train")
    c = num_classes or data.num_classes
    est = CacheEstimate(images=images or len(rows), views=cfg.teaching.views, num_classes=c,
                     device=str(resolve_device(cfg.device)), workers=cfg.data.num_workers)
    teacher = create_model(cfg.teacher.arch, c).eval()
    k = cfg.teaching.logit_topk
    est.entries["teacher"] = {"logits": 2 * c if k is None else topk_nbytes(k), "feat": 2 * teacher.feat_dim,
                               "boxes": BOX_BYTES}
    if cfg.uses_clip:   # the architecture's config gives the width: no model, no weights file
        import open_clip

        register_tiny_config()
        dim = int(open_clip.get_model_config(cfg.clip.model)["embed_dim"])
        est.entries["clip-image"] = {"feat": 2 * dim, "boxes": BOX_BYTES}
    if not calibrate:
        return est
    source = data.train_clean.source
    sample = rows[:calibration_images]
    started = time.perf_counter()
    for r in sample:
        decode_views(source, int(r), est.views, cfg.teaching.view_seed, data.image_size)
    per_image = (time.perf_counter() - started) / max(1, len(sample))
    est.rates["decode_images_per_s"] = 1.0 / per_image
    est.seconds["decode"] = per_image * est.images
    dev = torch.device(est.device)
    # a GPU needs large batches to show its speed; on a CPU a few images give the per-image cost
    batch = torch.rand(min(cfg.data.eval_batch_size, 64 if dev.type == "cuda" else 8), 3, data.image_size,
                       data.image_size, device=dev)
    teacher.to(dev)
    mean, std = (torch.tensor(v, device=dev) for v in (data.mean, data.std))
    _measure(est, "teacher", lambda x: teacher(normalize(x, mean, std)), batch)
    if cfg.uses_clip:   # random weights: only the architecture's speed matters
        clip_model = open_clip.create_model(cfg.clip.model, pretrained=None, device=dev)
        clip = ClipTeacher(clip_model, None, model_name=cfg.clip.model, pretrained="random", weights_id="-")
        _measure(est, "clip", clip.encode_images, batch[: min(len(batch), cfg.clip.batch_size)])
    return est


def _size(n: float) -> str:
    k = min(4, int(math.log10(max(n, 1))) // 3)    # B, KB, MB, GB, TB
    return f"{n / 1000 ** k:.1f} {' KMGT'[k]}B" if k else f"{int(n)} B"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def format_estimate(est: CacheEstimate, cfg: Config, shard_rows: int) -> str:
    lines = [f"cache plan: {est.images:,} images x {est.views} views = {est.images * est.views:,} cached views, "
             f"{est.num_classes} classes, {math.ceil(est.images / shard_rows)} shards of {shard_rows} rows"]
    for kind, arrays in est.entries.items():
        parts = ", ".join(f"{name} {n} B" for name, n in arrays.items())
        lines.append(f"  {kind:<11} {sum(arrays.values()):>6} B/view ({parts})  {_size(est.entry_bytes(kind))}")
    lines.append(f"  total       {_size(est.total_bytes)} on disk (memory-mapped: a trial copies only its batches)")
    if est.seconds:
        r = est.rates
        lines.append(f"build time on this machine ({est.device}, measured):")
        decode = est.seconds["decode"]
        lines.append(f"  decode + {est.views} crops  {r['decode_images_per_s']:.1f} images/s per process -> "
                     f"{_duration(decode)} in one, {_duration(decode / max(1, est.workers))} in "
                     f"data.num_workers={est.workers}")
        lines.append(f"  teacher {cfg.teacher.arch:<10} {r['teacher_views_per_s']:.1f} views/s -> "
                     f"{_duration(est.seconds['teacher'])}")
        if "clip" in est.seconds:
            lines.append(f"  CLIP {cfg.clip.model:<13} {r['clip_views_per_s']:.1f} views/s -> "
                         f"{_duration(est.seconds['clip'])}")
        lines.append(f"  estimate    {_duration(est.estimate_s)} (decoding overlaps the models; the slower side "
                     "decides)")
    return "\n".join(lines)
