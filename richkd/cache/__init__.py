"""Content-addressed caches of frozen-teacher outputs, one concept per module (docs/architecture.md#caching).
The names below load their module on first use, so that the sweep layer's `richkd.cache.signature` stays free of
torch."""
import importlib

_HOMES = {"build": ("class_embeddings", "plan_caches", "prepare_caches"),
          "entries": ("CacheEntry", "CacheError", "describe", "entry_exists", "read_entry", "write_entry"),
          "identity": ("cached_rows", "split_entries"), "signature": ("affects_cache", "cache_signature")}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'richkd.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f"richkd.cache.{_HOME[name]}"), name)
