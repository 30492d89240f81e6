"""Fair comparisons (richkd.tune.arms): arms expand to sweeps with equal budgets; differences get bootstrap
intervals; a comparison needs at least two seeds."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from richkd.tune.arms import bootstrap_difference, compare, group_for, read_group, write_group
from richkd.tune.finalize import FinalistResult, FinalizeResult
from richkd.tune.spec import load_spec, load_specs

from tests.factories import ENV, base_spec, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def _arms_file(assets, tmp_path, **arm_extra):
    raw = base_spec(assets, tmp_path)
    del raw["space"]
    raw["name"] = "cmp"
    raw["arms"] = {
        "richkd": {"space": {"loss.fusion_alpha": {"sampler": "uniform", "low": 0.3, "high": 1.0}},
                   "points_to_evaluate": [{"loss.fusion_alpha": 0.7}]},
        "kd": {"config": {"loss": {"method": "kd"}, **arm_extra},
               "space": {"loss.temperature": {"sampler": "choice", "values": [2.0, 4.0]},
                         "optim.lr": {"sampler": "loguniform", "low": 0.01, "high": 0.1}}},
    }
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_arms_are_sweeps_with_equal_budgets_and_their_own_spaces(assets, tmp_path):
    specs = load_specs(_arms_file(assets, tmp_path), ["tune.num_samples=6"], check_resources=False, check_data=False)
    assert list(specs) == ["richkd", "kd"]
    assert [s.name for s in specs.values()] == ["cmp.richkd", "cmp.kd"]
    budgets = {(s.tune.num_samples, s.max_t, s.tune.search.seed, s.tune.search.algorithm, s.tune.scheduler,
                s.tune.resources, s.base_config.seed) for s in specs.values()}
    assert len(budgets) == 1 and next(iter(budgets))[0] == 6          # the --set reached every arm
    assert specs["kd"].base_config.loss.method == "kd" and specs["richkd"].base_config.loss.method == "richkd"
    assert specs["kd"].space_keys == ["loss.temperature", "optim.lr"] and specs["richkd"].points
    group = group_for(specs)
    write_group(group, specs)
    again, stored = read_group("cmp", specs["kd"].tune.storage_path)
    assert again.sweeps == {"richkd": "cmp.richkd", "kd": "cmp.kd"} and stored["kd"].to_dict() == specs["kd"].to_dict()
    with pytest.raises(ValueError, match="compares 2 arms"):
        load_spec(_arms_file(assets, tmp_path), check_resources=False, check_data=False)


def test_an_arm_cannot_buy_itself_a_longer_schedule_or_another_metric(assets, tmp_path):
    with pytest.raises(ValueError, match="arms.kd.config.train.epochs: every arm trains with the same"):
        load_specs(_arms_file(assets, tmp_path, train={"epochs": 9}), check_resources=False, check_data=False)
    raw = yaml.safe_load(_arms_file(assets, tmp_path).read_text())
    raw["arms"]["kd"]["tune"] = {"metric": "val_loss"}      # the tune: section (metric, budget) is shared
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="unknown spec key 'arms.kd.tune'"):
        load_specs(tmp_path / "bad.yaml", check_resources=False, check_data=False)


def test_bootstrap_interval_covers_the_difference_and_is_seeded():
    diff, lo, hi = bootstrap_difference([80.0, 81.0, 82.0], [70.0, 71.0, 72.0])
    assert diff == pytest.approx(10.0) and 8.0 <= lo < diff < hi <= 12.0
    assert bootstrap_difference([1.0, 2.0], [1.5, 1.6]) == bootstrap_difference([1.0, 2.0], [1.5, 1.6])
    # a noisy pair whose means differ by less than the noise: the interval includes 0
    rng = np.random.default_rng(1)
    a, b = list(75 + rng.normal(0, 2, 3)), list(75.5 + rng.normal(0, 2, 3))
    _, lo, hi = bootstrap_difference(a, b)
    assert lo < 0 < hi


def test_a_comparison_lists_every_pair_with_its_interval():
    def result(values):
        fin = FinalistResult(rank=1, trial_id="t", sampled={}, seeds=[0, 1, 2], test_top1=values, val_top1=values)
        return FinalizeResult(finalists=[fin], csv_path=None)

    c = compare("cmp", {"a": ("cmp.a", result([80.0, 81.0, 82.0])), "b": ("cmp.b", result([70.0, 71.0, 72.0])),
                        "c": ("cmp.c", result([80.5, 79.0, 82.5]))})
    assert [(d["a"], d["b"]) for d in c.differences] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = c.differences[0]
    assert ab["excludes_zero"] and ab["diff"] == pytest.approx(10.0)
    assert not c.differences[1]["excludes_zero"]
    assert c.arms["a"]["mean"] == pytest.approx(81.0) and c.arms["a"]["std"] == pytest.approx(1.0)


def test_finalize_of_arms_with_one_seed_is_refused(assets, tmp_path):
    specs = load_specs(_arms_file(assets, tmp_path), check_resources=False, check_data=False)
    write_group(group_for(specs), specs)
    p = subprocess.run([sys.executable, "-m", "richkd", "finalize", "cmp", "--seeds", "1", "--storage",
                        specs["kd"].tune.storage_path], capture_output=True, text=True, env={**os.environ, **ENV},
                       timeout=120)
    assert p.returncode == 2 and "needs --seeds >= 2" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_the_group_page_shows_the_comparison_and_links_each_arm(assets, tmp_path):
    import json

    from richkd.tune.arms import COMPARISON_FILE, write_group_page

    specs = load_specs(_arms_file(assets, tmp_path), check_resources=False, check_data=False)
    group = group_for(specs)
    reports = {arm: f"{group.storage}/{s}/report/index.html" for arm, s in group.sweeps.items()}
    assert "richkd finalize cmp" in open(write_group_page(group, reports)).read()     # not compared yet
    def result(values):
        fin = FinalistResult(rank=1, trial_id="t", sampled={}, seeds=[0, 1, 2], test_top1=values, val_top1=values)
        return FinalizeResult(finalists=[fin], csv_path=None)

    c = compare("cmp", {"richkd": ("cmp.richkd", result([80.0, 81.0, 82.0])), "kd": ("cmp.kd", result([70.0, 71, 72]))})
    (tmp_path / "runs" / "cmp" / COMPARISON_FILE).write_text(json.dumps(c.to_dict()))
    page = open(write_group_page(group, reports)).read()
    assert "81.00 ± 1.00" in page and "richkd - kd" in page and "excludes 0" in page
    assert 'href="../../cmp.kd/report/index.html"' in page
