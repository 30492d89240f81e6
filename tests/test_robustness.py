"""Robustness evaluation: corruptions (shape, range, determinism, severity order, hand values), CIFAR-C folders,
mCE arithmetic, robustness_metrics, and `richkd evaluate` end to end on a real (tiny) checkpoint."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from richkd.robustness.corruptions import (CORRUPTION_NAMES, CORRUPTIONS, SEVERITIES, SEVERITY_PARAMS, CorruptionError,
                                           corrupt, disk_kernel, parse_corruptions, parse_severities)


def _images(b=6, size=32, seed=0):
    """Smooth-ish random images in [0, 1]: upsampled 8x8 colour noise plus fine texture (natural-image-like)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(b, 3, size, size, generator=g)).clamp(0, 1)


# ----- corruptions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruption_shape_range_determinism_and_severity_order(name):
    x = _images()
    index = torch.arange(100, 106)
    mse = []
    for s in SEVERITIES:
        y = corrupt(x, name, s, seed=3, index=index)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert torch.equal(y, corrupt(x.clone(), name, s, seed=3, index=index))   # same seed -> same output
        mse.append(float(((y - x) ** 2).mean()))
    assert mse[0] > 0, f"{name} at severity 1 left the images unchanged"
    assert all(a < b for a, b in zip(mse, mse[1:])), f"{name}: MSE to clean not increasing with severity: {mse}"


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_is_keyed_by_seed_and_row_not_by_batch(name):
    x = _images(b=4)
    index = torch.tensor([7, 8, 9, 10])
    full = corrupt(x, name, 3, seed=0, index=index)
    # the same rows in a different batch composition get the same noise
    part = corrupt(x[2:], name, 3, seed=0, index=index[2:])
    assert torch.equal(full[2:], part)
    assert not torch.equal(full, corrupt(x, name, 3, seed=1, index=index))           # seed matters
    assert not torch.equal(full[0], corrupt(x[:1], name, 3, seed=0, index=torch.tensor([8]))[0])  # row matters


def test_brightness_and_contrast_by_hand():
    # constant colour (0.2, 0.4, 0.6): HSV value V = 0.6; severity 5 adds 0.3 -> V' = 0.9, so every channel
    # scales by 0.9 / 0.6 = 1.5 (hue and saturation unchanged): (0.3, 0.6, 0.9)
    x = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    y = corrupt(x, "brightness", 5)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.3, 0.6, 0.9]), atol=1e-6)
    # black becomes grey at the added value; V clips at 1
    black = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(corrupt(black, "brightness", 2), torch.full_like(black, 0.1))
    white_ish = torch.full((1, 3, 2, 2), 0.95)
    assert torch.allclose(corrupt(white_ish, "brightness", 3), torch.ones_like(white_ish))
    # contrast severity 2 (factor 0.5) on a two-valued channel with mean 0.5: 0.1 -> 0.3, 0.9 -> 0.7
    img = torch.tensor([[0.1, 0.9], [0.9, 0.1]]).expand(1, 3, 2, 2).contiguous()
    out = corrupt(img, "contrast", 2)
    assert torch.allclose(out[0, 0], torch.tensor([[0.3, 0.7], [0.7, 0.3]]), atol=1e-6)
    # a constant image has no contrast to reduce
    flat = torch.full((2, 3, 5, 5), 0.37)
    assert torch.allclose(corrupt(flat, "contrast", 5), flat, atol=1e-7)


def test_brightness_matches_hsv_round_trip():
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    x = _images(b=2, size=8)
    for s in (1, 5):
        hsv = rgb_to_hsv(x.permute(0, 2, 3, 1).numpy().astype(np.float64))
        hsv[..., 2] = np.clip(hsv[..., 2] + SEVERITY_PARAMS["brightness"][s - 1], 0, 1)
        expected = torch.from_numpy(hsv_to_rgb(hsv)).permute(0, 3, 1, 2).float()
        assert torch.allclose(corrupt(x, "brightness", s), expected, atol=1e-5)


