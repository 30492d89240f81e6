"""Content-addressed caches of frozen-teacher outputs: manifest per entry, atomic writes, memory-mapped reads.

Why caching works for RichKD (docs/architecture.md#caching): both teachers are frozen and every searched knob (alpha,
lambda, T, scale, loss weights, prompt set) acts on teacher *outputs*. So the conventional teacher's logits
and pooled features, CLIP's image features and CLIP's class (text) embeddings are computed once and every
trial reads them. Each entry is a folder named by a hash of everything that determines its content; its
manifest repeats those fields and a mismatch is an error, never a silent reuse.

Layout under `teaching.cache_dir`:
    teacher-<key>/      manifest.json  logits.npy (N, C) fp16  feat.npy (N, d_T) fp16
    clip-image-<key>/   manifest.json  feat.npy (N, D) fp16, L2-normalised
    clip-text-<key>/    manifest.json  classifier.npy (C, D) fp32, L2-normalised

Modules, one concept each: `entries` (an entry on disk: manifest, write, read), `identity` (what keys an
entry: weights, rows, views), `build` (which entries are missing, running the teachers to fill them),
`shards` (one entry computed in row shards elsewhere and assembled), `signature` (which caches a config reads).
Importing this package does not import torch.
"""
from richkd.cache.build import (
    EntryPlan,
    EntryJob,
    build_entry,
    class_embeddings,
    plan_caches,
    prepare_caches,
    torch_rows,
)
from richkd.cache.entries import (
    CACHE_FORMAT_VERSION,
    CacheEntry,
    CacheError,
    describe,
    ensure_cache_writable,
    entry_exists,
    read_entry,
    write_entry,
)
from richkd.cache.identity import (
    CLEAN_VIEW,
    CLIP_PREPROCESS_VERSION,
    cached_rows,
    clip_image_entry,
    clip_text_entry,
    clip_weights_id,
    dataset_identity,
    file_sha256_memo,
    teacher_entry,
    view_id,
)
from richkd.cache.shards import assemble_entry, compute_shard, remove_shards, shard_ranges, shard_root
from richkd.cache.signature import CACHE_AFFECTING_PREFIXES, CACHE_NEUTRAL_KEYS, affects_cache, cache_signature

__all__ = [
    "CACHE_AFFECTING_PREFIXES", "CACHE_FORMAT_VERSION", "CACHE_NEUTRAL_KEYS", "CLEAN_VIEW", "CLIP_PREPROCESS_VERSION",
    "CacheEntry", "CacheError", "EntryPlan", "EntryJob", "affects_cache", "assemble_entry", "build_entry",
    "cache_signature", "cached_rows", "class_embeddings", "clip_image_entry", "clip_text_entry", "clip_weights_id",
    "compute_shard", "dataset_identity", "describe", "ensure_cache_writable", "entry_exists", "file_sha256_memo",
    "plan_caches", "prepare_caches", "read_entry", "remove_shards", "shard_ranges", "shard_root", "teacher_entry",
    "torch_rows", "view_id", "write_entry",
]
