"""Trainer: the pure LR schedule, exact resume, seeded reproducibility, non-finite loss detection."""
import math
from pathlib import Path

import pytest
import torch

from richkd.config import Config, OptimConfig
from richkd.trainer import NonFiniteLossError, Run, lr_at, run_training

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")


def test_step_schedule_matches_official_150_180_210():
    o = OptimConfig(lr=0.05)
    assert lr_at(1, o, 240) == 0.05
    assert lr_at(150, o, 240) == 0.05          # decays take effect after the milestone epoch
    assert lr_at(151, o, 240) == pytest.approx(0.005)
    assert lr_at(180, o, 240) == pytest.approx(0.005)
    assert lr_at(181, o, 240) == pytest.approx(0.0005)
    assert lr_at(211, o, 240) == pytest.approx(0.00005)
    assert lr_at(240, o, 240) == pytest.approx(0.00005)
    with pytest.raises(ValueError):
        lr_at(0, o, 240)


def test_cosine_schedule_and_warmup():
    o = OptimConfig(lr=0.1, schedule="cosine")
    assert lr_at(1, o, 10) == pytest.approx(0.1)
    assert lr_at(6, o, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr_at(10, o, 10) > 0
    w = OptimConfig(lr=0.1, warmup_epochs=4, milestones=(8,))
    assert [lr_at(e, w, 10) for e in (1, 2, 4, 5, 9)] == pytest.approx([0.025, 0.05, 0.1, 0.1, 0.01])


def tiny_cfg(tmp_path, **overrides) -> Config:
    cfg = Config.from_dict({
        "name": "tiny", "device": "cpu", "seed": 3,
        "data": {"dataset": "fashion_mnist", "max_train_samples": 192, "max_eval_samples": 96,
                 "batch_size": 32, "eval_batch_size": 96},
        "student": {"arch": "resnet8"},
        "loss": {"method": "supervised"},
        "optim": {"lr": 0.05, "milestones": [2]},
        "train": {"epochs": 3},
        "teaching": {"cache_dir": str(tmp_path / "cache")},
    })
    return cfg.with_overrides(overrides) if overrides else cfg


TWO_STEPS = {"train.epochs": 1, "data.max_train_samples": 64}      # 2 batches of 32


@needs_fmnist
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(tmp_path)
    straight = run_training(cfg)
    states = {}
    first = run_training(cfg, stop_after_epoch=1, on_epoch=lambda r: states.setdefault(r.epoch, r.state()))
    assert first.epochs_run == 1
    torch.save(states[1], tmp_path / "state.pt")
    resumed = run_training(cfg, resume_state=torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.epochs_run == 3
    for key in ("train_loss", "val_top1", "val_loss", "val_ece"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], rel=1e-6, abs=1e-9), key
    assert [h["lr"] for h in resumed.history] == [0.05, 0.05, pytest.approx(0.005)]


@needs_fmnist
def test_metrics_reported_every_epoch_and_test_split_only_when_final(tmp_path):
    seen = []
    result = run_training(tiny_cfg(tmp_path, **{"train.epochs": 2}), on_epoch=lambda r: seen.append(r.metrics))
    assert [m["epoch"] for m in seen] == [1, 2]
    assert all("val_top1" in m and 0 <= m["val_top1"] <= 100 for m in seen)
    assert not any(k.startswith("test_") for m in seen for k in m)
    assert result.test_metrics == {}
    final = run_training(tiny_cfg(tmp_path, **{"train.epochs": 1}), final=True)
    assert set(final.test_metrics) >= {"test_top1", "test_top5", "test_loss", "test_ece"}


@needs_fmnist
def test_nan_loss_raises_clear_error(tmp_path):
    run = Run(tiny_cfg(tmp_path, **{"train.epochs": 1}))
    with torch.no_grad():
        for p in run.student.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        run.train()


@needs_fmnist
def test_channels_last_trains_the_same_model(tmp_path):
    """Other convolution kernels, other float32 sums, amplified by SGD step by step (see the compiled test below):
    over 2 steps the losses agree to ~1e-5 (measured), so 1e-3 holds on any machine."""
    cfg = tiny_cfg(tmp_path, **TWO_STEPS)
    a = run_training(cfg)
    b = run_training(cfg.with_overrides({"train.channels_last": True}))
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-3)
    assert b.metrics["val_loss"] == pytest.approx(a.metrics["val_loss"], rel=1e-3)


