"""Build a frozen ClipTeacher from an open_clip architecture + weights (tag, file, local-dir), offline-safe."""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from huggingface_hub import is_offline_mode

from richkd.clip.teacher import ClipTeacher
from richkd.io import atomic_torch_save, sha256_file

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


class ClipLoadError(ValueError):
    """CLIP cannot be built or its weights cannot be found; the message says how to provide them."""


@dataclass(frozen=True)
class PretrainedRef:
    """What a `clip.pretrained` value names. `path`: the expanded file or folder, None for a tag; a "file" may be
    missing (it looks like a path, so it is never looked up as a tag)."""
    value: str
    kind: str                 # "tag" | "file" | "dir"
    path: Optional[Path] = None

    def absolute(self) -> str:
        """The value with its path made absolute (sweep trials run in their own working directory); a tag, or a
        value with a URL scheme (s3://...), as given."""
        if self.kind == "tag" or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", self.value):
            return self.value
        absolute = os.path.abspath(self.path)
        return LOCAL_DIR_PREFIX + absolute if self.kind == "dir" else absolute


def parse_pretrained(value: str) -> PretrainedRef:
    """The one reading of `clip.pretrained`, shared by config checks, cache keys, the loader and the sweep:
    `local-dir:FOLDER` is a folder; an existing file, or anything that looks like a path (a slash or a weights
    suffix such as .pt), is a file; everything else is an open_clip tag such as `openai`."""
    if value.startswith(LOCAL_DIR_PREFIX):
        return PretrainedRef(value, "dir", Path(value[len(LOCAL_DIR_PREFIX):]).expanduser())
    path = Path(value).expanduser()
    if os.sep in value or "/" in value or value.endswith(WEIGHTS_SUFFIXES) or path.is_file():
        return PretrainedRef(value, "file", path)
    return PretrainedRef(value, "tag")


# A tiny random CLIP for tests and the offline demo: a 2-layer ViT (32 px, patch 8) and a 2-layer text transformer
# with the standard 77-token context and the full 49408-token BPE vocabulary, so open_clip's SimpleTokenizer works.
# The text width is 32 because the token table (49408 x width) dominates the file size.
TINY_CLIP_MODEL = "richkd-tiny"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
_register_lock = threading.Lock()


def register_tiny_config() -> None:
    """Make "richkd-tiny" a known open_clip architecture in this process (idempotent), through the public
    `open_clip.add_model_config`."""
    import open_clip

    with _register_lock:
        if TINY_CLIP_MODEL in open_clip.list_models():
            return
        with tempfile.TemporaryDirectory(prefix="richkd-clip-") as tmp:
            path = Path(tmp) / f"{TINY_CLIP_MODEL}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)


def init_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random CLIP state dict (fp16, ~3.4 MB) to `path` atomically, for `load_clip("richkd-tiny",
    path)`; the global torch RNG is left untouched."""
    import open_clip

    register_tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None, device="cpu")
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out = Path(path).expanduser()
    atomic_torch_save(state, out)
    log.info("wrote tiny CLIP (%s, seed %d) to %s", TINY_CLIP_MODEL, seed, out)
    return out


@dataclass(frozen=True)
class _Build:
    """The open_clip.create_model arguments of a (clip.model, clip.pretrained) pair."""
    name: str                                # an architecture, or a local-dir: / hf-hub: name
    weights: str | Path                      # what identifies the weights: a file (hashed on load) or a name
    pretrained: Optional[str] = None         # the weights file open_clip loads (a tag's is fetched first)
    quick_gelu: bool = False
    preprocess: Optional[dict] = None


def _fetch(fetch: Callable[[], str], arch: str, tag: str, source: str, quick_gelu: bool = False) -> str:
    """fetch()'s file, through open_clip (from the local cache, else downloaded). Weights that are neither are one
    ClipLoadError saying how to provide them, instead of open_clip's retries and traceback."""
    try:
        return fetch()
    except Exception as exc:
        reason = "HF_HUB_OFFLINE=1" if is_offline_mode() else " ".join(str(exc).split())
        # a file is built as clip.model names it; the tag's QuickGELU (all OpenAI weights) must then be in the name
        model = f"{arch}-quickgelu" if quick_gelu and not arch.endswith("quickgelu") else arch
        keep = f"set clip.model: {model!r}, as these weights need QuickGELU" if model != arch else \
            f"clip.model stays {arch!r}"
        raise ClipLoadError(
            f"CLIP weights {arch}/{tag} are not in the local cache and cannot be downloaded ({reason}). Provide them "
            f"yourself: on a machine with internet download {source or 'the open_clip model hub'} and set "
            f"clip.pretrained to the file's path ({keep}); or point clip.pretrained at 'local-dir:FOLDER' holding "
            "open_clip_config.json plus the weights; or copy a filled ~/.cache/huggingface/hub here. For an offline "
            f"smoke test write random weights with `richkd clip init-tiny PATH` and set clip.model={TINY_CLIP_MODEL} "
            "clip.pretrained=PATH.") from None


