"""Building the caches a config reads, before training, so a trial never computes teacher outputs itself: `plan_caches`
(which entries a config reads; existing ones are checked, missing ones become jobs: cheap) and `build_entry` (one
missing entry: the expensive part), both in-process for `richkd cache`, or planned by a sweep's driver with the
rows computed on Ray workers (richkd.cache.row_blocks, docs/architecture.md#caching).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from richkd.cache.entries import CacheEntry, ensure_cache_writable, entry_exists, read_entry, write_entry
from richkd.cache.identity import cached_rows, clip_text_entry, split_entries
from richkd.cache.photo_build import build_photo_entries
from richkd.clip import load_clip, load_prompt_set
from richkd.config import Config
from richkd.data import SplitDataset, build_data, make_loader, normalize
from richkd.device import resolve_device
from richkd.io import progress_bar
from richkd.models import load_teacher

log = logging.getLogger(__name__)

ROW_KINDS = ("teacher", "clip-image")   # one output row per (view, dataset row): can be computed in row blocks
TEXT_KIND = "clip-text"                 # one row per class: small, always built whole
PHOTO_KIND = "photo"                    # a photo dataset's sharded entries: one resumable pass builds both


@dataclass(frozen=True)
class EntryJob:
    """One missing cache entry and everything needed to compute it elsewhere (plain, picklable values)."""
    kind: str                  # teacher | clip-image | clip-text | photo
    entry: CacheEntry
    cache_dir: str
    config: dict               # the Config as a dict: plain dicts are what crosses process boundaries
    split: Optional[str] = None
    n_rows: int = 0            # dataset rows (per view) of a row kind; 0 for the text classifier
    batch_size: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.entry.key}"

    @property
    def path(self) -> Path:
        return self.entry.path(self.cache_dir)

@dataclass
class EntryPlan:
    """Every entry folder a config reads (in a fixed order) and the jobs that build the missing ones."""
    paths: list = field(default_factory=list)
    missing: list = field(default_factory=list)


def plan_caches(cfg: Config, splits: tuple[str, ...] = ("train",), data=None) -> EntryPlan:
    """Which entries cfg reads (split_entries, and the text classifier with CLIP): existing ones are checked against
    their manifest (CacheError), missing ones become EntryJobs; the cache folder's writability is checked first."""
    plan = EntryPlan()
    if not cfg.loss.uses_teacher:
        return plan
    data = data if data is not None else build_data(cfg.data)
    cache_dir = Path(cfg.teaching.cache_dir)
    as_dict = cfg.to_dict()
    for split in splits:
        n = len(cached_rows(data, split))
        entries = split_entries(cfg, data, split)
        missing = []
        for kind, entry in entries.items():
            plan.paths.append(entry.path(cache_dir))
            if entry_exists(entry, cache_dir):
                read_entry(entry, cache_dir, n, cfg.teaching.views)
            else:
                missing.append(kind)
        if missing and data.train_clean.decodes_per_batch:   # one resumable pass builds both
            plan.missing.append(EntryJob(PHOTO_KIND, entries["teacher"], str(cache_dir), as_dict, split, n))
            continue
        for kind in missing:
            batch_size = cfg.data.eval_batch_size if kind == "teacher" else cfg.clip.batch_size
            plan.missing.append(EntryJob(kind, entries[kind], str(cache_dir), as_dict, split, n, batch_size))
    if cfg.uses_clip:
        entry = clip_text_entry(cfg, load_prompt_set(cfg.clip.prompt_set).templates, list(data.class_names))
        plan.paths.append(entry.path(cache_dir))
        if not entry_exists(entry, cache_dir):
            plan.missing.append(EntryJob(TEXT_KIND, entry, str(cache_dir), as_dict))
    if plan.missing:
        ensure_cache_writable(cache_dir)
    return plan


# ----- computing ------------------------------------------------------------------------------------------

def rows_dataset(data, split: str, start: int = 0, stop: Optional[int] = None) -> SplitDataset:
    """The split's cached rows [start, stop) as an un-augmented dataset, in cache order."""
    clean = data.train_clean if split == "train" else data.test_clean
    return SplitDataset(clean.source, cached_rows(data, split)[start:stop], data.image_size, False, split)


