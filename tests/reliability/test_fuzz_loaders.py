"""Property-based fuzzing (hypothesis) of the config and sweep-spec loaders: any input gives either a valid
Config / SweepSpec or one ConfigError / SpecError with a message, never another exception (a traceback).

Derandomised and with modest example counts so CI on 2 cores is quick and reproducible; a failure prints the
smallest input hypothesis found, which becomes a regression test (see the explicit cases at the bottom).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from richkd.config import Config, ConfigError, dotted_keys, load_yaml_mapping

from tests.factories import base_spec, make_assets

FUZZ = settings(max_examples=int(os.environ.get("RICHKD_FUZZ_EXAMPLES", 120)), derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DOTTED = dotted_keys()
SECTIONS = sorted({k.split(".")[0] for k in DOTTED})
FIELDS = sorted({k.split(".")[-1] for k in DOTTED})
WORDS = ["auto", "cpu", "cuda:0", "richkd", "kd", "supervised", "cosine", "step", "cached", "online", "standard",
         "none", "fashion_mnist", "cifar100", "resnet8", "optuna", "random", "grid", "asha", "fifo", "choice",
         "uniform", "loguniform", "quniform", "randint", "val_top1", "val_loss", "max", "min", "gt", "in", "${HOME}",
         "${RICHKD_FUZZ_UNSET}", "${RICHKD_FUZZ_UNSET:-4}", "${", "sqlite:///x.db", "http://127.0.0.1:1", "./mlruns",
         "s3://b/p", "1e-3", "", " ", "true", "null", "~/x", "local-dir:/nope"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2, 3, -1, 0.5, 1e-9, 1e308, -0.0]),
    st.text(max_size=10), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(SECTIONS + FIELDS + DOTTED), st.text(max_size=8), st.integers(-3, 3), st.none(),
                 st.booleans())
plausible = st.one_of(st.floats(0, 1), st.integers(0, 10), st.sampled_from(WORDS), st.just([0.0, 0.5]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=10)


def _config_like():
    """Mappings shaped like a config: known sections holding known (or random) fields with random values."""
    section = st.dictionaries(st.one_of(st.sampled_from(FIELDS), keys), values, max_size=5)
    return st.dictionaries(st.one_of(st.sampled_from(SECTIONS), keys), st.one_of(section, values), max_size=5)


def _is_clear(exc: BaseException) -> bool:
    return isinstance(exc, ConfigError) and bool(str(exc).strip())


@FUZZ
@given(raw=st.one_of(_config_like(), values))
def test_config_from_dict_gives_a_config_or_one_config_error(raw):
    try:
        cfg = Config.from_dict(raw)
    except ConfigError as exc:
        assert _is_clear(exc)
        return
    assert isinstance(cfg, Config)
    assert Config.from_dict(cfg.to_dict()) == cfg        # what was accepted survives a round trip


YAML_ALPHABET = st.sampled_from(list("abcdefgilmnoprstuy_.:-[]{},'\"!&*#|>?%@` \n\t0123456789") +
                                ["data:", "  dataset: ", "optim:", "  lr: ", "!!python/object:os.system", "!!str ",
                                 "&a [1]", "*a", "---\n", "\\u", "\xff", "${X}"])


@FUZZ
@given(text=st.lists(YAML_ALPHABET, max_size=40).map("".join))
def test_yaml_config_files_give_a_config_or_one_config_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        cfg = Config.from_yaml(path)
    except ConfigError as exc:
        assert _is_clear(exc)
        return
    assert isinstance(cfg, Config)


# ----- sweep specs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_spec(tmp_path_factory) -> dict:
    from richkd.tune.spec import spec_from_mapping

    assets = make_assets(tmp_path_factory.getbasetemp() / "tune_assets")
    raw = base_spec(assets, tmp_path_factory.mktemp("fuzz_spec"))
    raw["space"]["loss.feat_weight"] = {"sampler": "choice", "values": [0.0, 0.8]}
    raw["space"]["loss.feat_lambda"] = {"sampler": "uniform", "low": 0.0, "high": 1.0,
                                        "when": {"loss.feat_weight": {"gt": 0}}}
    raw["space"]["optim.lr"] = {"sampler": "quniform", "low": 0.01, "high": 0.1, "q": 0.01}
    raw["tune"]["search"] = {"algorithm": "optuna", "seed": 0}
    raw["points_to_evaluate"] = [{"loss.fusion_alpha": 0.7, "loss.temperature": 4.0}]
    spec_from_mapping(raw, check_resources=False, check_data=False)          # the starting point is valid
    return raw


def _paths(node, prefix=()):
    """Every (nested) key path of a spec mapping, for targeted mutations."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, prefix + (k,)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, prefix + (i,)))
    return out


def _mutate(raw: dict, path: tuple, value, delete: bool) -> None:
    node = raw
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


