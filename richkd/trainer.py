"""One readable training loop: schedule, train an epoch, evaluate, report, checkpoint, resume exactly.

`train_step` is the package's one optimisation step: Run.step runs it for every batch, and the benchmarks time
it on objects built over synthetic data, so a change to the step changes what is measured too.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from tqdm import tqdm

from richkd.analysis import teacher_analysis
from richkd.config import Config, OptimConfig
from richkd.data import build_data, make_loader, normalize
from richkd.data.resident import make_resident
from richkd.device import resolve_device, seed_everything
from richkd.io import atomic_torch_save, atomic_write_text, load_problem, quiet_torch_load
from richkd.metrics import ClassificationMeter
from richkd.models import create_model, save_model_checkpoint
from richkd.objective import DistillationObjective
from richkd.robustness.engine import val_robustness_metrics
from richkd.teachers import build_teacher_source

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the run cannot continue meaningfully."""


def lr_at(epoch: int, optim: OptimConfig, total_epochs: int) -> float:
    """Learning rate for a 1-based epoch. step: lr * gamma^#(epoch > milestone), the mdistiller/RichKD rule
    (epochs 1..150 use the base rate, 151..180 one decay, ...); cosine: half-cosine from lr to 0 over total_epochs;
    either scaled by a linear warm-up over the first `warmup_epochs` epochs."""
    if epoch < 1:
        raise ValueError(f"epochs are 1-based, got {epoch}")
    if optim.schedule == "step":
        lr = optim.lr * optim.gamma ** sum(epoch > m for m in optim.milestones)
    else:
        lr = optim.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / total_epochs))
    if optim.warmup_epochs and epoch <= optim.warmup_epochs:
        lr *= epoch / optim.warmup_epochs
    return lr


def evaluates_at(epoch: int, train) -> bool:
    """Is the validation split evaluated after this 1-based epoch? Every `train.eval_every` epochs and the last."""
    return epoch % train.eval_every == 0 or epoch == train.epochs


class StepRecord(NamedTuple):
    """What one train step leaves behind: the loss and its terms (detached) and the batch size."""
    loss: torch.Tensor
    terms: dict
    batch_size: int


