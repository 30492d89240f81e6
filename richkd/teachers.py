"""Where frozen-teacher outputs come from during training: cache look-ups by index, or online forwards."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from richkd.cache import CacheError, cached_rows, class_embeddings, read_entry, split_entries
from richkd.cache.entries import ShardedArray, read_manifest
from richkd.cache.topk import TopKLogits
from richkd.clip import load_clip
from richkd.config import Config
from richkd.data.batch import Batch
from richkd.models import load_teacher


@dataclass
class TeacherOutputs:
    """Outputs of both frozen teachers for one batch (fp32 on the training device)."""
    logits: torch.Tensor                     # (B, C) conventional teacher logits
    feat: torch.Tensor                       # (B, d_T) teacher pooled feature
    clip_feat: Optional[torch.Tensor] = None  # (B, D) L2-normalised CLIP image embedding
    clip_cosine: Optional[torch.Tensor] = None  # (B, C) cosine(image, class embedding), unscaled


class TeacherSource:
    """Base of the three teaching modes (docs/method.md#teaching-protocol): the conventional teacher runs on the
    student's view when `teacher` is set, else its outputs are read from the cache; CLIP runs on the view when
    `clip` is set, else its features are read from the cache (`clip_feat_rows`) or unused (None)."""

    view_boxes: Optional[StoredBoxes] = None    # a photo cache's boxes: the trainer cuts the student's views from them
    teacher = clip = logits = feat = clip_feat_rows = None

    def __init__(self, teacher_dim: int, clip_dim: Optional[int], class_embeddings: Optional[torch.Tensor],
                 device: torch.device, num_rows: int = 0, rows: Optional[np.ndarray] = None) -> None:
        self.teacher_dim, self.clip_dim = int(teacher_dim), None if clip_dim is None else int(clip_dim)
        # (C, D) on the device, or None when CLIP is not used
        self.class_embeddings = None if class_embeddings is None else class_embeddings.to(device)
        self.reader = CachedRows(num_rows, device, rows)

    @torch.no_grad()
    def __call__(self, batch: Batch, normalized_images: torch.Tensor) -> TeacherOutputs:
        if self.teacher is None:    # both teachers' rows in one read
            logits, feat, clip_feat = self.reader.read(batch, self.logits, self.feat, self.clip_feat_rows)
        else:
            logits, feat = self.teacher(normalized_images)
            clip_feat = None
            if self.clip is not None:
                clip_feat = self.clip.encode_images(batch.image)
            elif self.clip_feat_rows is not None:
                clip_feat = self.reader.read(batch, self.clip_feat_rows)[0]
        cosine = None if clip_feat is None or self.class_embeddings is None else clip_feat @ self.class_embeddings.t()
        return TeacherOutputs(logits.float(), feat.float(), clip_feat, cosine)


class CachedRows:
    """Rows of memory-mapped fp16 cache arrays for a batch, by dataset row (and cached view), as fp32 tensors.

    Only the batch's rows are copied per step, in their stored dtype, into one (on CUDA page-locked) host buffer,
    copied to the device asynchronously and ordered and upcast there. Row `view * N + position` holds the outputs
    for the view the student was shown; batches without views read view 0, the clean image.
    """

    def __init__(self, num_rows: int, device: torch.device, rows: Optional[np.ndarray] = None) -> None:
        self.num_rows = num_rows      # cached rows per view
        self.rows = None if rows is None else np.asarray(rows)  # sorted dataset rows cached; None = 0..num_rows-1
        self.device = device
        self.pin = torch.device(device).type == "cuda"

    def flat(self, index: np.ndarray, view: Optional[np.ndarray] = None) -> np.ndarray:
        """Cache rows of (dataset row, view) pairs; a row the cache does not cover (a subset run) is a CacheError."""
        pos = index
        if self.rows is not None:
            pos = np.minimum(np.searchsorted(self.rows, index), len(self.rows) - 1)
            if not np.array_equal(self.rows[pos], index):
                missing = index[self.rows[pos] != index][:5].tolist()
                raise CacheError(f"rows {missing} are not in the teacher cache (it was built for other rows); "
                                 "rebuild it with `richkd cache`")
        return pos if view is None else np.asarray(view, dtype=np.int64) * self.num_rows + pos

    def _buffer(self, shape: tuple, dtype: np.dtype) -> torch.Tensor:
        """An empty host tensor, page-locked for a CUDA run (so that the copy to the device is asynchronous)."""
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=self.pin)

    def _host(self, values: np.ndarray) -> torch.Tensor:
        if not self.pin:
            return torch.from_numpy(np.ascontiguousarray(values))
        out = self._buffer(values.shape, values.dtype)
        out.numpy()[...] = values
        return out

    def _rows(self, arr, sorted_index: np.ndarray) -> torch.Tensor:
        """The rows of one array as a host tensor, read in sorted order (kinder to the page cache)."""
        if not isinstance(arr, np.ndarray):          # sharded or top-k arrays build their rows themselves
            return self._host(np.asarray(arr[sorted_index]))
        if len(sorted_index) and not 0 <= sorted_index[0] <= sorted_index[-1] < len(arr):
            raise IndexError(f"cache rows {sorted_index[0]}..{sorted_index[-1]} outside an array of {len(arr)} rows")
        out = self._buffer((len(sorted_index), *arr.shape[1:]), arr.dtype)
        np.take(arr, sorted_index, axis=0, out=out.numpy(), mode="clip")   # one copy: "clip" is never buffered
        return out

    def read(self, batch: Batch, *arrays) -> list[Optional[torch.Tensor]]:
        """The batch's rows of each array (None stays None), in batch order, fp32 on the device."""
        view = batch.view_on_host()     # host copies: no device->host sync per step
        index = self.flat(batch.index_on_host().numpy(), None if view is None else view.numpy())
        order = np.argsort(index)
        sorted_index = index[order]
        inverse = self._host(np.argsort(order)).to(self.device, non_blocking=True)   # batch order, on the device
        return [None if arr is None else
                self._rows(arr, sorted_index).to(self.device, non_blocking=True).index_select(0, inverse).float()
                for arr in arrays]


class StoredBoxes:
    """The view boxes a photo cache stores, by dataset row and view: the trainer crops the student's views from
    them (richkd.data.photos.PhotoSplit.with_view_boxes), so it sees the region both teachers saw."""

    def __init__(self, records: ShardedArray, reader: CachedRows) -> None:
        self.records, self.reader, self.origin = records, reader, str(records.folder)

    def boxes(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        return self.records[self.reader.flat(rows, views)]


def _dim(arr) -> Optional[int]:
    return None if arr is None else arr.shape[1]


class CachedTeachers(TeacherSource):
    """Both teachers from the cache: outputs of the clean image (views 1) or of the student's cached view.

    `teaching.mode: cached`, a speed option, not the official protocol (docs/method.md#teaching-protocol): with
    one view both targets describe the clean image while the student sees a random crop; with V views the
    student is shown exactly the cached view (FKD-style).
    """

    def __init__(self, logits: np.ndarray, feat: np.ndarray, clip_feat: Optional[np.ndarray],
                 class_embeddings: Optional[torch.Tensor], device: torch.device, num_rows: int,
                 rows: Optional[np.ndarray] = None) -> None:
        super().__init__(feat.shape[1], _dim(clip_feat), class_embeddings, device, num_rows, rows)
        self.logits, self.feat, self.clip_feat_rows = logits, feat, clip_feat


class OnlineTeachers(TeacherSource):
    """Both teachers run on the student's own augmented view every step (consistent teaching, slower)."""

    def __init__(self, teacher: torch.nn.Module, clip, class_embeddings: Optional[torch.Tensor],
                 device: torch.device) -> None:
        super().__init__(teacher.feat_dim, None if clip is None else clip.embed_dim, class_embeddings, device)
        self.teacher, self.clip = teacher, clip


class OfficialTeachers(TeacherSource):
    """The official RichKD protocol: the teacher runs online on the student's augmented view, CLIP's outputs of
    the clean image are read from the cache by row (None when the run uses no CLIP term, e.g. alpha-only)."""

    def __init__(self, teacher: torch.nn.Module, clip_feat: Optional[np.ndarray],
                 class_embeddings: Optional[torch.Tensor], device: torch.device, num_rows: int,
                 rows: Optional[np.ndarray] = None) -> None:
        super().__init__(teacher.feat_dim, _dim(clip_feat), class_embeddings, device, num_rows, rows)
        self.teacher, self.clip_feat_rows = teacher, clip_feat


def build_teacher_source(cfg: Config, data, device: torch.device, split: str = "train",
                         reuse: Optional[TeacherSource] = None) -> Optional[TeacherSource]:
    """None for supervised runs; otherwise the source teaching.mode names, reading the `split`'s caches ("test":
    the final analysis, richkd.analysis); `reuse`: the run's training source, whose networks are reused."""
    if not cfg.loss.uses_teacher:
        return None
    if isinstance(reuse, OnlineTeachers):
        return reuse  # it runs on whatever batch it is given
    class_emb = (reuse.class_embeddings if reuse is not None else
                 class_embeddings(cfg, data.class_names, device=device) if cfg.uses_clip else None)
    if cfg.teaching.mode == "online":
        clip = None
        if cfg.uses_clip:
            clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=device)
            _check_clip_dim(clip.embed_dim, class_emb)
            visual = getattr(clip.model, "visual", None)
            if cfg.train.channels_last and visual is not None and is_conv_tower(visual):
                visual.to(memory_format=torch.channels_last)
        return OnlineTeachers(_load_teacher(cfg, data, device), clip, class_emb, device)
    # the split's entries the config reads (richkd.cache.split_entries), checked: they cover the rows this run
    # reads, and a photo cache's teacher and CLIP entries hold the same view boxes
    cache_dir, rows, entries = Path(cfg.teaching.cache_dir), cached_rows(data, split), split_entries(cfg, data, split)
    stored = {kind: read_entry(entry, cache_dir, len(rows), cfg.teaching.views) for kind, entry in entries.items()}
    for kind, arrays in stored.items():
        if not np.array_equal(arrays["rows"], rows):
            raise CacheError(f"the {kind} cache {entries[kind].path(cache_dir)} covers other rows than this run "
                             "reads; delete it and rebuild with `richkd cache`")
    if len(stored) == 2 and "boxes" in stored["clip-image"]:
        teacher, clip = (read_manifest(entries[kind], cache_dir).get("boxes_sha256") for kind in stored)
        if teacher != clip:
            raise CacheError(f"{entries['teacher'].path(cache_dir)} and {entries['clip-image'].path(cache_dir)} store "
                             "different view boxes, so the teachers saw different crops; delete both and rebuild "
                             "with `richkd cache`")
    whole = len(rows) == len(data.train_clean if split == "train" else data.test_clean)
    clip_feat = stored["clip-image"]["feat"] if "clip-image" in stored else None
    if clip_feat is not None:
        _check_clip_dim(clip_feat.shape[1], class_emb)
    if cfg.teaching.mode == "official":
        model = reuse.teacher if isinstance(reuse, OfficialTeachers) else _load_teacher(cfg, data, device)
        return OfficialTeachers(model, clip_feat, class_emb, device, len(rows), None if whole else rows)
    t = stored["teacher"]
    logits = t["logits"] if "logits" in t else \
        TopKLogits(t["topk_values"], t["topk_index"], t["lse"], data.num_classes)
    source = CachedTeachers(logits, t["feat"], clip_feat, class_emb, device, len(rows), None if whole else rows)
    if "boxes" in t:   # a photo cache: the trainer crops the student's views from these boxes
        source.view_boxes = StoredBoxes(t["boxes"], source.reader)
    return source


def _load_teacher(cfg: Config, data, device: torch.device) -> torch.nn.Module:
    model = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)[0].to(device)
    # its input is the student's, already channels_last (measured 1.27x forward)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def is_conv_tower(visual: torch.nn.Module) -> bool:
    """True for a convolutional CLIP image tower (ResNet, ConvNeXt: more than a patch-embedding conv and no
    nn.MultiheadAttention), the towers channels_last pays off for; False for a ViT."""
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in visual.modules())
    return convs > 1 and not attention


def _check_clip_dim(image_dim: int, class_emb: Optional[torch.Tensor]) -> None:
    if class_emb is not None and class_emb.shape[1] != image_dim:
        raise CacheError(
            f"CLIP image features have dimension {image_dim} but the text classifier has {class_emb.shape[1]}: "
            "they come from different CLIP models; rebuild the caches with `richkd cache`")