def test_pixelate_matches_pillow_box_resize():
    from PIL import Image

    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    x = torch.from_numpy(img).expand(1, 3, 32, 32).contiguous()
    for s, factor in enumerate(SEVERITY_PARAMS["pixelate"], start=1):
        n = int(32 * factor)
        expected = np.array(Image.fromarray(img, mode="F").resize((n, n), Image.BOX).resize((32, 32), Image.BOX))
        assert np.allclose(corrupt(x, "pixelate", s)[0, 0].numpy(), expected, atol=1e-5)


def test_gaussian_blur_matches_scipy_and_defocus_kernel():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _images(b=1, size=16)
    y = corrupt(x, "gaussian_blur", 5)   # sigma 1, skimage defaults: truncate 4, mode nearest
    expected = np.stack([ndimage.gaussian_filter(x[0, c].double().numpy(), sigma=1.0, mode="nearest", truncate=4.0)
                         for c in range(3)])
    assert np.allclose(y[0].numpy(), expected, atol=1e-5)
    # severity 5 defocus: disk radius 1.5 -> the 3x3 block, blur sigma 0.1 barely spreads it
    k = disk_kernel(1.5, 0.1)
    assert math.isclose(float(k.sum()), 1.0, rel_tol=1e-6)
    assert torch.allclose(k[1:4, 1:4], torch.full((3, 3), 1 / 9), atol=1e-4)


def test_corruption_errors_are_clear():
    x = _images(b=1)
    with pytest.raises(CorruptionError, match="gaussian_noise"):
        corrupt(x, "gausian_noise", 1)
    with pytest.raises(CorruptionError, match="1..5"):
        corrupt(x, "contrast", 6)
    assert parse_severities("1..5") == (1, 2, 3, 4, 5)
    assert parse_severities("4,2-3") == (2, 3, 4)
    assert parse_corruptions("contrast, pixelate") == ("contrast", "pixelate")
    assert parse_corruptions("all") == CORRUPTION_NAMES
    with pytest.raises(CorruptionError):
        parse_severities("0..2")
    with pytest.raises(CorruptionError):
        parse_corruptions("contrast,fog")


def test_the_config_accepts_exactly_the_registrys_corruptions():
    """richkd.robustness.corruptions is the one source of the names: a config takes them all and, for an unknown
    one, lists them as the choices."""
    from richkd.config import Config, ConfigError

    # the one list of names is richkd.config.CORRUPTION_NAMES (the config validates against it without importing
    # torch); the parameter tables (in its order) and the registered implementations are exactly those
    assert tuple(SEVERITY_PARAMS) == CORRUPTION_NAMES and CORRUPTIONS.names() == sorted(CORRUPTION_NAMES)
    cfg = Config.from_dict({"robustness": {"enabled": True, "corruptions": list(CORRUPTION_NAMES)}})
    assert cfg.robustness.corruptions == CORRUPTION_NAMES
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"robustness": {"corruptions": ["fog"]}})
    assert all(name in str(err.value) for name in CORRUPTION_NAMES)


# ----- CIFAR-C folder ---------------------------------------------------------------------------------

