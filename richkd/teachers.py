"""Where frozen-teacher outputs come from during training: cache look-ups by index, or online forwards."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from richkd import cache as cache_mod
from richkd.config import Config
from richkd.data.batch import Batch

log = logging.getLogger(__name__)


@dataclass
class TeacherOutputs:
    """Outputs of both frozen teachers for one batch (fp32 on the training device)."""
    logits: torch.Tensor                     # (B, C) conventional teacher logits
    feat: torch.Tensor                       # (B, d_T) teacher pooled feature
    clip_feat: Optional[torch.Tensor] = None  # (B, D) L2-normalised CLIP image embedding
    clip_cosine: Optional[torch.Tensor] = None  # (B, C) cosine(image, class embedding), unscaled


class TeacherSource:
    """Base: turns a batch (and the student's normalised input) into TeacherOutputs."""
    teacher_dim: int
    clip_dim: Optional[int]
    class_embeddings: Optional[torch.Tensor]  # (C, D) on device, or None when CLIP is not used

    def __call__(self, batch: Batch, normalized_images: torch.Tensor) -> TeacherOutputs:  # pragma: no cover
        raise NotImplementedError

    def _cosine(self, clip_feat: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if clip_feat is None or self.class_embeddings is None:
            return None
        return clip_feat @ self.class_embeddings.t()


class CachedRows:
    """Rows of memory-mapped fp16 cache arrays for a batch, by dataset row (and cached view), as fp32 tensors.

    The arrays are shared by every trial process on a node; only the rows of a batch are copied per step, in
    their stored dtype, straight into one (on CUDA page-locked) host buffer, copied to the device asynchronously
    and put in batch order and upcast there. With V cached views (teaching.views) row `view * N + position` holds
    the outputs for the view the student was shown; batches without views read view 0, the clean image.
    """

    def __init__(self, num_rows: int, device: torch.device, rows: Optional[np.ndarray] = None) -> None:
        self.num_rows = num_rows      # cached rows per view
        self.rows = None if rows is None else np.asarray(rows)  # sorted dataset rows cached; None = 0..num_rows-1
        self.device = device
        self.pin = torch.device(device).type == "cuda"

    def _positions(self, index: np.ndarray) -> np.ndarray:
        """Dataset rows -> positions in a cache that covers only some rows (a subset run)."""
        if self.rows is None:
            return index
        pos = np.minimum(np.searchsorted(self.rows, index), len(self.rows) - 1)
        if not np.array_equal(self.rows[pos], index):
            missing = index[self.rows[pos] != index][:5].tolist()
            raise cache_mod.CacheError(f"rows {missing} are not in the teacher cache (it was built for other "
                                       "rows); rebuild it with `richkd cache`")
        return pos

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
        index = self._positions(batch.index_on_host().numpy())  # host copies: no device->host sync per step
        view = batch.view_on_host()
        if view is not None:
            index = view.numpy() * self.num_rows + index
        order = np.argsort(index)
        sorted_index = index[order]
        inverse = self._host(np.argsort(order)).to(self.device, non_blocking=True)   # batch order, on the device
        return [None if arr is None else
                self._rows(arr, sorted_index).to(self.device, non_blocking=True).index_select(0, inverse).float()
                for arr in arrays]


class CachedTeachers(TeacherSource):
    """Both teachers from the cache: outputs of the clean image (views 1) or of the student's cached view.

    `teaching.mode: cached`, a speed option, not the official protocol (docs/method.md#teaching-protocol): with
    one view both targets describe the clean image while the student sees a random crop; with V views the
    student is shown exactly the cached view (FKD-style).
    """

    def __init__(self, logits: np.ndarray, feat: np.ndarray, clip_feat: Optional[np.ndarray],
                 class_embeddings: Optional[torch.Tensor], device: torch.device, num_rows: int,
                 rows: Optional[np.ndarray] = None) -> None:
        self.logits, self.feat, self.clip_feat_rows = logits, feat, clip_feat
        self.reader = CachedRows(num_rows, device, rows)
        self.teacher_dim = int(feat.shape[1])
        self.clip_dim = None if clip_feat is None else int(clip_feat.shape[1])
        self.class_embeddings = None if class_embeddings is None else class_embeddings.to(device)

    def __call__(self, batch: Batch, normalized_images: torch.Tensor) -> TeacherOutputs:
        logits, feat, clip_feat = self.reader.read(batch, self.logits, self.feat, self.clip_feat_rows)
        return TeacherOutputs(logits, feat, clip_feat, self._cosine(clip_feat))


class OnlineTeachers(TeacherSource):
    """Both teachers run on the student's own augmented view every step (consistent teaching, slower)."""

    def __init__(self, teacher: torch.nn.Module, clip, class_embeddings: Optional[torch.Tensor],
                 device: torch.device) -> None:
        self.teacher, self.clip = teacher, clip
        self.teacher_dim = int(teacher.feat_dim)
        self.clip_dim = None if clip is None else int(clip.embed_dim)
        self.class_embeddings = None if class_embeddings is None else class_embeddings.to(device)

    @torch.no_grad()
    def __call__(self, batch: Batch, normalized_images: torch.Tensor) -> TeacherOutputs:
        out = self.teacher(normalized_images)
        clip_feat = None if self.clip is None else self.clip.encode_images(batch.image).float()
        return TeacherOutputs(out.logits.float(), out.feat.float(), clip_feat, self._cosine(clip_feat))


class OfficialTeachers(TeacherSource):
    """The official RichKD protocol: the conventional teacher runs online on the student's augmented view,
    CLIP's outputs of the clean image are read from the cache by row index (docs/method.md#teaching-protocol).

    `clip_feat` is None when the run uses no CLIP term (e.g. the alpha-only control): only the teacher runs.
    """

    def __init__(self, teacher: torch.nn.Module, clip_feat: Optional[np.ndarray],
                 class_embeddings: Optional[torch.Tensor], device: torch.device, num_rows: int,
                 rows: Optional[np.ndarray] = None) -> None:
        self.teacher, self.clip_feat_rows = teacher, clip_feat
        self.reader = CachedRows(num_rows, device, rows)
        self.teacher_dim = int(teacher.feat_dim)
        self.clip_dim = None if clip_feat is None else int(clip_feat.shape[1])
        self.class_embeddings = None if class_embeddings is None else class_embeddings.to(device)

    @torch.no_grad()
    def __call__(self, batch: Batch, normalized_images: torch.Tensor) -> TeacherOutputs:
        out = self.teacher(normalized_images)
        (clip_feat,) = self.reader.read(batch, self.clip_feat_rows)
        return TeacherOutputs(out.logits.float(), out.feat.float(), clip_feat, self._cosine(clip_feat))


def build_teacher_source(cfg: Config, data, device: torch.device, split: str = "train",
                         reuse: Optional[TeacherSource] = None) -> Optional[TeacherSource]:
    """None for supervised runs; otherwise the source teaching.mode names, reading the `split`'s caches.

    split "test" serves the final analysis of the test split (richkd.analysis); `reuse` is the run's training
    source, whose loaded networks (teacher, CLIP) are reused instead of being loaded again.
    """
    if not cfg.loss.uses_teacher:
        return None
    mode = cfg.teaching.mode
    if isinstance(reuse, OnlineTeachers):
        return reuse  # it runs on whatever batch it is given
    class_emb = (reuse.class_embeddings if reuse is not None else
                 cache_mod.class_embeddings(cfg, data.class_names, device=device) if cfg.uses_clip else None)
    if mode == "cached" and cfg.data.dataset == "imagenet":  # sharded views with stored crop boxes
        return _read_photo_cached(cfg, data, split, device, class_emb)
    if mode == "cached":
        return _read_cached(cfg, data, split, device, class_emb, teacher=True)
    if mode == "official":
        model = reuse.teacher if isinstance(reuse, OfficialTeachers) else _load_teacher(cfg, data, device)
        clip_feat, n, rows = _read_cached(cfg, data, split, device, class_emb, teacher=False)
        return OfficialTeachers(model, clip_feat, class_emb, device, num_rows=n, rows=rows)
    clip = None
    if cfg.uses_clip:
        from richkd.clip import load_clip

        clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=device)
        _check_clip_dim(clip.embed_dim, class_emb)
        visual = getattr(clip.model, "visual", None)
        if cfg.train.channels_last and visual is not None and is_conv_tower(visual):
            visual.to(memory_format=torch.channels_last)
    return OnlineTeachers(_load_teacher(cfg, data, device), clip, class_emb, device)


def _load_teacher(cfg: Config, data, device: torch.device) -> torch.nn.Module:
    from richkd.models import load_teacher

    model, _ = load_teacher(cfg.teacher.arch, cfg.teacher.checkpoint, data.num_classes)
    model.to(device)
    if cfg.train.channels_last:  # its input is the student's, already channels_last (measured 1.27x forward)
        model.to(memory_format=torch.channels_last)
    return model


def _read_photo_cached(cfg: Config, data, split: str, device: torch.device,
                       class_emb: Optional[torch.Tensor]) -> "CachedTeachers":
    """CachedTeachers over a photo dataset's sharded entries, with the view boxes the student is cropped from."""
    from richkd.cache.views_imagenet import open_photo_caches

    opened = open_photo_caches(cfg, data, split, Path(cfg.teaching.cache_dir))
    if opened["clip_feat"] is not None:
        _check_clip_dim(opened["clip_feat"].shape[1], class_emb)
    n = len(opened["rows"])
    whole = len(data.train_clean if split == "train" else data.test_clean)
    source = CachedTeachers(opened["logits"], opened["feat"], opened["clip_feat"], class_emb, device, num_rows=n,
                            rows=None if n == whole else opened["rows"])
    source.view_boxes = opened["boxes"]   # the trainer crops the student's views from these boxes
    return source


def _read_cached(cfg: Config, data, split: str, device: torch.device, class_emb: Optional[torch.Tensor],
                 teacher: bool):
    """CachedTeachers over the split's caches (teacher=True), or (CLIP feature rows or None, rows per view,
    cached rows or None) for the official protocol, which reads only CLIP from the cache."""
    cache_dir = Path(cfg.teaching.cache_dir)
    ident = cache_mod.dataset_identity(data, split)
    cached = cache_mod.cached_rows(data, split)
    n = len(cached)
    rows = n * cfg.teaching.views
    whole = len(data.train_clean if split == "train" else data.test_clean)
    subset = None if n == whole else cached
    entries = {}
    if cfg.uses_clip:
        entries["CLIP"] = cache_mod.read_entry(cache_mod.clip_image_entry(cfg, ident, split, cache_dir), cache_dir,
                                               expect_rows={"feat": rows, "rows": n})
        _check_clip_dim(entries["CLIP"]["feat"].shape[1], class_emb)
    if teacher:
        entries["teacher"] = cache_mod.read_entry(cache_mod.teacher_entry(cfg, ident, split, cache_dir), cache_dir,
                                                  expect_rows={"logits": rows, "feat": rows, "rows": n})
    for name, entry in entries.items():
        if not np.array_equal(entry["rows"], cached):
            raise cache_mod.CacheError(f"the {name} cache in {cache_dir} covers other rows than this run reads; "
                                       "delete it and rebuild with `richkd cache`")
    clip_feat = entries["CLIP"]["feat"] if "CLIP" in entries else None
    if not teacher:
        return clip_feat, n, subset
    t = entries["teacher"]
    return CachedTeachers(t["logits"], t["feat"], clip_feat, class_emb, device, num_rows=n, rows=subset)


def is_conv_tower(visual: torch.nn.Module) -> bool:
    """True for a convolutional CLIP image tower (ResNet, ConvNeXt), False for a ViT.

    channels_last only pays off for convolutions; a ViT's single patch-embedding conv gains nothing, so its
    tower is left as it is. A tower counts as convolutional when it has 2-d convolutions besides a patch
    embedding and no nn.MultiheadAttention blocks (ModifiedResNet's attention pool is not one).
    """
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in visual.modules())
    return convs > 1 and not attention


def _check_clip_dim(image_dim: int, class_emb: Optional[torch.Tensor]) -> None:
    if class_emb is not None and class_emb.shape[1] != image_dim:
        raise cache_mod.CacheError(
            f"CLIP image features have dimension {image_dim} but the text classifier has {class_emb.shape[1]}: "
            "they come from different CLIP models; rebuild the caches with `richkd cache`")