def entry_outputs(job: EntryJob, cfg: Config, data, dataset: SplitDataset, dev, progress: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, manifest extras) of a row kind over `dataset`'s rows, every cached view: what the entry holds for
    those rows. Row v * n + i holds view v of dataset row i; `rows` holds the dataset rows (once)."""
    if job.kind == "teacher":
        model, sha = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
        model.to(dev)
        log.info("caching teacher %s (%s) outputs on %s/%s", cfg.teacher.arch, sha[:12], cfg.data.dataset, job.split)

        run = lambda images: model(normalize(images, data.mean, data.std))._asdict()   # noqa: E731
        extra = {}
    else:   # clip-image
        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=dev)
        log.info("caching CLIP %s image features on %s/%s", cfg.clip.model, cfg.data.dataset, job.split)
        run = lambda images: {"feat": clip.encode_images(images)}   # noqa: E731
        extra = {"preprocess_id": clip.preprocess_id, "embed_dim": clip.embed_dim}
    n_views, seed = cfg.teaching.views, cfg.teaching.view_seed
    views = [dataset] if n_views == 1 else [dataset.with_views(n_views, seed, fixed_view=v) for v in range(n_views)]
    chunks: dict[str, list[np.ndarray]] = {}
    for v, shown in enumerate(views):      # in order: output row k of a view is dataset item k
        loader = make_loader(shown, batch_size=job.batch_size, shuffle=False, seed=0)
        desc = f"cache {job.kind} {job.split}" + (f" view {v + 1}/{n_views}" if n_views > 1 else "")
        bar = progress_bar(len(loader), desc, disable=not progress)
        with torch.inference_mode():
            for batch in loader:
                for name, value in run(batch.to(dev).image).items():
                    chunks.setdefault(name, []).append(value.float().cpu().numpy())
                bar.update(1)
        bar.close()
    arrays = {name: np.concatenate(parts).astype(np.float16) for name, parts in chunks.items()}
    return {**arrays, "rows": dataset.indices.numpy()}, extra


def _text_classifier(cfg: Config, class_names, cache_dir: Path, dev) -> CacheEntry:
    """The text classifier's entry, built now if it is missing."""
    prompt_set = load_prompt_set(cfg.clip.prompt_set)
    entry = clip_text_entry(cfg, prompt_set.templates, list(class_names))
    if not entry_exists(entry, cache_dir):
        ensure_cache_writable(cache_dir)
        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=dev)
        classifier = clip.encode_text_classifier(list(class_names), prompt_set.templates,
                                                 clean=cfg.clip.clean_class_names)
        write_entry(entry, cache_dir, {"classifier": classifier.float().cpu().numpy()},
                    extra={"prompt_set": prompt_set.name, "templates": list(prompt_set.templates),
                           "class_names": list(class_names), "logit_scale": clip.logit_scale})
    return entry


def build_entry(job: EntryJob, device=None, progress: bool = False, data=None) -> Path:
    """Compute a missing entry whole, in this process, and write it."""
    cfg = Config.from_dict(job.config)
    data = data if data is not None else build_data(cfg.data)
    dev = resolve_device(device or cfg.device)
    if job.kind == TEXT_KIND:
        return _text_classifier(cfg, data.class_names, Path(job.cache_dir), dev).path(job.cache_dir)
    if job.kind == PHOTO_KIND:
        build_photo_entries(cfg, data, job.split, Path(job.cache_dir), dev, progress)
        return job.path
    arrays, extra = entry_outputs(job, cfg, data, rows_dataset(data, job.split), dev, progress)
    return write_entry(job.entry, job.cache_dir, arrays, extra=extra or None)


def prepare_caches(cfg: Config, progress: bool = False, device: Optional[str] = None,
                   splits: tuple[str, ...] = ("train",)) -> list[Path]:
    """Build every missing cache entry the config reads (plan_caches); return the entry folders. Cheap when
    everything exists: only manifests are checked."""
    if not cfg.loss.uses_teacher:
        return []
    data = build_data(cfg.data)
    plan = plan_caches(cfg, splits, data=data)
    for job in plan.missing:
        build_entry(job, device=device, progress=progress, data=data)
    return plan.paths


def class_embeddings(cfg: Config, class_names: list[str], device=None) -> torch.Tensor:
    """(C, D) fp32 text classifier for cfg's prompt set, from the cache (built if missing)."""
    cache_dir = Path(cfg.teaching.cache_dir)
    entry = _text_classifier(cfg, class_names, cache_dir, device or "cpu")
    arr = read_entry(entry, cache_dir, len(class_names))["classifier"]
    return torch.from_numpy(np.array(arr, dtype=np.float32))
