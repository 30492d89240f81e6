"""The GPU paths, tested on the CPU always and on CUDA when present (the CUDA variants are marked `cuda`; a lent
GPU runs them with `pytest -m cuda`, see benchmarks/gpu_check.sh).

What only a GPU can show (no host syncs in a train step, pinned batches) is checked inside the CUDA variants with
torch.cuda.set_sync_debug_mode("error"). A GPU that Ray gave a process but torch cannot use is simulated on the
CPU (torch.cuda.is_available patched) and goes through the real trial, task and node-check functions.
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from richkd.config import Config, ConfigError
from richkd.trainer import Run
from tests.factories import base_spec, make_assets

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, CUDA])]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def device_cfg(assets, work, device: str, **overrides) -> Config:
    """base_spec's RichKD-L+F config (Fashion-MNIST subset, random resnet8 teacher, tiny CLIP), one epoch."""
    raw = base_spec(assets, work)["config"]
    cfg = Config.from_dict({**raw, "device": device, "train": {"epochs": 1}})
    return cfg.with_overrides(overrides) if overrides else cfg


@contextlib.contextmanager
def no_host_syncs(device: torch.device):
    """On CUDA, any operation that makes the host wait for the device raises inside the block."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def recording_teachers(run: Run) -> tuple[list, object]:
    """Wrap run.teachers so that every TeacherOutputs it returns is kept; returns (kept outputs, the source)."""
    seen, real = [], run.teachers
    run.teachers = lambda batch, x: seen.append(real(batch, x)) or seen[-1]
    return seen, real


def first_batch(run: Run):
    run.train_loader.set_epoch(1)
    return next(iter(run.train_loader))


# ----- a train step on the device -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["cached", "official", "online"])
def test_a_train_step_in_each_teaching_mode_runs_on_the_device_without_host_syncs(assets, tmp_path, device, mode):
    from richkd.cache import prepare_caches

    cfg = device_cfg(assets, tmp_path, device, **{"teaching.mode": mode})
    prepare_caches(cfg)
    run = Run(cfg)
    seen, _ = recording_teachers(run)
    batch = first_batch(run)
    if run.device.type == "cuda":
        assert run.resident_train is not None or batch.image.is_pinned()
    with no_host_syncs(run.device):
        record = run.step(batch)
    out = seen[0]
    for t in (out.logits, out.feat, out.clip_feat, out.clip_cosine):
        assert t.dtype == torch.float32 and t.device.type == run.device.type
    assert set(record.terms) == {"ce", "logit", "feat"} and math.isfinite(float(record.loss))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["cached", "online"])
def test_amp_runs_the_student_in_bf16_and_keeps_the_teacher_targets_fp32(assets, tmp_path, monkeypatch, device,
                                                                          mode):
    """train.amp: the student's forward under bf16 autocast, the teachers' outputs (online teacher, CLIP image
    encoding, the CLIP cosine against the class embeddings, cached rows) in fp32 and equal to the targets without
    amp. On the CPU, where train.amp is off, bf16 autocast is switched on for the test (torch has it there)."""
    import richkd.trainer as trainer
    from richkd.cache import prepare_caches

    if device == "cpu":
        monkeypatch.setattr(trainer, "autocast", lambda dev, amp: torch.autocast(dev.type, torch.bfloat16,
                                                                                  enabled=amp))
    cfg = device_cfg(assets, tmp_path, device, **{"teaching.mode": mode, "train.amp": True})
    prepare_caches(cfg)
    run = Run(cfg)
    seen, source = recording_teachers(run)
    conv = next(m for m in run.student.modules() if isinstance(m, torch.nn.Conv2d))
    student_dtypes = []
    conv.register_forward_hook(lambda module, inputs, output: student_dtypes.append(output.dtype))
    batch = first_batch(run)
    run.step(batch)
    assert student_dtypes == [torch.bfloat16]          # autocast was on for the student: the test can fail
    moved = batch.to(run.device)
    reference = source(moved, trainer.student_inputs(moved.image, run.mean, run.std, False))   # no autocast
    for name in ("logits", "feat", "clip_feat", "clip_cosine"):
        got, want = getattr(seen[0], name), getattr(reference, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # fp32 both: only kernel choice may differ


# ----- the pieces, on the device ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampling", ["other_class", "uniform"])
def test_crd_sampling_and_memory_update_on_the_device(device, sampling):
    from richkd.losses.crd import ContrastMemory

    dev = torch.device(device)
    targets = torch.arange(300) % 7
    torch.manual_seed(0)
    cpu = ContrastMemory(16, targets, nce_k=40, sampling=sampling)
    mem = ContrastMemory(16, targets, nce_k=40, sampling=sampling).to(dev)
    mem.load_state_dict(cpu.state_dict())
    index = torch.arange(0, 300, 10, device=dev)
    v_s = torch.nn.functional.normalize(torch.randn(len(index), 16), dim=1)
    v_t = torch.nn.functional.normalize(torch.randn(len(index), 16), dim=1)
    on_device = v_s.to(dev), v_t.to(dev)
    with no_host_syncs(dev):
        ci = mem.sample(index)
        log_p = mem(*on_device, index, contrast_index=ci)
    assert ci.device.type == dev.type and ci.shape == (len(index), 41)
    neg = ci[:, 1:].cpu()
    assert not (targets[neg] == targets[index.cpu()].unsqueeze(1)).any()
    if sampling == "other_class":
        assert all(len(set(row)) == 40 for row in neg.tolist())
    want = cpu(v_s, v_t, index.cpu(), contrast_index=ci.cpu())
    for got, ref in zip(log_p, want):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)   # device vs CPU matmul order
    torch.testing.assert_close(mem.memory_student.cpu(), cpu.memory_student, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mem.memory_teacher[index].norm(dim=1).cpu(), torch.ones(len(index)), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dkd_on_the_device_matches_the_cpu_and_needs_no_host_sync(device):
    from richkd.losses.dkd import dkd_loss

    dev = torch.device(device)
    torch.manual_seed(0)
    s, t, y = torch.randn(32, 10), torch.randn(32, 10), torch.randint(0, 10, (32,))
    ref_student = s.clone().requires_grad_()
    ref = dkd_loss(ref_student, t, y, 1.0, 8.0, 4.0)
    ref.backward()
    student, teacher, target = s.clone().to(dev).requires_grad_(), t.to(dev), y.to(dev)
    with no_host_syncs(dev):
        loss = dkd_loss(student, teacher, target, 1.0, 8.0, 4.0)
        loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.cpu(), ref_student.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_resident_batches_on_the_device_match_the_host_loader(assets, tmp_path, device):
    """The host loader's batch moved to the device equals the resident one (bit for bit on the CPU; on CUDA the
    uint8 -> float conversion and the 28 -> 32 px resize may round differently in the last bit)."""
    from richkd.data import build_data, make_loader
    from richkd.data.resident import ResidentDataset

    cfg = device_cfg(assets, tmp_path, device, **{"data.augment": "standard"})
    run_data = build_data(cfg.data)
    dev = torch.device(device)
    host = make_loader(run_data.train, 64, shuffle=True, seed=5)
    resident = make_loader(ResidentDataset(run_data.train, dev), 64, shuffle=True, seed=5)
    for a, b in zip(host, resident, strict=True):
        a = a.to(dev)
        assert b.image.device.type == dev.type and torch.equal(a.index, b.index)
        if dev.type == "cpu":
            assert torch.equal(a.image, b.image)
        else:
            torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_resume_across_device_counts(assets, tmp_path, monkeypatch, device):
    """A checkpoint holds the run device's CUDA generator only (none for a CPU run, which never touches CUDA);
    one from an older version, with a state per GPU its writer saw (here 2), still resumes, exactly on the CPU."""
    from richkd.cache import prepare_caches

    cfg = device_cfg(assets, tmp_path, device, **{"train.epochs": 2, "train.deterministic": device == "cuda"})
    prepare_caches(cfg)
    straight = Run(cfg).train()
    first = Run(cfg)
    first.train(stop_after_epoch=1)
    state = first.state()
    if device == "cpu":
        assert state["cuda_rng"] is None
        state["cuda_rng"] = [torch.zeros(16, dtype=torch.uint8)] * 2         # an older 2-GPU checkpoint
    else:
        assert isinstance(state["cuda_rng"], torch.Tensor)
        state["cuda_rng"] = [state["cuda_rng"], torch.cuda.get_rng_state()]   # written where 2 GPUs were visible
    resumed = Run(cfg)
    with monkeypatch.context() as patch:
        if device == "cpu":
            def untouchable(*args, **kwargs):
                raise AssertionError("a device: cpu run touched CUDA")

            for name in ("is_available", "get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all",
                         "current_device", "device_count"):
                patch.setattr(torch.cuda, name, untouchable)
            resumed.state()
        resumed.load_state(state)
    result = resumed.train()
    tol = 1e-6 if device == "cpu" else 1e-4     # CUDA: train.deterministic, but ops without a deterministic kernel warn
    for key in ("train_loss", "val_loss", "val_top1"):
        assert result.metrics[key] == pytest.approx(straight.metrics[key], rel=tol, abs=1e-9), key
    if device == "cuda":
        torch.save(resumed.state(), tmp_path / "state.pt")
        assert isinstance(torch.load(tmp_path / "state.pt", weights_only=True)["cuda_rng"], torch.Tensor)


def test_a_run_builds_its_loaders_once_so_their_workers_persist(assets, tmp_path, monkeypatch):
    """One DataLoader per split for the whole run (persistent_workers): 2 epochs with data.num_workers 1 make the
    training and validation DataLoaders once, not once per epoch and evaluation."""
    cfg = device_cfg(assets, tmp_path, "cpu", **{"loss.method": "supervised", "train.epochs": 2,
                                                  "data.num_workers": 1})
    run = Run(cfg)
    made = []
    real = torch.utils.data.DataLoader.__init__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__",
                        lambda self, *a, **k: made.append(k.get("persistent_workers")) or real(self, *a, **k))
    result = run.train()
    assert made == [True, True] and len(result.history) == 2       # the training and the validation loader


def test_cached_rows_come_in_batch_order_as_fp32_on_the_device(tmp_path):
    import numpy as np

    from richkd.data import Batch
    from richkd.teachers import CachedRows

    arr = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=(3 * 10, 4))
    arr[:] = np.arange(120, dtype=np.float16).reshape(30, 4)
    arr.flush()
    arr = np.load(tmp_path / "a.npy", mmap_mode="r")
    index, view = torch.tensor([7, 2, 9, 2]), torch.tensor([0, 2, 1, 1])
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        reader = CachedRows(10, torch.device(device))
        batch = Batch(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), index, view)
        (rows,) = reader.read(batch.to(device), arr)
        assert rows.dtype == torch.float32 and rows.device.type == device
        assert torch.equal(rows.cpu(), torch.from_numpy(arr[(view * 10 + index).numpy()].astype(np.float32)))
    with pytest.raises(IndexError, match="outside an array"):
        CachedRows(10, torch.device("cpu")).read(Batch(torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long),
                                                        torch.tensor([5]), torch.tensor([3])), arr)


# ----- a GPU Ray gave and torch cannot use -------------------------------------------------------------------

@pytest.fixture()
def unusable_gpu(monkeypatch):
    """torch sees no CUDA device on a node with NVIDIA driver 470.82.01 (too old for torch's CUDA)."""
    import richkd.device as device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "nvidia_driver_version", lambda: "470.82.01")
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def _assert_unusable_gpu_line(message: str, where: str) -> None:
    assert "\n" not in message
    assert where in message and "470.82.01" in message and "CUDA 13.0" in message
    assert "install the torch build for this node's CUDA" in message and "tune.resources.gpu: 0" in message


