"""Building the caches a config reads: run the frozen teacher and CLIP once over the rows, write the entries.

`prepare_caches` runs before training, builds only what is missing and checks what exists against its manifest, so
a trial never computes teacher outputs itself. It is split in two steps that a sweep also uses on its own:
`plan_caches` (which entries a config reads, which exist and are checked, which are missing: cheap) and
`entry_outputs` (one kind's arrays over some rows: the expensive part). `richkd cache` runs both in-process; a
sweep's driver plans and lets Ray workers compute row shards (richkd.cache.shards) that are assembled into the
same entry (docs/architecture.md#caching).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from richkd.cache.entries import CacheEntry, CacheError, ensure_cache_writable, entry_exists, read_entry, write_entry
from richkd.cache.identity import cached_rows, clip_image_entry, clip_text_entry, dataset_identity, teacher_entry
from richkd.config import Config
from richkd.io import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

ROW_KINDS = ("teacher", "clip-image")   # one output row per (view, dataset row): can be computed in row shards
TEXT_KIND = "clip-text"                 # one row per class: small, always built whole
PHOTO_KIND = "photo"                    # a photo dataset's sharded multi-view entries (richkd.cache.views_imagenet),
                                        # built whole by their own resumable builder


@dataclass(frozen=True)
class EntryJob:
    """One missing cache entry and everything needed to compute it elsewhere (plain, picklable values)."""
    kind: str                  # teacher | clip-image | clip-text
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

    @property
    def views(self) -> int:
        return int(self.config["teaching"]["views"])


@dataclass
class EntryPlan:
    """Every entry folder a config reads (in a fixed order) and the jobs that build the missing ones."""
    paths: list = field(default_factory=list)
    missing: list = field(default_factory=list)


# ----- planning -----------------------------------------------------------------------------------------

def plan_caches(cfg: Config, splits: tuple[str, ...] = ("train",), data=None) -> EntryPlan:
    """Which entries cfg reads; existing ones are checked against their manifest (a stale or damaged entry is a
    CacheError here), missing ones become EntryJobs. Fails before any teacher runs if the cache folder could not
    take the missing entries.

    cached teaching reads the teacher's and CLIP's image outputs, official teaching CLIP's only (its teacher runs
    online), online teaching neither; all read the small text classifier when CLIP is used. Both the in-process
    build (prepare_caches) and a sweep's Ray build follow this plan (docs/method.md#teaching-protocol)."""
    plan = EntryPlan()
    if not cfg.loss.uses_teacher:
        return plan
    from richkd.data import build_data

    data = data if data is not None else build_data(cfg.data)
    cache_dir = Path(cfg.teaching.cache_dir)
    as_dict = cfg.to_dict()
    mode = cfg.teaching.mode
    for split in splits if mode in ("cached", "official") else ():
        if cfg.data.dataset == "imagenet":   # config refuses official teaching here: photo entries hold both
            _plan_photo(plan, cfg, data, split, cache_dir, as_dict)
            continue
        n = len(cached_rows(data, split))
        ident = dataset_identity(data, split)
        kinds = []
        if mode == "cached":
            kinds.append(("teacher", teacher_entry(cfg, ident, split, cache_dir), "logits", cfg.data.eval_batch_size))
        if cfg.uses_clip:
            kinds.append(("clip-image", clip_image_entry(cfg, ident, split, cache_dir), "feat", cfg.clip.batch_size))
        for kind, entry, rows_array, batch_size in kinds:
            plan.paths.append(entry.path(cache_dir))
            if entry_exists(entry, cache_dir):
                read_entry(entry, cache_dir, expect_rows={rows_array: n * cfg.teaching.views})
            else:
                plan.missing.append(EntryJob(kind, entry, str(cache_dir), as_dict, split, n, batch_size))
    if cfg.uses_clip:
        entry = _text_entry(cfg, data.class_names, cache_dir)
        plan.paths.append(entry.path(cache_dir))
        if not entry_exists(entry, cache_dir):
            plan.missing.append(EntryJob(TEXT_KIND, entry, str(cache_dir), as_dict))
    if plan.missing:
        ensure_cache_writable(cache_dir)
    return plan


def _plan_photo(plan: EntryPlan, cfg: Config, data, split: str, cache_dir: Path, as_dict: dict) -> None:
    """A photo dataset's entries: existing ones checked, a missing (or partly built) one is one job for both."""
    from richkd.cache.view_store import open_entry
    from richkd.cache.views_imagenet import photo_entries

    n = len(cached_rows(data, split))
    entries = photo_entries(cfg, data, split, cache_dir)
    plan.paths.extend(e.path(cache_dir) for e in entries.values())
    for entry in entries.values():
        if entry_exists(entry, cache_dir):
            open_entry(entry, cache_dir, n_rows=n, views=cfg.teaching.views)     # checks the manifest
    if not all(entry_exists(e, cache_dir) for e in entries.values()):
        plan.missing.append(EntryJob(PHOTO_KIND, entries["teacher"], str(cache_dir), as_dict, split, n))