def _resolve(model_name: str, pretrained: str, fetch: bool) -> _Build:
    """What open_clip is asked to build; ClipLoadError for an unknown architecture or tag, a missing file or
    folder, or weights neither cached nor downloadable. fetch=False (the pre-checks) downloads nothing: offline,
    uncached weights are still an error; online, load_clip finds out."""
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir  # the exact file open_clip itself will pick
    from open_clip.pretrained import download_pretrained_from_hf

    register_tiny_config()
    fetch = fetch or is_offline_mode()     # offline, fetching only reads the local cache
    ref = parse_pretrained(pretrained)
    if ref.kind == "dir":
        folder = ref.path
        if not folder.is_dir():
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: folder {str(folder)!r} does not exist")
        if not (folder / "open_clip_config.json").is_file():
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: no open_clip_config.json in {str(folder)!r}; a "
                                "local-dir folder needs it (with `model_cfg`) next to the weights file")
        ckpt = _find_checkpoint_in_dir(folder)
        if ckpt is None:
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: no weights file (*.safetensors, *.bin, *.pth) "
                                f"in {str(folder)!r}")
        return _Build(f"{LOCAL_DIR_PREFIX}{folder}", Path(ckpt))
    if model_name.startswith(HF_HUB_PREFIX):
        repo = model_name[len(HF_HUB_PREFIX):]
        if fetch:
            _fetch(lambda: download_pretrained_from_hf(repo, filename="open_clip_config.json"), model_name, "(hub)",
                   f"https://huggingface.co/{repo}")
        return _Build(model_name, model_name)
    if not pretrained:
        raise ClipLoadError(f"clip.pretrained is empty for {model_name!r}: give an open_clip tag (e.g. openai), "
                            "a weights file or local-dir:FOLDER; a randomly initialised CLIP cannot teach")
    if ref.kind == "file" and not ref.path.is_file():
        raise ClipLoadError(f"clip.pretrained: file {pretrained!r} does not exist (create the offline tiny CLIP with "
                            "`richkd clip init-tiny PATH`, or use a tag such as openai)")
    arch, known = model_name.replace("/", "-"), open_clip.list_models()  # OpenAI spells ViT-L/14, open_clip ViT-L-14
    if arch not in known:
        by_lower = {name.lower(): name for name in known}
        close = [by_lower[c] for c in difflib.get_close_matches(arch.lower(), list(by_lower), n=5, cutoff=0.6)]
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ClipLoadError(f"unknown CLIP architecture {model_name!r} (clip.model).{hint} "
                            f"See open_clip.list_models() for all {len(known)} names, e.g. ViT-B-32, ViT-L-14.")
    if ref.kind == "file":
        return _Build(arch, ref.path, pretrained=str(ref.path))
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise ClipLoadError(f"{arch!r} has no open_clip pretrained tags, and {pretrained!r} is not a "
                                "file; set clip.pretrained to a weights file path"
                                + (" (write one with `richkd clip init-tiny PATH`)" if arch == TINY_CLIP_MODEL else ""))
        close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ClipLoadError(f"{pretrained!r} is neither a file nor a pretrained tag of {arch}.{hint} "
                            f"Tags of {arch}: {', '.join(tags)}")
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    path = None
    if fetch:   # the tag's file is loaded by path: a cached model never touches the network
        hub = tag_cfg.get("hf_hub", "")
        source = f"https://huggingface.co/{hub.rstrip('/')}" if hub else tag_cfg.get("url") or tag_cfg.get("file")
        path = _fetch(lambda: open_clip.download_pretrained(tag_cfg), arch, pretrained, source, quick_gelu)
    # the tag's preprocessing, applied by hand since the file is loaded by path
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    return _Build(arch, pretrained, pretrained=path, quick_gelu=quick_gelu, preprocess=preprocess)


def check_weights(model_name: str, pretrained: str) -> None:
    """What load_clip would find missing, without building the model or downloading (see _resolve)."""
    _resolve(str(model_name).strip(), str(pretrained or "").strip(), fetch=False)


def load_clip(model_name: str, pretrained: str, device: str | torch.device = "cpu") -> ClipTeacher:
    """Frozen CLIP teacher on `device`; `pretrained` as parse_pretrained reads it. A tag's weights are fetched by
    open_clip (the local cache first) and loaded by path. Tags trained with QuickGELU (all OpenAI weights) get it
    forced on, which open_clip 3.x only warns about. Random weights are never returned."""
    import open_clip

    model_name, pretrained = str(model_name).strip(), str(pretrained or "").strip()
    build = _resolve(model_name, pretrained, fetch=True)
    if build.quick_gelu and not build.name.endswith("quickgelu"):
        log.info("%s/%s was trained with QuickGELU: building the model with QuickGELU", build.name, pretrained)
    try:
        model = open_clip.create_model(
            build.name, pretrained=build.pretrained, device=torch.device(device),
            force_quick_gelu=build.quick_gelu, force_preprocess_cfg=build.preprocess, require_pretrained=True,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(build.name)
    except Exception as exc:
        raise ClipLoadError(f"could not load CLIP {model_name!r} with weights {pretrained!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    weights_id = sha256_file(build.weights) if isinstance(build.weights, Path) else build.weights
    teacher = ClipTeacher(model, tokenizer, model_name=model_name, pretrained=pretrained, weights_id=weights_id)
    log.info("loaded %r (weights %s)", teacher, weights_id[:16])
    return teacher