def test_a_trial_given_a_gpu_it_cannot_use_fails_with_one_line(assets, tmp_path, unusable_gpu):
    from richkd.device import CudaUnusableError
    from richkd.tune.spec import spec_from_mapping
    from richkd.tune.trainable import train_trial

    raw = base_spec(assets, tmp_path)
    raw["config"]["device"] = "auto"
    raw["tune"]["resources"] = {"cpu": 1, "gpu": 0.5}
    spec = spec_from_mapping(raw, check_data=False)
    threads = torch.get_num_threads()          # the trial sets the threads it was granted (here: every CPU)
    try:
        with pytest.raises(CudaUnusableError) as info:
            train_trial({"loss.fusion_alpha": 0.5, "loss.temperature": 4.0}, plan=spec.plan())
    finally:
        torch.set_num_threads(threads)
    _assert_unusable_gpu_line(str(info.value), "the trial on node ")


def test_cache_and_finalist_tasks_given_a_gpu_they_cannot_use_fail_with_one_line(assets, tmp_path, unusable_gpu):
    from richkd.cache.build import plan_caches
    from richkd.device import CudaUnusableError
    from richkd.tune.cache_tasks import _shard_task, _whole_task
    from richkd.tune.finalize import train_seed

    cfg = device_cfg(assets, tmp_path, "auto")
    jobs = plan_caches(cfg).missing
    with pytest.raises(CudaUnusableError) as info:
        _shard_task(jobs[0], 0, 64, str(tmp_path / "shards"), 1, 0.5)
    _assert_unusable_gpu_line(str(info.value), f"the cache task for {jobs[0].name} on node ")
    with pytest.raises(CudaUnusableError) as info:
        _whole_task(jobs[-1], 1, 1)
    _assert_unusable_gpu_line(str(info.value), "the cache task for ")
    with pytest.raises(CudaUnusableError) as info:
        train_seed(cfg.to_dict(), 1, 0.25)
    _assert_unusable_gpu_line(str(info.value), "finalist ")
    assert not (tmp_path / "shards").exists() and not any((tmp_path / "cache").glob("*/manifest.json"))


