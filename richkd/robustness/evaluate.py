"""`richkd evaluate`: a trained student checkpoint -> clean / corruption / shift / calibration report and files;
every user-fixable problem is found before any file is written, so a failed run leaves no output."""
from __future__ import annotations

import argparse
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from richkd.config import Config, ConfigError
from richkd.data import build_data
from richkd.device import resolve_device
from richkd.io import atomic_write_text, ensure_writable, load_problem, quiet_torch_load
from richkd.models import CheckpointError, load_teacher
from richkd.robustness.cifar_c import CorruptionFolder
from richkd.robustness.corruptions import parse_corruptions, parse_severities
from richkd.robustness.engine import corruption_metrics, evaluate_folder, evaluate_model
from richkd.robustness.report import check_tracking_uri, log_to_mlflow, save_reliability_diagram
from richkd.robustness.scores import compare_to_reference, load_reference

log = logging.getLogger(__name__)

REPORT_FILE = "robustness.json"
DIAGRAM_FILE = "reliability.png"
SHIFT_DIAGRAM_FILE = "reliability_shift.png"


def resolve_config(checkpoint: Path, config: Optional[str]):
    """(Config, where it came from): --config, else config.yaml, else result.json next to the checkpoint."""
    if config:
        return Config.from_yaml(config), str(config)
    folder = checkpoint.parent
    if (folder / "config.yaml").is_file():
        return Config.from_yaml(folder / "config.yaml"), str(folder / "config.yaml")
    if (folder / "result.json").is_file():
        try:
            raw = json.loads((folder / "result.json").read_text())["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{folder / 'result.json'} has no readable 'config' ({exc}); pass --config") from None
        return Config.from_dict(raw), str(folder / "result.json")
    raise ConfigError(f"no config for {checkpoint}: pass --config RUN.yaml (the config the model was trained "
                      f"with), or keep the config.yaml that `richkd train` writes next to student.pt")


def _checkpoint_header(path: Path) -> dict:
    """The non-weight fields of a student.pt ({"model": sd, "arch": str, "num_classes": int})."""
    try:
        with quiet_torch_load():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign file: load_teacher would say the same, later
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({load_problem(exc)}); pass the "
                              "student.pt written by `richkd train`") from None
    return {k: v for k, v in obj.items() if k in ("arch", "num_classes")} if isinstance(obj, dict) else {}


def _normal_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def class_mapping(shift_names: Sequence[str], model_names: Sequence[str]) -> torch.Tensor:
    """(len(shift_names),) int64: each shift-set class id -> the model's class id with the same name.

    Names match exactly, or after lower-casing and folding runs of non-alphanumerics to '_' (an ImageFolder
    cannot name a folder "T-shirt/top"; "t-shirt_top" matches). A shift set may hold a subset of the classes,
    in any order (ImageFolder sorts folder names). Raises ValueError naming the classes that match nothing.
    """
    exact = {n: i for i, n in enumerate(model_names)}
    loose = {_normal_name(n): i for i, n in reversed(list(enumerate(model_names)))}   # the first of equal names
    mapping = [exact.get(n, loose.get(_normal_name(n))) for n in shift_names]
    unknown = [n for n, i in zip(shift_names, mapping) if i is None]
    if unknown:
        raise ValueError(f"shift dataset classes {unknown} are not classes of the model ({list(model_names)}); a "
                         "shift set must use the training classes' names (folder names for an ImageFolder)")
    if len(set(mapping)) != len(mapping):
        raise ValueError(f"shift dataset classes {list(shift_names)} map several folders to one model class")
    return torch.tensor(mapping, dtype=torch.int64)


def _split(data, split: str):
    dataset = data.val if split == "val" else data.test
    if len(dataset) == 0:
        raise ValueError(f"{data.name}: the {split} split is empty"
                         + (" (data.val_fraction is 0?)" if split == "val" else ""))
    return dataset


