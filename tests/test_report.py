"""`richkd report`: the static sweep page and its PNGs, built from a real (tiny) sweep, plus the pieces it rests on.

The sweep is the end-to-end smoke sweep of tests/tune/test_e2e.py (3 trials: one reaches max_t, one is stopped by ASHA,
one ends on a NaN loss), run once per session and shared with tests/tune/test_e2e.py / test_export.py.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.factories import ensure_smoke_sweep, trial_results

REPO = Path(__file__).resolve().parents[1]


def run_report(argv: list[str]) -> int:
    from richkd.cli import main

    return main(["report", *argv])


# ----- pure pieces (fast) ------------------------------------------------------------------------------------

def test_importances_put_the_driving_parameter_first_and_note_conditional_ones():
    """value = a (+ a little noise): a must dominate; the conditional d (set in about half the trials) gets a note."""
    import random

    from richkd.report.importance import param_importances
    from richkd.tune.params import Condition, Param

    params = [Param("a", "uniform", 0.0, 1.0), Param("b", "loguniform", 1e-4, 1.0),
              Param("c", "choice", values=(0.0, 0.5)),
              Param("d", "uniform", 0.0, 1.0, when=(Condition("c", "gt", 0),)),
              Param("e", "randint", 1, 5)]
    rng = random.Random(0)
    samples = []
    for _ in range(12):
        s = {"a": rng.random(), "b": 10 ** rng.uniform(-4, 0), "c": rng.choice([0.0, 0.5]), "e": rng.randint(1, 5)}
        if s["c"] > 0:
            s["d"] = rng.random()
        samples.append((s, s["a"] + 0.01 * rng.random()))
    imp = param_importances(params, samples, "min")
    assert imp.n_trials == 12 and imp.evaluator
    assert list(imp.values)[0] == "a" and imp.values["a"] > 0.5
    assert set(imp.values) == {"a", "b", "c", "e"}
    assert math.isclose(sum(imp.values.values()), 1.0, rel_tol=1e-6)
    assert any(n.startswith("d: conditional") for n in imp.notes)
    # the same data maximised: the importance of a does not depend on the direction's sign
    assert list(param_importances(params, samples, "max").values)[0] == "a"


def test_importances_degrade_to_notes():
    from richkd.report.importance import param_importances
    from richkd.tune.params import Param

    params = [Param("a", "uniform", 0.0, 1.0)]
    few = param_importances(params, [({"a": 0.1}, 1.0), ({"a": 0.2}, 2.0), ({"a": 0.3}, float("nan"))], "max")
    assert not few.values and "too few trials" in few.notes[0]
    flat = param_importances(params, [({"a": x / 10}, 5.0) for x in range(6)], "max")
    assert not flat.values and "same value" in flat.notes[0]
    outside = param_importances(params, [({"a": 2.0 + x}, float(x)) for x in range(6)], "max")
    assert not outside.values and any("outside the spec" in n for n in outside.notes)


def test_curve_reads_a_trials_reports_and_keeps_the_last_report_of_a_rerun_epoch():
    from richkd.report.data import curve

    row = SimpleNamespace(history=[{"training_iteration": 1.0, "val_top1": 10.0},
                                   {"training_iteration": 2.0, "val_top1": 12.0},
                                   {"training_iteration": 2.0, "val_top1": 14.0},   # re-run after a restore: last wins
                                   {"training_iteration": 3.0, "val_top1": float("nan"), "nonfinite_loss": 1.0},
                                   {"val_top1": 99.0}])                             # no epoch: not a curve point
    assert curve(row, "val_top1") == [(1, 10.0), (2, 14.0)]
    assert curve(row, "val_loss") == [] and curve(SimpleNamespace(history=[]), "val_top1") == []


def _row(trial_id, outcome, values, t0, rank):
    """A trial row as richkd.tune.results reads it: its reports (history), last value and epochs."""
    history = [{"training_iteration": float(e), "val_loss": v, "timestamp": float(t0 + e)}
               for e, v in enumerate(values, start=1)]
    last = values[-1] if math.isfinite(values[-1]) else None
    return SimpleNamespace(trial_id=trial_id, outcome=outcome, epochs=len(values), value=last, history=history,
                           metrics={"val_loss": values[-1]}, rank=rank, sampled={})


def _data(rows):
    from richkd.report.data import ReportData

    tune = SimpleNamespace(metric="val_loss", mode="min", objective_pairs=(("val_loss", "min"),),
                           scheduler=SimpleNamespace(type="asha"))
    return ReportData(spec=SimpleNamespace(tune=tune, max_t=3), experiment_path="", record=None, rows=rows,
                      out_dir=Path("."), export_dir=Path("."))


def test_search_progress_and_stopped_trials_ahead_of_the_winner():
    """Rows in rank order: A wins; B reached max_t first; C was ahead of A where ASHA stopped it, D was not."""
    from richkd.report.page import early_stopping_note

    data = _data([_row("A", "completed", [3.0, 2.0, 1.0], 10, 1), _row("B", "completed", [2.5, 2.4, 2.3], 0, 2),
                  _row("C", "stopped_early", [2.0], 20, 3), _row("D", "stopped_early", [3.5], 30, 4),
                  _row("E", "nonfinite_loss", [float("nan")], 40, 5)])
    assert data.best.trial_id == "A" and data.total_epochs == 9
    # B's three reports come first (the 3rd epoch spent sets the best), then A's (the 6th beats it)
    assert data.best_so_far() == [(3, 2.3, "B"), (6, 1.0, "A")]
    assert data.stopped_ahead_of_winner() == [("C", 1, 2.0, 3.0)]
    note = early_stopping_note(data)
    assert note.startswith("Early stopping: 1 of 2 stopped trial(s) were ahead") and "C at epoch 1: 2 vs 3" in note
    # reports of several trials in the same second (Ray's timestamps are whole seconds) are ordered by rank
    tied = _data([_row("A", "completed", [3.0, 2.0, 1.0], 0, 1), _row("B", "completed", [2.5, 2.4, 2.3], 0, 2)])
    assert tied.best_so_far() == [(5, 1.0, "A")]


def test_optuna_draws_the_importances_and_the_pareto_front_of_the_report_study(tmp_path):
    from richkd.report import figures
    from richkd.report.importance import param_importances
    from richkd.tune.params import Param

    params = [Param("a", "uniform", 0.0, 1.0), Param("g", "grid", values=("x", "y"))]   # grid: categorical here
    samples = [({"a": a / 8, "g": "xy"[a % 2]}, a / 8) for a in range(8)]
    imp = param_importances(params, samples, "max")
    assert list(imp.values) == ["a", "g"] and imp.study is not None and len(imp.study.trials) == 8
    png = figures.importance_bars(imp, tmp_path / "importances.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [SimpleNamespace(trial_id=f"t{i}", outcome="completed" if i < 5 else "stopped_early",
                            metrics={"x": i % 3, "y": 5 - i, "z": i * 0.1, "w": 1.0}) for i in range(7)]

    def front(objectives):
        tune = SimpleNamespace(metric="x", mode="max", objective_pairs=tuple(objectives))
        data = _data(rows)
        data.spec = SimpleNamespace(tune=tune, params=[], max_t=3)
        return figures.pareto_front(data, tmp_path / "pareto.png")

    assert front([("x", "max"), ("y", "min")]).stat().st_size > 10_000
    assert front([("x", "max"), ("y", "min"), ("z", "max")]).stat().st_size > 10_000   # Optuna draws 3-D
    assert front([("x", "max"), ("y", "min"), ("z", "max"), ("w", "min")]) is None     # the page's table only
    rows[:5] = []                                                                      # nobody reached max_t
    assert front([("x", "max"), ("y", "min")]) is None


def test_importing_the_report_package_is_light():
    code = ("import sys, richkd.report, richkd.cli.report; "
            "bad = [m for m in ('ray', 'mlflow', 'matplotlib', 'optuna', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_missing_sweep_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_report(["no_such_sweep", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("richkd report: error:") and "no_such_sweep" in err[0]


def test_out_that_is_a_file_is_a_user_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert run_report(["any_sweep", "--storage", str(tmp_path), "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err


# ----- a real sweep ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    return ensure_smoke_sweep(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def report(smoke) -> dict:
    """`richkd report NAME --storage ...` through the command handler, as a user runs it."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = run_report([smoke["name"], "--storage", smoke["storage"]])
    assert rc == 0, out.getvalue()
    folder = Path(smoke["experiment_path"]) / "report"
    return {"dir": folder, "index": folder / "index.html", "html": (folder / "index.html").read_text(),
            "stdout": out.getvalue()}