def test_the_node_check_asks_gpu_nodes_whether_torch_can_use_their_gpus():
    """The check runs in a fresh Python without Ray's CUDA_VISIBLE_DEVICES; here, on this machine's real torch."""
    from richkd.tune.node_check import SweepNeeds, check_needs

    assert check_needs(SweepNeeds(gpu=0.5), gpus=0) == []          # a CPU node gets no GPU trial
    assert check_needs(SweepNeeds(gpu=0.0), gpus=1) == []          # a CPU sweep does not ask
    found = check_needs(SweepNeeds(gpu=0.5), gpus=1)
    if torch.cuda.is_available():
        assert found == []
    else:
        (line,) = found
        assert line.startswith("a trial here (tune.resources.gpu: 0.5) was given a GPU but torch cannot use it")
        assert "install the torch build for this node's CUDA" in line and "\n" not in line


def test_more_than_one_gpu_per_trial_is_refused(assets, tmp_path):
    from richkd.tune.errors import SpecError
    from richkd.tune.spec import spec_from_mapping

    raw = base_spec(assets, tmp_path)
    raw["config"]["device"] = "auto"
    raw["tune"]["resources"] = {"cpu": 1, "gpu": 2}
    with pytest.raises(SpecError, match=r"^tune.resources.gpu: 2 must be 0 or a fraction in \(0, 1\].*multi-GPU"):
        spec_from_mapping(raw, check_data=False)


