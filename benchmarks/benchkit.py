"""Shared pieces of the benchmark suite: machine facts, process memory, synthetic CIFAR data and caches, train steps.

Everything here builds the product's own objects (richkd.teachers.CachedTeachers / OnlineTeachers,
richkd.objective.DistillationObjective, richkd.models, richkd.data loaders, richkd.cache entries); only the data
and the weights are synthetic (random), which does not change the cost of a step.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

for _k, _v in (("RAY_AUTH_MODE", "disabled"), ("MLFLOW_DISABLE_TELEMETRY", "true"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# CIFAR-100 shapes (the official RichKD recipe: resnet32x4 -> resnet8x4, batch 64, 32x32 inputs)
N_TRAIN = 50000
NUM_CLASSES = 100
TEACHER_ARCH, STUDENT_ARCH = "resnet32x4", "resnet8x4"
TEACHER_FEAT_DIM = 256
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CLIP_DIMS = {"tiny": 64, "vitb32": 512}
VITB32 = "ViT-B-32"


# ----- machine and process facts --------------------------------------------------------------------

def machine_info(device: str = "cpu") -> dict:
    info = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg": list(os.getloadavg()), "mem_total_gb": round(_meminfo_kb("MemTotal") / 2**20, 1),
    }
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _meminfo_kb(key: str) -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_status_mb(pid: int | str = "self") -> dict:
    """VmRSS (current) and VmHWM (peak RSS) of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_rss_mb": out.get("VmHWM", 0.0)}