sampler_entries = st.fixed_dictionaries(
    {"sampler": st.one_of(st.sampled_from(["uniform", "loguniform", "quniform", "randint", "choice", "grid"]),
                          scalars)},
    optional={"low": plausible | scalars, "high": plausible | scalars, "q": plausible | scalars,
              "values": st.lists(plausible, min_size=1, max_size=3) | values,
              "when": st.dictionaries(st.sampled_from(DOTTED[:20] + ["loss.feat_weight"]), values, max_size=2)})


@FUZZ
@given(data=st.data())
def test_spec_from_mapping_gives_a_spec_or_one_spec_error(valid_spec, data):
    from richkd.tune.errors import SpecError
    from richkd.tune.spec import SweepSpec, spec_from_mapping

    raw = copy.deepcopy(valid_spec)
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        paths = _paths(raw)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        kind = data.draw(st.sampled_from(["value", "delete", "new_key", "space_entry"]), label="kind")
        if kind == "new_key" and isinstance(_parent(raw, path), dict):
            _mutate(raw, path[:-1] + (data.draw(keys, label="key"),), data.draw(values, label="value"), False)
        elif kind == "space_entry":
            raw.setdefault("space", {})
            if isinstance(raw["space"], dict):
                raw["space"][data.draw(st.sampled_from(DOTTED + ["variant", "x"]), label="space_key")] = \
                    data.draw(sampler_entries, label="entry")
        else:
            _mutate(raw, path, data.draw(plausible | values, label="value"), kind == "delete")
    overrides = data.draw(st.just([]) | st.lists(st.one_of(st.text(max_size=12), st.sampled_from(
        ["tune.num_samples=0", "tune.num_samples=2", "config.train.epochs=x", "space=1", "name=", "x.y=1",
         "tune=[]", "mlflow.tracking_uri=./mlruns", "config.loss.method=kd"])), max_size=2), label="overrides")
    try:
        spec = spec_from_mapping(raw, overrides=overrides, check_resources=False, check_data=False)
    except SpecError as exc:
        assert str(exc).strip()
        event(f"SpecError on {str(exc).split(':')[0][:30]}")   # --hypothesis-show-statistics: what was tried
        return
    except ConfigError as exc:                            # --set parsing reports ConfigError (SpecError's base)
        assert str(exc).strip() and "--set" in str(exc)
        event("ConfigError from --set")
        return
    event("valid spec")
    assert isinstance(spec, SweepSpec)
    for point in spec.random_points(4, seed=1):            # an accepted space only produces valid configs
        spec.trial_config(point)
    again = spec_from_mapping(spec.to_dict(), check_resources=False, check_data=False)   # what --resume re-reads
    assert again.space_hash() == spec.space_hash()


def _parent(raw, path):
    node = raw
    for part in path[:-1]:
        node = node[part]
    return node


@FUZZ
@given(text=st.lists(YAML_ALPHABET | st.sampled_from(["space:\n", "  optim.lr:\n", "    sampler: ", "tune:\n",
                                                      "  num_samples: ", "config:\n", "base: "]), max_size=30)
       .map("".join))
def test_spec_files_give_a_spec_or_one_spec_error(text, tmp_path_factory):
    from richkd.tune.errors import SpecError
    from richkd.tune.spec import load_spec

    path = tmp_path_factory.mktemp("spec") / "s.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_spec(path, check_resources=False, check_data=False)
    except SpecError as exc:
        assert str(exc).strip()


# ----- cases fuzzing found (kept as plain regression tests) ------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("[" * 600 + "]" * 600, "nested too deeply"),
    (b"data:\n  root: \xff\xfe\n", "not a UTF-8 text file"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "YAML aliases"),
])
def test_hostile_yaml_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "hostile.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_yaml_mapping(path)


@pytest.mark.parametrize("raw, key", [({"optim": {"lr": math.nan}}, "optim.lr"),
                                      ({"optim": {"lr": -math.inf}}, "optim.lr"),
                                      ({"train": {"epochs": 2**80}}, "train.epochs"),
                                      ({"train": {"epochs": math.inf}}, "train.epochs"),
                                      ({"data": {"batch_size": 64.5}}, "data.batch_size")])
def test_non_finite_huge_and_fractional_numbers_are_clear_errors(raw, key):
    with pytest.raises(ConfigError, match=key):
        Config.from_dict(raw)


def test_quniform_with_an_overflowing_grid_is_a_spec_error(valid_spec):
    """Found by fuzzing: low=-1e308, high=1e308 made (high - low) / q infinite and round() raised OverflowError."""
    from richkd.tune.errors import SpecError
    from richkd.tune.spec import spec_from_mapping

    raw = copy.deepcopy(valid_spec)
    raw["space"]["optim.lr"] = {"sampler": "quniform", "low": -1e308, "high": 1e308, "q": 1.0}
    with pytest.raises(SpecError, match="grid steps is too many"):
        spec_from_mapping(raw, check_resources=False, check_data=False)