def _write_cifar_c(root, n=6, names=("contrast", "gaussian_noise"), seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = np.tile(np.arange(n) % 3, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    arrays = {}
    for name in names:
        arr = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(root / f"{name}.npy", arr)
        arrays[name] = arr
    return arrays, labels


def test_corruption_folder_loading(tmp_path):
    from richkd.robustness.cifar_c import CorruptionFolder, CorruptionFolderError

    arrays, labels = _write_cifar_c(tmp_path / "c")
    folder = CorruptionFolder(tmp_path / "c")
    assert folder.corruptions == ("contrast", "gaussian_noise") and folder.n == 6
    assert folder.labels.tolist() == (np.arange(6) % 3).tolist()
    sev3 = folder.images("contrast", 3)
    assert sev3.shape == (6, 3, 32, 32) and sev3.dtype == torch.uint8
    assert np.array_equal(sev3.permute(0, 2, 3, 1).numpy(), arrays["contrast"][12:18])
    some = folder.images("gaussian_noise", 5, torch.tensor([1, 4]))
    assert np.array_equal(some.permute(0, 2, 3, 1).numpy(), arrays["gaussian_noise"][[25, 28]])
    with pytest.raises(CorruptionFolderError, match="fog"):
        folder.images("fog", 1)
    (tmp_path / "bad").mkdir()
    np.save(tmp_path / "bad" / "contrast.npy", arrays["contrast"])
    with pytest.raises(CorruptionFolderError, match="labels.npy"):
        CorruptionFolder(tmp_path / "bad")


# ----- mCE --------------------------------------------------------------------------------------------

def test_mce_hand_example(tmp_path):
    from richkd.robustness.scores import (ReferenceFileError, compare_to_reference, corruption_errors, load_reference,
                                          mean_ce)

    errors = {"a": {1: 20.0, 2: 40.0}, "b": {1: 10.0, 2: 30.0}}
    ref = {"a": {1: 40.0, 2: 40.0}, "b": {1: 20.0, 2: 20.0}}
    # CE_a = (20 + 40) / (40 + 40) = 0.75, CE_b = 40 / 40 = 1 -> mCE = 87.5 %
    ce = corruption_errors(errors, ref)
    assert ce == pytest.approx({"a": 75.0, "b": 100.0})
    assert mean_ce(ce) == pytest.approx(87.5)
    # relative, clean errors 5 (model) and 10 (reference): a: (15 + 35) / (30 + 30), b: (5 + 25) / (10 + 10)
    rel = corruption_errors(errors, ref, 5.0, 10.0)
    assert rel == pytest.approx({"a": 100 * 50 / 60, "b": 150.0})
    assert mean_ce(rel) == pytest.approx((100 * 50 / 60 + 150.0) / 2)
    # severities only in one table are ignored; a perfect reference makes CE undefined (None), not inf
    assert corruption_errors({"a": {1: 10.0, 3: 99.0}}, {"a": {1: 20.0, 2: 1.0}}) == {"a": 50.0}
    assert corruption_errors({"a": {1: 10.0}}, {"a": {1: 0.0}}) == {"a": None}
    # through a robustness.json reference
    report = {"clean": {"top1": 90.0}, "corruptions": {"error": {k: {str(s): e for s, e in v.items()}
                                                                 for k, v in ref.items()}}}
    (tmp_path / "ref.json").write_text(json.dumps(report))
    loaded = load_reference(tmp_path / "ref.json")
    out = compare_to_reference(errors, 5.0, loaded)
    assert out["mce"] == pytest.approx(87.5) and out["relative_ce"]["b"] == pytest.approx(150.0)
    with pytest.raises(ReferenceFileError, match="shares no corruption"):
        compare_to_reference({"c": {1: 5.0}}, 5.0, loaded)
    (tmp_path / "nope.json").write_text(json.dumps({"clean": {"top1": 1.0}}))
    with pytest.raises(ReferenceFileError, match="no corruption error table"):
        load_reference(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"clean": {"top1": 1.0}, "corruptions": {"error": {"a": 3}}}))
    with pytest.raises(ReferenceFileError, match="corruption -> severity -> error"):
        load_reference(tmp_path / "bad.json")


# ----- metrics API and evaluate CLI on a real checkpoint ----------------------------------------------

@pytest.fixture(scope="module")
def fm_config(mini_fashion_root):
    from richkd.config import Config

    return Config.from_dict({
        "name": "rob", "device": "cpu",
        "data": {"dataset": "fashion_mnist", "root": str(mini_fashion_root), "eval_batch_size": 64},
        "student": {"arch": "resnet8"}, "loss": {"method": "supervised", "confidence_threshold": 0.6},
    })


