"""Seeded on-the-fly common corruptions (CIFAR-10-C parameter tables) for float image batches in [0, 1].

Every corruption maps (B, 3, H, W) float images in [0, 1] to the same shape, clamped to [0, 1], on the images'
device. The severity parameters are the CIFAR-10-C tables of Hendrycks & Dietterich (ICLR 2019,
`hendrycks/robustness`, `ImageNet-C/create_c/make_cifar_c.py`), in pixels for 32 x 32 images. The released
CIFAR-C files are uint8; ours stay float, so accuracies differ slightly from the published files (to reproduce
them, evaluate the released `.npy` folder: `richkd.robustness.cifar_c`).

Noise is reproducible and independent of batching: sample i draws from a CPU generator seeded by (seed,
corruption, dataset row index[i]), whatever the batch size, subset or device. The seed does not depend on the
severity ("common random numbers"): severity s+1 scales the same noise pattern as severity s, so
accuracy-vs-severity curves are not blurred by resampling noise.
"""
from __future__ import annotations

import hashlib
import io
import re
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from richkd.config import CORRUPTION_NAMES
from richkd.registry import Registry
from richkd.schema import suggest

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Parameter per severity 1..5, as in make_cifar_c.py (CIFAR-10-C / CIFAR-100-C).
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),          # std of additive N(0, c^2)
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),           # photons at full intensity: Poisson(x c) / c
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),           # salt & pepper share of values
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # (disk radius, alias blur)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),                # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                   # factor towards the per-channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                 # added to HSV value
    "jpeg_compression": (80, 65, 58, 50, 40),                  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                 # box-downscale factor, then box-upscale
}

# fn(images (B,3,H,W) in [0,1], parameter, per-sample seeds (B,) int64 on CPU) -> corrupted images
CorruptionFn = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]
CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")


class CorruptionError(ValueError):
    """An unknown corruption name or severity (the message lists the valid ones)."""


# ----- seeds --------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64 finaliser: spreads every input bit over all 64 output bits (torch's CPU generator keeps 32)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample_seeds(seed: int, name: str, index: torch.Tensor) -> torch.Tensor:
    """Per-sample generator seeds (B,) int64 for corruption `name` from the run seed and dataset rows `index`."""
    base = int.from_bytes(hashlib.sha256(f"richkd-corruption:{int(seed)}:{name}".encode()).digest()[:8], "little")
    rows = [int(i) for i in torch.as_tensor(index).flatten().tolist()]
    return torch.tensor([_mix64(base ^ _mix64(r & _MASK64)) & ((1 << 63) - 1) for r in rows], dtype=torch.int64)


def _per_sample(seeds: torch.Tensor, draw: Callable[[int, torch.Generator], torch.Tensor]) -> torch.Tensor:
    """Stack draw(i, generator_i) over samples; each generator is a fresh CPU generator seeded by seeds[i]."""
    return torch.stack([draw(i, torch.Generator().manual_seed(int(s))) for i, s in enumerate(seeds.tolist())])


# ----- public entry point -------------------------------------------------------------------------

def corrupt(images: torch.Tensor, name: str, severity: int, *, seed: int = 0,
            index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to float images (B, 3, H, W) in [0, 1].

    index: (B,) int64 dataset rows that key the per-sample randomness (default 0..B-1, i.e. batch position).
    Returns a new float tensor of the same shape, dtype and device, clamped to [0, 1].
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"corrupt: expected float images in [0, 1], got dtype {images.dtype}")
    try:
        fn = CORRUPTIONS.get(name)
    except KeyError as exc:
        raise CorruptionError(exc.args[0]) from None
    param = SEVERITY_PARAMS[name][_severity_position(severity)]
    b = images.shape[0]
    if index is None:
        index = torch.arange(b)
    index = torch.as_tensor(index).flatten().cpu()
    if index.numel() != b:
        raise ValueError(f"corrupt: index has {index.numel()} entries for a batch of {b} images")
    if b == 0:
        return images.clone()
    out = fn(images, param, sample_seeds(seed, name, index))
    return out.clamp_(0.0, 1.0).to(images.dtype)


