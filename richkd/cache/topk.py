"""Top-k teacher logits (`teaching.logit_topk`): FKD's soft-label compression, stored as logits for fusion.

FKD (Shen & Xing, ECCV 2022; docs/method.md#teaching-protocol) keeps the k largest soft-label probabilities of
each crop and spreads the remaining mass uniformly over the other classes. RichKD fuses *logits*
(z_F = alpha z_T + (1 - alpha) s cos, docs/method.md#logit-fusion), so the cache keeps the k largest logits, their
class ids and the log-sum-exp of the full row, and rebuilds a full logit row whose temperature-1 softmax is
exactly FKD's distribution: the k stored probabilities softmax(z)_i = exp(z_i - lse), and (1 - their sum) / (C - k)
for every other class. The top-k classes, their order and their logits are those of the full row (up to fp16
rounding); other temperatures see the same ranking with a flat tail. For ImageNet (C = 1000) and k = 10 a row
takes 44 bytes instead of 2000.
"""
from __future__ import annotations

import numpy as np

def topk_nbytes(k: int) -> int:
    """Bytes per cached row: k fp16 logits, k int16 class ids, one fp32 log-sum-exp."""
    return 4 * k + 4


def compress_logits(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """(n, C) logits -> {"topk_values" fp16 (n, k) descending, "topk_index" int16 (n, k), "lse" fp32 (n,)}; k is
    checked against C by the config and the builder (richkd.cache.photo_build)."""
    z = np.asarray(logits, dtype=np.float32)
    if z.shape[1] > np.iinfo(np.int16).max:
        raise ValueError(f"top-k storage keeps class ids as int16; {z.shape[1]} classes are too many")
    part = np.argpartition(-z, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(z, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    index = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(vals, order, axis=1)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))).astype(np.float32)
    return {"topk_values": top.astype(np.float16), "topk_index": index.astype(np.int16), "lse": lse}


def reconstruct_logits(values: np.ndarray, index: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Full (n, C) float32 logits from top-k storage (see the module docstring)."""
    v = np.asarray(values, dtype=np.float32)
    idx = np.asarray(index, dtype=np.int64)
    lse = np.asarray(lse, dtype=np.float32).reshape(-1, 1)
    n, k = v.shape
    out = np.empty((n, num_classes), dtype=np.float32)
    if k < num_classes:
        kept = np.exp(v - lse).sum(axis=1, keepdims=True)
        rest = np.maximum(1.0 - kept, np.float32(1e-12)) / (num_classes - k)
        fill = lse + np.log(rest)
        # never above the k-th stored logit (fp16 rounding could otherwise lift a flat tail into the top k)
        fill = np.minimum(fill, np.nextafter(v[:, -1:], np.float32(-np.inf)))
        out[:] = fill
    np.put_along_axis(out, idx, v, axis=1)
    return out


class TopKLogits:
    """Array-like (rows, C) view over top-k storage (any `part[index]` objects, e.g. memory-mapped shards):
    `arr[flat_index]` rebuilds only those rows' full logits."""

    def __init__(self, values, index, lse, num_classes: int) -> None:
        self.values, self.index, self.lse = values, index, lse
        self.num_classes = int(num_classes)
        self.shape = (int(values.shape[0]), self.num_classes)

    def __getitem__(self, rows) -> np.ndarray:
        return reconstruct_logits(self.values[rows], self.index[rows], self.lse[rows], self.num_classes)