# ----- RNG, determinism, timings ------------------------------------------------------------------------------

def test_random_crops_seed_only_the_cpu_generator(monkeypatch):
    """RandomResizedCrop boxes are drawn under a per-image seed; CUDA's generators are left alone, the global CPU
    generator is restored, and the boxes are those torch.manual_seed gave (the cached view boxes stay valid)."""
    from torchvision.transforms import RandomResizedCrop

    from richkd.data.photos import RRC_RATIO, RRC_SCALE, rrc_box

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        top, left, h, w = RandomResizedCrop.get_params(torch.empty(1, 300, 400), list(RRC_SCALE), list(RRC_RATIO))
        expected = (int(top), int(left), int(h), int(w), int(torch.rand(1).item() < 0.5))
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    before = torch.get_rng_state()
    assert rrc_box(300, 400, 1234) == expected
    assert reseeded == [] and torch.equal(torch.get_rng_state(), before)


def test_train_deterministic_and_cudnn_benchmark_set_the_backends(assets, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        Run(device_cfg(assets, tmp_path, "cpu", **{"loss.method": "supervised", "train.deterministic": True}))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
        Run(device_cfg(assets, tmp_path, "cpu", **{"loss.method": "supervised", "train.cudnn_benchmark": True}))
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.benchmark
    finally:
        Run(device_cfg(assets, tmp_path, "cpu", **{"loss.method": "supervised"}))     # back to the defaults
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(ConfigError, match="train.cudnn_benchmark: cuDNN's timed kernel choice is not deterministic"):
        device_cfg(assets, tmp_path, "cpu", **{"train.deterministic": True, "train.cudnn_benchmark": True})


@pytest.mark.cuda
@CUDA
def test_cache_plan_timings_wait_for_the_gpu(monkeypatch):
    from richkd.cache import estimate

    synced = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(a) or real(*a))
    est = estimate.CacheEstimate(images=1000, views=1, num_classes=10, device="cuda")
    estimate._measure(est, "teacher", lambda x: x @ x, torch.rand(64, 512, 512, device="cuda"))
    assert est.rates["teacher_views_per_s"] > 0 and est.seconds["teacher"] > 0 and len(synced) == 2


