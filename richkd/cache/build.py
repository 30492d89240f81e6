"""Building the caches a config reads: run the frozen teacher and CLIP once over the rows, write the entries.

`prepare_caches` runs before training (a sweep's driver runs it before any trial starts), builds only what is
missing and checks what exists against its manifest, so a trial never computes teacher outputs itself.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from richkd.cache.entries import CacheEntry, CacheError, ensure_cache_writable, entry_exists, read_entry, write_entry
from richkd.cache.identity import cached_rows, clip_image_entry, clip_text_entry, dataset_identity, teacher_entry
from richkd.config import Config

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


def _batched_outputs(dataset, fn: Callable[["torch.Tensor"], dict], batch_size: int, device,
                     progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Run fn over a dataset in order (output row k = dataset item k) and stack numpy outputs."""
    import torch

    from richkd.data import make_loader

    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    chunks: dict[str, list[np.ndarray]] = {}
    expected = 0
    bar = _progress(len(loader), desc) if progress else None
    with torch.inference_mode():
        for batch in loader:
            if not torch.equal(batch.index, dataset.indices[expected:expected + len(batch)]):
                raise CacheError("cache building must visit the rows in order (internal error)")
            expected += len(batch)
            for name, value in fn(batch.image.to(device)).items():
                chunks.setdefault(name, []).append(value.float().cpu().numpy())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _outputs_over_views(cfg: Config, dataset, fn, batch_size: int, device, progress: bool,
                        desc: str) -> dict[str, np.ndarray]:
    """Outputs for every cached view; row v * N + i holds view v of dataset row i (view 0 = clean)."""
    if cfg.teaching.views == 1:
        return _batched_outputs(dataset, fn, batch_size, device, progress, desc)
    per_view = [_batched_outputs(dataset.with_views(cfg.teaching.views, cfg.teaching.view_seed, fixed_view=v), fn,
                                 batch_size, device, progress, f"{desc} view {v + 1}/{cfg.teaching.views}")
                for v in range(cfg.teaching.views)]
    return {name: np.concatenate([p[name] for p in per_view]) for name in per_view[0]}


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False)


def prepare_caches(cfg: Config, progress: bool = False, device: Optional[str] = None,
                   splits: tuple[str, ...] = ("train",)) -> list[Path]:
    """Build every missing cache entry the config reads in cached teaching; return the entry folders.

    A no-op for supervised runs and online teaching (except the small text classifier, which online CLIP
    teaching also reads). Cheap when everything exists: only manifests are checked.
    """
    if cfg.loss.method == "supervised":
        return []
    from richkd.data import SplitDataset, build_data
    from richkd.device import resolve_device

    data = build_data(cfg.data)
    dev = resolve_device(device or cfg.device)
    cache_dir = Path(cfg.teaching.cache_dir)
    built: list[Path] = []
    sources = {"train": data.train_clean, "test": data.test_clean}
    for split in splits:
        if cfg.data.dataset == "imagenet":  # sharded multi-view caches (richkd/cache/views_imagenet.py)
            from richkd.cache.views_imagenet import ensure_photo_caches

            if cfg.teaching.mode == "cached":
                built += ensure_photo_caches(cfg, data, split, cache_dir, dev, progress)
            continue
        rows = torch_rows(cached_rows(data, split))
        dataset = SplitDataset(sources[split].source, rows, data.image_size, False, split)
        ident = dataset_identity(data, split)
        if cfg.teaching.mode == "cached":
            built.append(_ensure_teacher(cfg, data, dataset, ident, split, cache_dir, dev, progress))
            if cfg.uses_clip:
                built.append(_ensure_clip_image(cfg, dataset, ident, split, cache_dir, dev, progress))
    if cfg.uses_clip:
        built.append(_ensure_clip_text(cfg, data.class_names, cache_dir, dev))
    return built


def _ensure_teacher(cfg, data, dataset, ident, split, cache_dir, dev, progress) -> Path:
    from richkd.data import normalize
    from richkd.models import load_teacher

    entry = teacher_entry(cfg, ident, split, cache_dir)
    if entry_exists(entry, cache_dir):
        read_entry(entry, cache_dir, expect_rows={"logits": len(dataset) * cfg.teaching.views})
        return entry.path(cache_dir)
    ensure_cache_writable(cache_dir)
    model, sha = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
    model.to(dev)
    log.info("caching teacher %s (%s) outputs on %s/%s", cfg.teacher.arch, sha[:12], cfg.data.dataset, split)

    def run(images):
        out = model(normalize(images, data.mean, data.std))
        return {"logits": out.logits.half(), "feat": out.feat.half()}

    arrays = _outputs_over_views(cfg, dataset, run, cfg.data.eval_batch_size, dev, progress, f"teacher {split}")
    arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
    return write_entry(entry, cache_dir, {**arrays, "rows": dataset.indices.numpy()})


def _ensure_clip_image(cfg, dataset, ident, split, cache_dir, dev, progress) -> Path:
    from richkd.clip import load_clip

    entry = clip_image_entry(cfg, ident, split, cache_dir)
    if entry_exists(entry, cache_dir):
        read_entry(entry, cache_dir, expect_rows={"feat": len(dataset) * cfg.teaching.views})
        return entry.path(cache_dir)
    ensure_cache_writable(cache_dir)
    clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=dev)
    log.info("caching CLIP %s image features on %s/%s", cfg.clip.model, cfg.data.dataset, split)
    arrays = _outputs_over_views(cfg, dataset, lambda im: {"feat": clip.encode_images(im)}, cfg.clip.batch_size,
                                 dev, progress, f"CLIP {split}")
    return write_entry(entry, cache_dir, {"feat": arrays["feat"].astype(np.float16), "rows": dataset.indices.numpy()},
                       extra={"preprocess_id": clip.preprocess_id, "embed_dim": clip.embed_dim})


def torch_rows(rows: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


def class_embeddings(cfg: Config, class_names: list[str], device=None) -> "torch.Tensor":
    """(C, D) fp32 text classifier for cfg's prompt set, from the cache (built if missing)."""
    import torch

    cache_dir = Path(cfg.teaching.cache_dir)
    path = _ensure_clip_text(cfg, class_names, cache_dir, device or "cpu")
    entry = CacheEntry("clip-text", json.loads((path / "manifest.json").read_text())["fields"])
    arr = read_entry(entry, cache_dir, expect_rows={"classifier": len(class_names)})["classifier"]
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def _ensure_clip_text(cfg, class_names, cache_dir, dev) -> Path:
    from richkd.clip import load_clip, load_prompt_set

    prompt_set = load_prompt_set(cfg.clip.prompt_set)
    entry = clip_text_entry(cfg, prompt_set.templates, list(class_names), cache_dir)
    if entry_exists(entry, cache_dir):
        return entry.path(cache_dir)
    ensure_cache_writable(cache_dir)
    clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=dev)
    classifier = clip.encode_text_classifier(list(class_names), prompt_set.templates, clean=cfg.clip.clean_class_names)
    return write_entry(entry, cache_dir, {"classifier": classifier.float().cpu().numpy()},
                       extra={"prompt_set": prompt_set.name, "templates": list(prompt_set.templates),
                              "class_names": list(class_names), "logit_scale": clip.logit_scale})