def _severity_position(severity: int) -> int:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= len(SEVERITIES):
        raise CorruptionError(f"severity must be an integer in 1..{len(SEVERITIES)}, got {severity!r}")
    return int(severity) - 1


def parse_corruptions(text: Optional[str | Sequence[str]], known: Sequence[str] = CORRUPTION_NAMES,
                      where: str = "") -> tuple[str, ...]:
    """'all' / None (every name `known`) / 'a,b' / ['a', 'b'] -> validated names in the order given, unique."""
    items = [] if text is None else [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    if text is None or items == ["all"]:
        return tuple(known)
    if not items:
        raise CorruptionError(f"corruptions: {text!r} names no corruption; use 'all' or a comma-separated list "
                              f"of {', '.join(known)}")
    for item in items:
        if item not in known:
            raise CorruptionError(f"unknown corruption {item!r}{where}{suggest(item, known)} (known: "
                                  f"{', '.join(known)})")
    return tuple(dict.fromkeys(items))


def parse_severities(text: Optional[str | Sequence[int]]) -> tuple[int, ...]:
    """'1..5' / '2-4' / '1,3,5' / '3' / [1, 2] / None (all) -> sorted unique severities in 1..5."""
    if text is None:
        return SEVERITIES
    values: list[int] = []
    for part in (text.split(",") if isinstance(text, str) else text):
        match = re.fullmatch(r"\s*(\d+)\s*(?:(?:\.\.|-)\s*(\d+)\s*)?", str(part))
        if match is None or (match[2] and int(match[1]) > int(match[2])):
            if str(part).strip():
                raise CorruptionError(f"severities: cannot parse {text!r}; use e.g. 1..5, 2-4 or 1,3,5")
            continue
        values.extend(range(int(match[1]), int(match[2] or match[1]) + 1))
    for v in values:
        _severity_position(v)
    if not values:
        raise CorruptionError(f"severities: {text!r} names no severity; use e.g. 1..5")
    return tuple(sorted(set(values)))


# ----- noise --------------------------------------------------------------------------------------

@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, std: float, seeds: torch.Tensor) -> torch.Tensor:
    """x + N(0, std^2) per value."""
    shape = x.shape[1:]
    noise = _per_sample(seeds, lambda i, g: torch.randn(shape, generator=g))
    return x + std * noise.to(device=x.device, dtype=x.dtype)


@CORRUPTIONS.register("shot_noise")
def shot_noise(x: torch.Tensor, photons: float, seeds: torch.Tensor) -> torch.Tensor:
    """Poisson(x * photons) / photons per value (photon-counting noise: fewer photons, more noise)."""
    rates = (x.detach().float().cpu().clamp(0.0, 1.0) * photons)
    counts = _per_sample(seeds, lambda i, g: torch.poisson(rates[i], generator=g))
    return (counts / photons).to(device=x.device, dtype=x.dtype)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: torch.Tensor, amount: float, seeds: torch.Tensor) -> torch.Tensor:
    """Salt & pepper per value (skimage random_noise 's&p'): a share `amount` of values set to 0 or 1 (50/50).

    The two uniforms are drawn independently of `amount`, so a higher severity flips a superset of values.
    """
    shape = x.shape[1:]
    u = _per_sample(seeds, lambda i, g: torch.rand((2, *shape), generator=g)).to(x.device)
    flip, salt = u[:, 0] < amount, u[:, 1] < 0.5
    return torch.where(flip, salt.to(x.dtype), x)


# ----- blur ---------------------------------------------------------------------------------------

