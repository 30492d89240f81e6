"""A user-level cache of decoded dataset arrays (.npy, memory-mapped) so fresh trial processes skip decoding.

Why: every Tune trial is a fresh process, and decoding Fashion-MNIST's IDX files costs ~2.8 s of its start-up;
a memory-mapped copy opens in milliseconds and concurrent trials on a node share the pages.

Where: $RICHKD_DECODED_CACHE if set ("off" disables the cache), else $RICHKD_CACHE/decoded, else
~/.cache/richkd/decoded. An entry is keyed by the source files' resolved path, size and mtime, so replacing a
file re-decodes it. A damaged or unwritable cache never fails a run: it falls back to decoding.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from richkd.io import write_array_folder

log = logging.getLogger(__name__)

DECODED_ENV_VAR = "RICHKD_DECODED_CACHE"
CACHE_ENV_VAR = "RICHKD_CACHE"
DECODED_FORMAT_VERSION = 1
_OFF = ("", "0", "off", "false", "no", "none")


def decoded_cache_dir() -> Optional[Path]:
    """The folder of decoded-array entries, or None when $RICHKD_DECODED_CACHE switches the cache off."""
    env = os.environ.get(DECODED_ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    base = os.environ.get(CACHE_ENV_VAR)
    return (Path(base).expanduser() / "decoded") if base else Path("~/.cache/richkd/decoded").expanduser()


def cached_arrays(name: str, files: Sequence[os.PathLike | str],
                  decode: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """decode()'s arrays (validated by decode: they are cached), as copy-on-write maps of the cached entry for
    these files (writable, so torch.from_numpy takes them without a copy), decoded and stored when missing."""
    root = decoded_cache_dir()
    if root is None:
        return decode()
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in (Path(f).resolve() for f in files)]
    key = json.dumps({"format": DECODED_FORMAT_VERSION, "name": name, "files": stats}, sort_keys=True)
    folder = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "manifest.json").is_file():
        try:
            arrays = _read(folder)
            log.info("%s: decoded arrays memory-mapped from %s", name, folder)
            return arrays
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: decoded-array cache %s is damaged (%s); decoding again", name, folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    arrays = decode()
    try:
        write_array_folder(folder, arrays, {"format_version": DECODED_FORMAT_VERSION, "name": name,
                                            "files": [path for path, _, _ in stats]})
        return _read(folder)
    except (OSError, ValueError, KeyError) as exc:  # a read-only or full disk: run without the cache
        log.info("%s: could not store decoded arrays in %s (%s); continuing without the cache", name, folder, exc)
        return arrays


def _read(folder: Path) -> dict[str, np.ndarray]:
    meta = json.loads((folder / "manifest.json").read_text())
    if meta.get("format_version") != DECODED_FORMAT_VERSION:
        raise ValueError(f"format_version {meta.get('format_version')!r}")
    out = {}
    for key, spec in meta["arrays"].items():
        arr = np.load(folder / f"{key}.npy", mmap_mode="c", allow_pickle=False)
        if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
            raise ValueError(f"{key}.npy is {arr.dtype} {arr.shape}, the manifest says {spec}")
        out[key] = arr
    return out