@needs_fmnist
def test_zero_val_fraction_run_says_it_has_no_validation_metrics(tmp_path, capsys):
    import json

    from richkd.cli import main

    cfg = tiny_cfg(tmp_path, **{"data.val_fraction": 0.0, "train.epochs": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out"), "--final", "-q"]) == 0
    out = capsys.readouterr().out
    assert ("data.val_fraction is 0: training on the whole training split (192 rows); no validation metrics are "
            "reported") in out
    assert "done: no validation split, test top-1 " in out and "(last epoch)" in out
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert not any(k.startswith(("val_", "best_val")) for k in saved["metrics"])
    assert 0 <= saved["test_metrics"]["test_top1"] <= 100


def test_eval_every_validates_every_nth_and_the_last_epoch(tmp_path):
    from richkd.trainer import evaluates_at

    cfg = tiny_cfg(tmp_path, **{"train.epochs": 5, "train.eval_every": 2})
    assert [evaluates_at(e, cfg.train) for e in range(1, 6)] == [False, True, False, True, True]
    seen = []
    run = Run(cfg)
    run.evaluate = lambda split, real=run.evaluate: seen.append(run.epoch + 1) or real(split)
    result = run.train()
    assert seen == [2, 4, 5]                                     # the validation split was read after these epochs
    h = result.history

    def val(metrics):
        return {k: v for k, v in metrics.items() if k.startswith("val_")}

    assert val(h[0]) == {}                                       # nothing to carry before the first evaluation
    assert val(h[2]) == val(h[1]) and val(h[1])                  # epoch 3 carries epoch 2's values unchanged
    top1 = {epoch: h[epoch - 1]["val_top1"] for epoch in (2, 4, 5)}
    assert [m["best_val_top1"] for m in h] == [float("-inf"), top1[2], top1[2], max(top1[2], top1[4]),
                                               max(top1.values())]
    assert result.best_val_top1 == max(top1.values())


@needs_fmnist
def test_amp_changes_nothing_on_cpu(tmp_path):
    """train.amp asks for bf16 autocast on CUDA; on a CPU run it is a no-op, so the numbers are identical."""
    from richkd.trainer import autocast

    with autocast(torch.device("cpu"), True):
        assert not torch.is_autocast_enabled("cpu")
    a = run_training(tiny_cfg(tmp_path, **{"train.epochs": 1}))
    b = run_training(tiny_cfg(tmp_path, **{"train.epochs": 1, "train.amp": True}))
    for key in ("train_loss", "val_top1", "val_loss"):
        assert a.metrics[key] == b.metrics[key], key


@needs_fmnist
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_amp_on_cuda_runs_the_student_in_bf16_and_validates_in_fp32(tmp_path):
    run = Run(tiny_cfg(tmp_path, **{"device": "cuda", "train.epochs": 1, "train.amp": True}))
    conv = next(m for m in run.student.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    handle = conv.register_forward_hook(lambda module, inputs, output: dtypes.append((module.training, output.dtype)))
    try:
        result = run.train()
    finally:
        handle.remove()
    assert {d for training, d in dtypes if training} == {torch.bfloat16}      # training forwards
    assert {d for training, d in dtypes if not training} == {torch.float32}   # validation forwards
    assert math.isfinite(result.metrics["train_loss"]) and 0 <= result.metrics["val_top1"] <= 100


@needs_fmnist
def test_compile_wraps_the_student_and_keeps_its_state_dict(tmp_path):
    """train.compile: the compiled module shares the student's parameters, so checkpoints stay loadable by an
    uncompiled run (no `_orig_mod.` prefixes) and the optimizer trains the same tensors."""
    run = Run(tiny_cfg(tmp_path, **{"train.compile": True}))
    assert run.forward_student is not run.student
    assert run.forward_student._orig_mod is run.student
    assert not any("_orig_mod" in k for k in run.state()["student"])
    trained = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in run.forward_student.parameters()} <= trained
    plain = Run(tiny_cfg(tmp_path))
    assert plain.forward_student is plain.student
    plain.student.load_state_dict(run.state()["student"])


@pytest.mark.slow
@needs_fmnist
def test_compiled_student_trains_to_the_same_numbers(tmp_path):
    """A real torch.compile (inductor on CPU: most of this test's time is compiling resnet8).

    Inductor fuses and reorders float32 sums: the first step's gradients differ by ~1e-6 relative, and this
    random-init student's SGD amplifies that step by step (measured: the weights differ by 1e-5 of their update
    after one step, 3% after six). So the run is 2 steps long, where the numbers agree to 1e-4 with a wide margin."""
    cfg = tiny_cfg(tmp_path, **TWO_STEPS)
    a = run_training(cfg)
    b = run_training(cfg.with_overrides({"train.compile": True}))
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-4)
    assert b.metrics["val_loss"] == pytest.approx(a.metrics["val_loss"], rel=1e-4)
    untrained = Run(cfg).evaluate("val")["val_loss"]
    assert abs(a.metrics["val_loss"] - untrained) > 1e-2 * untrained     # the steps moved it far past the tolerance
