"""Content-addressed caches of frozen-teacher outputs (docs/architecture.md#caching).

Both teachers are frozen and every searched knob (alpha, lambda, T, scale, loss weights, prompt set) acts on
teacher *outputs*, so the conventional teacher's logits and features, CLIP's image features and CLIP's class
embeddings are computed once and every trial reads them. Modules, one concept each: `entries` (an entry on disk,
flat or sharded: manifest, writers, one reader), `identity` (what keys an entry, which entries a config reads),
`build` (plan which entries are missing, run the teachers to fill them), `photo_build` (a photo dataset's sharded
multi-view entries, in one resumable pass), `row_blocks` (a flat entry computed in row blocks elsewhere and
assembled), `topk` (top-k logits), `estimate` (`richkd cache --plan`), `signature` (which caches a config reads).
"""
from richkd.cache.build import EntryJob, EntryPlan, build_entry, class_embeddings, plan_caches, prepare_caches
from richkd.cache.entries import CacheEntry, CacheError, describe, entry_exists, read_entry, write_entry
from richkd.cache.identity import cached_rows, dataset_identity, split_entries
from richkd.cache.signature import CACHE_AFFECTING_PREFIXES, affects_cache, cache_signature

__all__ = [
    "CACHE_AFFECTING_PREFIXES", "CacheEntry", "CacheError", "EntryJob", "EntryPlan", "affects_cache", "build_entry",
    "cache_signature", "cached_rows", "class_embeddings", "dataset_identity", "describe", "entry_exists",
    "plan_caches", "prepare_caches", "read_entry", "split_entries", "write_entry",
]