@pytest.mark.slow
def test_page_has_every_trial_in_the_leaderboard_and_highlights_the_exported_best(smoke, report):
    from richkd.tune.export import best_trial, load_sweep

    spec, _, _, rows = load_sweep(smoke["name"], smoke["storage"])
    best = best_trial(rows, spec)
    page = report["html"]
    assert str(report["index"]) in report["stdout"]
    body = page.split("<tbody>")[-1]
    table_rows = re.findall(r'<tr class="([^"]+)">(.*?)</tr>', body)
    assert len(table_rows) == smoke["num_trials"] == len(rows)
    for (cls, cells), row in zip(table_rows, rows):           # same order as the export ranking
        assert row.trial_id in cells
        assert (cls == "best") == (row.trial_id == best.trial_id)
    # header: counts from the trial folders themselves, not from the code under test
    results = trial_results(smoke["experiment_path"])
    total_epochs = sum(len(r) for r in results.values())
    counts = smoke["counts"]
    for label, value in (("trials", len(results)), ("stopped early", counts["stopped_early"]),
                         ("errored", counts.get("error", 0) + counts.get("nonfinite_loss", 0)),
                         ("total epochs", total_epochs)):
        assert re.search(rf'<div class="k">{label}</div><div class="v">{value}</div>', page), label
    assert f"<title>Sweep report: {smoke['name']}</title>" in page
    assert f"trial <code>{best.trial_id}</code>" in page
    for key, value in best.sampled.items():                   # the best config's searched values
        assert key in page
    assert "val_loss" in page and "(min)" in page


