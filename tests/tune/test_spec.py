"""Sweep spec loading and validation: every user error is one SpecError raised before Ray starts, writing nothing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from richkd.config import Config
from richkd.tune.errors import SpecError
from richkd.tune.params import TrialPlan
from richkd.tune.paths import is_shared_filesystem
from richkd.tune.spec import SweepSpec, expand_env, load_spec, load_specs, spec_from_mapping

from tests.factories import base_spec, make_assets


# ----- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def load(raw: dict, **kw):
    return spec_from_mapping(raw, **kw)


def error_of(raw: dict, **kw) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_mapping(raw, **kw)
    return str(info.value)


# ----- valid specs --------------------------------------------------------------------------------------------

def test_valid_spec_resolves_defaults_and_absolute_paths(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = base_spec(assets, tmp_path)
    raw["config"]["teaching"]["cache_dir"] = "rel/cache"
    raw["tune"] = {"num_samples": 2}
    raw.pop("mlflow")
    spec = load(raw)
    assert spec.base_config.teaching.cache_dir == str(tmp_path / "rel" / "cache")
    assert spec.tune.storage_path == str(tmp_path / "tune_runs")
    assert spec.mlflow.tracking_uri == f"sqlite:///{tmp_path}/tune_runs/mlflow.db"
    assert spec.mlflow.artifact_location == (tmp_path / "tune_runs" / "mlartifacts").as_uri()
    assert (spec.tune.metric, spec.tune.mode, spec.max_t) == ("val_top1", "max", 3)
    assert spec.tune.resolved_reuse_actors is True             # CPU trials keep their warm worker process
    assert spec.base_config.name == "unit"   # the sweep name names the trials' configs
    assert list(tmp_path.iterdir()) == []    # validation writes nothing
    raw["config"]["train"]["checkpoint_dir"] = "ckpts"          # would be shared by every trial: dropped
    assert load(raw).base_config.train.checkpoint_dir is None


@pytest.mark.parametrize("epochs, scheduler, grace", [(3, {}, 1), (12, {}, 3), (60, {}, 15), (12, {"grace_period": 2}, 2)])
def test_asha_grace_period_defaults_to_a_quarter_of_the_epochs(assets, tmp_path, epochs, scheduler, grace):
    """docs/search.md: on the shipped table a grace period of one epoch stopped trials on noise."""
    raw = base_spec(assets, tmp_path)
    raw["config"]["train"]["epochs"] = epochs
    raw["tune"]["scheduler"] = {"type": "asha", **scheduler}
    spec = load(raw)
    assert spec.tune.scheduler.grace_period == grace
    assert SweepSpec.from_dict(spec.to_dict()).tune.scheduler.grace_period == grace     # stored resolved


def test_a_saved_spec_reads_back_as_the_same_typed_spec(assets, tmp_path, monkeypatch):
    """What the sweep folder stores (to_dict) is a spec the loader reads back unchanged, from any directory
    and environment: conditions, variants, points, objectives and resolved paths included."""
    raw = base_spec(assets, tmp_path)
    raw["space"]["variant"] = {"sampler": "choice", "values": {"L": {"loss.logit_weight": 1.0},
                                                             "LF": {"loss.logit_weight": 1.0, "loss.feat_weight": 0.5}}}
    raw["space"]["loss.feat_lambda"] = {"sampler": "uniform", "low": 0.0, "high": 1.0, "when": {"variant": "LF"}}
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.5, "variant": "L"}]
    raw["tune"].update(metric=["val_top1", "val_loss"], search="optuna", scheduler="fifo")
    spec = load(raw)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")        # must not leak into a saved spec
    saved = json.loads(json.dumps(spec.to_dict()))
    again = SweepSpec.from_dict(saved, source=spec.source)
    assert again == spec
    assert again.tune.objective_pairs == (("val_top1", "max"), ("val_loss", "min"))
    assert again.params[-1].when[0].describe() == "variant eq 'LF'"
    plan = again.plan()     # a `when:` on a variant entry tests the variant's name
    assert "loss.feat_lambda" in plan.active_sampled({"variant": "LF", "loss.feat_lambda": 0.3})
    assert "loss.feat_lambda" not in plan.active_sampled({"variant": "L", "loss.feat_lambda": 0.3})


REPO = Path(__file__).resolve().parents[2]


def fake_demo_dir(root: Path) -> Path:
    """The configs `richkd demo --quick` writes (the Fashion-MNIST specs build on them), without training."""
    from richkd.demo import demo_configs
    from richkd.io import atomic_write_text

    for name, cfg in demo_configs(root, quick=True).items():
        atomic_write_text(root / "configs" / f"{name}.yaml", cfg.to_yaml())
    return root


def test_shipped_specs_parse(tmp_path, monkeypatch):
    """Every spec in search_spaces/ is well-formed (files they point at are checked only at run time)."""
    specs = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert {p.stem for p in specs} >= {"smoke", "fmnist_demo", "cifar100_resnet32x4_resnet8x4", "ablation_lf"}
    monkeypatch.setenv("RICHKD_DEMO_DIR", str(fake_demo_dir(tmp_path / "demo")))
    monkeypatch.chdir(REPO)                     # relative paths in the specs are relative to the repository root
    for path in specs:
        for spec in load_specs(path, check_resources=False, check_data=False).values():   # arms: one per arm
            assert spec.params and spec.tune.num_samples >= 1, path
            if spec.base_config.data.dataset == "fashion_mnist":
                assert spec.base_config.teacher.checkpoint == str(tmp_path / "demo" / "teacher" / "student.pt")


def test_cifar_space_seeds_paper_defaults_and_alpha1_control(monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / "search_spaces" / "cifar100_resnet32x4_resnet8x4.yaml"
    spec = load_spec(path, check_resources=False, check_data=False)
    first, second = spec.points[0], spec.points[1]
    paper = spec.trial_config(first)
    assert (paper.loss.fusion_alpha, paper.loss.temperature, paper.loss.logit_weight, paper.loss.feat_weight,
            paper.clip.prompt_set) == (0.7, 3.0, 3.0, 0.8, "richkd12")
    assert spec.trial_config(second).loss.fusion_alpha == 1.0
    assert not spec.trial_config(second).uses_clip        # alpha = 1 and lambda = 1: the teacher alone
    assert spec.tune.search.algorithm == "optuna" and spec.tune.scheduler.type == "asha"


def test_dkd_space_crosses_the_loss_form_with_alpha_at_mdistillers_settings(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec(REPO / "search_spaces" / "richkd_dkd.yaml", check_resources=False, check_data=False)
    assert spec.space_keys == ["kd_form", "loss.fusion_alpha", "seed"] and spec.tune.search.algorithm == "grid"
    dkd = spec.trial_config({"kd_form": "DKD", "loss.fusion_alpha": 0.7, "seed": 0}).loss
    assert (dkd.kd_form, dkd.dkd_alpha, dkd.dkd_beta, dkd.temperature, dkd.dkd_warmup_epochs, dkd.logit_weight) == (
        "dkd", 1.0, 8.0, 4.0, 20, 1.0)
    kl = spec.trial_config({"kd_form": "KL", "loss.fusion_alpha": 1.0, "seed": 0})
    assert (kl.loss.kd_form, kl.loss.temperature, kl.loss.logit_weight, kl.uses_clip) == ("kl", 3.0, 3.0, False)
    assert spec.finalize.overrides == {"teaching.mode": "official"}


# ----- errors -------------------------------------------------------------------------------------------------

def test_unknown_space_key_suggests_the_nearest(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["loss.temprature"] = raw["space"].pop("loss.temperature")
    msg = error_of(raw)
    assert "loss.temprature" in msg and "did you mean 'loss.temperature'" in msg


@pytest.mark.parametrize("section, key, suggestion", [
    ("tune", "metrc", "tune.metric"), ("mlflow", "trackinguri", "mlflow.tracking_uri"), (None, "spce", "space")])
def test_unknown_spec_key_suggests_the_nearest(assets, tmp_path, section, key, suggestion):
    raw = base_spec(assets, tmp_path)
    (raw[section] if section else raw)[key] = 1
    assert f"did you mean {suggestion!r}" in error_of(raw)


@pytest.mark.parametrize("entry, needle", [
    ({"sampler": "uniform", "low": 0.9, "high": 0.3}, "low (0.9) must be < high (0.3)"),
    ({"sampler": "loguniform", "low": 0.0, "high": 1.0}, "loguniform needs low > 0"),
    ({"sampler": "quniform", "low": 0.0, "high": 1.0, "q": 0.3}, "must be a whole number"),
    ({"sampler": "uniform", "low": 0.3, "high": 1.5}, "1.5 is not a valid value"),
    ({"sampler": "randint", "low": 1, "high": 2.5}, "expected an integer"),
    ({"sampler": "choice", "values": []}, "non-empty list"),
    ({"sampler": "choice", "values": [0.5, 0.5]}, "duplicates"),
    ({"sampler": "uniform", "low": 0.3}, "needs high"),
    ({"sampler": "gaussian", "low": 0, "high": 1}, "is not one of"),
])
def test_bad_ranges_are_rejected(assets, tmp_path, entry, needle):
    raw = base_spec(assets, tmp_path)
    raw["space"]["loss.fusion_alpha"] = entry
    assert needle in error_of(raw)


def test_wrong_value_type_names_the_key(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["loss.temperature"] = {"sampler": "choice", "values": [2.0, "hot"]}
    msg = error_of(raw)
    assert "space.loss.temperature" in msg and "'hot'" in msg


def test_unknown_prompt_set_is_rejected(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["clip.prompt_set"] = {"sampler": "choice", "values": ["simple", "richkd13"]}
    msg = error_of(raw)
    assert "richkd13" in msg and "richkd12" in msg   # the close match is offered


def test_unknown_student_model_is_rejected(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["student.arch"] = {"sampler": "choice", "values": ["resnet8", "resnet9"]}
    msg = error_of(raw)
    assert "resnet9" in msg and "resnet8" in msg


def test_unknown_clip_model_is_rejected(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["config"]["clip"]["model"] = "ViT-B-33"
    msg = error_of(raw)
    assert "ViT-B-33" in msg and "ViT-B-32" in msg


@pytest.mark.parametrize("path, value, needle", [
    (("teacher", "checkpoint"), "missing.pth", "teacher.checkpoint"),
    (("clip", "pretrained"), "missing_clip.pt", "clip.pretrained"),
    (("data", "root"), "no_such_data", "data"),
])
def test_missing_files_are_rejected(assets, tmp_path, path, value, needle):
    raw = base_spec(assets, tmp_path)
    raw["config"][path[0]][path[1]] = str(tmp_path / value)
    msg = error_of(raw)
    assert needle in msg and value in msg


def test_missing_file_in_a_choice_is_rejected(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["teacher.checkpoint"] = {"sampler": "choice",
                                          "values": [str(assets / "teacher.pth"), str(tmp_path / "other.pth")]}
    assert "other.pth" in error_of(raw)


@pytest.mark.parametrize("key, entry", [
    ("clip.batch_size", {"sampler": "randint", "low": 32, "high": 64}),
    ("data.batch_size", {"sampler": "quniform", "low": 32, "high": 64, "q": 32}),
    ("data.val_fraction", {"sampler": "uniform", "low": 0.1, "high": 0.2}),
])
def test_continuous_sampler_on_a_cache_key_is_rejected(assets, tmp_path, key, entry):
    raw = base_spec(assets, tmp_path)
    raw["space"][key] = entry
    msg = error_of(raw)
    assert key in msg and "cache" in msg and "choice" in msg


def test_choice_on_a_cache_key_is_fine_and_every_combination_is_probed(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["clip.prompt_set"] = {"sampler": "choice", "values": ["simple", "single"]}
    raw["space"]["data.batch_size"] = {"sampler": "choice", "values": [32, 64]}
    spec = load(raw)
    probes = spec.cache_probe_configs
    combos = {(c.clip.prompt_set, c.data.batch_size) for c in probes if c.uses_clip}
    assert combos == {("simple", 32), ("simple", 64), ("single", 32), ("single", 64)}
    # computed once per spec: the loader's checks, the cache build and the node checks all read these
    assert spec.cache_probe_configs is probes


@pytest.mark.parametrize("where", ["config", "choice", "variant"])
def test_zero_validation_fraction_is_refused_in_a_sweep(assets, tmp_path, where):
    raw = base_spec(assets, tmp_path)
    if where == "config":
        raw["config"]["data"]["val_fraction"] = 0.0
        prefix = "config.data.val_fraction: "
    elif where == "choice":
        raw["space"]["data.val_fraction"] = {"sampler": "choice", "values": [0.25, 0.0]}
        prefix = "space.data.val_fraction: data.val_fraction "
    else:
        raw["space"]["split"] = {"sampler": "grid", "values": {"held": {"data.val_fraction": 0.25},
                                                                "all": {"data.val_fraction": 0.0}}}
        raw["tune"]["search"] = {"algorithm": "random"}
        prefix = "space.split: data.val_fraction "
    msg = error_of(raw)
    assert msg.startswith(prefix + "0 leaves no validation split, but a sweep ranks and selects trials on "
                          "validation metrics"), msg
    raw = base_spec(assets, tmp_path)
    raw["space"]["data.val_fraction"] = {"sampler": "choice", "values": [0.25, 0.5]}
    assert load(raw).trial_config({"data.val_fraction": 0.5}).data.val_fraction == 0.5


def test_searching_the_epochs_is_rejected(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["train.epochs"] = {"sampler": "choice", "values": [2, 3]}
    assert "max_t" in error_of(raw)


def test_file_store_tracking_uri_is_rejected(assets, tmp_path):
    for uri in ("./mlruns", "file:///tmp/mlruns"):
        raw = base_spec(assets, tmp_path, mlflow={"tracking_uri": uri})
        assert "file store" in error_of(raw)


def test_mlflow_tracking_uri_env_is_the_default(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    raw = base_spec(assets, tmp_path)
    raw.pop("mlflow")
    spec = load(raw)
    assert spec.mlflow.tracking_uri == "http://head:5000" and spec.mlflow.artifact_location is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    assert "file store" in error_of(raw)


def test_relative_sqlite_uri_is_made_absolute(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load(base_spec(assets, tmp_path, mlflow={"tracking_uri": "sqlite:///db/m.db"}))
    assert spec.mlflow.tracking_uri == f"sqlite:///{tmp_path}/db/m.db"


def test_metric_and_mode_are_checked(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["tune"]["metric"] = "val_acc"
    assert "val_top1" in error_of(raw)
    raw["tune"]["metric"] = "val_loss"
    raw["tune"]["mode"] = "max"
    assert "mode: min" in error_of(raw)


def test_search_and_sampler_compatibility(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"]["loss.temperature"] = {"sampler": "grid", "values": [2.0, 4.0]}
    assert "algorithm: grid or random" in error_of(raw)
    raw["tune"]["search"] = {"algorithm": "grid"}
    assert "every entry to use the grid sampler" in error_of(raw)
    raw["tune"]["search"] = {"algorithm": "random"}
    assert load(raw).tune.search.algorithm == "random"


def test_scheduler_grace_must_fit_the_epochs(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["tune"]["scheduler"] = {"type": "asha", "grace_period": 4}
    assert "train.epochs = 3" in error_of(raw)


def test_fractional_gpu_and_bad_resources(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["config"]["device"] = "auto"
    raw["tune"]["resources"] = {"cpu": 2, "gpu": 0.25}
    spec = load(raw)
    assert (spec.tune.cpu, spec.tune.gpu, spec.plan().gpu) == (2, 0.25, 0.25)
    assert spec.tune.resolved_reuse_actors is False            # GPU trials: a fresh process each (ray#23971)
    raw["tune"]["resources"] = {"cpu": 1, "gpu": 1.5}
    assert "must be 0 or a fraction in (0, 1]" in error_of(raw)
    raw["tune"]["resources"] = {"cpu": 1, "gpu": 2}          # no multi-GPU training: a second GPU would idle
    assert "there is no multi-GPU training" in error_of(raw)
    raw["config"]["device"] = "cpu"
    raw["tune"]["resources"] = {"cpu": 1, "gpu": 1}
    assert "device is cpu" in error_of(raw)
    raw["config"]["device"] = "cuda:1"
    assert "Ray assigns each trial its GPU" in error_of(raw)


# ----- ${ENV} --------------------------------------------------------------------------------------------------

def test_env_expansion(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("RICHKD_TEST_TEACHER", str(assets / "teacher.pth"))
    monkeypatch.delenv("RICHKD_TEST_N", raising=False)
    raw = base_spec(assets, tmp_path)
    raw["config"]["teacher"]["checkpoint"] = "${RICHKD_TEST_TEACHER}"
    raw["tune"]["num_samples"] = "${RICHKD_TEST_N:-3}"
    spec = load(raw)
    assert spec.base_config.teacher.checkpoint == str(assets / "teacher.pth")
    assert spec.tune.num_samples == 3 and isinstance(spec.tune.num_samples, int)


def test_missing_env_var_is_one_clear_error(assets, tmp_path, monkeypatch):
    monkeypatch.delenv("RICHKD_NOT_SET", raising=False)
    raw = base_spec(assets, tmp_path)
    raw["config"]["teacher"]["checkpoint"] = "${RICHKD_NOT_SET}/t.pth"
    msg = error_of(raw)
    assert "RICHKD_NOT_SET" in msg and "config.teacher.checkpoint" in msg


def test_expand_env_keeps_text_around_variables(monkeypatch):
    monkeypatch.setenv("RK_A", "x")
    assert expand_env({"a": ["pre-${RK_A}-post", "${RK_B:-1.5}"]}) == {"a": ["pre-x-post", 1.5]}


# ----- conditional keys, points and variants --------------------------------------------------------------------

def _conditional(assets, tmp_path) -> dict:
    raw = base_spec(assets, tmp_path)
    raw["space"]["loss.feat_weight"] = {"sampler": "choice", "values": [0.0, 0.8]}
    raw["space"]["loss.feat_lambda"] = {"sampler": "uniform", "low": 0.0, "high": 1.0,
                                        "when": {"loss.feat_weight": {"gt": 0}}}
    return raw


def test_conditional_key_only_when_its_condition_holds(assets, tmp_path):
    spec = load(_conditional(assets, tmp_path))
    plan = spec.plan()
    off = plan.effective_overrides({"loss.feat_weight": 0.0, "loss.feat_lambda": 0.3})
    on = plan.effective_overrides({"loss.feat_weight": 0.8, "loss.feat_lambda": 0.3})
    assert "loss.feat_lambda" not in off and on["loss.feat_lambda"] == 0.3
    assert plan.trial_config({"loss.feat_weight": 0.0, "loss.feat_lambda": 0.3}).loss.feat_lambda is None
    draws = spec.random_points(64, seed=1)
    assert all(("loss.feat_lambda" in d) == (d["loss.feat_weight"] > 0) for d in draws)
    assert {d["loss.feat_weight"] for d in draws} == {0.0, 0.8}


def test_points_to_evaluate_are_validated(assets, tmp_path):
    raw = _conditional(assets, tmp_path)
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.7, "loss.feat_weight": 0.0, "loss.feat_lambda": 0.5}]
    assert "inactive" in error_of(raw)
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 1.2}]
    assert "outside the space" in error_of(raw)
    raw["points_to_evaluate"] = [{"loss.fusion_alfa": 0.7}]
    assert "did you mean 'loss.fusion_alpha'" in error_of(raw)
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}]
    assert load(raw).points == ({"loss.fusion_alpha": 0.7, "loss.temperature": 4.0},)


def test_variant_entries_bundle_keys(assets, tmp_path):
    raw = base_spec(assets, tmp_path)
    raw["space"] = {"variant": {"sampler": "choice", "values": {
        "L": {"loss.logit_weight": 3.0, "loss.feat_weight": 0.0},
        "F": {"loss.logit_weight": 0.0, "loss.feat_weight": 0.8},
        "LF": {"loss.logit_weight": 3.0, "loss.feat_weight": 0.8}}}}
    spec = load(raw)
    cfg = spec.trial_config({"variant": "F"})
    assert (cfg.loss.logit_weight, cfg.loss.feat_weight) == (0.0, 0.8)
    raw["space"]["variant"]["values"]["none"] = {"loss.logit_weight": 0.0, "loss.feat_weight": 0.0}
    assert "invalid" in error_of(raw) and "richkd needs" in error_of(raw)
    raw["space"]["variant"]["values"] = {"L": {"loss.logit_wieght": 3.0}}
    assert "did you mean 'loss.logit_weight'" in error_of(raw)


def test_trial_plan_is_picklable_and_rebuilds_the_config(assets, tmp_path):
    import pickle

    spec = load(_conditional(assets, tmp_path))
    plan = pickle.loads(pickle.dumps(spec.plan()))
    assert isinstance(plan, TrialPlan)
    sampled = {"loss.fusion_alpha": 0.5, "loss.temperature": 4.0, "loss.feat_weight": 0.8, "loss.feat_lambda": 0.25}
    cfg = plan.trial_config(sampled)
    expected = Config.from_dict(spec.base_config.to_dict()).with_overrides(sampled)
    assert cfg == expected


def test_spec_overrides_from_the_command_line(assets, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base_spec(assets, tmp_path)))
    spec = load_spec(path, ["tune.num_samples=7", "config.train.epochs=5", "name=other"])
    assert (spec.tune.num_samples, spec.max_t, spec.name) == (7, 5, "other")
    with pytest.raises(SpecError, match="unknown spec section"):
        load_spec(path, ["tuen.num_samples=7"])


# ----- the CLI: exit code 2, one line, nothing written, nothing launched -------------------------------------------

@pytest.mark.parametrize("mutate", [
    lambda r: r["space"].__setitem__("loss.temprature", {"sampler": "uniform", "low": 1, "high": 2}),
    lambda r: r["space"].__setitem__("loss.fusion_alpha", {"sampler": "uniform", "low": 0.5, "high": 0.2}),
    lambda r: r["space"].__setitem__("clip.prompt_set", {"sampler": "choice", "values": ["nope"]}),
    lambda r: r["config"]["teacher"].__setitem__("checkpoint", "/nonexistent/t.pth"),
    lambda r: r["space"].__setitem__("data.batch_size", {"sampler": "randint", "low": 8, "high": 64}),
])
def test_cli_rejects_bad_specs_before_anything_starts(assets, tmp_path, capsys, mutate):
    from richkd.cli import main

    work = tmp_path / "work"
    work.mkdir()
    raw = base_spec(assets, work)
    mutate(raw)
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(yaml.safe_dump(raw))
    ray_was_loaded = "ray" in sys.modules and __import__("ray").is_initialized()
    rc = main(["sweep", str(spec_file)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("richkd sweep: error: ") and err.count("\n") == 1
    assert list(work.iterdir()) == []           # no storage, no cache, no mlflow.db
    if not ray_was_loaded and "ray" in sys.modules:
        assert not __import__("ray").is_initialized()


def test_cli_check_validates_only(assets, tmp_path, capsys):
    from richkd.cli import main

    work = tmp_path / "work"
    work.mkdir()
    spec_file = tmp_path / "ok.yaml"
    spec_file.write_text(yaml.safe_dump(base_spec(assets, work)))
    assert main(["sweep", str(spec_file), "--check"]) == 0
    assert "is valid" in capsys.readouterr().out
    assert list(work.iterdir()) == []


def test_shared_filesystem_detection():
    mounts = "\n".join(["/dev/sda1 / ext4 rw 0 0", "server:/export /mnt/shared nfs4 rw 0 0",
                        "tmpfs /mnt/shared/tmp tmpfs rw 0 0"])
    assert is_shared_filesystem("/mnt/shared/tune_runs", mounts)
    assert not is_shared_filesystem("/mnt/shared/tmp/x", mounts)      # the deepest mount wins
    assert not is_shared_filesystem("/home/me/tune_runs", mounts)
    assert not is_shared_filesystem("/mnt/sharedX", mounts)