def _gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _conv_per_channel(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate each channel with a 2-D kernel (kh, kw) (odd sizes); `mode` is F.pad's border mode."""
    c = x.shape[1]
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
    weight = kernel.to(device=x.device, dtype=x.dtype).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x: torch.Tensor, sigma: float, seeds: torch.Tensor) -> torch.Tensor:
    """Gaussian blur as skimage.filters.gaussian: truncate at 4 sigma, 'nearest' (replicate) borders."""
    radius = int(4.0 * sigma + 0.5)
    k = _gaussian_1d(sigma, radius).float()
    x = _conv_per_channel(x, k.view(1, -1), "replicate")
    return _conv_per_channel(x, k.view(-1, 1), "replicate")


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of make_cifar_c.py: a normalised disk on a 17x17 grid, blurred by a 3x3 Gaussian.

    For radius <= 8 the disk grid is -8..8 and the anti-alias blur is a 3x3 Gaussian of sigma `alias_blur`
    (cv2.GaussianBlur with ksize (3, 3)); larger radii use a grid of -r..r and a 5x5 Gaussian. The result
    is cropped to its non-zero support (zero weights add nothing) and sums to 1.
    """
    half = 8 if radius <= 8 else int(radius)
    ksize = 3 if radius <= 8 else 5
    coords = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _gaussian_1d(alias_blur, ksize // 2)
    blurred = F.conv2d(disk[None, None], (g[:, None] * g[None, :])[None, None], padding=ksize // 2)[0, 0]
    r = half - int(torch.nonzero(blurred.sum(1) > 0).min())   # the support: a centred square (radial symmetry)
    kernel = blurred[half - r:half + r + 1, half - r:half + r + 1]
    return (kernel / kernel.sum()).float()


@CORRUPTIONS.register("defocus_blur")
def defocus_blur(x: torch.Tensor, param: tuple, seeds: torch.Tensor) -> torch.Tensor:
    """Convolution with an anti-aliased disk (lens defocus); borders reflected as cv2.filter2D does."""
    radius, alias_blur = param
    return _conv_per_channel(x, disk_kernel(radius, alias_blur), "reflect")


# ----- digital ------------------------------------------------------------------------------------

@CORRUPTIONS.register("contrast")
def contrast(x: torch.Tensor, factor: float, seeds: torch.Tensor) -> torch.Tensor:
    """(x - m) * factor + m with m the per-image, per-channel mean over pixels."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


@CORRUPTIONS.register("brightness")
def brightness(x: torch.Tensor, delta: float, seeds: torch.Tensor) -> torch.Tensor:
    """Add `delta` to the HSV value V = max(r, g, b) (clipped to 1), keeping hue and saturation.

    Equivalent to rgb2hsv -> V += delta -> hsv2rgb without the round trip: at fixed H and S every RGB channel
    is proportional to V, so rgb' = rgb * V'/V; a black pixel (V = 0, S = 0) becomes grey (V', V', V').
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp(max=1.0)
    scale = v_new / v.clamp(min=1e-12)
    return torch.where(v > 0, x * scale, v_new.expand_as(x))


@CORRUPTIONS.register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, quality: int, seeds: torch.Tensor) -> torch.Tensor:
    """Save each image as JPEG at `quality` with Pillow and decode it (exactly make_cifar_c.py's codec path).

    Runs on the CPU one image at a time (~0.1 ms per 32 x 32 image), then returns to the images' device.
    """
    as_uint8 = (x.detach().float().cpu() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    decoded = []
    for img in as_uint8.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as im:
            decoded.append(np.array(im.convert("RGB"), dtype=np.uint8))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return (out.float() / 255.0).to(device=x.device, dtype=x.dtype)


@CORRUPTIONS.register("pixelate")
def pixelate(x: torch.Tensor, factor: float, seeds: torch.Tensor) -> torch.Tensor:
    """Box-downscale to int(size * factor) and box-upscale back with Pillow (Image.BOX both ways, as
    make_cifar_c.py), on float32 channels (mode "F", so no rounding to uint8)."""
    h, w = x.shape[2], x.shape[3]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    planes = x.detach().float().cpu().numpy()
    out = [[np.asarray(Image.fromarray(c).resize(small, Image.BOX).resize((w, h), Image.BOX))
            for c in image] for image in planes]
    return torch.from_numpy(np.array(out)).to(device=x.device, dtype=x.dtype)