# ----- Ray on a GPU -------------------------------------------------------------------------------------------

@pytest.mark.cuda
@CUDA
def test_a_cache_task_on_the_gpu_builds_what_the_cpu_builds(assets, tmp_path):
    """Teacher and CLIP-image entries computed by Ray tasks holding half a GPU equal the CPU-built entries up to
    fp16 rounding of the stored values (the GPU's convolution and matmul kernels sum in another order)."""
    import numpy as np

    ray = pytest.importorskip("ray", reason="the GPU cache task is a Ray task")
    from richkd.cache import prepare_caches
    from richkd.tune.cache_tasks import build_caches
    from richkd.tune.session import init_ray

    cfg = device_cfg(assets, tmp_path, "auto", **{"teaching.cache_dir": str(tmp_path / "gpu")})
    if ray.is_initialized():
        ray.shutdown()
    assert init_ray(num_cpus=2)
    try:
        built = build_caches([cfg], cpu=1, gpu=0.5, shards=2)
    finally:
        ray.shutdown()
    reference = prepare_caches(cfg.with_overrides({"device": "cpu", "teaching.cache_dir": str(tmp_path / "cpu")}))
    for a, b in zip(built.paths[0], reference):
        for name in sorted(f.name for f in b.glob("*.npy")):
            x, y = np.load(a / name), np.load(b / name)
            if x.dtype.kind == "f":
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-2, atol=2e-2)
            else:
                assert np.array_equal(x, y), name


@pytest.mark.cuda
@CUDA
def test_two_trials_share_one_gpu(assets, tmp_path):
    """tune.resources.gpu 0.5: two trials run together on one GPU, each capped at its share, both complete."""
    import json

    ray = pytest.importorskip("ray", reason="a sweep runs on Ray")
    pytest.importorskip("mlflow", reason="a sweep records to MLflow")
    from richkd.tune.runner import run_sweep
    from richkd.tune.spec import spec_from_mapping

    raw = base_spec(assets, tmp_path, tune={"num_samples": 2, "max_concurrent": 2, "search": {"algorithm": "random"},
                                            "resources": {"cpu": 1, "gpu": 0.5},
                                            "storage_path": str(tmp_path / "runs")})
    raw["config"]["device"] = "auto"
    raw["config"]["train"] = {"epochs": 1}
    if ray.is_initialized():
        ray.shutdown()
    outcome = run_sweep(spec_from_mapping(raw), num_cpus=2, verbose=0)
    assert outcome.counts.get("completed") == 2, outcome.counts
    reports = [json.loads(line) for f in sorted((tmp_path / "runs" / "unit").glob("trial_*/result.json"))
               for line in f.read_text().splitlines() if line.strip()]
    assert len(reports) == 2 and all(math.isfinite(r["val_top1"]) for r in reports)
