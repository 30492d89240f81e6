"""The report's PNG figures (matplotlib Agg, no pyplot): learning curves, parameter-vs-metric scatters, importances.

Visual grammar shared by all figures: trials that reached max_t (ASHA survivors) are coloured, one colour per
trial in rank order, the selected best trial drawn thicker with a star; ASHA-stopped trials are grey and dashed
with an "x" where they stopped; failed trials (error / non-finite loss) are red and dotted.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

from richkd.io import atomic_path

STOPPED = "#8c8c8c"
FAILED = "#d62728"
SURVIVOR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                   "#393b79", "#637939", "#843c39", "#7b4173")
DPI = 110
SECOND_METRICS = ("val_top1", "val_loss")     # drawn beside the sweep metric when it is not the sweep metric


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure   # no pyplot: no global figure state

    return Figure(figsize=(width, height), dpi=DPI)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def trial_colors(rows: Sequence) -> dict:
    """trial_id -> colour: survivors get distinct colours in rank order, stopped grey, failed red."""
    out, i = {}, 0
    for r in rows:
        if r.outcome == "completed":
            out[r.trial_id] = SURVIVOR_COLORS[i % len(SURVIVOR_COLORS)]
            i += 1
        elif r.outcome in ("error", "nonfinite_loss"):
            out[r.trial_id] = FAILED
        else:
            out[r.trial_id] = STOPPED
    return out


def short_value(value, width: int = 18) -> str:
    """A compact label: floats to 4 significant digits, paths to their file name, long text cut with '…'."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if ("/" in text or os.sep in text) and len(text) > width:
        text = os.path.basename(text.rstrip("/" + os.sep)) or text
    return text if len(text) <= width else text[:width - 1] + "…"


def asha_rungs(spec) -> list[int]:
    """ASHA's milestones below max_t (grace_period * reduction_factor**k), where trials are compared and cut."""
    s = spec.tune.scheduler
    if s.type != "asha":
        return []
    rungs, t = [], float(s.grace_period)
    while t < spec.max_t and len(rungs) < 50:
        rungs.append(int(math.ceil(t)) if abs(t - round(t)) > 1e-9 else int(round(t)))
        t *= float(s.reduction_factor)
    return rungs


def curve_metrics(data) -> list[str]:
    """The sweep metric, then one companion validation metric when the trials report it."""
    names = [data.metric]
    for extra in SECOND_METRICS:
        if extra != data.metric and any(c.series(extra) for c in data.curves.values()):
            names.append(extra)
            break
    return names


def _better(mode: str) -> str:
    return "higher is better" if mode == "max" else "lower is better"


def _mode_of(name: str, data) -> str:
    if name == data.metric:
        return data.mode
    from richkd.metric_names import KNOWN_METRICS

    return KNOWN_METRICS.get(name, "max")


