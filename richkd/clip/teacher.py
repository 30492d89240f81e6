"""The frozen CLIP teacher: on-device preprocessing, L2-normalised image features, prompt-averaged text classifier,
zero-shot accuracy."""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from richkd.clip.prompts import format_prompts, validate_templates
from richkd.data.batch import Batch

log = logging.getLogger(__name__)

# Named mean/std pairs (open_clip.constants), so preprocess ids stay readable.
_NAMED_STATS = {
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "random": "bicubic"}


def average_prompt_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """(C, T, D) raw text embeddings -> (C, D): L2-normalise each prompt, mean over templates, L2-normalise, as
    the official code (docs/method.md#the-official-code): each template gets an equal vote."""
    if embeddings.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) embeddings, got shape {tuple(embeddings.shape)}")
    per_prompt = F.normalize(embeddings.float(), dim=-1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def preprocess_images(images: torch.Tensor, size: Any, mean: Sequence[float] | torch.Tensor,
                      std: Sequence[float] | torch.Tensor,
                      interpolation: str = "bicubic", resize_mode: str = "shortest",
                      fill_color: int = 0) -> torch.Tensor:
    """(B, 3, H, W) float images in [0, 1] -> (B, 3, h, w) CLIP input, computed on the images' device.

    Mirrors open_clip's eval transform (Resize(shortest side) + CenterCrop, or squash / longest+pad) with tensor ops:
    antialiased resize, then a clamp to [0, 1] because the reference PIL pipeline works on uint8 and so cannot
    overshoot; then (x - mean) / std. Square inputs (CIFAR, Fashion-MNIST) reduce to one resize; the result is close
    to, not bit-identical with, the PIL path (PIL's bicubic kernel differs slightly and quantises to uint8).
    """
    th, tw = _pair(size)
    mode = _INTERPOLATIONS.get(interpolation)
    if mode is None:
        raise ValueError(f"unsupported CLIP interpolation {interpolation!r}; known: {sorted(_INTERPOLATIONS)}")
    kwargs = {"mode": mode}
    if mode != "nearest":
        kwargs.update(align_corners=False, antialias=True)
    x = images
    h, w = x.shape[-2:]
    if (h, w) != (th, tw):
        if resize_mode == "squash" or h * tw == w * th:
            x = F.interpolate(x, size=(th, tw), **kwargs)
        elif resize_mode == "shortest":
            scale = max(th / h, tw / w)
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), **kwargs)
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        elif resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = min(th, round(h * scale)), min(tw, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), **kwargs)
            top, left = (th - nh) // 2, (tw - nw) // 2
            x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=fill_color / 255.0)
        else:
            raise ValueError(f"unsupported CLIP resize_mode {resize_mode!r}; known: shortest, longest, squash")
    x = x.clamp(0.0, 1.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class ClipTeacher:
    """A frozen open_clip model plus its tokenizer and preprocessing (build it with `richkd.clip.load_clip`). Not an
    nn.Module on purpose: it must never end up in a student's parameters or checkpoints."""

    text_batch_size = 256  # prompts per text-encoder forward

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, model_name: str, pretrained: str,
                 weights_id: str) -> None:
        from open_clip.model import get_model_preprocess_cfg

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name, self.pretrained, self.weights_id = model_name, pretrained, weights_id
        self.preprocess_cfg = cfg = dict(get_model_preprocess_cfg(model))
        h, w = _pair(cfg.get("size", 224))
        self.image_size: Any = h if h == w else (h, w)
        self.mean = tuple(float(v) for v in cfg.get("mean", _NAMED_STATS["openai"][0]))
        self.std = tuple(float(v) for v in cfg.get("std", _NAMED_STATS["openai"][1]))
        # a short id such as "bicubic224-openai-meanstd" for cache manifests (what turns pixels into CLIP input)
        rounded = tuple(tuple(round(v, 6) for v in s) for s in (self.mean, self.std))
        stats = next((name for name, pair in _NAMED_STATS.items()
                      if tuple(tuple(round(v, 6) for v in s) for s in pair) == rounded),
                     "ms" + hashlib.sha256(repr(rounded).encode()).hexdigest()[:8])
        mode = cfg.get("resize_mode", "shortest")
        self.preprocess_id = (f"{cfg.get('interpolation', 'bicubic')}{h if h == w else f'{h}x{w}'}-{stats}-meanstd"
                              + ("" if mode == "shortest" else f"-{mode}"))
        self._stats: dict = {}     # device -> (mean, std) tensors, made once (not copied to the device per batch)
        self.logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        dim = getattr(getattr(model, "visual", None), "output_dim", None)
        if not isinstance(dim, int):
            with torch.no_grad():
                probe = torch.zeros(1, 3, h, w, device=self.device, dtype=self.dtype)
                dim = int(model.encode_image(probe).shape[-1])
        self.embed_dim = dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return (f"ClipTeacher({self.model_name!r}, pretrained={self.pretrained!r}, embed_dim={self.embed_dim}, "
                f"image_size={self.image_size}, preprocess={self.preprocess_id!r}, device={self.device})")

    def encode_images(self, images_0_1: torch.Tensor) -> torch.Tensor:
        """(B, 3|1, H, W) float images in [0, 1], any device -> (B, D) L2-normalised float32 on that device. CLIP's
        preprocessing happens here, so the same un-normalised view feeds the student and CLIP."""
        if images_0_1.ndim != 4 or images_0_1.shape[1] not in (1, 3):
            raise ValueError(f"encode_images expects (B, 3, H, W) images in [0, 1], got {tuple(images_0_1.shape)}")
        if not images_0_1.is_floating_point():
            raise ValueError(f"encode_images expects float images in [0, 1], got {images_0_1.dtype}; "
                             "divide uint8 images by 255 first")
        out_device = images_0_1.device
        x = images_0_1.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        c = self.preprocess_cfg
        if x.device not in self._stats:
            self._stats[x.device] = tuple(torch.tensor(v, device=x.device) for v in (self.mean, self.std))
        x = preprocess_images(x, self.image_size, *self._stats[x.device], c.get("interpolation", "bicubic"),
                              c.get("resize_mode", "shortest"), int(c.get("fill_color", 0) or 0))
        with torch.no_grad():
            feats = self.model.encode_image(x.to(self.dtype))
        return F.normalize(feats.float(), dim=-1).to(out_device)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) strings -> (N, D) raw (un-normalised) float32 text embeddings on the model's device."""
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.text_batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.text_batch_size])).to(self.device)
                chunks.append(self.model.encode_text(tokens).float())
        return torch.cat(chunks) if chunks else torch.empty(0, self.embed_dim, device=self.device)

    def encode_text_classifier(self, class_names: Sequence[str], templates: Sequence[str] | Any,
                               clean: bool = True) -> torch.Tensor:
        """(C,) class names x (T,) templates ("{}" strings or a PromptSet) -> (C, D) float32 class embeddings
        (average_prompt_embeddings) on the model's device; open_clip's build_zero_shot_classifier, transposed."""
        templates = getattr(templates, "templates", templates)
        templates = validate_templates(templates, "given to encode_text_classifier")
        names = list(class_names)
        if not names:
            raise ValueError("encode_text_classifier needs at least one class name")
        raw = self.encode_texts(format_prompts(names, templates, clean=clean))
        return average_prompt_embeddings(raw.view(len(names), len(templates), -1))


def zero_shot_accuracy(teacher: ClipTeacher, batches: Iterable | tuple[torch.Tensor, torch.Tensor],
                       class_embeddings: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of argmax(image_features @ class_embeddings.T) over batches of un-normalised
    images in [0, 1] (Batch records or (image, target, ...) tuples, as the loaders yield them) or over one
    (images, targets) pair of tensors. The logit scale does not change an argmax, so raw cosines are used."""
    if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches):
        batches = [batches]
    correct, total = 0, 0
    for batch in batches:
        if isinstance(batch, Batch):
            batch = batch.to(batch.image.device)      # photo loaders' uint8 images become float in [0, 1]
            batch = (batch.image, batch.target)
        images, targets = batch[0], batch[1]
        pred = (teacher.encode_images(images) @ class_embeddings.to(images.device, torch.float32).t()).argmax(dim=1)
        correct += int((pred.cpu() == targets.reshape(-1).cpu()).sum())
        total += int(targets.numel())
    if total == 0:
        raise ValueError("zero_shot_accuracy: no samples (empty loader)")
    return correct / total