@pytest.mark.slow
def test_images_are_referenced_relatively_and_exist(report):
    sources = re.findall(r'<img src="([^"]+)"', report["html"])
    assert {"curves.png", "budget.png", "params.png"} <= set(sources)
    for src in sources:
        assert "/" not in src                                 # beside index.html: the folder can be moved
        png = report["dir"] / src
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, src


@pytest.mark.slow
def test_importances_or_the_reason_they_are_missing(smoke, report):
    """The smoke sweep has 3 trials, fewer than the 4 importances need (richkd.report.importance.MIN_TRIALS): the
    page says so with the counts read from the trial folders, and draws no importance figure."""
    import html

    from richkd.report.importance import MIN_TRIALS

    results = trial_results(smoke["experiment_path"])
    assert len(results) == 3 < MIN_TRIALS
    metric = smoke["raw"]["tune"]["metric"]
    finite = [rows for rows in results.values() if any(math.isfinite(r.get(metric, math.nan)) for r in rows)]
    longest = max(len(rows) for rows in results.values())
    section = report["html"].split("<h2>Parameter importances</h2>")[1].split("</section>")[0]
    assert html.unescape(section).count(
        f"too few trials for parameter importances: no epoch was reached by {MIN_TRIALS} trials with a finite "
        f"{metric} ({len(finite)} trial(s) have any finite value, the longest ran {longest} epoch(s))") == 1, section
    assert "importances.png" not in section and "<th class=\"num\">importance</th>" not in section
    assert not (report["dir"] / "importances.png").exists()