def student_inputs(images: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    """Normalised float images in the student's memory format; mean/std: per-channel tensors on the images'
    device (Run builds them once: no host->device copy per step) or tuples."""
    x = normalize(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when amp, for the student's training forward only; the objective casts logits and
    features to fp32 itself."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def train_step(batch, *, forward_student: Callable, teachers, objective, optimizer: torch.optim.Optimizer,
               device: torch.device, mean, std, channels_last: bool = False, amp: bool = False) -> StepRecord:
    """One optimisation step: batch to device, normalise, student and teacher forward, objective, SGD step.
    `teachers` may be None (supervised runs); it is only called when the objective needs teacher outputs."""
    batch = batch.to(device, non_blocking=True)
    x = student_inputs(batch.image, mean, std, channels_last)
    with autocast(device, amp):
        out = forward_student(x)
    # outside autocast: the targets stay fp32 (as in teacher_analysis), whatever train.amp does to the student
    teacher = teachers(batch, x) if teachers is not None and objective.needs_teacher else None
    terms = objective(out, batch.target, teacher, batch.index)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return StepRecord(loss.detach(), {name: value.detach() for name, value in terms.items()}, len(batch))


@dataclass
class EpochReport:
    """What the loop hands to its callback after every epoch (Tune reports from here)."""
    epoch: int
    metrics: dict
    state: Callable[[], dict]  # TrainState as a torch-saveable dict (computed on demand)


@dataclass
class TrainResult:
    metrics: dict                      # last epoch's metrics
    best_val_top1: float
    epochs_run: int
    history: list = field(default_factory=list)
    test_metrics: dict = field(default_factory=dict)  # only when run with final=True


class Run:
    """All live objects of one training run; built once, then `train()` drives the epochs."""

    def __init__(self, cfg: Config, progress: bool = False) -> None:
        self.cfg, self.progress = cfg, progress
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        # for the whole process (a trial process runs one Run at a time). Deterministic: torch's deterministic
        # algorithms (an op without one warns, naming itself), cuDNN's deterministic kernels, and the cuBLAS
        # workspace CUDA asks for (read when cuBLAS starts: set before the first CUDA matmul; a set value is kept)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=True)
        torch.backends.cudnn.deterministic = cfg.train.deterministic
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        self.device = resolve_device(cfg.device)
        seed_everything(cfg.seed)
        self.data = build_data(cfg.data)
        # normalisation constants on the device once, not copied from the host at every step
        self.mean, self.std = (torch.tensor(v, device=self.device) for v in (self.data.mean, self.data.std))
        # with cached views the student is shown exactly the crops/flips whose teacher outputs are cached
        self.train_set = (self.data.train.with_views(cfg.teaching.views, cfg.teaching.view_seed)
                          if cfg.teaching.views > 1 else self.data.train)
        # data.resident: the training rows once on the device as uint8; batches are gathered and cropped there
        self.resident_train = make_resident(self.train_set, cfg.data.resident, self.device)
        self.student = create_model(cfg.student.arch, self.data.num_classes).to(self.device)
        if cfg.train.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        # the compiled module shares parameters with self.student, so state dicts stay unprefixed
        self.forward_student = torch.compile(self.student) if cfg.train.compile else self.student
        self.teachers = build_teacher_source(cfg, self.data, self.device)
        if cfg.teaching.views > 1 and getattr(self.teachers, "view_boxes", None) is not None:
            # photo views: the student is cropped from the boxes stored with the teachers' outputs
            self.train_set = self.train_set.with_view_boxes(self.teachers.view_boxes)
        self.objective = DistillationObjective(
            cfg.loss, student_dim=self.student.feat_dim,
            teacher_dim=None if self.teachers is None else self.teachers.teacher_dim,
            clip_dim=None if self.teachers is None else self.teachers.clip_dim,
            train_targets=self.data.train_targets, train_rows=torch.as_tensor(self.data.train.indices),
        ).to(self.device)
        # one loader per split for the whole run: DataLoader workers (data.num_workers) start once and persist;
        # the training order is a function of (seed, epoch) (BatchLoader.set_epoch), so resume stays exact
        pin = self.device.type == "cuda"
        self.train_loader = make_loader(self.train_set if self.resident_train is None else self.resident_train,
                                        cfg.data.batch_size, shuffle=True, seed=cfg.seed * 100003,
                                        num_workers=cfg.data.num_workers, pin_memory=pin)
        self._eval_loaders = {split: make_loader(dataset, cfg.data.eval_batch_size, shuffle=False, seed=0,
                                                 num_workers=cfg.data.num_workers, pin_memory=pin)
                              for split, dataset in (("val", self.data.val), ("test", self.data.test))}
        params = list(self.student.parameters()) + list(self.objective.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
        self.epoch = 0
        self.best_val_top1 = float("-inf")
        self.history: list[dict] = []
        self._teacher_metrics: dict[str, dict] = {}
        self.has_val = len(self.data.val) > 0
        if not self.has_val:
            log.warning("%s: no validation split (data.val_fraction %g): training on all %d training rows; this "
                        "run reports no val_* metrics", cfg.name, cfg.data.val_fraction, len(self.train_set))

    def state(self) -> dict:
        """TrainState: everything needed for an exact resume (tensors and plain values only)."""
        return {
            "format_version": STATE_FORMAT_VERSION, "epoch": self.epoch, "config": self.cfg.to_dict(),
            "student": self.student.state_dict(), "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(), "best_val_top1": self.best_val_top1,
            "history": self.history, "rng": torch.get_rng_state(),
            # the run device's generator only: a CPU run never touches CUDA, and any GPU count can resume it
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def load_state(self, state: dict) -> None:
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError("checkpoint was written by an incompatible version of richkd (format_version "
                             f"{state.get('format_version')!r}, expected {STATE_FORMAT_VERSION})")
        self.student.load_state_dict(state["student"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best_val_top1 = float(state["best_val_top1"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"])
        cuda_rng = state.get("cuda_rng")
        if self.device.type == "cuda" and cuda_rng is not None and len(cuda_rng):
            if isinstance(cuda_rng, (list, tuple)):   # older checkpoints: one state per GPU the writer saw
                cuda_rng = cuda_rng[(self.device.index or 0) if (self.device.index or 0) < len(cuda_rng) else 0]
            torch.cuda.set_rng_state(cuda_rng, self.device)

    def step(self, batch) -> StepRecord:
        return train_step(batch, forward_student=self.forward_student, teachers=self.teachers,
                          objective=self.objective, optimizer=self.optimizer, device=self.device,
                          mean=self.mean, std=self.std, channels_last=self.cfg.train.channels_last,
                          amp=self.cfg.train.amp)

    def train_one_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        lr = lr_at(epoch, cfg.optim, cfg.train.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.objective.epoch = epoch   # DKD's warm-up reads it
        self.student.train()
        self.objective.train()
        self.train_loader.set_epoch(epoch)   # the sample order is a function of (seed, epoch): resume is exact
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        n_seen = 0
        with tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.train.epochs}", unit="batch", leave=False,
                  disable=not self.progress) as batches:
            for i, batch in enumerate(batches):
                loss, terms, b = self.step(batch)
                n_seen += b
                total += loss * b
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0) + value * b
                if i % 50 == 0 and not torch.isfinite(loss):  # a periodic check avoids a sync per step
                    break
        mean_loss = float(total) / max(n_seen, 1)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"training loss became {mean_loss} in epoch {epoch} (lr {lr:g}); "
                                     "lower optim.lr or the loss weights")
        return {"train_loss": mean_loss, "lr": lr, **{f"train_{name}": float(v) / n_seen for name, v in sums.items()}}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Top-1/5, ECE and mean CE of the student on a split, in fp32 whatever train.amp says (as `richkd
        evaluate` and the robustness metrics); accumulated on the device, read once at the end."""
        self.student.eval()
        meter = ClassificationMeter()
        for batch in self._eval_loaders[split]:
            batch = batch.to(self.device, non_blocking=True)
            x = student_inputs(batch.image, self.mean, self.std, self.cfg.train.channels_last)
            meter.update(self.forward_student(x).logits.float(), batch.target)
        m = meter.compute()
        return {f"{split}_{k}": m[k] for k in ("top1", "top5", "ece", "loss")}

    @functools.cached_property
    def test_teachers(self):
        """The teacher source for the test split (final runs only): cached modes read the test split's caches,
        which `prepare_caches(cfg, splits=("train", "test"))` builds; a missing one fails here, before training."""
        return None if self.teachers is None else build_teacher_source(self.cfg, self.data, self.device,
                                                                        split="test", reuse=self.teachers)

    def teacher_metrics(self, split: str = "val") -> dict:
        """Frozen-teacher analysis (the paper's Fig. 1 quantities) on a split, computed once per split (teachers
        do not change). The test split is analysed only in final runs."""
        if split not in self._teacher_metrics:
            source = self.test_teachers if split == "test" else self.teachers
            self._teacher_metrics[split] = ({} if source is None else
                                            teacher_analysis(self.cfg, self.data, source, self.objective,
                                                             self.device, split=split))
        return self._teacher_metrics[split]

    def train(self, on_epoch: Optional[Callable[[EpochReport], None]] = None, final: bool = False,
              stop_after_epoch: Optional[int] = None) -> TrainResult:
        cfg = self.cfg
        last_epoch = cfg.train.epochs if stop_after_epoch is None else min(stop_after_epoch, cfg.train.epochs)
        metrics: dict = self.history[-1] if self.history else {}
        test_metrics: dict = {k: v for k, v in metrics.items() if k.startswith("test_")}
        if final:
            self.test_teachers   # built now: a missing test cache is an error before training, not after it

        while self.epoch < last_epoch:
            epoch = self.epoch + 1
            started = time.perf_counter()
            metrics = {"epoch": epoch, **self.train_one_epoch(epoch)}
            metrics["epoch_time_s"] = time.perf_counter() - started
            # data.val_fraction 0 leaves nothing to validate on (a final run; a sweep refuses it)
            if self.has_val and evaluates_at(epoch, cfg.train):
                metrics.update({**self.evaluate("val"), **self.teacher_metrics()})
                if cfg.robustness.enabled:   # val_corrupt_* on a seeded subset of the val split
                    metrics.update(val_robustness_metrics(self.student, self.data.val, self.data.mean, self.data.std,
                                                          self.device, cfg.robustness, cfg.data.eval_batch_size))
                self.best_val_top1 = max(self.best_val_top1, metrics["val_top1"])
            elif self.has_val and self.history:  # keep the metric present in every report (Tune requires it)
                metrics.update({k: v for k, v in self.history[-1].items() if k.startswith("val_")})
            if self.has_val:
                metrics["best_val_top1"] = self.best_val_top1
            if final and epoch == cfg.train.epochs:   # in the last report too (learning-curve tables record it)
                test_metrics = {**self.evaluate("test"), **self.teacher_metrics("test")}
                metrics.update(test_metrics)
            self.epoch = epoch
            self.history.append(metrics)
            log.info("epoch %d/%d: %s", epoch, cfg.train.epochs, ", ".join(
                f"{k}={metrics[k]:.4g}" for k in ("train_loss", "val_top1", "val_loss", "lr") if k in metrics))
            if cfg.train.checkpoint_dir:
                atomic_torch_save(self.state(), Path(cfg.train.checkpoint_dir) / "last.pt")
            if on_epoch is not None:
                on_epoch(EpochReport(epoch, dict(metrics), self.state))
        result = TrainResult(metrics=metrics, best_val_top1=self.best_val_top1 if self.has_val else float("nan"),
                             epochs_run=self.epoch, history=list(self.history))
        if final:  # the last epoch's student, never a selected epoch; plus the teachers' Fig. 1 analysis
            result.test_metrics = test_metrics or {**self.evaluate("test"), **self.teacher_metrics("test")}
        return result

    def save_outputs(self, result: TrainResult, out_dir: str | Path) -> Path:
        """What a finished run leaves in out_dir: student.pt (mdistiller's format, so it can be a teacher or go to
        `richkd evaluate`, which finds config.yaml next to it), config.yaml and result.json. Returns student.pt."""
        out = Path(out_dir)
        save_model_checkpoint(self.student, out / "student.pt", arch=self.cfg.student.arch,
                              num_classes=self.data.num_classes)
        atomic_write_text(out / "config.yaml", self.cfg.to_yaml())
        summary = {"config": self.cfg.to_dict(), "metrics": result.metrics, "best_val_top1": result.best_val_top1,
                   "test_metrics": result.test_metrics, "model": str(out / "student.pt")}
        atomic_write_text(out / "result.json", json.dumps(summary, indent=1, default=float))
        return out / "student.pt"


def run_training(cfg: Config, *, on_epoch: Optional[Callable[[EpochReport], None]] = None,
                 resume_state: Optional[dict] = None, progress: bool = False, final: bool = False,
                 stop_after_epoch: Optional[int] = None) -> TrainResult:
    """Train cfg's student (supervised, KD or RichKD); the test split is evaluated only with final=True."""
    run = Run(cfg, progress=progress)
    if resume_state is not None:
        run.load_state(resume_state)
    return run.train(on_epoch=on_epoch, final=final, stop_after_epoch=stop_after_epoch)


def load_train_state(path: str | Path) -> dict:
    """Read a TrainState written by this package (tensors and plain values only: weights_only is safe)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        with quiet_torch_load():
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or foreign file
        raise ValueError(f"{p} is not a readable richkd training checkpoint ({load_problem(exc)})") from None