def learning_curves(data, path: Path) -> Optional[Path]:
    """Validation metric(s) vs epoch for every trial; None when no trial has a finite value to draw."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = curve_metrics(data)
    if not any(c.series(data.metric) for c in data.curves.values()):
        return None
    colors = trial_colors(data.rows)
    best = data.best
    width = 4.3 * len(names) + 2.1     # ~1180 px at DPI: shown 1:1 in the page's column
    fig = _figure(width, 4.4)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    rungs = asha_rungs(data.spec)
    # draw the grey / red ones first so survivors sit on top
    order = sorted(data.rows, key=lambda r: (r.outcome == "completed", best is not None and r is best))
    for ax, name in zip(axes, names):
        for rung in rungs:
            ax.axvline(rung, color="#bbbbbb", linewidth=0.8, linestyle=":", zorder=0)
        for r in order:
            pts = data.curves[r.trial_id].series(name) if r.trial_id in data.curves else []
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            color = colors[r.trial_id]
            if r.outcome == "completed":
                is_best = best is not None and r is best
                ax.plot(xs, ys, color=color, linewidth=2.6 if is_best else 1.6, marker="o", markersize=3.5,
                        zorder=4 if is_best else 3)
                if is_best:
                    ax.plot(xs[-1], ys[-1], marker="*", markersize=15, color=color, markeredgecolor="black",
                            markeredgewidth=0.8, zorder=5)
            elif r.outcome in ("error", "nonfinite_loss"):
                ax.plot(xs, ys, color=color, linewidth=1.2, linestyle=":", marker="o", markersize=2.5, alpha=0.8,
                        zorder=2)
                ax.plot(xs[-1], ys[-1], marker="X", markersize=9, color=color, zorder=2)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.1, linestyle="--", alpha=0.75, zorder=1)
                ax.plot(xs[-1], ys[-1], marker="x", markersize=8, markeredgewidth=1.8, color="#555555", zorder=2)
        ax.set_xlim(0.7, data.spec.max_t + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        tag = " (sweep metric)" if name == data.metric else ""
        ax.set_title(f"{name}{tag}, {_better(_mode_of(name, data))}", fontsize=10)
        ax.grid(True, alpha=0.25)
    handles, labels = [], []
    for r in data.rows:
        if r.outcome != "completed" or not (r.trial_id in data.curves and data.curves[r.trial_id].series(data.metric)):
            continue
        is_best = best is not None and r is best
        handles.append(Line2D([], [], color=colors[r.trial_id], linewidth=2.6 if is_best else 1.6,
                              marker="*" if is_best else "o", markersize=10 if is_best else 4,
                              markeredgecolor="black" if is_best else colors[r.trial_id]))
        value = f"{r.value:.4g}" if r.value is not None else "n/a"
        labels.append(f"#{r.rank} {r.trial_id}  {value}" + ("  (best)" if is_best else ""))
        if len(handles) >= 12:
            break
    n_stopped = sum(1 for r in data.rows if r.outcome == "stopped_early")
    n_failed = sum(1 for r in data.rows if r.outcome in ("error", "nonfinite_loss"))
    n_unfinished = sum(1 for r in data.rows if r.outcome == "unfinished")
    if n_stopped:
        handles.append(Line2D([], [], color=STOPPED, linestyle="--", marker="x", markeredgecolor="#555555"))
        labels.append(f"stopped early by ASHA ({n_stopped})")
    if n_unfinished:
        handles.append(Line2D([], [], color=STOPPED, linestyle="--"))
        labels.append(f"unfinished ({n_unfinished})")
    if n_failed:
        handles.append(Line2D([], [], color=FAILED, linestyle=":", marker="X"))
        labels.append(f"error / non-finite loss ({n_failed})")
    if rungs:
        handles.append(Line2D([], [], color="#bbbbbb", linestyle=":"))
        labels.append("ASHA rung")
    fig.legend(handles, labels, loc="center right", fontsize=8.5, frameon=False,
               title=f"reached max_t = {data.spec.max_t}\n(rank, trial, last {data.metric})", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.15 / width, 1))
    return _save(fig, path)


def _is_log(p) -> bool:
    return p.sampler == "loguniform"


def param_scatter(data, path: Path) -> Optional[Path]:
    """One small scatter per searched entry: its value (x) vs each trial's last metric value (y).

    Categorical entries are placed on integer positions with a small seeded jitter so equal values do not hide
    each other. A trial where a conditional entry was inactive has no point in that entry's panel.
    """
    import numpy as np

    params = list(data.spec.params)
    if not params:
        return None
    points = [r for r in data.rows if r.value is not None]
    if not points:
        return None
    colors = trial_colors(data.rows)
    best = data.best
    cols = min(3, len(params))
    nrows = int(math.ceil(len(params) / cols))
    fig = _figure(3.55 * cols, 2.9 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False)
    rng = np.random.default_rng(0)
    for i, p in enumerate(params):
        ax = axes[i // cols][i % cols]
        active = [r for r in points if p.key in r.sampled]
        categories = None
        if p.is_finite or p.is_variant:
            categories = list(p.variants) if p.is_variant else list(p.values)
        for r in sorted(active, key=lambda r: (r.outcome == "completed", best is not None and r is best)):
            value = r.sampled[p.key]
            if categories is not None:
                idx = next((j for j, c in enumerate(categories) if c == value and type(c) is type(value)),
                           next((j for j, c in enumerate(categories) if c == value), None))
                if idx is None:
                    continue
                x = idx + rng.uniform(-0.15, 0.15)
            else:
                x = float(value)
            is_best = best is not None and r is best
            if r.outcome == "completed":
                ax.scatter([x], [r.value], s=170 if is_best else 42, marker="*" if is_best else "o",
                           color=colors[r.trial_id], edgecolors="black", linewidths=0.8 if is_best else 0.4,
                           zorder=4 if is_best else 3)
            elif r.outcome in ("error", "nonfinite_loss"):
                ax.scatter([x], [r.value], s=40, marker="X", color=FAILED, zorder=2)
            else:
                ax.scatter([x], [r.value], s=36, marker="o", facecolors="none", edgecolors=STOPPED, linewidths=1.3,
                           zorder=2)
        if categories is not None:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels([short_value(c, 16) for c in categories], fontsize=8,
                               rotation=20 if len(categories) > 3 else 0)
            ax.set_xlim(-0.6, len(categories) - 0.4)
        else:
            if _is_log(p):
                ax.set_xscale("log")
            span = (float(p.high) - float(p.low)) if not _is_log(p) else 0.0
            if span > 0:
                ax.set_xlim(float(p.low) - 0.04 * span, float(p.high) + 0.04 * span)
            elif _is_log(p):
                ax.set_xlim(float(p.low) / 1.3, float(p.high) * 1.3)
        title = p.key
        if len(active) < len(points):
            title += f"  (set in {len(active)}/{len(points)})"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.25)
        if i % cols == 0:
            ax.set_ylabel(f"last {data.metric}", fontsize=8)
    for j in range(len(params), nrows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(f"searched values vs last {data.metric} ({_better(data.mode)}); colour = reached max_t, "
                 "hollow grey = stopped early (fewer epochs)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, path)


def importance_bars(importances, path: Path) -> Optional[Path]:
    """Horizontal bars of the normalised importances, most important on top."""
    if not importances.values:
        return None
    items = list(importances.values.items())
    fig = _figure(6.4, 0.45 * len(items) + 1.3)
    ax = fig.subplots()
    keys = [k for k, _ in items][::-1]
    vals = [v for _, v in items][::-1]
    bars = ax.barh(range(len(keys)), vals, color="#4c72b0")
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(keys, fontsize=9)
    for bar, v in zip(bars, vals):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, max(vals) + 0.12))
    ax.set_xlabel("importance (sums to 1)", fontsize=9)
    where = f" at epoch {importances.epoch}" if importances.epoch else ""
    ax.set_title(f"{importances.evaluator} importance, {importances.n_trials} trials{where}", fontsize=10)
    ax.grid(True, axis="x", alpha=0.25)
    fig.tight_layout()
    return _save(fig, path)


def pareto_scatter(data, path: Path) -> Optional[Path]:
    """Multi-objective sweeps: one panel per pair of objectives (last values), Pareto-front trials highlighted.

    Front members (non-dominated over ALL objectives among trials that reached max_t) are large diamonds labelled
    with their trial id; other trials that reached max_t are small coloured dots; ASHA-stopped trials are hollow
    grey (their values come from fewer epochs and never enter the front). A 2-D panel of a 3-objective front can
    show a front member below another: it wins on an objective not drawn in that panel.
    """
    import itertools

    objectives = data.objectives
    if len(objectives) < 2:
        return None
    from richkd.pareto import objective_values

    front = data.front
    front_ids = {r.trial_id for r in front}
    label_offset = {r.trial_id: (6, 5 if i % 2 == 0 else -11) for i, r in enumerate(front)}   # near points stay legible
    best = data.best
    pairs = list(itertools.combinations(range(len(objectives)), 2))[:3]
    points = [(r, {m: r.metrics.get(m) for m, _ in objectives}) for r in data.rows]
    drawable = [(r, v) for r, v in points if objective_values(r, [m for m, _ in objectives]) is not None]
    if not drawable:
        return None
    colors = trial_colors(data.rows)
    fig = _figure(4.6 * len(pairs) + 0.4, 4.4)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (i, j) in zip(axes, pairs):
        (mx, dx), (my, dy) = objectives[i], objectives[j]
        for r, v in sorted(drawable, key=lambda rv: (rv[0].trial_id in front_ids, rv[0].outcome == "completed")):
            x, y = v[mx], v[my]
            if r.trial_id in front_ids:
                is_best = best is not None and r is best
                ax.scatter([x], [y], s=150 if is_best else 95, marker="*" if is_best else "D", color="#d4a017",
                           edgecolors="black", linewidths=0.9, zorder=5)
                ax.annotate(r.trial_id, (x, y), textcoords="offset points", xytext=label_offset[r.trial_id],
                            fontsize=7.5, zorder=6)
            elif r.outcome == "completed":
                ax.scatter([x], [y], s=34, marker="o", color=colors[r.trial_id], edgecolors="black",
                           linewidths=0.3, alpha=0.85, zorder=3)
            elif r.outcome in ("error", "nonfinite_loss"):
                continue
            else:
                ax.scatter([x], [y], s=30, marker="o", facecolors="none", edgecolors=STOPPED, linewidths=1.2,
                           zorder=2)
        done = [v for r, v in drawable if r.outcome == "completed"]
        for name, set_lim in ((mx, ax.set_xlim), (my, ax.set_ylim)) if done else ():   # fit the front's candidates
            lo, hi = min(v[name] for v in done), max(v[name] for v in done)
            pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi) * 0.02, 1e-3)
            set_lim(lo - pad, hi + pad)
        ax.set_xlabel(f"{mx} ({_better(dx)})", fontsize=9)
        ax.set_ylabel(f"{my} ({_better(dy)})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.25)
    fig.suptitle(f"Pareto front: {len(front)} non-dominated of "
                 f"{sum(1 for r in data.rows if r.outcome == 'completed')} trials that reached max_t (gold diamonds; "
                 "star = best by the first objective); dots: dominated; hollow grey: stopped early (axes fit the "
                 "trials that reached max_t)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save(fig, path)


def budget_progress(data, path: Path) -> Optional[Path]:
    """Best value found so far against the trial-epochs spent (every trial's epochs, in report order)."""
    points = data.best_so_far()
    if not points:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    xs = [0] + [e for e, _, _ in points] + [data.total_epochs]
    ys = [points[0][1]] + [v for _, v, _ in points] + [points[-1][1]]
    ax.step(xs[1:], ys[1:], where="post", color="#1f77b4", linewidth=1.8)
    ax.plot([e for e, _, _ in points], [v for _, v, _ in points], "o", color="#1f77b4", markersize=4)
    ax.set_xlim(0, data.total_epochs * 1.02)
    ax.set_xlabel("trial-epochs spent (all trials)")
    ax.set_ylabel(f"best {data.metric} so far")
    ax.set_title(f"search progress: best last {data.metric} of trials that reached max_t", fontsize=10)
    ax.grid(True, alpha=0.25)
    fig.tight_layout()
    return _save(fig, path)