def evaluate_checkpoint(req: argparse.Namespace) -> tuple[dict, list[Path]]:
    """Run the requested suite of the `richkd evaluate` arguments `req` (argparse checked suite, split and counts)
    and write robustness.json + reliability PNG(s); returns (report, written paths). User errors are ValueErrors,
    raised before anything is written."""
    with_corruptions = req.suite in ("corruptions", "robustness")
    if req.suite == "shift" and not req.shift_config:
        raise ValueError("--suite shift needs --shift-config CFG (a config whose data section names another "
                         "dataset with the same classes)")
    if req.shift_config and req.suite not in ("shift", "robustness"):
        raise ValueError(f"--shift-config is used by --suite shift or robustness, not {req.suite}")
    for flag, value in (("--reference", req.reference), ("--corruption-dir", req.corruption_dir),
                        ("--corruptions", req.corruptions), ("--severities", req.severities)):
        if value is not None and not with_corruptions:
            raise ValueError(f"{flag} is used by --suite corruptions or robustness, not {req.suite}")
    if req.corruption_dir and req.split != "test":
        raise ValueError("--corruption-dir holds corrupted TEST images (CIFAR-C release); add --split test so the "
                         "clean and corrupted numbers describe the same images (never select models on them)")
    ckpt = Path(req.checkpoint).expanduser()
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} does not exist; pass the student.pt written by "
                              "`richkd train` (in its --out folder, default tune_runs/runs/<name>/)")
    cfg, cfg_source = resolve_config(ckpt, req.config)
    if req.device:
        cfg = cfg.with_overrides({"device": req.device})
    severities = parse_severities(req.severities) if with_corruptions else ()
    reference = load_reference(req.reference) if req.reference else None
    folder = CorruptionFolder(req.corruption_dir) if req.corruption_dir else None
    if folder is not None:   # the folder's own corruption names (a release may hold ones we do not implement)
        names = parse_corruptions(req.corruptions, folder.corruptions, f" in {folder.root}")
    else:
        names = parse_corruptions(req.corruptions) if with_corruptions else ()
    shift_cfg = Config.from_yaml(req.shift_config) if req.shift_config else None
    if req.mlflow_uri:
        check_tracking_uri(req.mlflow_uri)
    out_dir = Path(req.out).expanduser() if req.out else ckpt.parent / f"robustness-{req.split}"
    ensure_writable(out_dir, "the evaluation's output folder (--out)", create=False)   # before the evaluation

    device = resolve_device(cfg.device)
    header = _checkpoint_header(ckpt)
    data = build_data(cfg.data)
    dataset = _split(data, req.split)
    arch = str(header.get("arch") or cfg.student.arch)
    if header.get("arch") and header["arch"] != cfg.student.arch:
        log.warning("checkpoint arch %r differs from the config's student.arch %r; using the checkpoint's",
                    header["arch"], cfg.student.arch)
    ckpt_classes = header.get("num_classes")
    if ckpt_classes is not None and int(ckpt_classes) != data.num_classes:
        raise CheckpointError(f"{ckpt} is a {ckpt_classes}-class model but {cfg.data.dataset} ({cfg_source}) has "
                              f"{data.num_classes} classes; pass --config with the data section the model was "
                              "trained on")
    model, sha = load_teacher(arch, ckpt, data.num_classes, map_location=device)

    shift_set = target_map = None
    if shift_cfg is not None:
        if shift_cfg.data.image_size != cfg.data.image_size:
            log.warning("shift config image_size %d -> %d (the model's input size)", shift_cfg.data.image_size,
                        cfg.data.image_size)
            shift_cfg = shift_cfg.with_overrides({"data.image_size": cfg.data.image_size})
        shift_data = build_data(shift_cfg.data)
        shift_set = _split(shift_data, req.split)
        target_map = class_mapping(shift_data.class_names, data.class_names)

    batch_size = req.batch_size or cfg.data.eval_batch_size
    threshold = cfg.loss.confidence_threshold
    common = dict(seed=req.seed, max_samples=req.max_samples, batch_size=batch_size)
    res = evaluate_model(model, dataset, data.mean, data.std, device,
                         corruptions=names if (with_corruptions and folder is None) else (),
                         severities=severities, confidence_threshold=threshold, **common)
    corrupted = res.corrupted
    if folder is not None:
        corrupted = evaluate_folder(model, folder, data.mean, data.std, device, image_size=cfg.data.image_size,
                                    corruptions=names, severities=severities, num_classes=data.num_classes,
                                    **common)

    report: dict[str, Any] = {
        "checkpoint": str(ckpt), "checkpoint_sha256": sha, "arch": arch, "num_classes": data.num_classes,
        "config_source": cfg_source, "dataset": data.name, "data_origin": data.origin, "split": req.split,
        "suite": req.suite, "seed": req.seed, "max_samples": req.max_samples, "device": str(device),
        "confidence_threshold": threshold, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "clean": dict(res.clean),
        "calibration": res.calibration,
        "config": cfg.to_dict(),
    }
    flat = corruption_metrics(corrupted) if with_corruptions else {}
    if with_corruptions:
        report["corruptions"] = _corruption_section(corrupted, folder, flat)
        if reference is not None:
            if reference.get("dataset") not in (None, data.name) or reference.get("split") not in (None, req.split):
                log.warning("reference %s was evaluated on %s/%s, this run on %s/%s: CE ratios compare different "
                            "images", reference["path"], reference.get("dataset"), reference.get("split"),
                            data.name, req.split)
            errors = {c: {s: 100.0 - m["top1"] for s, m in by.items()} for c, by in corrupted.items()}
            report["corruptions"]["reference"] = compare_to_reference(errors, 100.0 - res.clean["top1"], reference)
    if shift_set is not None:
        shift_res = evaluate_model(model, shift_set, data.mean, data.std, device,
                                   confidence_threshold=threshold, target_map=target_map, **common)
        report["shift"] = {
            **dict(shift_res.clean), "dataset": shift_data.name, "data_origin": shift_data.origin,
            "split": req.split, "config": str(req.shift_config), "classes": list(shift_data.class_names),
            "top1_drop": shift_res.clean["top1"] - res.clean["top1"],
            "calibration": shift_res.calibration,
        }
    report["metrics"] = _flat_metrics(report, flat)
    report = json.loads(json.dumps(report), parse_constant=lambda _: None)   # NaN/inf -> null: strict JSON

    written = _write(report, out_dir)
    if req.mlflow_uri:
        run_name = f"evaluate:{ckpt.parent.name}/{ckpt.stem}"
        report["mlflow_run_id"] = log_to_mlflow(report, written, req.mlflow_uri, req.mlflow_experiment, run_name)
    return report, written


