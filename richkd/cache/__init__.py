"""Content-addressed caches of frozen-teacher outputs, one concept per module (docs/architecture.md#caching).
The names below load their module on first use, so that the sweep layer's `richkd.cache.signature` stays free of
torch."""
from richkd.registry import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "build": ("class_embeddings", "plan_caches", "prepare_caches"),
    "entries": ("CacheEntry", "CacheError", "describe", "entry_exists", "read_entry", "write_entry"),
    "identity": ("cached_rows", "split_entries"),
    "signature": ("affects_cache", "cache_signature"),
})