def _text_entry(cfg: Config, class_names, cache_dir) -> CacheEntry:
    from richkd.clip import load_prompt_set

    return clip_text_entry(cfg, load_prompt_set(cfg.clip.prompt_set).templates, list(class_names), cache_dir)


# ----- computing ------------------------------------------------------------------------------------------

def rows_dataset(cfg: Config, data, split: str, start: int = 0, stop: Optional[int] = None):
    """The split's cached rows [start, stop) as an un-augmented dataset, in cache order."""
    from richkd.data import SplitDataset

    sources = {"train": data.train_clean, "test": data.test_clean}
    rows = torch_rows(cached_rows(data, split)[start:stop])
    return SplitDataset(sources[split].source, rows, data.image_size, False, split)


def entry_outputs(job: EntryJob, cfg: Config, data, dataset, dev, progress: bool = False
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, manifest extras) of a row kind over `dataset`'s rows, every cached view: what the entry holds for
    those rows. Row v * n + i holds view v of dataset row i; `rows` holds the dataset rows (once)."""
    if job.kind == "teacher":
        from richkd.data import normalize
        from richkd.models import load_teacher

        model, sha = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
        model.to(dev)
        log.info("caching teacher %s (%s) outputs on %s/%s", cfg.teacher.arch, sha[:12], cfg.data.dataset, job.split)

        def run(images):
            out = model(normalize(images, data.mean, data.std))
            return {"logits": out.logits.half(), "feat": out.feat.half()}

        arrays = _outputs_over_views(cfg, dataset, run, job.batch_size, dev, progress, f"teacher {job.split}")
        arrays = {k: v.astype(np.float16) for k, v in arrays.items()}
        return {**arrays, "rows": dataset.indices.numpy()}, {}
    if job.kind == "clip-image":
        from richkd.clip import load_clip

        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=dev)
        log.info("caching CLIP %s image features on %s/%s", cfg.clip.model, cfg.data.dataset, job.split)
        arrays = _outputs_over_views(cfg, dataset, lambda im: {"feat": clip.encode_images(im)}, job.batch_size,
                                     dev, progress, f"CLIP {job.split}")
        return ({"feat": arrays["feat"].astype(np.float16), "rows": dataset.indices.numpy()},
                {"preprocess_id": clip.preprocess_id, "embed_dim": clip.embed_dim})
    raise CacheError(f"{job.kind} entries are not computed by rows (internal error)")


def build_entry(job: EntryJob, device=None, progress: bool = False, data=None) -> Path:
    """Compute a missing entry whole, in this process, and write it (the atomic manifest writer)."""
    from richkd.data import build_data

    cfg = Config.from_dict(job.config)
    data = data if data is not None else build_data(cfg.data)
    if job.kind == TEXT_KIND:
        return _ensure_clip_text(cfg, data.class_names, Path(job.cache_dir), _device(cfg, device))
    if job.kind == PHOTO_KIND:
        from richkd.cache.views_imagenet import ensure_photo_caches

        ensure_photo_caches(cfg, data, job.split, Path(job.cache_dir), _device(cfg, device), progress)
        return job.path
    dataset = rows_dataset(cfg, data, job.split)
    arrays, extra = entry_outputs(job, cfg, data, dataset, _device(cfg, device), progress)
    return write_entry(job.entry, job.cache_dir, arrays, extra=extra or None)


def _device(cfg: Config, device):
    from richkd.device import resolve_device

    return resolve_device(device or cfg.device)


def _batched_outputs(dataset, fn: Callable[["torch.Tensor"], dict], batch_size: int, device,
                     progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Run fn over a dataset in order (output row k = dataset item k) and stack numpy outputs."""
    import torch

    from richkd.data import make_loader

    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    chunks: dict[str, list[np.ndarray]] = {}
    expected = 0
    bar = progress_bar(len(loader), f"cache {desc}") if progress else None
    with torch.inference_mode():
        for batch in loader:
            if not torch.equal(batch.index, dataset.indices[expected:expected + len(batch)]):
                raise CacheError("cache building must visit the rows in order (internal error)")
            expected += len(batch)
            for name, value in fn(batch.to(device).image).items():
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


# ----- in-process building ----------------------------------------------------------------------------------

def prepare_caches(cfg: Config, progress: bool = False, device: Optional[str] = None,
                   splits: tuple[str, ...] = ("train",)) -> list[Path]:
    """Build every missing cache entry the config reads; return the entry folders.

    cached teaching reads the teacher's and CLIP's image outputs, official teaching CLIP's only (its teacher
    runs online), online teaching neither; all read the small text classifier when CLIP is used. A no-op for
    supervised runs. Cheap when everything exists: only manifests are checked.
    """
    if not cfg.loss.uses_teacher:
        return []
    from richkd.data import build_data

    data = build_data(cfg.data)
    plan = plan_caches(cfg, splits, data=data)
    for job in plan.missing:
        build_entry(job, device=device, progress=progress, data=data)
    return plan.paths


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