def _corruption_section(corrupted: dict, folder, flat: dict) -> dict:
    top1, ece = ({c: {str(s): m[key] for s, m in by.items()} for c, by in corrupted.items()} for key in ("top1", "ece"))
    return {
        "source": f"folder {folder.root}" if folder is not None else "on-the-fly",
        "names": list(corrupted), "severities": list(next(iter(corrupted.values()))),
        "top1": top1, "error": {c: {s: 100.0 - v for s, v in by.items()} for c, by in top1.items()}, "ece": ece,
        "mean_top1": {c: flat[f"corruption_top1/{c}"] for c in corrupted},
        "corruption_top1": flat["corruption_top1"], "corruption_error": 100.0 - flat["corruption_top1"],
        "corruption_ece": flat["corruption_ece"],
    }


def _flat_metrics(report: dict, corruption: dict) -> dict:
    """Every headline number under one flat name (MLflow metrics; the corruption ones as a sweep reports them)."""
    m: dict[str, Optional[float]] = {f"clean_{k}": float(v) for k, v in report["clean"].items() if k != "n"}
    m.update(corruption)
    ref = report.get("corruptions", {}).get("reference")
    if ref:
        m["mce"], m["relative_mce"] = ref["mce"], ref["relative_mce"]
        m.update({f"ce/{c}": v for c, v in ref["ce"].items()})
        m.update({f"relative_ce/{c}": v for c, v in ref["relative_ce"].items()})
    shift = report.get("shift") or {}
    m.update({f"shift_{k}": float(shift[k]) for k in ("top1", "top5", "loss", "ece", "top1_drop",
                                                       "confident_correct_pct", "confidently_wrong_pct") if k in shift})
    return m


def _write(report: dict, out_dir: Path) -> list[Path]:
    """The reliability diagram(s), then robustness.json; returns the paths, robustness.json first."""
    shift = report.get("shift")
    sources = [(report, DIAGRAM_FILE, "")] + ([(shift, SHIFT_DIAGRAM_FILE, " (shift)")] if shift else [])
    diagrams = [save_reliability_diagram(r["calibration"], out_dir / name,
                                         f"{report['arch']} on {r['dataset']}/{r['split']}{tag}")
                for r, name, tag in sources]
    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=1, allow_nan=False) + "\n")
    return [out_dir / REPORT_FILE, *diagrams]