@pytest.mark.slow
def test_stopped_and_failed_trials_end_early_in_the_curves(smoke, report):
    import html

    from richkd.report.data import curve, load_report_data

    data = load_report_data(smoke["name"], smoke["storage"])
    by_outcome = {r.outcome: r for r in data.rows}
    assert [e for e, _ in curve(by_outcome["completed"], "val_loss")] == list(range(1, data.spec.max_t + 1))
    assert len(curve(by_outcome["stopped_early"], "val_loss")) < data.spec.max_t
    assert curve(by_outcome["nonfinite_loss"], "val_loss") == []     # its only val_loss is NaN
    nan_id = by_outcome["nonfinite_loss"].trial_id
    assert f"no finite val_loss to draw for trial(s) {nan_id} (non-finite loss)" in html.unescape(report["html"])
    assert "non-finite loss: training loss became nan" in html.unescape(report["html"])   # the stop reason, in full


@pytest.mark.slow
def test_search_progress_and_early_stopping_note_from_the_trial_folders(smoke, report):
    """The budget figure and the early-stopping note of the smoke sweep, checked against the trials' own
    result.json files: one trial reached max_t (the only step of the progress curve), one was stopped at epoch 1."""
    import html

    results = trial_results(smoke["experiment_path"])
    max_t = smoke["raw"]["config"]["train"]["epochs"]
    (winner,) = [reps for reps in results.values() if len(reps) == max_t]
    (stopped,) = [reps for reps in results.values() if len(reps) < max_t and math.isfinite(reps[-1]["val_loss"])]
    page = html.unescape(report["html"])
    assert '<img src="budget.png"' in page and (report["dir"] / "budget.png").stat().st_size > 10_000
    ahead = int(stopped[-1]["val_loss"] < winner[len(stopped) - 1]["val_loss"])      # val_loss: lower is better
    assert f"Early stopping: {ahead} of 1 stopped trial(s) were ahead of the final winner" in page

    from richkd.report.data import load_report_data

    ((spent, value, _),) = load_report_data(smoke["name"], smoke["storage"]).best_so_far()
    finished = winner[-1]["timestamp"]
    timestamps = [rep["timestamp"] for reps in results.values() for rep in reps]
    assert value == winner[-1]["val_loss"]
    assert sum(t < finished for t in timestamps) < spent <= sum(t <= finished for t in timestamps)


@pytest.mark.slow
def test_report_is_logged_on_the_parent_run(smoke, report):
    from richkd.tracking import client_for

    client = client_for(smoke["tracking_uri"])
    names = {Path(a.path).name for a in client.list_artifacts(smoke["parent_run_id"], "report")}
    assert {"index.html", "curves.png", "params.png"} <= names
    assert f"parent run {smoke['parent_run_id']}" in report["html"]


@pytest.mark.slow
def test_moved_sweep_without_mlflow_still_reports(smoke, tmp_path):
    """A copied sweep folder whose meta has no parent run: the page says so, nothing is logged, no crash."""
    from richkd.report import build_report

    copy = tmp_path / "moved"
    shutil.copytree(smoke["experiment_path"], copy, ignore=shutil.ignore_patterns("report", "checkpoint_*"))
    meta_file = copy / "richkd_sweep.json"
    meta = json.loads(meta_file.read_text())
    meta.update(tracking_uri=None, parent_run_id=None, experiment_id=None)
    meta_file.write_text(json.dumps(meta))
    result = build_report(str(copy), out_dir=str(tmp_path / "out"))
    assert result.mlflow_run_id is None and result.index == tmp_path / "out" / "index.html"
    page = result.index.read_text()
    assert "ran without MLflow" in page and page.count('<tr class="') == smoke["num_trials"]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_page_renders_in_a_headless_browser(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI installs it for this test")
    from PIL import Image

    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,2000",
                    report["index"].as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    assert shot.stat().st_size > 20_000
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 200           # text, figures and tables, not a blank page
    # the survivor's colour (first of figures.SURVIVOR_COLORS) is on screen: the curves PNG loaded
    assert any(abs(r - 0x1F) < 12 and abs(g - 0x77) < 12 and abs(b - 0xB4) < 12 and n > 50
               for n, (r, g, b) in colors)
