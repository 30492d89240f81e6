"""Typed, frozen, validated configuration for one training run (a trial is exactly one of these)."""
from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

import yaml

from richkd.schema import ConfigError, build, check, flatten, in_range, load_yaml_mapping, one_of, to_plain


# The seeded corruptions richkd.robustness.corruptions implements (CIFAR-10-C table order): the one list of their
# names, here so the config validates them without importing torch (tests/test_robustness.py checks that the
# registered implementations and their parameter tables are exactly these).
CORRUPTION_NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur", "contrast",
                    "brightness", "jpeg_compression", "pixelate")
# what data.root must hold for the datasets that have no default location
ROOT_LAYOUTS = {"imagefolder": "a folder with train/ (and optionally test/)",
                "imagenet": "a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (any subset of the classes)"}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split and batched."""
    dataset: str = "fashion_mnist"
    root: Optional[str] = None          # None: the dataset's default location (see richkd.data)
    download: bool = False               # torchvision download; off so offline runs fail fast and clearly
    image_size: int = 32                 # every image is resized to this square size (models are CIFAR-style)
    augment: str = "standard"            # standard = RandomCrop(size, pad 4) + horizontal flip
    # seeded hold-out from the training set for model selection; 0 trains on the whole split and reports no
    # validation metrics (what `richkd finalize` does; a sweep refuses 0, it selects on a validation metric)
    val_fraction: float = 0.1
    split_seed: int = 0
    max_train_samples: Optional[int] = None   # cap for quick runs (taken after the val split, seeded)
    max_eval_samples: Optional[int] = None
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    # keep the training rows on the device as uint8 and crop/flip there (richkd.data.resident); auto: on for
    # CUDA runs whose rows fit 1 GiB, off on CPU; true is allowed on CPU (same batches, for testing)
    resident: Union[str, bool] = "auto"
    # seeded, class-stratified training subset for sweeps: at most this many training images per class
    max_train_per_class: Optional[int] = None
    # photo datasets (imagenet, richkd/data/imagenet.py): how unreadable or truncated files are handled, which
    # JPEG decoder runs, and where class names come from (None: <root>/classes.txt, else ImageNet-1k wnids)
    bad_images: str = "error"            # error: one message listing them; skip: leave them out and count them
    decode: str = "pil"                  # pil | torchvision (torchvision.io.decode_jpeg)
    class_names: Optional[str] = None    # a "folder<TAB>name" file per class (e.g. LOC_synset_mapping.txt)

    def __post_init__(self) -> None:
        one_of(self.dataset, "data.dataset", ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "imagenet"))
        if isinstance(self.resident, str) and self.resident.lower() in ("true", "false"):
            object.__setattr__(self, "resident", self.resident.lower() == "true")
        check(isinstance(self.resident, bool) or self.resident == "auto", "data.resident",
               f"{self.resident!r} is not one of auto, true, false (auto keeps small training sets on a CUDA "
               "device; false always builds batches on the host)")
        one_of(self.augment, "data.augment", ("standard", "none"))
        in_range(self.image_size, "data.image_size", 8, 512)
        in_range(self.val_fraction, "data.val_fraction", 0.0, 0.9, hi_open=True)
        in_range(self.batch_size, "data.batch_size", 1)
        in_range(self.eval_batch_size, "data.eval_batch_size", 1)
        in_range(self.num_workers, "data.num_workers", 0, 64)
        for key in ("max_train_samples", "max_eval_samples", "max_train_per_class"):
            in_range(getattr(self, key), f"data.{key}", 1)
        check(self.root is not None or self.dataset not in ROOT_LAYOUTS, "data.root",
              f"an {self.dataset} dataset needs data.root pointing at {ROOT_LAYOUTS.get(self.dataset)}")
        one_of(self.bad_images, "data.bad_images", ("error", "skip"))
        one_of(self.decode, "data.decode", ("pil", "torchvision"))


@dataclass(frozen=True)
class ModelConfig:
    """A network from the zoo (`richkd models` lists the names)."""
    arch: str = "resnet8x4"


@dataclass(frozen=True)
class TeacherConfig:
    """The frozen conventional teacher. checkpoint holds {"model": state_dict} (mdistiller format)."""
    arch: Optional[str] = None
    checkpoint: Optional[str] = None


@dataclass(frozen=True)
class ClipConfig:
    """The frozen CLIP teacher and its zero-shot head."""
    model: str = "ViT-L-14"
    pretrained: str = "openai"            # open_clip tag, a local file path, or local-dir:FOLDER
    prompt_set: str = "richkd12"          # a built-in set name, or a path to a YAML file with `templates:`
    clean_class_names: bool = False       # false: "aquarium_fish" as the official code; true: "aquarium fish"
    batch_size: int = 128                 # for cache building / zero-shot evaluation

    def __post_init__(self) -> None:
        check(bool(self.model), "clip.model", "must name an open_clip architecture, e.g. ViT-B-32")
        check(bool(self.pretrained), "clip.pretrained", "must be a tag (openai), a file path or local-dir:PATH")
        check(bool(self.prompt_set), "clip.prompt_set", "must name a prompt set")
        in_range(self.batch_size, "clip.batch_size", 1)


@dataclass(frozen=True)
class LossConfig:
    """Loss terms and RichKD fusion knobs. Zero weights switch a term off entirely (no memory bank, no CLIP)."""
    method: str = "richkd"               # supervised (CE only) | kd (Hinton KD) | richkd (fused teacher)
    ce_weight: float = 1.0
    logit_weight: float = 3.0            # w_L, multiplied by T^2 inside kd_loss
    temperature: float = 3.0
    fusion_alpha: float = 0.7            # z_F = alpha z_T + (1 - alpha) s cos_C
    clip_logit_scale: float = 1.0        # 1 = official code (raw cosine); ~100 = CLIP's own convention
    zero_clip_logits: bool = False       # the alpha-only control: s cos_C == 0
    feat_weight: float = 0.8             # w_F; 0 gives RichKD-L
    feat_lambda: Optional[float] = None  # None: tied to fusion_alpha (official code); paper: separate
    feat_dim: int = 128
    nce_k: int = 16384
    nce_temperature: float = 0.07
    nce_momentum: float = 0.5
    # CRD negatives (docs/method.md#feature-fusion-and-crd): other_class = K distinct rows of other classes per
    # sample, as the official dataset draws them; uniform = K i.i.d. draws over the other-class rows
    nce_sampling: str = "other_class"
    # form of the (fused) logit term (docs/method.md#other-distillation-losses): kl = Hinton KD; dkd = Decoupled
    # KD (alpha * target-class + beta * non-target-class KL, weight ramped up over the first warm-up epochs)
    kd_form: str = "kl"
    dkd_alpha: float = 1.0               # mdistiller's DKD defaults: alpha 1, beta 8 (T 4, warm-up 20)
    dkd_beta: float = 8.0
    dkd_warmup_epochs: int = 20          # weight min(epoch / warm-up, 1), 1-based epochs; 0: no warm-up
    logit_stand: bool = False            # z-score student and teacher logits before the softmax (either form)
    confidence_threshold: float = 0.5    # for the confident-correct / confidently-wrong analysis

    def __post_init__(self) -> None:
        one_of(self.method, "loss.method", ("supervised", "kd", "richkd"))
        for key in ("ce_weight", "logit_weight", "feat_weight"):
            in_range(getattr(self, key), f"loss.{key}", 0.0, 1000.0)
        in_range(self.temperature, "loss.temperature", 0.0, 100.0, lo_open=True)
        in_range(self.fusion_alpha, "loss.fusion_alpha", 0.0, 1.0)
        in_range(self.clip_logit_scale, "loss.clip_logit_scale", 0.0, 1000.0)
        in_range(self.feat_lambda, "loss.feat_lambda", 0.0, 1.0)
        in_range(self.feat_dim, "loss.feat_dim", 1, 4096)
        in_range(self.nce_k, "loss.nce_k", 1)
        in_range(self.nce_temperature, "loss.nce_temperature", 0.0, 10.0, lo_open=True)
        in_range(self.nce_momentum, "loss.nce_momentum", 0.0, 1.0, hi_open=True)
        one_of(self.nce_sampling, "loss.nce_sampling", ("other_class", "uniform"))
        one_of(self.kd_form, "loss.kd_form", ("kl", "dkd"))
        in_range(self.dkd_alpha, "loss.dkd_alpha", 0.0, 1000.0)
        in_range(self.dkd_beta, "loss.dkd_beta", 0.0, 1000.0)
        in_range(self.dkd_warmup_epochs, "loss.dkd_warmup_epochs", 0, 100000)
        in_range(self.confidence_threshold, "loss.confidence_threshold", 0.0, 1.0)
        if self.fused_teacher:
            check(self.logit_weight > 0 or self.feat_weight > 0, "loss",
                   "richkd needs logit_weight > 0 (RichKD-L) or feat_weight > 0 (RichKD-F), or both")

    # What loss.method means, decided here only: every method but supervised distils from the conventional
    # teacher; richkd distils from the teacher fused with CLIP, and its feature term (feat_weight > 0) is CRD.
    @property
    def uses_teacher(self) -> bool:
        return self.method != "supervised"

    @property
    def fused_teacher(self) -> bool:
        return self.method == "richkd"

    @property
    def uses_crd(self) -> bool:
        return self.fused_teacher and self.feat_weight > 0

    @property
    def resolved_feat_lambda(self) -> float:
        return self.fusion_alpha if self.feat_lambda is None else self.feat_lambda


@dataclass(frozen=True)
class TeachingConfig:
    """Which image each frozen teacher sees and where its outputs come from: official (the teacher online on the
    student's view, CLIP's clean-image outputs cached), cached (both cached: the clean image, or V seeded views
    the student is shown), online (both on the student's view). docs/method.md#teaching-protocol compares them."""
    mode: str = "cached"
    cache_dir: str = "tune_runs/cache"
    views: int = 1                       # cached views per image: 1 = the clean image; V > 1 = FKD-style
    view_seed: int = 0                   # V seeded crops/flips (view 0 clean) shared with the student
    # store only the k largest teacher logits per cached row (FKD's soft-label compression); the rest of the
    # distribution is reconstructed (richkd/cache/topk.py). None: all logits. Sharded (imagenet) caches only.
    logit_topk: Optional[int] = None

    def __post_init__(self) -> None:
        one_of(self.mode, "teaching.mode", ("cached", "online", "official"))
        in_range(self.logit_topk, "teaching.logit_topk", 1, 32767)
        check(self.logit_topk is None or self.mode == "cached", "teaching.logit_topk",
              "top-k logits are a cache format; they need teaching.mode=cached")
        in_range(self.views, "teaching.views", 1, 1024)
        in_range(self.view_seed, "teaching.view_seed", 0, 2**31 - 1)
        check(self.views == 1 or self.mode == "cached", "teaching.views",
               f"cached views need teaching.mode=cached ({self.mode} teaching runs the conventional teacher on "
               "the student's view)")


@dataclass(frozen=True)
class OptimConfig:
    """SGD and a pure learning-rate schedule (see trainer.lr_at)."""
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "step"
    milestones: Tuple[int, ...] = (150, 180, 210)
    gamma: float = 0.1
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        in_range(self.lr, "optim.lr", 0.0, 10.0, lo_open=True)
        in_range(self.momentum, "optim.momentum", 0.0, 1.0, hi_open=True)
        in_range(self.weight_decay, "optim.weight_decay", 0.0, 1.0)
        one_of(self.schedule, "optim.schedule", ("step", "cosine"))
        in_range(self.gamma, "optim.gamma", 0.0, 1.0, lo_open=True)
        in_range(self.warmup_epochs, "optim.warmup_epochs", 0)
        check(list(self.milestones) == sorted(self.milestones) and all(m > 0 for m in self.milestones),
               "optim.milestones", f"must be increasing positive epochs, got {list(self.milestones)}")
        check(not (self.nesterov and self.momentum == 0), "optim.nesterov", "nesterov needs momentum > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Length of training and where checkpoints go."""
    epochs: int = 240
    eval_every: int = 1                  # evaluate on the validation split every N epochs (and the last)
    checkpoint_dir: Optional[str] = None # None: no TrainState files (Tune trials checkpoint through Tune)
    threads: Optional[int] = None        # torch CPU threads; None: leave torch's default / Ray's grant
    amp: bool = False                    # bf16 autocast for the student's training forward on CUDA (teacher
                                         # targets, losses and validation stay fp32)
    channels_last: bool = False          # NHWC memory format (faster convolutions on tensor cores)
    compile: bool = False                # torch.compile the student: pays a compile per process, for long runs
    cudnn_benchmark: bool = False        # let cuDNN time its kernels for the (fixed) input shapes, e.g. CIFAR
    deterministic: bool = False          # deterministic algorithms on CUDA too (slower): bitwise repeatable runs

    def __post_init__(self) -> None:
        in_range(self.epochs, "train.epochs", 1, 100000)
        in_range(self.eval_every, "train.eval_every", 1)
        in_range(self.threads, "train.threads", 1, 1024)
        check(not (self.deterministic and self.cudnn_benchmark), "train.cudnn_benchmark",
              "cuDNN's timed kernel choice is not deterministic; set it false with train.deterministic: true")


# Cheap defaults: one corruption per family (noise, blur, digital, compression) at the middle severity on a
# seeded 500-image subset of the validation split, so a CPU trial is not dominated by the extra passes.
DEFAULT_EVAL_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")


@dataclass(frozen=True)
class RobustnessEvalConfig:
    """Corruption accuracy on the validation split at every evaluation (val_corrupt_top1 / _ece), with the seeded
    corruptions of richkd.robustness; switched on by a sweep whose objective needs it. It changes no cache."""
    enabled: bool = False
    corruptions: Tuple[str, ...] = DEFAULT_EVAL_CORRUPTIONS   # names from `richkd evaluate --help`
    severities: Tuple[int, ...] = (3,)                       # each in 1..5; the metric averages corruption x severity
    max_samples: Optional[int] = 500     # seeded class-stratified subset of the val split (None: all of it)
    seed: int = 0                        # picks the subset and the noise

    def __post_init__(self) -> None:
        check(len(self.corruptions) > 0, "robustness.corruptions",
               f"list at least one corruption, e.g. {list(DEFAULT_EVAL_CORRUPTIONS)}")
        check(len(set(self.corruptions)) == len(self.corruptions), "robustness.corruptions",
               f"{list(self.corruptions)} has duplicates")
        for name in self.corruptions:
            one_of(name, "robustness.corruptions", CORRUPTION_NAMES)
        check(len(self.severities) > 0, "robustness.severities", "list at least one severity in 1..5, e.g. [3]")
        for s in self.severities:
            in_range(s, "robustness.severities", 1, 5)
        check(len(set(self.severities)) == len(self.severities), "robustness.severities",
               f"{list(self.severities)} has duplicates")
        in_range(self.max_samples, "robustness.max_samples", 1)
        in_range(self.seed, "robustness.seed", 0, 2**31 - 1)


@dataclass(frozen=True)
class Config:
    """Everything one run needs. Plain dicts cross process boundaries; this is rebuilt on the other side."""
    name: str = "run"
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teaching: TeachingConfig = field(default_factory=TeachingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    robustness: RobustnessEvalConfig = field(default_factory=RobustnessEvalConfig)

    def __post_init__(self) -> None:
        check(self.device == "auto" or self.device in ("cpu", "cuda", "mps") or self.device.startswith("cuda:"),
               "device", f"{self.device!r} is not auto, cpu, cuda, cuda:N or mps")
        in_range(self.seed, "seed", 0, 2**31 - 1)
        check(self.teaching.views == 1 or self.data.augment == "standard", "teaching.views",
               "cached augmented views need data.augment=standard")
        check(not (self.robustness.enabled and self.data.val_fraction == 0), "robustness.enabled",
               "robustness metrics are measured on the validation split, and data.val_fraction is 0; set "
               "data.val_fraction > 0 or robustness.enabled: false")
        check(self.teaching.logit_topk is None or self.data.dataset == "imagenet", "teaching.logit_topk",
              "top-k logits are stored by the sharded caches of data.dataset=imagenet; set it to null here")
        check(not (self.teaching.mode == "official" and self.data.dataset == "imagenet"), "teaching.mode",
              "official teaching reads CLIP-only caches, and an imagenet cache stores the teacher's and CLIP's "
              "outputs of the same views together; use teaching.mode cached or online for data.dataset=imagenet")

    @property
    def uses_clip(self) -> bool:
        """CLIP is needed only when fused logits use it or feature fusion is on."""
        loss = self.loss
        if not loss.fused_teacher:
            return False
        logits_need_clip = loss.logit_weight > 0 and loss.fusion_alpha < 1 and not loss.zero_clip_logits
        return logits_need_clip or (loss.feat_weight > 0 and loss.resolved_feat_lambda < 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "Config":
        return build(cls, raw)

    @classmethod
    def from_yaml(cls, path: "str | os.PathLike") -> "Config":
        raw = load_yaml_mapping(path)
        if "space" in raw or "tune" in raw:   # given where a run config belongs (train --config, ...)
            raise ConfigError(f"{path} is a sweep spec (it has space: / tune:), not a run config; run it with "
                              f"`richkd sweep {path}`, or pass a run config (configs/ has examples)")
        return cls.from_dict(raw)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A new config with dotted keys replaced, e.g. {"optim.lr": 0.01}, validated as a whole (an unknown key
        is the usual "did you mean" error)."""
        nested = self.to_dict()
        for dotted, value in overrides.items():
            *sections, leaf = dotted.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{dotted}: {section} is a value, not a section of keys")
            if isinstance(node.get(leaf), dict):
                raise ConfigError(f"{dotted}: is a section; set its keys one by one, e.g. "
                                  f"{dotted}.{next(iter(node[leaf]))}")
            node[leaf] = value
        return Config.from_dict(nested)

    def to_dict(self) -> dict:
        """Nested plain dict (tuples become lists) suitable for YAML and for crossing the Ray boundary."""
        return to_plain(self)

    def to_flat_dict(self) -> dict:
        """{"section.key": value} for MLflow params and leaderboards."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def dotted_keys() -> list[str]:
    """Every valid dotted key of Config, e.g. "loss.fusion_alpha"; used by search-space validation."""
    return sorted(Config().to_flat_dict())