def test_evaluation_loop_and_the_val_robustness_metrics_of_a_trial(mini_teacher, fm_config):
    from richkd.config import RobustnessEvalConfig
    from richkd.data import build_data
    from richkd.metric_names import VAL_CORRUPT_ECE, VAL_CORRUPT_TOP1
    from richkd.models import load_teacher
    from richkd.robustness.engine import corruption_metrics, evaluate_model, val_robustness_metrics

    data = build_data(fm_config.data)
    model, _ = load_teacher("resnet8", mini_teacher, 10)
    model.train()   # a trial calls this mid-training: the mode must come back
    names = ("contrast", "gaussian_noise")
    res = evaluate_model(model, data.val, data.mean, data.std, "cpu", corruptions=names, severities=(1, 5), seed=0,
                         max_samples=20, batch_size=8)
    assert model.training
    assert res.clean["n"] == 20 and 0 <= res.clean["top1"] <= 100 and 0 <= res.clean["ece"] <= 1
    m = corruption_metrics(res.corrupted)
    per = [m[f"corruption_top1/{c}/{s}"] for c in names for s in (1, 5)]
    assert m["corruption_top1"] == pytest.approx(sum(per) / 4)
    assert m["corruption_top1/contrast"] == pytest.approx((per[0] + per[1]) / 2)
    # a trial's numbers for the same subset and seed, at another batch size: the same (noise is keyed by dataset row)
    rcfg = RobustnessEvalConfig(enabled=True, corruptions=names, severities=(1, 5), max_samples=20, seed=0)
    val = val_robustness_metrics(model, data.val, data.mean, data.std, "cpu", rcfg, batch_size=20)
    assert model.training
    assert val[VAL_CORRUPT_TOP1] == m["corruption_top1"]                                # same predictions
    assert val["val_corrupt_top1_contrast"] == m["corruption_top1/contrast"]
    assert val[VAL_CORRUPT_ECE] == pytest.approx(m["corruption_ece"], rel=1e-5)         # up to summation order


def _evaluate(argv):
    """Run `richkd evaluate ...` through the real CLI."""
    from richkd.cli import main

    return main(["evaluate", *argv])


