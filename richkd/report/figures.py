"""The report's PNG figures. Learning curves and search progress are drawn here (matplotlib Agg, no pyplot); the
searched values, the importances and the Pareto front are Optuna's own plots (optuna.visualization.matplotlib)
of the report's study (richkd.report.importance.build_study). How the curves are styled: page.py's caption.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from richkd.io import atomic_path
from richkd.metric_names import KNOWN_METRICS
from richkd.pareto import objective_values
from richkd.report.data import curve
from richkd.report.importance import build_study

STOPPED = "#8c8c8c"
FAILED = "#d62728"
FAILED_OUTCOMES = ("error", "nonfinite_loss")
SURVIVOR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                   "#393b79", "#637939", "#843c39", "#7b4173")
DPI = 110
SECOND_METRICS = ("val_top1", "val_loss")     # drawn beside the sweep metric when it is not the sweep metric
# line style, and marker at the last epoch, by kind of trial
LINE = {"best": dict(linewidth=2.6, marker="o", markersize=3.5, zorder=4),
        "completed": dict(linewidth=1.6, marker="o", markersize=3.5, zorder=3),
        "failed": dict(linewidth=1.2, linestyle=":", marker="o", markersize=2.5, alpha=0.8, zorder=2),
        "stopped": dict(linewidth=1.1, linestyle="--", alpha=0.75, zorder=1)}
END = {"best": dict(marker="*", markersize=15, markeredgecolor="black", markeredgewidth=0.8, zorder=5),
       "failed": dict(marker="X", markersize=9, zorder=2),
       "stopped": dict(marker="x", markersize=8, markeredgewidth=1.8, color="#555555", zorder=2)}


def _kind(outcome: str) -> str:
    return "completed" if outcome == "completed" else "failed" if outcome in FAILED_OUTCOMES else "stopped"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure   # no pyplot: no global figure state

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig, path: Path, **kwargs) -> Path:
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, **kwargs)
    return Path(path)


def _optuna_png(draw, path: Path) -> Path:
    """Save what draw(optuna.visualization.matplotlib) plots; its pyplot style and figure do not outlive the call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as plots
    from optuna.exceptions import ExperimentalWarning

    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)     # e.g. equal x limits of a single point
        fig = np.ravel(draw(plots))[0].figure
        try:
            return _save(fig, path, bbox_inches="tight")
        finally:
            plt.close(fig)


def short_value(value, width: int = 18) -> str:
    """A compact label: floats to 4 significant digits, paths to their file name, long text cut with '…'."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if ("/" in text or os.sep in text) and len(text) > width:
        text = os.path.basename(text.rstrip("/" + os.sep)) or text
    return text if len(text) <= width else text[:width - 1] + "…"


def trial_colors(rows: Sequence) -> dict:
    """trial_id -> colour: survivors get distinct colours in rank order, stopped grey, failed red."""
    survivors = [r for r in rows if r.outcome == "completed"]
    out = {r.trial_id: FAILED if _kind(r.outcome) == "failed" else STOPPED for r in rows}
    out.update({r.trial_id: SURVIVOR_COLORS[i % len(SURVIVOR_COLORS)] for i, r in enumerate(survivors)})
    return out


def asha_rungs(spec) -> list[int]:
    """ASHA's milestones below max_t (grace_period * reduction_factor**k), where trials are compared and cut."""
    s = spec.tune.scheduler
    if s.type != "asha":
        return []
    milestones = (s.grace_period * float(s.reduction_factor) ** k for k in range(50))
    return [math.ceil(t - 1e-9) for t in itertools.takewhile(lambda t: t < spec.max_t, milestones)]


def _better(mode: str) -> str:
    return "higher is better" if mode == "max" else "lower is better"


