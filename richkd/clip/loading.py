"""Build a frozen ClipTeacher from an open_clip architecture + weights (tag, file, local-dir), offline-safe."""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from richkd.clip.errors import ClipLoadError
from richkd.clip.teacher import ClipTeacher
from richkd.io import atomic_torch_save, sha256_file

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
PRECISIONS = ("fp32", "fp16", "bf16")
_NETWORK_PROBE_TIMEOUT_S = 3.0

WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


@dataclass(frozen=True)
class PretrainedRef:
    """What a `clip.pretrained` value names: an open_clip tag, a weights file or a local-dir folder.

    `path` is the expanded (`~`) file or folder, None for a tag. A "file" may be missing: the value looks like a
    path (has a slash or a weights suffix), so it is never looked up as a tag; whoever needs the file says so.
    """
    value: str
    kind: str                 # "tag" | "file" | "dir"
    path: Optional[Path] = None

    def absolute(self) -> str:
        """The value with its path made absolute (sweep trials run in their own working directory).

        A tag, or a value with a URL scheme (s3://...), is returned as given.
        """
        if self.kind == "tag" or re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", self.value):
            return self.value
        absolute = os.path.abspath(self.path)
        return LOCAL_DIR_PREFIX + absolute if self.kind == "dir" else absolute


def parse_pretrained(value: str) -> PretrainedRef:
    """The one reading of `clip.pretrained`, shared by config checks, cache keys, the loader and the sweep.

    `local-dir:FOLDER` is a folder; an existing file, or anything that looks like a path (a slash or a weights
    suffix such as .pt), is a file; everything else is an open_clip tag such as `openai`.
    """
    if value.startswith(LOCAL_DIR_PREFIX):
        return PretrainedRef(value, "dir", Path(value[len(LOCAL_DIR_PREFIX):]).expanduser())
    path = Path(value).expanduser()
    if _looks_like_path(value) or path.is_file():
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
    """Make "richkd-tiny" a known open_clip architecture in this process (idempotent).

    open_clip's config registry is per process, so every process that loads the tiny model (Ray trials included)
    must call this; load_clip does. Uses the public `open_clip.add_model_config` with a temporary JSON file: the
    registry keeps the parsed config after the file is gone.
    """
    import open_clip

    with _register_lock:
        if TINY_CLIP_MODEL in open_clip.list_models():
            return
        with tempfile.TemporaryDirectory(prefix="richkd-clip-") as tmp:
            path = Path(tmp) / f"{TINY_CLIP_MODEL}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(path)
        if TINY_CLIP_MODEL not in open_clip.list_models():  # pragma: no cover - would mean open_clip changed
            raise ClipLoadError(f"could not register the {TINY_CLIP_MODEL!r} config with open_clip")