def test_evaluate_cli_end_to_end(mini_teacher, fm_config, tmp_path, capsys):
    from richkd.io import atomic_write_text

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / "student.pt"
    shutil.copy(mini_teacher, ckpt)
    atomic_write_text(run_dir / "config.yaml", fm_config.to_yaml())   # as `richkd train` leaves it
    out = tmp_path / "eval"
    rc = _evaluate([str(ckpt), "--suite", "robustness", "--corruptions", "contrast,pixelate,jpeg_compression",
                    "--severities", "1,5", "--max-samples", "24", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads((out / "robustness.json").read_text())
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert report["split"] == "val" and report["clean"]["n"] == 24 and report["arch"] == "resnet8"
    corr = report["corruptions"]
    assert corr["names"] == ["contrast", "pixelate", "jpeg_compression"] and corr["severities"] == [1, 5]
    assert corr["corruption_top1"] == pytest.approx(np.mean([v for by in corr["top1"].values() for v in by.values()]))
    assert report["metrics"]["corruption_top1/contrast/5"] == corr["top1"]["contrast"]["5"]
    assert report["confidence_threshold"] == 0.6
    shares = [report["clean"][k] for k in ("confident_correct_pct", "uncertain_correct_pct",
                                           "confidently_wrong_pct", "uncertain_wrong_pct")]
    assert sum(shares) == pytest.approx(100.0)
    bins = report["calibration"]
    assert sum(bins["count"]) == 24 and bins["ece"] == pytest.approx(report["clean"]["ece"], abs=1e-9)
    assert "contrast" in printed and "mean corruption top-1" in printed

    # a second run against the first as reference: the same model -> every CE is exactly 100 %
    rc = _evaluate([str(ckpt), "--suite", "corruptions", "--corruptions", "contrast,pixelate,jpeg_compression",
                    "--severities", "1,5", "--max-samples", "24", "--reference", str(out / "robustness.json"),
                    "--out", str(tmp_path / "eval2")])
    assert rc == 0
    ref = json.loads((tmp_path / "eval2" / "robustness.json").read_text())["corruptions"]["reference"]
    assert all(v == pytest.approx(100.0) for v in ref["ce"].values() if v is not None)
    assert ref["mce"] == pytest.approx(100.0)


def test_the_config_comes_from_the_flag_else_config_yaml_else_result_json(fm_config, tmp_path):
    from richkd.config import ConfigError
    from richkd.robustness.evaluate import resolve_config

    ckpt = tmp_path / "student.pt"
    with pytest.raises(ConfigError, match="--config"):
        resolve_config(ckpt, None)
    (tmp_path / "result.json").write_text(json.dumps({"config": fm_config.to_dict()}))   # a finished run's folder
    assert resolve_config(ckpt, None) == (fm_config, str(tmp_path / "result.json"))
    (tmp_path / "config.yaml").write_text(fm_config.with_overrides({"name": "from_yaml"}).to_yaml())
    assert resolve_config(ckpt, None)[0].name == "from_yaml"
    other = tmp_path / "other.yaml"
    other.write_text(fm_config.with_overrides({"name": "from_flag"}).to_yaml())
    assert resolve_config(ckpt, str(other))[0].name == "from_flag"
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(ConfigError, match="no readable 'config'"):
        resolve_config(ckpt, None)


def test_evaluate_shift_on_imagefolder(mini_teacher, fm_config, tmp_path):
    """Distribution shift: the same classes from an ImageFolder (inverted images, folder names cleaned)."""
    from PIL import Image

    from richkd.config import Config
    from richkd.data import FASHION_MNIST_CLASSES, build_data
    from richkd.io import atomic_write_text

    data = build_data(fm_config.data)
    shift_root = tmp_path / "shift"
    for row in range(30):
        image, target, _ = data.test[row]
        name = FASHION_MNIST_CLASSES[target].replace("/", "_")    # "T-shirt/top" cannot be a folder name
        folder = shift_root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        arr = (255 * (1 - image[0])).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{row}.png")
    shift_cfg = Config.from_dict({"data": {"dataset": "imagefolder", "root": str(shift_root), "val_fraction": 0.5}})
    atomic_write_text(tmp_path / "shift.yaml", shift_cfg.to_yaml())
    atomic_write_text(tmp_path / "cfg.yaml", fm_config.to_yaml())
    out = tmp_path / "out"
    rc = _evaluate([str(mini_teacher), "--suite", "shift", "--config", str(tmp_path / "cfg.yaml"),
                    "--shift-config", str(tmp_path / "shift.yaml"), "--max-samples", "20", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "robustness.json").read_text())
    shift = report["shift"]
    assert shift["dataset"] == "imagefolder" and shift["n"] > 0
    assert shift["top1_drop"] == pytest.approx(shift["top1"] - report["clean"]["top1"])
    assert (out / "reliability_shift.png").stat().st_size > 1000


def test_evaluate_user_errors_exit_2_without_output(mini_teacher, fm_config, tmp_path, capsys):
    from richkd.models import create_model, save_model_checkpoint

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(fm_config.to_yaml())
    out = tmp_path / "out"
    # wrong checkpoint path
    assert _evaluate([str(tmp_path / "missing.pt"), "--config", str(cfg_path), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a 5-class model evaluated on 10-class Fashion-MNIST
    five = tmp_path / "five" / "student.pt"
    save_model_checkpoint(create_model("resnet8", 5), five, arch="resnet8", num_classes=5)
    assert _evaluate([str(five), "--config", str(cfg_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "5-class model" in err and "10 classes" in err
    # no config anywhere
    assert _evaluate([str(five), "--out", str(out)]) == 2
    assert "--config" in capsys.readouterr().err
    # the file store is refused before any work
    assert _evaluate([str(mini_teacher), "--config", str(cfg_path), "--out", str(out),
                      "--mlflow-uri", str(tmp_path / "mlruns")]) == 2
    assert "sqlite:///" in capsys.readouterr().err
    # an unknown corruption
    assert _evaluate([str(mini_teacher), "--config", str(cfg_path), "--out", str(out),
                      "--corruptions", "fog"]) == 2
    assert "fog" in capsys.readouterr().err
    assert not out.exists()
    assert not (tmp_path / "five" / "robustness-val").exists()


def test_evaluate_logs_to_mlflow_sqlite(mini_teacher, fm_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(fm_config.to_yaml())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    rc = _evaluate([str(mini_teacher), "--suite", "calibration", "--config", str(cfg_path), "--max-samples", "8",
                    "--out", str(tmp_path / "out"), "--mlflow-uri", uri, "--mlflow-experiment", "evals"])
    assert rc == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("evals")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == f"evaluate:{mini_teacher.parent.name}/{mini_teacher.stem}"
    report = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert run.data.metrics["clean_top1"] == pytest.approx(report["clean"]["top1"])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["reliability.png", "robustness.json"]
    assert (tmp_path / "db" / "mlartifacts").is_dir() and not (cwd / "mlruns").exists()


def test_evaluate_corruption_folder(mini_teacher, fm_config, tmp_path, capsys):
    """A released CIFAR-C style folder is evaluated instead of on-the-fly corruptions (test split only)."""
    from richkd.data import build_data
    from richkd.models import load_teacher
    from richkd.robustness.cifar_c import CorruptionFolder
    from richkd.robustness.engine import evaluate_folder

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(fm_config.to_yaml())
    root = tmp_path / "FMNIST-C"
    root.mkdir()
    data = build_data(fm_config.data)
    clean = (data.test.get_batch(torch.arange(12))[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = data.test.targets[:12].numpy()
    # "corruption" whose severities are all the identity: accuracy must equal clean accuracy on those images
    np.save(root / "identity.npy", np.concatenate([clean] * 5))
    np.save(root / "labels.npy", np.concatenate([labels] * 5).astype(np.uint8))
    model, _ = load_teacher("resnet8", mini_teacher, 10)
    folder = CorruptionFolder(root)
    got = evaluate_folder(model, folder, data.mean, data.std, "cpu", image_size=32, corruptions=["identity"],
                          severities=[1, 5], num_classes=10)
    stored = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255.0     # what the folder holds
    logits = model((stored - data.mean[0]) / data.std[0]).logits
    expected = 100.0 * float((logits.argmax(1) == data.test.targets[:12]).float().mean())
    assert got["identity"][1]["top1"] == pytest.approx(expected) and got["identity"][5]["n"] == 12

    out = tmp_path / "out"
    args = [str(mini_teacher), "--suite", "corruptions", "--config", str(cfg_path), "--corruption-dir", str(root),
            "--out", str(out)]
    assert _evaluate(args) == 2 and "--split test" in capsys.readouterr().err and not out.exists()
    # folder corruption names need not be ones we implement on the fly
    assert _evaluate(args + ["--split", "test", "--severities", "1,5", "--corruptions", "identity"]) == 0
    corr = json.loads((out / "robustness.json").read_text())["corruptions"]
    assert corr["source"].startswith("folder") and corr["names"] == ["identity"]
    assert corr["top1"]["identity"]["1"] == pytest.approx(expected)


def test_command_module_is_light():
    """The CLI builds its parser from richkd.cli.evaluate: that import must not pull in torch or mlflow."""
    import subprocess
    import sys

    code = ("import sys, argparse, richkd.cli.evaluate as c; p = argparse.ArgumentParser(); "
            "c.add_commands(p.add_subparsers()); print(sorted(m for m in ('torch', 'mlflow', 'matplotlib') "
            "if m in sys.modules))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "[]"