def smaps_rollup_mb(pid: int | str = "self") -> dict:
    """Rss and Pss (proportional set size: shared pages divided by their sharers) of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:", "Shared_Clean:", "Private_Clean:", "Private_Dirty:"):
                out[parts[0][:-1].lower() + "_mb"] = int(parts[1]) / 1024
    return out


def mapped_files_mb(pid: int | str, under: str | os.PathLike) -> dict:
    """Rss and Pss of the memory mappings of files below `under` (the cache folder), in MB."""
    under = str(Path(under).resolve())
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].strip().startswith(under)
            elif inside and head[0] == "Rss:":
                rss += int(head[1])
            elif inside and head[0] == "Pss:":
                pss += int(head[1])
    return {"cache_rss_mb": rss / 1024, "cache_pss_mb": pss / 1024}


def have_open_clip() -> bool:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- synthetic CIFAR-100-shaped data and caches -------------------------------------------------------

def synthetic_train_set(n: int = N_TRAIN, seed: int = 0, augment: bool = True):
    """A richkd SplitDataset over n random uint8 32x32 RGB images with 100 interleaved classes.

    Same container and augmentation (random crop pad 4 + flip) as the real CIFAR-100 train split.
    """
    from richkd.data.datasets import SplitDataset
    from richkd.data.sources import TensorSource

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = torch.arange(n, dtype=torch.int64) % NUM_CLASSES
    source = TensorSource(images, targets, origin="synthetic-cifar100")
    return SplitDataset(source, torch.arange(n), 32, augment, "train")


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def write_synthetic_caches(cache_dir: str | os.PathLike, n: int = N_TRAIN, clip_dims=(64, 512),
                           seed: int = 0) -> dict:
    """CIFAR-sized teacher and CLIP caches written through richkd.cache.write_entry (manifest + .npy, fp16).

    Returns {"teacher": {"logits", "feat"}, "clip64": {"feat"}, ...} memory-mapped by richkd.cache.read_entry,
    plus "bytes": the total size of the .npy files (one copy of the cache).
    """
    from richkd.cache import CacheEntry, entry_exists, read_entry, write_entry

    rng = np.random.default_rng(seed)
    out: dict = {}
    total = 0
    specs = [("teacher", {"synthetic": "teacher", "n": n, "c": NUM_CLASSES, "d": TEACHER_FEAT_DIM},
              lambda: {"logits": (3 * rng.standard_normal((n, NUM_CLASSES), dtype=np.float32)).astype(np.float16),
                       "feat": np.abs(rng.standard_normal((n, TEACHER_FEAT_DIM), dtype=np.float32)).astype(
                           np.float16)})]
    for d in clip_dims:
        specs.append((f"clip{d}", {"synthetic": "clip-image", "n": n, "d": d},
                      lambda d=d: {"feat": _unit_rows(rng, n, d)}))
    for name, fields_, make in specs:
        entry = CacheEntry(f"bench-{name}", fields_)
        if not entry_exists(entry, cache_dir):
            write_entry(entry, cache_dir, make())
        out[name] = read_entry(entry, cache_dir)
        total += sum(f.stat().st_size for f in entry.path(cache_dir).glob("*.npy"))
    out["bytes"] = total
    return out


def class_embeddings(dim: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(NUM_CLASSES, dim, generator=g), dim=1)


# ----- teachers ------------------------------------------------------------------------------------------

def build_clip(kind: str, device: torch.device, work_dir: str | os.PathLike):
    """A ClipTeacher: the offline tiny model ("tiny") or a randomly initialised ViT-B-32 ("vitb32").

    Random weights cost exactly what real ones do; open_clip builds ViT-B-32 offline with pretrained=None.
    """
    from richkd.clip import TINY_CLIP_MODEL, init_tiny_clip, load_clip

    if kind == "tiny":
        path = Path(work_dir) / "tiny_clip.pt"
        if not path.is_file():
            init_tiny_clip(path)
        return load_clip(TINY_CLIP_MODEL, str(path), device=device)
    if kind == "vitb32":
        import open_clip

        from richkd.clip import ClipTeacher

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(VITB32, pretrained=None, device=device)
        return ClipTeacher(model, None, model_name=VITB32, pretrained="random-init", weights_id="random-init")
    raise ValueError(f"unknown CLIP kind {kind!r}; use tiny or vitb32")


def build_teacher(device: torch.device) -> torch.nn.Module:
    from richkd.models import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = create_model(TEACHER_ARCH, NUM_CLASSES)
    return model.to(device).eval().requires_grad_(False)


# ----- one trainer step ----------------------------------------------------------------------------------

@dataclass
class StepSpec:
    """One benchmarked configuration: RichKD variant x teaching mode x CLIP size."""
    variant: str = "L"            # L (feat_weight 0) | LF (feat_weight 0.8, CRD with nce_k 16384 over 50k rows)
    mode: str = "cached"          # online | official | cached
    clip: str = "tiny"            # tiny | vitb32 (CLIP model for online; cache width for official / cached)
    batch_size: int = 64
    nce_k: int = 16384
    amp: bool = False
    channels_last: bool = False
    nce_sampling: str = "other_class"   # loss.nce_sampling of the L+F variant (+iid in the name: uniform)

    @property
    def name(self) -> str:
        extra = "".join(s for s, on in (("+amp", self.amp), ("+cl", self.channels_last),
                                        ("+iid", self.nce_sampling == "uniform")) if on)
        return f"{self.variant}/{self.mode}/{self.clip}{extra}"


class TrainBench:
    """Student + objective + optimiser + teacher source + seeded loader; `step()` is one trainer step.

    `step()` calls richkd.trainer.train_step, the step Run.train_one_epoch runs (normalise on device, student
    forward, teacher outputs, objective, backward, SGD step), and accumulates the loss as the epoch loop does.
    Run itself needs a dataset on disk, so the pieces it steps are built here from the same factories
    Run.__init__ uses.
    """

    def __init__(self, spec: StepSpec, device: torch.device, dataset, caches: Optional[dict], work_dir,
                 shared: Optional[dict] = None, seed: int = 0) -> None:
        from richkd.config import LossConfig
        from richkd.data import make_loader
        from richkd.models import create_model
        from richkd.objective import DistillationObjective
        from richkd.teachers import CachedTeachers, OfficialTeachers, OnlineTeachers

        shared = {} if shared is None else shared
        self.spec, self.device = spec, device
        torch.manual_seed(seed)
        self.student = create_model(STUDENT_ARCH, NUM_CLASSES).to(device)
        if spec.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        clip_dim = CLIP_DIMS[spec.clip]
        class_emb = class_embeddings(clip_dim)
        if spec.mode in ("online", "official"):
            if "teacher" not in shared:
                shared["teacher"] = build_teacher(device)
            teacher = shared["teacher"]
        if spec.mode == "online":
            key = f"clip-{spec.clip}"
            if key not in shared:
                shared[key] = build_clip(spec.clip, device, work_dir)
            self.teachers = OnlineTeachers(teacher, shared[key], class_emb, device)
        elif spec.mode == "official":  # the teacher online on the student's view, CLIP rows from the cache
            self.teachers = OfficialTeachers(teacher, caches[f"clip{clip_dim}"]["feat"], class_emb, device,
                                             num_rows=N_TRAIN)
        elif spec.mode == "cached":
            t = caches["teacher"]
            self.teachers = CachedTeachers(t["logits"], t["feat"], caches[f"clip{clip_dim}"]["feat"], class_emb,
                                           device, num_rows=N_TRAIN)
        else:
            raise ValueError(f"unknown mode {spec.mode!r}")
        loss = LossConfig(method="richkd", feat_weight=0.0 if spec.variant == "L" else 0.8, nce_k=spec.nce_k,
                          nce_sampling=spec.nce_sampling)
        train_targets = torch.arange(N_TRAIN, dtype=torch.int64) % NUM_CLASSES
        self.objective = DistillationObjective(
            loss, student_dim=self.student.feat_dim, teacher_dim=self.teachers.teacher_dim,
            clip_dim=self.teachers.clip_dim, train_targets=train_targets, train_rows=torch.arange(N_TRAIN),
        ).to(device)
        params = list(self.student.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.loader = make_loader(dataset, spec.batch_size, shuffle=True, seed=seed, pin_memory=device.type == "cuda")
        self.mean, self.std = (torch.tensor(v, device=device) for v in (CIFAR100_MEAN, CIFAR100_STD))  # as Run
        self._it = iter(self.loader)
        self.total = torch.zeros((), device=device)
        self.student.train()
        self.objective.train()

    def _next_batch(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def step(self) -> dict:
        """One richkd.trainer.train_step (the step Run.train_one_epoch runs); returns its detached loss terms."""
        from richkd.trainer import train_step

        record = train_step(self._next_batch(), forward_student=self.student, teachers=self.teachers,
                            objective=self.objective, optimizer=self.optimizer, device=self.device,
                            mean=self.mean, std=self.std, channels_last=self.spec.channels_last,
                            amp=self.spec.amp)
        self.total += record.loss * record.batch_size
        return record.terms

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps (device-synchronised)."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0


def interleaved(benches: dict, steps: dict, rounds: int, warmup, batch_size: int, log=None) -> dict:
    """Round-robin timing: every round runs `steps[name]` steps of each bench in turn (warm-up excluded).

    Interleaving makes the ratios between configurations robust to load that changes during the run (other
    processes on a shared machine): each configuration sees the same mix of quiet and busy periods.
    Returns {name: {"images_per_s": median over rounds, "spread": (max - min) / median, "rounds": [...]}}.
    """
    for name, bench in benches.items():
        bench.run(warmup[name] if isinstance(warmup, dict) else warmup)
    per_round: dict = {name: [] for name in benches}
    for r in range(rounds):
        for name, bench in benches.items():
            dt = bench.run(steps[name])
            per_round[name].append(steps[name] * batch_size / dt)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n}={v[-1]:.0f}" for n, v in per_round.items()))
    out = {}
    for name, values in per_round.items():
        med = statistics.median(values)
        out[name] = {"images_per_s": med, "spread": (max(values) - min(values)) / med if med else 0.0,
                     "rounds": [round(v, 2) for v in values], "steps_per_round": steps[name]}
    return out


def spec_from_name(name: str, batch_size: int = 64) -> StepSpec:
    """"LF/cached/tiny+amp+cl" -> StepSpec (the inverse of StepSpec.name)."""
    head, *flags = name.split("+")
    variant, mode, clip = head.split("/")
    unknown = set(flags) - {"amp", "cl", "iid"}
    if variant not in ("L", "LF") or mode not in ("online", "official", "cached") or clip not in CLIP_DIMS or unknown:
        raise ValueError(f"bad configuration name {name!r}; expected VARIANT/MODE/CLIP[+amp][+cl][+iid], "
                         "e.g. LF/cached/tiny")
    return StepSpec(variant, mode, clip, batch_size, amp="amp" in flags, channels_last="cl" in flags,
                    nce_sampling="uniform" if "iid" in flags else "other_class")


def spec_from_json(text: str) -> StepSpec:
    return StepSpec(**json.loads(text))


def spec_to_json(spec: StepSpec) -> str:
    return json.dumps(asdict(spec))


def median(values):
    return statistics.median(values) if values else float("nan")


def child_env() -> dict:
    """The environment for benchmark worker processes: this one plus the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def wait_ready(procs: list, what: str) -> list[str]:
    """Block until every worker printed its `READY <payload>` barrier line; return the payloads in order."""
    payloads = []
    for p in procs:
        line = p.stdout.readline()
        while line and not line.startswith("READY "):
            line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} failed to start: {p.stderr.read()[-3000:]}")
        payloads.append(line[len("READY "):])
    return payloads