def init_tiny_clip(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random CLIP state dict (fp16, ~3.4 MB) to `path` atomically; returns the path.

    Load it with `load_clip("richkd-tiny", path)` (open_clip's standard `pretrained=PATH` route). The global torch
    RNG is left untouched. Weights are stored in fp16 to keep the file small; open_clip casts them to the model's
    dtype on load.
    """
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


# -- helpers --------------------------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, re-read now in case the variable was set after import."""
    truthy = {"1", "on", "yes", "true"}
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in truthy:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub missing
        return False


def _reachable(host: str, port: int = 443, timeout: float = _NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe in a daemon thread, so a hanging DNS lookup cannot stall us either."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hf_endpoint_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _hf_cached(repo_id: str, filenames: list[str]) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for name in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, name)
        except Exception:
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _tag_sources(tag_cfg: dict) -> tuple[Optional[str], list[str], str]:
    """(cached weights path or None, human-readable download sources, host to probe) for an open_clip tag."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if tag_cfg.get("file"):
        return (tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None), [tag_cfg["file"]], ""
    sources: list[str] = []
    hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
    host = ""
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        sources.append(f"https://huggingface.co/{repo_id} (file {filename})")
        host = _hf_endpoint_host()
        hit = _hf_cached(repo_id, candidates)
        if hit:
            return hit, sources, host
    if url:
        sources.append(url)
        host = host or (urlparse(url).hostname or "")
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return str(cached), sources, host
    return None, sources, host


def _offline_error(arch: str, tag: str, sources: list[str], reason: str, quick_gelu: bool = False) -> ClipLoadError:
    where = "; ".join(sources) if sources else "the open_clip model hub"
    # a file is built as clip.model names it; the tag's QuickGELU (all OpenAI weights) must then be in the name
    model = f"{arch}-quickgelu" if quick_gelu and not arch.endswith("quickgelu") else arch
    keep = f"set clip.model: {model!r}, as these weights need QuickGELU" if model != arch else \
        f"clip.model stays {arch!r}"
    return ClipLoadError(
        f"CLIP weights {arch}/{tag} are not in the local cache and cannot be downloaded ({reason}). "
        f"Provide them yourself: on a machine with internet download {where} and set clip.pretrained to the "
        f"file's path ({keep}); or point clip.pretrained at 'local-dir:FOLDER' holding "
        f"open_clip_config.json plus the weights; or copy a filled ~/.cache/huggingface/hub here. For an offline "
        f"smoke test write random weights with `richkd clip init-tiny PATH` and set clip.model={TINY_CLIP_MODEL} "
        f"clip.pretrained=PATH."
    )


def _resolve_arch(model_name: str) -> str:
    import open_clip

    arch = model_name.replace("/", "-")  # OpenAI spells ViT-L/14, open_clip ViT-L-14
    known = open_clip.list_models()
    if arch in known:
        return arch
    by_lower = {name.lower(): name for name in known}
    close = [by_lower[c] for c in difflib.get_close_matches(arch.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise ClipLoadError(f"unknown CLIP architecture {model_name!r} (clip.model).{hint} "
                        f"See open_clip.list_models() for all {len(known)} names, e.g. ViT-B-32, ViT-L-14.")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(WEIGHTS_SUFFIXES)


def _checkpoint_in_dir(folder: Path) -> Optional[Path]:
    from open_clip.factory import _find_checkpoint_in_dir  # the exact file open_clip itself will pick

    found = _find_checkpoint_in_dir(folder)
    return Path(found) if found else None


def _resolve_tag(arch: str, pretrained: str) -> tuple[dict, Optional[str]]:
    """(open_clip's config of the tag, the cached weights file or None when it can be downloaded). An unknown tag,
    or weights neither cached nor downloadable (offline, or the hub unreachable in a 3 s probe), is one
    ClipLoadError saying how to provide them."""
    import open_clip

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
    cached, sources, host = _tag_sources(tag_cfg)
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if not cached and _hub_offline():
        raise _offline_error(arch, pretrained, sources, "HF_HUB_OFFLINE=1", quick_gelu)
    if not cached and host and not _reachable(host):
        raise _offline_error(arch, pretrained, sources, f"{host} is unreachable", quick_gelu)
    return tag_cfg, cached


def check_weights(model_name: str, pretrained: str) -> None:
    """What load_clip would find missing, without building the model: an unknown architecture or tag, a missing
    file or folder, or weights that are neither cached nor downloadable. `richkd sweep --check` and every command
    call it (richkd.validate.check_resources) before any expensive work."""
    register_tiny_config()
    model_name, pretrained = str(model_name).strip(), str(pretrained or "").strip()
    ref = parse_pretrained(pretrained)
    if ref.kind == "dir":
        if not ref.path.is_dir():
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: folder {str(ref.path)!r} does not exist")
        return
    if model_name.startswith(HF_HUB_PREFIX):
        return _check_hub_model(model_name)
    if ref.kind == "file" and not ref.path.is_file():
        raise ClipLoadError(f"clip.pretrained: file {pretrained!r} does not exist (create the offline tiny CLIP with "
                            "`richkd clip init-tiny PATH`, or use a tag such as openai)")
    arch = _resolve_arch(model_name)
    if ref.kind == "tag" and pretrained:
        _resolve_tag(arch, pretrained)


def _check_hub_model(model_name: str) -> None:
    repo_id = model_name[len(HF_HUB_PREFIX):]
    if not _hf_cached(repo_id, ["open_clip_config.json"]):
        if _hub_offline():
            raise _offline_error(model_name, "(hub)", [f"https://huggingface.co/{repo_id}"], "HF_HUB_OFFLINE=1")
        if not _reachable(_hf_endpoint_host()):
            raise _offline_error(model_name, "(hub)", [f"https://huggingface.co/{repo_id}"],
                                 f"{_hf_endpoint_host()} is unreachable")


# -- the loader -----------------------------------------------------------------------------------------------------
def load_clip(model_name: str, pretrained: str, device: str | torch.device = "cpu", *,
              precision: str = "fp32") -> ClipTeacher:
    """Frozen (eval, requires_grad False) CLIP teacher on `device`.

    `pretrained`: an open_clip tag ("openai", "laion2b_s34b_b79k", ...), a local weights file, or
    "local-dir:FOLDER" (open_clip_config.json + weights; the architecture then comes from the folder). Tags are
    resolved from the local caches first and loaded by path, so a cached model never touches the network; an
    uncached tag while offline (HF_HUB_OFFLINE=1, or the hub unreachable in a 3 s probe) raises one ClipLoadError
    at once instead of open_clip's ~46 s of retries. Tags trained with QuickGELU (all OpenAI weights) get it
    forced on, which open_clip 3.x only warns about. Random weights are never returned.
    """
    import open_clip

    if precision not in PRECISIONS:
        raise ClipLoadError(f"unknown CLIP precision {precision!r}; use one of {PRECISIONS}")
    register_tiny_config()
    model_name, pretrained = str(model_name).strip(), str(pretrained or "").strip()
    create_name, create_pretrained = model_name, None
    force_quick_gelu, force_preprocess = False, None

    ref = parse_pretrained(pretrained)
    if ref.kind == "dir":
        folder = ref.path
        if not folder.is_dir():
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: folder {str(folder)!r} does not exist")
        if not (folder / "open_clip_config.json").is_file():
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: no open_clip_config.json in {str(folder)!r}; a "
                                "local-dir folder needs it (with `model_cfg`) next to the weights file")
        ckpt = _checkpoint_in_dir(folder)
        if ckpt is None:
            raise ClipLoadError(f"clip.pretrained {pretrained!r}: no weights file (*.safetensors, *.bin, *.pth) "
                                f"in {str(folder)!r}")
        create_name = f"{LOCAL_DIR_PREFIX}{folder}"
        weights_id = sha256_file(ckpt)
        log.info("CLIP from local folder %s (weights %s); the architecture comes from its open_clip_config.json",
                 folder, ckpt.name)
    elif model_name.startswith(HF_HUB_PREFIX):
        _check_hub_model(model_name)
        weights_id = model_name
    else:
        if not pretrained:
            raise ClipLoadError(f"clip.pretrained is empty for {model_name!r}: give an open_clip tag (e.g. openai), "
                                "a weights file or local-dir:FOLDER; a randomly initialised CLIP cannot teach")
        arch = _resolve_arch(model_name)
        create_name = arch
        if ref.kind == "file":
            if not ref.path.is_file():
                raise ClipLoadError(f"clip.pretrained: weights file {pretrained!r} does not exist")
            create_pretrained = str(ref.path)
            weights_id = sha256_file(ref.path)
        else:
            tag_cfg, cached = _resolve_tag(arch, pretrained)
            force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            if force_quick_gelu and not arch.endswith("quickgelu"):
                log.info("%s/%s was trained with QuickGELU: building the model with QuickGELU", arch, pretrained)
            if cached:
                # Load the cached file by path: no network round trip; the tag's preprocessing is applied by hand.
                create_pretrained = cached
                force_preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                    if k in tag_cfg}
                log.info("CLIP %s/%s from the local cache: %s", arch, pretrained, cached)
            else:
                create_pretrained = pretrained
            weights_id = pretrained

    try:
        model = open_clip.create_model(
            create_name, pretrained=create_pretrained, device=torch.device(device), precision=precision,
            force_quick_gelu=force_quick_gelu, force_preprocess_cfg=force_preprocess, require_pretrained=True,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(create_name)
    except ClipLoadError:
        raise
    except Exception as exc:
        raise ClipLoadError(f"could not load CLIP {model_name!r} with weights {pretrained!r}: "
                            f"{type(exc).__name__}: {exc}") from exc
    teacher = ClipTeacher(model, tokenizer, model_name=model_name, pretrained=pretrained, weights_id=weights_id)
    log.info("loaded %r (weights %s)", teacher, weights_id[:16])
    return teacher
