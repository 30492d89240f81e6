"""The report's static HTML page: embedded CSS, images referenced relatively, every piece of text escaped."""
from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

from richkd import __version__
from richkd.report.data import curve
from richkd.report.figures import short_value, trial_colors

OUTCOME_LABELS = {"completed": "reached max_t", "stopped_early": "stopped (ASHA)",
                  "nonfinite_loss": "non-finite loss", "error": "error", "unfinished": "unfinished"}

CSS = """
:root { --ink:#1d2430; --muted:#5b6472; --line:#dde2ea; --bg:#f6f7f9; --card:#fff; --accent:#1f77b4;
        --best:#fff4cc; --bad:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; }
main { max-width:1280px; margin:0 auto; padding:24px 28px 48px; }
h1 { font-size:24px; margin:0 0 4px; }
h2 { font-size:18px; margin:0 0 10px; }
.sub { color:var(--muted); margin:0 0 18px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:16px 18px;
        margin:0 0 18px; }
.stats { display:grid; grid-template-columns:repeat(auto-fit,minmax(140px,1fr)); gap:10px; margin-bottom:14px; }
.stat { border:1px solid var(--line); border-radius:6px; padding:8px 10px; background:#fbfcfd; }
.stat .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
.stat .v { font-size:20px; font-weight:600; }
.stat.bad .v { color:var(--bad); }
.best-cfg { display:flex; flex-wrap:wrap; gap:6px 8px; margin:6px 0 0; padding:0; list-style:none; }
.best-cfg li { background:var(--best); border:1px solid #ecd98a; border-radius:4px; padding:2px 8px;
               font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:13px; }
.meta { color:var(--muted); font-size:13px; margin:10px 0 0; }
.meta code, td code { font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px; }
figure { margin:0; }
figure img { max-width:100%; height:auto; display:block; border:1px solid var(--line); border-radius:4px;
             background:#fff; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
table { border-collapse:collapse; width:100%; font-size:12.5px; }
th, td { border-bottom:1px solid var(--line); padding:4px 6px; text-align:left; white-space:nowrap; }
th { background:#eef1f5; position:sticky; top:0; font-weight:600; white-space:normal; vertical-align:bottom; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.best td { background:var(--best); font-weight:600; }
tr.stopped_early td, tr.unfinished td { color:var(--muted); }
tr.error td, tr.nonfinite_loss td { color:var(--bad); }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px; vertical-align:middle; }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:12px; border:1px solid var(--line); }
.badge.completed { background:#e6f4ea; border-color:#b7dfc3; color:#1e6b34; }
.badge.stopped_early, .badge.unfinished { background:#f1f1f1; color:#555; }
.badge.error, .badge.nonfinite_loss { background:#fdecea; border-color:#f3b9b2; color:var(--bad); }
.scroll { overflow-x:auto; }
.two { display:grid; grid-template-columns:minmax(0,3fr) minmax(240px,2fr); gap:18px; align-items:start; }
ul.notes { margin:6px 0 0; padding-left:20px; color:var(--muted); }
footer { color:var(--muted); font-size:12px; margin-top:24px; }
@media (max-width:900px) { .two { grid-template-columns:1fr; } }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _cell(value, width: int = 22) -> str:
    """A table cell's content: shortened text with the full value as a tooltip when it was shortened."""
    full = fmt(value, 6) if isinstance(value, float) else ("" if value is None else str(value))
    shown = short_value(value, width) if value is not None else ""
    if shown != full:
        return f'<span title="{esc(full)}">{esc(shown)}</span>'
    return esc(shown)


def _rel(target: Path, start: Path) -> str:
    """A relative URL from the page's folder to `target` (forward slashes, percent-encoded)."""
    return quote(os.path.relpath(target, start).replace(os.sep, "/"))


def _breakable(key: str) -> str:
    """A dotted key that may wrap after its dots in a narrow table header."""
    return ".<wbr>".join(esc(part) for part in key.split("."))


