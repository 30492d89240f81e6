"""Cache entries on disk, as docs/architecture.md#caching describes: a folder per entry named by a hash of its inputs,
a manifest that repeats them (a mismatch is an error, never a silent reuse), atomic writes and memory-mapped reads.
Two layouts share the manifest checks and one reader: flat (NAME.npy per array) and sharded (written shard by shard
so a killed build resumes, docs/architecture.md#imagenet-scale).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from richkd.io import OutputError, atomic_write_text, ensure_writable, output_error, write_array_folder

CACHE_FORMAT_VERSION = 1
SHARD_FORMAT = "sharded-v1"
SHARD_ROWS_ENV = "RICHKD_SHARD_ROWS"
DEFAULT_SHARD_ROWS = 4096      # ImageNet, V = 10: ~100 MB of fp16 logits per shard; 313 shards for 1.28M images


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


def entry_exists(entry: CacheEntry, cache_dir: str | os.PathLike) -> bool:
    return (entry.path(cache_dir) / "manifest.json").is_file()


def json_plain(obj) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _manifest(entry: CacheEntry, **extra) -> dict:
    return {"format_version": CACHE_FORMAT_VERSION, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}


@contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A full disk or read-only cache folder as one CacheError naming the folder and the fix."""
    try:
        yield
    except OSError as exc:
        converted = output_error(exc, folder.parent, "teaching.cache_dir")
        if converted is exc:
            raise
        raise CacheError(f"{converted}; or set teaching.cache_dir to a writable folder with room for the cache") \
            from None


def ensure_cache_writable(cache_dir: str | os.PathLike) -> None:
    """Fail before running a teacher over the dataset if its outputs could not be stored."""
    try:
        ensure_writable(cache_dir, "teaching.cache_dir")
    except OutputError as exc:
        raise CacheError(f"{exc}; or set teaching.cache_dir to a writable folder") from None


# ----- writing ----------------------------------------------------------------------------------------------

def write_entry(entry: CacheEntry, cache_dir: str | os.PathLike, arrays: dict[str, np.ndarray],
                extra: Optional[dict] = None) -> Path:
    """A flat entry: arrays + manifest into a temp folder, then renamed into place (atomic for readers)."""
    final = entry.path(cache_dir)
    with _writing(final):
        return write_array_folder(final, arrays, _manifest(entry, **(extra or {})))


