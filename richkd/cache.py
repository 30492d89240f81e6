"""Content-addressed caches of frozen-teacher outputs: manifest per entry, atomic writes, memory-mapped reads.

Why caching works for RichKD (DESIGN.md §5): both teachers are frozen and every searched knob (alpha,
lambda, T, scale, loss weights, prompt set) acts on teacher *outputs*. So the conventional teacher's logits
and pooled features, CLIP's image features and CLIP's class (text) embeddings are computed once and every
trial reads them. Each entry is a folder named by a hash of everything that determines its content; its
manifest repeats those fields and a mismatch is an error, never a silent reuse.

Layout under `teaching.cache_dir`:
    teacher-<key>/      manifest.json  logits.npy (N, C) fp16  feat.npy (N, d_T) fp16
    clip-image-<key>/   manifest.json  feat.npy (N, D) fp16, L2-normalised
    clip-text-<key>/    manifest.json  classifier.npy (C, D) fp32, L2-normalised
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np

from richkd.config import ClipConfig, Config
from richkd.io import (OutputError, atomic_write_text, ensure_writable, output_error, sha256_file,
                       write_array_folder)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
# Dotted-key prefixes whose values change what a cache holds; a sweep samples them only from finite choices
# so the driver can build every cache before trials start.
CACHE_AFFECTING_PREFIXES = ("data.", "teacher.", "clip.", "teaching.")
# Keys under those prefixes that only change how rows reach the model, never what a cache holds: left out of
# cache signatures so adding or sampling them does not re-key (or re-build) the caches of a sweep.
CACHE_NEUTRAL_KEYS = ("data.resident",)
CLEAN_VIEW = "clean"  # the un-augmented image: the official code's cached behaviour (paper.md §1.6)
# Bumped whenever richkd.clip's image preprocessing changes, so old CLIP image caches are not reused.
CLIP_PREPROCESS_VERSION = "torch-bicubic-antialias-v1"


class CacheError(ValueError):
    """A cache is missing, stale, mismatched or damaged; the message names the folder and the fix."""


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    fields: dict

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, **self.fields}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def path(self, cache_dir: str | os.PathLike) -> Path:
        return Path(cache_dir) / f"{self.kind}-{self.key}"


# ----- identities of inputs -----------------------------------------------------------------------

def file_sha256_memo(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """sha256 of a (possibly large) file, memoised by (path, size, mtime) so trials don't re-hash CLIP weights."""
    p = Path(path).resolve()
    st = p.stat()
    memo_file = Path(memo_dir) / "sha256-memo.json"
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    memo: dict = {}
    if memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    if ident in memo:
        return memo[ident]
    digest = sha256_file(p)
    memo[ident] = digest
    try:
        atomic_write_text(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    except (OSError, OutputError):  # a read-only cache folder still works, just without the memo
        pass
    return digest


def clip_weights_id(clip: ClipConfig, memo_dir: str | os.PathLike) -> str:
    """What identifies CLIP's weights: the file's sha256 for local files, else the open_clip tag."""
    from richkd.clip import parse_pretrained  # lazily: importing richkd.clip imports torch

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


def _names_hash(names: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def view_id(cfg: Config) -> str:
    """What the cached rows show: the clean image, or V seeded augmented views (richkd.data.views)."""
    if cfg.teaching.views == 1:
        return CLEAN_VIEW
    from richkd.data.views import ViewSpec

    return ViewSpec(cfg.teaching.views, cfg.teaching.view_seed).cache_id


def teacher_entry(cfg: Config, dataset_id: dict, split: str, memo_dir: str | os.PathLike) -> CacheEntry:
    ckpt = Path(cfg.teacher.checkpoint or "").expanduser()
    if not ckpt.is_file():
        raise CacheError(f"teacher.checkpoint: file {str(ckpt)!r} does not exist")
    return CacheEntry("teacher", {
        "arch": cfg.teacher.arch, "checkpoint_sha256": file_sha256_memo(ckpt, memo_dir),
        **dataset_id, "split": split, "view": view_id(cfg),
    })


def clip_image_entry(cfg: Config, dataset_id: dict, split: str, memo_dir: str | os.PathLike) -> CacheEntry:
    return CacheEntry("clip-image", {
        "model": cfg.clip.model, "weights": clip_weights_id(cfg.clip, memo_dir),
        "preprocess": CLIP_PREPROCESS_VERSION,
        **dataset_id, "split": split, "view": view_id(cfg),
    })


def clip_text_entry(cfg: Config, templates: tuple[str, ...], class_names: list[str],
                    memo_dir: str | os.PathLike) -> CacheEntry:
    return CacheEntry("clip-text", {
        "model": cfg.clip.model, "weights": clip_weights_id(cfg.clip, memo_dir),
        "templates_sha": _names_hash(templates), "class_names_sha": _names_hash(class_names),
        "clean_class_names": cfg.clip.clean_class_names,
    })


def cached_rows(data, split: str) -> np.ndarray:
    """Sorted rows of the underlying split whose teacher outputs a run reads: its train and validation rows.

    A run on a subset (data.max_train_samples) caches just that subset instead of the whole split; a full run
    covers every row. Different subsets give different (small) cache entries.
    """
    if split == "train":
        return np.union1d(data.train.indices.numpy(), data.val.indices.numpy()).astype(np.int64)
    return np.arange(len(data.test_clean), dtype=np.int64)


def dataset_identity(data, split: str) -> dict:
    """Fields of the data that determine teacher outputs: the content fingerprint, not the folder it is in."""
    total = len(data.train_clean if split == "train" else data.test_clean)
    rows = cached_rows(data, split)
    subset = "all" if len(rows) == total else hashlib.sha256(rows.tobytes()).hexdigest()[:16]
    return {"dataset": data.name, "fingerprint": data.fingerprint(), "image_size": data.image_size, "n": total,
            "rows": subset, "n_rows": int(len(rows)), "num_classes": data.num_classes}


# ----- reading and writing entries ----------------------------------------------------------------

def write_entry(entry: CacheEntry, cache_dir: str | os.PathLike, arrays: dict[str, np.ndarray],
                extra: Optional[dict] = None) -> Path:
    """Write arrays + manifest into a temp folder, then rename it into place (atomic for readers)."""
    final = entry.path(cache_dir)
    manifest = {"format_version": CACHE_FORMAT_VERSION, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
    try:
        return write_array_folder(final, arrays, manifest)
    except OSError as exc:
        raise _write_error(exc, final) from None


def _write_error(exc: OSError, final: Path) -> Exception:
    """A full disk or read-only cache folder as a CacheError naming the folder and the fix (else unchanged)."""
    converted = output_error(exc, final.parent, "teaching.cache_dir")
    if converted is exc:
        return exc
    return CacheError(f"{converted}; or set teaching.cache_dir to a writable folder with room for the cache")


def ensure_cache_writable(cache_dir: str | os.PathLike) -> None:
    """Fail before running a teacher over the dataset if its outputs could not be stored."""
    try:
        ensure_writable(cache_dir, "teaching.cache_dir")
    except OutputError as exc:
        raise CacheError(f"{exc}; or set teaching.cache_dir to a writable folder") from None


def read_entry(entry: CacheEntry, cache_dir: str | os.PathLike,
               expect_rows: Optional[dict[str, int]] = None) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of an entry after checking its manifest; several processes share the pages."""
    folder = entry.path(cache_dir)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        raise CacheError(f"{entry.kind} cache {folder} is missing; build it with "
                         f"`richkd cache --config YOUR_CONFIG.yaml` (a sweep builds it before trials start)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        raise CacheError(f"{manifest_file} is not valid JSON; delete {folder} and rebuild the cache") from None
    stored = json.loads(json.dumps(manifest.get("fields"), default=str))
    wanted = json.loads(json.dumps(entry.fields, default=str))
    if manifest.get("format_version") != CACHE_FORMAT_VERSION or stored != wanted:
        diff = sorted(k for k in set(stored or {}) | set(wanted) if (stored or {}).get(k) != wanted.get(k))
        raise CacheError(f"cache {folder} was built for different inputs (differs in: {', '.join(diff) or 'format'});"
                         f" delete the folder and rebuild with `richkd cache`")
    arrays = {}
    for name, meta in manifest["arrays"].items():
        try:
            arr = np.load(folder / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty (0-byte) file
            raise CacheError(f"cache file {folder / (name + '.npy')} is unreadable or truncated ({exc}); "
                             f"delete {folder} and rebuild with `richkd cache`") from None
        if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
            raise CacheError(f"cache file {folder / (name + '.npy')} has shape {list(arr.shape)} {arr.dtype}, "
                             f"manifest says {meta['shape']} {meta['dtype']}; delete {folder} and rebuild")
        if expect_rows and name in expect_rows and arr.shape[0] != expect_rows[name]:
            raise CacheError(f"cache {folder} has {arr.shape[0]} rows but the dataset has {expect_rows[name]}; "
                             f"it was built for other data: delete it and rebuild")
        arrays[name] = arr
    return arrays


def entry_exists(entry: CacheEntry, cache_dir: str | os.PathLike) -> bool:
    return (entry.path(cache_dir) / "manifest.json").is_file()


# ----- building -----------------------------------------------------------------------------------

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


def describe(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per cache entry (kind, key, size in MB, creation time) for `richkd cache --list`."""
    rows = []
    for folder in sorted(Path(cache_dir).glob("*-*")):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        meta = json.loads(manifest.read_text())
        size = sum(f.stat().st_size for f in folder.iterdir())
        rows.append({"kind": meta["kind"], "key": meta["key"], "mb": round(size / 2**20, 2),
                     "created": meta.get("created"), "path": str(folder)})
    return rows