def _stat(label: str, value, bad: bool = False) -> str:
    return (f'<div class="stat{" bad" if bad else ""}"><div class="k">{esc(label)}</div>'
            f'<div class="v">{esc(value)}</div></div>')


def _notes(notes: Iterable[str]) -> str:
    items = "".join(f"<li>{esc(n)}</li>" for n in notes if n)
    return f'<ul class="notes">{items}</ul>' if items else ""


def _sampled(row, keys) -> list[str]:
    """The table cells of a trial's searched values; – where a conditional entry was not active."""
    return [f"<td>{_cell(row.sampled.get(k))}</td>" if k in row.sampled else '<td class="sub">–</td>' for k in keys]


def _figure(image: Optional[str], alt: str, caption: str, missing: str) -> str:
    if not image:
        return f'<p class="sub">{esc(missing)}</p>'
    return (f'<figure><img src="{esc(quote(image))}" alt="{esc(alt)}" loading="lazy">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def header_html(data, mlflow_note: str) -> str:
    spec = data.spec
    counts = data.counts()
    failed = counts.get("error", 0) + counts.get("nonfinite_loss", 0)
    best = data.best
    t = spec.tune
    stats = [
        _stat(f"metric ({t.mode})", data.metric),
        _stat("trials", len(data.rows)),
        _stat("reached max_t", counts.get("completed", 0)),
        _stat("stopped early", counts.get("stopped_early", 0)),
        _stat("errored", failed, bad=failed > 0),
        _stat("total epochs", data.total_epochs),
        _stat(f"best {data.metric}", fmt(best.value) if best else "n/a"),
    ]
    if counts.get("unfinished"):
        stats.insert(5, _stat("unfinished", counts["unfinished"]))
    if data.multi_objective:
        stats.append(_stat(f"Pareto front ({len(data.objectives)} objectives)", len(data.front)))
    parts = [f'<section class="card"><div class="stats">{"".join(stats)}</div>']
    if best is not None:
        cfg = "".join(f"<li>{esc(k)} = {_cell(v, 40)}</li>" for k, v in best.sampled.items())
        parts.append(f"<div><strong>Best configuration</strong>: trial <code>{esc(best.trial_id)}</code>, last "
                     f"{esc(data.metric)} = {esc(fmt(best.value, 6))} after {esc(best.epochs)} epochs"
                     f'<ul class="best-cfg">{cfg or "<li>(no searched values)</li>"}</ul></div>')
    else:
        parts.append(f"<div><strong>No best configuration yet</strong>: no trial reached max_t = {esc(spec.max_t)} "
                     f"epochs with a finite {esc(data.metric)}.</div>")
    exported = [data.export_dir / name for name in ("best_config.yaml", "best_trial.json", "leaderboard.csv")]
    links = [f'<a href="{esc(_rel(f, data.out_dir))}">{esc(f.name)}</a>' for f in exported if f.is_file()]
    search = (f"{t.search.algorithm} search (seed {t.search.seed}), {t.scheduler.type}"
              + (f" (grace {t.scheduler.grace_period}, reduction factor {t.scheduler.reduction_factor:g})"
                 if t.scheduler.type == "asha" else "") + f", max_t = {spec.max_t} epochs")
    meta_lines = [esc(search), f"experiment folder <code>{esc(data.experiment_path)}</code>", esc(mlflow_note),
                  "exported: " + " · ".join(links) if links else
                  f"not exported yet: <code>richkd export {esc(spec.name)}</code> writes best_config.yaml"]
    parts.append('<p class="meta">' + "<br>".join(meta_lines) + "</p></section>")
    return "".join(parts)


def leaderboard_html(data) -> str:
    spec = data.spec
    keys = spec.space_keys
    colors = trial_colors(data.rows)
    best = data.best
    head = ["rank", "trial", "outcome", "epochs", f"{data.metric} (last)", f"{data.metric} (best epoch)"]
    cells = "".join(f'<th class="num">{esc(h)}</th>' if i in (0, 3, 4, 5) else f"<th>{esc(h)}</th>"
                    for i, h in enumerate(head))
    cells += "".join(f"<th>{_breakable(k)}</th>" for k in keys) + "<th>MLflow run</th>"
    body = []
    for r in data.rows:
        is_best = best is not None and r is best
        cls = "best" if is_best else r.outcome
        swatch = f'<span class="swatch" style="background:{esc(colors[r.trial_id])}"></span>'
        star = " ★" if is_best else ""
        run = r.mlflow_run_id or ""
        row = [f'<td class="num">{esc(r.rank)}</td>',
               f"<td>{swatch}<code>{esc(r.trial_id)}</code>{star}</td>",
               f'<td><span class="badge {esc(r.outcome)}">{esc(OUTCOME_LABELS.get(r.outcome, r.outcome))}</span>'
               + (f' <small>{esc(r.extra["stop_reason"])}</small>' if r.extra.get("stop_reason") else "") + "</td>",
               f'<td class="num">{esc(r.epochs)}</td>',
               f'<td class="num">{esc(fmt(r.value))}</td>',
               f'<td class="num">{esc(fmt(r.best_value))}</td>']
        row += _sampled(r, keys)
        row.append(f'<td><code title="{esc(run)}">{esc(run[:8])}</code></td>')
        body.append(f'<tr class="{esc(cls)}">{"".join(row)}</tr>')
    return (f'<div class="scroll"><table><thead><tr>{cells}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            f'<p class="meta">Ranked as <code>richkd export</code> selects: trials that reached max_t first, by the '
            f"LAST {esc(data.metric)} on the validation split; then stopped, unfinished and failed trials. "
            "– = conditional entry not active for that trial.</p>")


def pareto_html(data, image: Optional[str]) -> str:
    """Figure + table of the Pareto-front trials of a multi-objective sweep."""
    objectives = data.objectives
    front = data.front
    best = data.best
    fig = _figure(image, "Pareto front of the objectives",
                  "Optuna's Pareto-front plot of the trials that reached max_t (last values on the validation "
                  "split); the front is red.", "no trial reached max_t with finite values of every objective, or "
                  "there are more than three objectives to draw (the table lists the front)")
    if not front:
        return fig
    cells = ('<th class="num">rank</th><th>trial</th>'
             + "".join(f'<th class="num">{esc(m)} ({esc(d)})</th>' for m, d in objectives)
             + "".join(f"<th>{_breakable(k)}</th>" for k in data.spec.space_keys) + "<th>config</th>")
    body = []
    for r in front:
        star = " ★" if best is not None and r is best else ""
        row = [f'<td class="num">{esc(r.rank)}</td>', f"<td><code>{esc(r.trial_id)}</code>{star}</td>"]
        row += [f'<td class="num">{esc(fmt(r.metrics.get(m)))}</td>' for m, _ in objectives]
        row += _sampled(r, data.spec.space_keys)
        cfg = data.export_dir / "pareto" / f"{r.trial_id}.yaml"
        row.append(f'<td><a href="{esc(_rel(cfg, data.out_dir))}">{esc(cfg.name)}</a></td>' if cfg.is_file()
                   else '<td class="sub">run richkd export</td>')
        body.append(f'<tr class="{"best" if star else "completed"}">{"".join(row)}</tr>')
    n_done = sum(1 for r in data.rows if r.outcome == "completed")
    note = (f"{len(front)} of {n_done} trials that reached max_t are non-dominated: no other such trial is at least "
            "as good in every objective and better in one. ASHA-stopped trials are excluded (fewer epochs; Optuna was "
            "told PRUNED). ★ = best by the first objective (best_config.yaml).")
    return (f"{fig}<div class=\"scroll\"><table><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody>"
            f'</table></div><p class="meta">{esc(note)}</p>')


def importances_html(importances, image: Optional[str], metric: str) -> str:
    if not importances.values:
        return (f"<p>No parameter importances for this sweep.</p>{_notes(importances.notes)}")
    rows = "".join(f'<tr><td>{esc(k)}</td><td class="num">{esc(f"{v:.3f}")}</td></tr>'
                   for k, v in importances.values.items())
    scored = (f"{importances.evaluator} (Optuna) on {importances.n_trials} trials scored by their {metric} at epoch "
              f"{importances.epoch}, the last epoch that enough trials reached (so ASHA-stopped trials compare like "
              "with like).")
    fig = _figure(image, "parameter importances", "", "")
    return (f'<div class="two"><div>{fig}</div><div><table><thead><tr><th>parameter</th>'
            f'<th class="num">importance</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<p class="meta">{esc(scored)}</p>{_notes(importances.notes)}</div></div>')


def early_stopping_note(data) -> str:
    """How many ASHA-stopped trials were ahead of the final winner where they were stopped."""
    stopped = sum(1 for r in data.rows if r.outcome == "stopped_early")
    ahead = data.stopped_ahead_of_winner()
    text = (f"Early stopping: {len(ahead)} of {stopped} stopped trial(s) were ahead of the final winner at the epoch "
            "where ASHA stopped them")
    if ahead:
        text += " (" + ", ".join(f"{t} at epoch {e}: {fmt(v)} vs {fmt(w)}" for t, e, v, w in ahead[:5]) + \
                (", ..." if len(ahead) > 5 else "") + "): a larger grace_period or a smaller reduction_factor would " \
                "have kept them longer"
    return text + "."


def render_page(data, importances, images: dict, mlflow_note: str) -> str:
    """The whole index.html. `images` maps curves / budget / params / importances / pareto to file names beside
    the page."""
    spec = data.spec
    title = f"Sweep report: {spec.name}"
    desc = spec.description or ""
    stopped_note = ("Coloured lines reached max_t (the selected best is thicker, with a star); grey dashed lines "
                    "were stopped early by ASHA at a rung (x marks their last epoch); red dotted lines failed. "
                    "Dotted vertical lines are ASHA rungs.")
    no_curve = [f"{r.trial_id} ({OUTCOME_LABELS.get(r.outcome, r.outcome)})" for r in data.rows
                if not curve(r, data.metric)]
    curve_notes = [f"no finite {data.metric} to draw for trial(s) {', '.join(no_curve)}"] if no_curve else []
    version = f"richkd {__version__}"
    if data.record.git_commit:
        version += f" (sweep ran at {data.record.git_commit})"
    sections = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(desc)}</p>' if desc else "",
        header_html(data, mlflow_note),
        '<section class="card"><h2>Learning curves</h2>'
        + _figure(images.get("curves"), "learning curves of all trials", stopped_note,
                  f"no trial has a finite {data.metric} yet")
        + _notes(curve_notes) + "</section>",
        '<section class="card"><h2>Search progress</h2>'
        + _figure(images.get("budget"), "best value so far against trial-epochs spent",
                  "Each step is a trial that reached max_t with a new best last value; the x axis counts every "
                  "epoch any trial trained, in the order they were reported.", "no trial reached max_t yet")
        + _notes([early_stopping_note(data)] if data.spec.tune.scheduler.type == "asha" else []) + "</section>",
        ('<section class="card"><h2>Pareto front (' + esc(", ".join(m for m, _ in data.objectives)) + ")</h2>"
         + pareto_html(data, images.get("pareto")) + "</section>") if data.multi_objective else "",
        '<section class="card"><h2>Searched values vs metric</h2>'
        + _figure(images.get("params"), "searched hyperparameters vs final metric",
                  f"Optuna's slice plot: each point is a trial, x = its sampled value, y = its last {data.metric}, "
                  "colour = trial number. Stopped trials' values come from fewer epochs; a conditional entry shows "
                  "the trials where it was active.",
                  "no searched parameters or no finite values to plot")
        + "</section>",
        '<section class="card"><h2>Parameter importances</h2>'
        + importances_html(importances, images.get("importances"), data.metric) + "</section>",
        f'<section class="card"><h2>Leaderboard ({len(data.rows)} trials)</h2>{leaderboard_html(data)}</section>',
    ]
    sections.append(f"<footer>Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by {esc(version)}; "
                    f"static page, no server needed.</footer>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            + "".join(sections) + "</main></body></html>\n")