def default_shard_rows() -> int:
    """Rows per shard: $RICHKD_SHARD_ROWS, else DEFAULT_SHARD_ROWS (the layout, never the content)."""
    raw = os.environ.get(SHARD_ROWS_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_SHARD_ROWS
    except ValueError:
        raise CacheError(f"${SHARD_ROWS_ENV}={raw!r} is not a positive integer") from None


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def begin_entry(entry: CacheEntry, cache_dir: str | os.PathLike, rows: np.ndarray, views: int,
                arrays: dict[str, tuple[tuple[int, ...], str]], shard_rows: int) -> Path:
    """Start (or continue) a sharded entry; arrays maps name -> (per-view shape, dtype). Returns the folder."""
    folder = entry.path(cache_dir)
    layout = json_plain({"format": SHARD_FORMAT, "kind": entry.kind, "key": entry.key, "fields": entry.fields,
                     "n_rows": int(len(rows)), "views": int(views), "shard_rows": int(shard_rows),
                     "arrays": {n: {"tail": list(t), "dtype": d} for n, (t, d) in sorted(arrays.items())}})
    with _writing(folder):
        if (folder / "layout.json").is_file():
            try:
                existing = json.loads((folder / "layout.json").read_text())
                same_rows = np.array_equal(np.load(folder / "rows.npy"), rows)
            except (OSError, ValueError):
                existing, same_rows = None, False
            if existing != layout or not same_rows:
                raise CacheError(f"{folder} holds a partial build for other inputs or another shard size "
                                 f"(${SHARD_ROWS_ENV}); delete the folder and run `richkd cache` again")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".rows.tmp.npy"
            np.save(tmp, np.ascontiguousarray(rows, dtype=np.int64), allow_pickle=False)
            os.replace(tmp, folder / "rows.npy")
            atomic_write_text(folder / "layout.json", json.dumps(layout, indent=1, sort_keys=True))
        for stale in folder.glob(".shard-*"):   # temp folders of shards a killed build was writing
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def missing_shards(folder: Path, n_shards: int) -> list[int]:
    return [i for i in range(n_shards) if not (folder / _shard_name(i) / "manifest.json").is_file()]


def write_shard(folder: Path, index: int, arrays: dict[str, np.ndarray]) -> Path:
    with _writing(folder):
        return write_array_folder(folder / _shard_name(index), arrays, {"shard": index, "format": SHARD_FORMAT})


def finish_entry(entry: CacheEntry, cache_dir: str | os.PathLike, extra: Optional[dict] = None) -> Path:
    """Write a sharded entry's manifest once every shard is there; the boxes' sha256 lets readers compare entries."""
    folder = entry.path(cache_dir)
    layout = json.loads((folder / "layout.json").read_text())
    n, sr, views = layout["n_rows"], layout["shard_rows"], layout["views"]
    n_shards = -(-n // sr)
    if missing_shards(folder, n_shards):
        raise CacheError(f"{folder}: shards {missing_shards(folder, n_shards)[:5]} are missing; run `richkd cache`")
    extra = dict(extra or {})
    if "boxes" in layout["arrays"]:   # shards concatenate to the (n, V, 7) array: the hash ignores the shard size
        boxes = hashlib.sha256()
        for i in range(n_shards):
            boxes.update(np.ascontiguousarray(np.load(folder / _shard_name(i) / "boxes.npy")).tobytes())
        extra["boxes_sha256"] = boxes.hexdigest()
    arrays = {name: {"shape": [n * views, *spec["tail"]], "dtype": spec["dtype"]}
              for name, spec in layout["arrays"].items()}
    manifest = _manifest(entry, sharded=SHARD_FORMAT, n_rows=n, views=views, shard_rows=sr, arrays=arrays,
                         shards=[{"rows": min(sr, n - i * sr)} for i in range(n_shards)], **extra)
    with _writing(folder):
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return folder


# ----- reading ----------------------------------------------------------------------------------------------

def _near_miss(entry: CacheEntry, cache_dir: Path) -> str:
    """A hint naming an entry of the same kind and data built for other settings (e.g. another image size)."""
    best = None
    for manifest in cache_dir.glob(f"{entry.kind}-*/manifest.json"):
        try:
            fields = json.loads(manifest.read_text()).get("fields") or {}
        except (OSError, ValueError):
            continue
        if fields.get("dataset") != entry.fields.get("dataset"):
            continue
        diff = sorted(k for k in set(fields) | set(entry.fields)
                      if json_plain(fields.get(k)) != json_plain(entry.fields.get(k)))
        if best is None or len(diff) < len(best[1]):
            best = (manifest.parent, diff, fields)
    if best is None or len(best[1]) > 4:
        return ""
    folder, diff, fields = best
    detail = ", ".join(f"{k} {fields.get(k)!r} there vs {entry.fields.get(k)!r} here" for k in diff)
    return f" ({folder.name} holds this data built for other settings: {detail})"


def read_manifest(entry: CacheEntry, cache_dir: str | os.PathLike) -> dict:
    """The complete entry's manifest, checked against the entry's fields and the format version."""
    cache_dir = Path(cache_dir)
    folder = entry.path(cache_dir)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        started = (folder / "layout.json").is_file()
        partial = " (a build was started and stopped; run it again to continue)" if started else ""
        raise CacheError(f"{entry.kind} cache {folder} is missing{partial}{_near_miss(entry, cache_dir)}; build it "
                         "with `richkd cache --config YOUR_CONFIG.yaml` (a sweep builds it before trials start)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError:
        raise CacheError(f"{manifest_file} is not valid JSON; delete {folder} and rebuild the cache") from None
    stored, wanted = json_plain(manifest.get("fields")) or {}, json_plain(entry.fields)
    if manifest.get("format_version") != CACHE_FORMAT_VERSION or manifest.get("sharded") not in (None, SHARD_FORMAT) \
            or stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise CacheError(f"cache {folder} was built for different inputs (differs in: {', '.join(diff) or 'format'}); "
                         "delete the folder and rebuild with `richkd cache`")
    return manifest


def _map(path: Path, shape: tuple, dtype: str, folder: Path) -> np.ndarray:
    """np.load(mmap_mode="r") of one array file, checked against the shape and dtype its manifest records."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:   # EOFError: an empty (0-byte) file
        raise CacheError(f"cache file {path} is unreadable or truncated ({exc}); delete {folder} and rebuild with "
                         "`richkd cache`") from None
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise CacheError(f"cache file {path} has shape {list(arr.shape)} {arr.dtype}, its manifest says {list(shape)} "
                         f"{dtype}; delete {folder} and rebuild with `richkd cache`")
    return arr


class ShardedArray:
    """A (n_rows * V, ...) array-like over shards: flat row v * n_rows + j is view v of cached row j (the layout
    richkd.teachers.CachedRows indexes). Shards are memory-mapped on first use; `arr[flat]` copies rows."""

    def __init__(self, folder: Path, name: str, n_rows: int, views: int, shard_rows: int, tail: tuple, dtype: str):
        self.folder, self.name = folder, name
        self.n_rows, self.views, self.shard_rows = n_rows, views, shard_rows
        self.tail, self.dtype = tuple(tail), np.dtype(dtype)
        self.shape = (n_rows * views, *self.tail)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        """Pickled (e.g. into spawned DataLoader workers) without its maps: each process maps the shards itself."""
        return {**self.__dict__, "_maps": {}}

    def shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            rows = min(self.shard_rows, self.n_rows - i * self.shard_rows)
            arr = _map(self.folder / _shard_name(i) / f"{self.name}.npy", (rows, self.views, *self.tail), self.dtype,
                       self.folder)
            # rows are read in random order: without the advice every page fault reads ahead ~32 pages, so a
            # trial's scattered batch rows would pull (and map) far more of a large cache than it reads
            if hasattr(mmap, "MADV_RANDOM") and getattr(arr, "_mmap", None) is not None:
                with suppress(OSError):     # an unusual filesystem: reads still work, with read-ahead
                    arr._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[i] = arr
        return self._maps[i]

    def __getitem__(self, flat) -> np.ndarray:
        flat = np.asarray(flat, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: rows out of range for a cache of {self.shape[0]} rows")
        view, row = np.divmod(flat, self.n_rows)
        shard, local = np.divmod(row, self.shard_rows)
        out = np.empty((flat.size, *self.tail), dtype=self.dtype)
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.shard(int(i))[local[sel], view[sel]]
        return out


def read_entry(entry: CacheEntry, cache_dir: str | os.PathLike, n_rows: Optional[int] = None,
               views: int = 1) -> dict[str, Any]:
    """The entry's arrays after checking its manifest: memory-mapped .npy files (flat) or ShardedArrays, plus
    "rows"; with n_rows, each must hold n_rows * views rows ("rows" n_rows), else CacheError."""
    folder = entry.path(cache_dir)
    manifest = read_manifest(entry, cache_dir)
    metas = manifest["arrays"]
    if manifest.get("sharded"):
        arrays: dict[str, Any] = {
            name: ShardedArray(folder, name, manifest["n_rows"], manifest["views"], manifest["shard_rows"],
                               tuple(meta["shape"][1:]), meta["dtype"]) for name, meta in metas.items()}
        arrays["rows"] = np.load(folder / "rows.npy", mmap_mode="r")
    else:
        arrays = {name: _map(folder / f"{name}.npy", meta["shape"], meta["dtype"], folder)
                  for name, meta in metas.items()}
    for name, arr in arrays.items():
        want = None if n_rows is None else n_rows if name == "rows" else n_rows * views
        if want is not None and arr.shape[0] != want:
            raise CacheError(f"cache {folder} holds {arr.shape[0]} rows of {name} where this run reads {want} "
                             f"({n_rows} rows x {views} views); it was built for other data: delete it and rebuild")
    return arrays


def describe(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per cache entry (kind, key, size in MB, creation time) for `richkd cache --list`."""
    rows = []
    for folder in sorted(Path(cache_dir).glob("*-*")):
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        meta = json.loads(manifest.read_text())
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())   # sharded entries: shard folders
        rows.append({"kind": meta["kind"], "key": meta["key"], "mb": round(size / 2**20, 2),
                     "created": meta.get("created"), "path": str(folder)})
    return rows