def learning_curves(data, path: Path) -> Optional[Path]:
    """Validation metric(s) vs epoch for every trial; None when no trial has a finite value to draw."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not any(curve(r, data.metric) for r in data.rows):
        return None
    names = [data.metric] + [m for m in SECOND_METRICS if m != data.metric
                             and any(curve(r, m) for r in data.rows)][:1]
    colors, best, counts, rungs = trial_colors(data.rows), data.best, data.counts(), asha_rungs(data.spec)
    width = 4.3 * len(names) + 2.1     # ~1180 px at DPI: shown 1:1 in the page's column
    fig = _figure(width, 4.4)
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        for rung in rungs:
            ax.axvline(rung, color="#bbbbbb", linewidth=0.8, linestyle=":", zorder=0)
        for r in data.rows:
            pts = curve(r, name)
            if pts:
                xs, ys = zip(*pts)
                kind = "best" if r is best else _kind(r.outcome)
                ax.plot(xs, ys, color=colors[r.trial_id], **LINE[kind])
                if kind in END:
                    ax.plot(xs[-1], ys[-1], **{"color": colors[r.trial_id], **END[kind]})
        ax.set_xlim(0.7, data.spec.max_t + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=name)
        mode = data.mode if name == data.metric else KNOWN_METRICS.get(name, "max")
        ax.set_title(f"{name}{' (sweep metric)' if name == data.metric else ''}, {_better(mode)}", fontsize=10)
        ax.grid(True, alpha=0.25)
    legend = []   # (handle, label): the survivors, then one entry per kind of other trial, then the rungs
    for r in [r for r in data.rows if r.outcome == "completed" and curve(r, data.metric)][:12]:
        kind = "best" if r is best else "completed"
        legend.append((Line2D([], [], color=colors[r.trial_id], **{**LINE[kind], **END.get(kind, {}),
                                                                     "markersize": 10 if r is best else 4}),
                       f"#{r.rank} {r.trial_id}  {'n/a' if r.value is None else f'{r.value:.4g}'}"
                       + ("  (best)" if r is best else "")))
    for label, kind, n in (("stopped early by ASHA", "stopped", counts.get("stopped_early", 0)),
                           ("unfinished", "stopped", counts.get("unfinished", 0)),
                           ("error / non-finite loss", "failed", sum(counts.get(o, 0) for o in FAILED_OUTCOMES))):
        if n:
            color = FAILED if kind == "failed" else STOPPED
            legend.append((Line2D([], [], **{"color": color, **LINE[kind], **END[kind]}), f"{label} ({n})"))
    if rungs:
        legend.append((Line2D([], [], color="#bbbbbb", linestyle=":"), "ASHA rung"))
    fig.legend(*zip(*legend), loc="center right", fontsize=8.5, frameon=False,
               title=f"reached max_t = {data.spec.max_t}\n(rank, trial, last {data.metric})", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.15 / width, 1))
    return _save(fig, path)


def budget_progress(data, path: Path) -> Optional[Path]:
    """Best value found so far against the trial-epochs spent (every trial's epochs, in report order)."""
    points = data.best_so_far()
    if not points:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    xs, ys = [e for e, _, _ in points], [v for _, v, _ in points]
    ax.step(xs + [data.total_epochs], ys + ys[-1:], where="post", color="#1f77b4", linewidth=1.8)
    ax.plot(xs, ys, "o", color="#1f77b4", markersize=4)
    ax.set_xlim(0, data.total_epochs * 1.02)
    ax.set(xlabel="trial-epochs spent (all trials)", ylabel=f"best {data.metric} so far")
    ax.set_title(f"search progress: best last {data.metric} of trials that reached max_t", fontsize=10)
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    return _save(fig, path)


def param_slice(data, path: Path) -> Optional[Path]:
    """Optuna's slice plot: each searched entry's value against each trial's last metric value (a conditional
    entry only where it was active); None without searched entries or finite values."""
    rows = [r for r in data.rows if r.value is not None]
    study, keys = build_study(data.spec.params, [(r.sampled, r.value) for r in rows], [data.mode], [])
    keys = [k for k in keys if any(k in t.params for t in study.trials)]
    if not keys:
        return None

    def draw(plots):
        axes = plots.plot_slice(study, params=keys, target_name=f"last {data.metric}")
        for ax in np.ravel(axes):   # categorical values are drawn as repr(value): long paths become file names
            labels = [t.get_text() for t in ax.get_xticklabels()]
            if labels and all(text.startswith("'") for text in labels):
                ax.set_xticks(ax.get_xticks(), [short_value(text.strip("'")) for text in labels])
        return axes

    return _optuna_png(draw, path)


def importance_bars(importances, path: Path) -> Optional[Path]:
    """Optuna's importance plot of the study the importances were scored on (the same seeded fANOVA)."""
    if not importances.values:
        return None
    from optuna.importance import FanovaImportanceEvaluator

    return _optuna_png(lambda plots: plots.plot_param_importances(
        importances.study, evaluator=FanovaImportanceEvaluator(seed=0), params=list(importances.values),
        target_name=f"{importances.evaluator}, {importances.n_trials} trials at epoch {importances.epoch}"), path)


def pareto_front(data, path: Path) -> Optional[Path]:
    """Optuna's Pareto-front plot of the trials that reached max_t (last values; 2 or 3 objectives), the front
    highlighted; None when no such trial has every objective or there are more than three."""
    metrics = [m for m, _ in data.objectives]
    if not 2 <= len(metrics) <= 3:
        return None
    points = [objective_values(r, metrics) for r in data.rows if r.outcome == "completed"]
    points = [({}, v) for v in points if v is not None]
    if not points:
        return None
    study, _ = build_study([], points, [d for _, d in data.objectives], [])
    return _optuna_png(lambda plots: plots.plot_pareto_front(
        study, target_names=[f"{m} ({_better(d)})" for m, d in data.objectives]), path)
