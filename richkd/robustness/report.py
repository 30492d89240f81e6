"""Presenting an evaluation: the reliability diagram (PNG), a text table, and MLflow logging."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from richkd.io import atomic_path
from richkd.tracking import KIND_TAG, STORE_SCHEMES, check_server, log_run

log = logging.getLogger(__name__)


def save_reliability_diagram(bins: Mapping, path: str | Path, title: str) -> Path:
    """Write a reliability diagram (accuracy per confidence bin vs the diagonal, with a histogram) as PNG."""
    from matplotlib.figure import Figure   # no pyplot: no display, no global figure state, safe in any thread

    edges = bins["edges"]
    width = edges[1] - edges[0]
    lefts = edges[:-1]
    filled = [i for i, c in enumerate(bins["count"]) if c]
    fig = Figure(figsize=(5, 6), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar([lefts[i] for i in filled], [bins["accuracy"][i] for i in filled], width=width, align="edge",
            color="#4c72b0", edgecolor="black", linewidth=0.5, label="accuracy")
    gap_base = [min(bins["accuracy"][i], bins["confidence"][i]) for i in filled]
    gap_height = [abs(bins["accuracy"][i] - bins["confidence"][i]) for i in filled]
    top.bar([lefts[i] for i in filled], gap_height, bottom=gap_base, width=width, align="edge",
            color="#dd8452", alpha=0.6, edgecolor="#c44e52", linewidth=0.5, hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {100 * bins['ece']:.2f}%  (n={sum(bins['count'])}, {bins['n_bins']} bins)",
                  fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lefts, bins["count"], width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("count")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def format_table(report: Mapping) -> str:
    """A short human-readable summary of a robustness report (what `richkd evaluate` prints)."""
    clean = report["clean"]
    line = f"clean            top-1 {clean['top1']:6.2f}%  top-5 {clean['top5']:6.2f}%  ECE {100 * clean['ece']:5.2f}%"
    if "confident_correct_pct" in clean:
        line += (f"  confident-correct {clean['confident_correct_pct']:.1f}%  confidently-wrong "
                 f"{clean['confidently_wrong_pct']:.1f}% (p >= {report['confidence_threshold']:g})")
    lines = [f"{report['arch']} on {report['dataset']}/{report['split']} ({clean['n']} images), "
             f"checkpoint {report['checkpoint']}", line]
    corr = report.get("corruptions")
    if corr:
        sevs, ref = corr["severities"], corr.get("reference")
        ce = (ref or {}).get("ce", {})
        lines.append(f"{'corruption':<17}" + "".join(f"{'s' + str(s):>7}" for s in sevs) + f"{'mean':>8}"
                     + (f"{'CE':>8}" if ce else ""))
        for name in corr["names"]:
            row = f"{name:<17}" + "".join(f"{corr['top1'][name][str(s)]:7.2f}" for s in sevs)
            row += f"{corr['mean_top1'][name]:8.2f}"
            if ce:
                row += f"{'-':>8}" if ce.get(name) is None else f"{ce[name]:8.1f}"
            lines.append(row)
        line = f"mean corruption top-1 {corr['corruption_top1']:.2f}% ({corr['source']})"
        if ref:
            mce, rel = ref.get("mce"), ref.get("relative_mce")
            line += f"; mCE {mce:.1f}%" if mce is not None else "; mCE undefined"
            line += f", relative mCE {rel:.1f}%" if rel is not None else ", relative mCE undefined"
            line += f" (reference {ref['reference']})"
        lines.append(line)
    shift = report.get("shift")
    if shift:
        lines.append(f"shift {shift['dataset']}/{shift['split']} ({shift['n']} images): top-1 {shift['top1']:.2f}% "
                     f"({shift['top1_drop']:+.2f} vs clean), ECE {100 * shift['ece']:.2f}%, confidently-wrong "
                     f"{shift.get('confidently_wrong_pct', float('nan')):.1f}%")
    return "\n".join(lines)


def check_tracking_uri(uri: str) -> str:
    """The URI unchanged, or a ValueError: MLflow 3.13+ refuses its file store (a plain folder, ./mlruns, a file:
    URI) unless MLFLOW_ALLOW_FILE_STORE=true, and other schemes are no tracking store at all."""
    if "://" not in uri or uri.split("://", 1)[0].split("+", 1)[0].lower() not in STORE_SCHEMES:
        raise ValueError(f"--mlflow-uri {uri!r}: not a tracking store MLflow opens (a plain folder or file: URI is "
                         "its file store, not supported); use sqlite:///PATH/mlflow.db, http://HOST:5000, or a "
                         "database URI (postgresql://, mysql://, ...)")
    check_server(uri, "--mlflow-uri")   # a server that does not answer: before the evaluation, not after it
    return uri


def log_to_mlflow(report: Mapping, artifacts: list[Path], tracking_uri: str, experiment: str,
                  run_name: str) -> str:
    """Log a report's flat metrics, its parameters and the written files to one new MLflow run; return its id."""
    params = {k: report.get(k) for k in ("checkpoint", "checkpoint_sha256", "arch", "dataset", "split", "suite",
                                         "seed", "max_samples")}
    corr = report.get("corruptions")
    if corr:
        params.update({"corruptions": ",".join(corr["names"]), "severities": ",".join(map(str, corr["severities"])),
                       "corruption_source": corr["source"]})
        if corr.get("reference"):
            params["reference"] = corr["reference"]["reference"]
    if report.get("shift"):
        params["shift_dataset"] = report["shift"]["dataset"]
    run_id = log_run(tracking_uri, experiment, run_name, params=params, metrics=report["metrics"],
                     tags={KIND_TAG: "evaluate"}, artifacts=artifacts, wait_s=None)
    log.info("logged evaluation to MLflow run %s (%s, experiment %r)", run_id, tracking_uri, experiment)
    return run_id
