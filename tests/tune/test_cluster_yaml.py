"""The cluster launcher configs (ray_cluster.yaml on AWS, ray_cluster_local.yaml on-prem) pass the checks `ray up`
runs before it touches a machine (Ray's prepare_config + validate_config, offline), install only pinned versions,
and set what a sweep needs on every node."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
YAMLS = ("ray_cluster.yaml", "ray_cluster_local.yaml")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does with the YAML before any provider call: prepare_config (defaults, merged setup commands,
    the local provider's node type), then validate_config (the JSON schema and the cross-field rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def constraints_pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load("ray_cluster.yaml")


@pytest.fixture(scope="module")
def local() -> dict:
    return load("ray_cluster_local.yaml")


@pytest.mark.parametrize("name", YAMLS)
def test_passes_the_checks_ray_up_runs(name):
    prepared = ray_up_checks(load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # the shared setup commands reach both the head and the workers (prepare_config merges them)
    assert prepared["head_setup_commands"][:len(prepared["setup_commands"])] == prepared["setup_commands"]
    assert prepared["worker_setup_commands"][:len(prepared["setup_commands"])] == prepared["setup_commands"]


def test_the_local_yaml_becomes_one_node_type_per_worker_ip(local):
    prepared = ray_up_checks(local)
    (node_type,) = prepared["available_node_types"].values()
    n_ips = len(local["provider"]["worker_ips"])
    assert n_ips >= 1 and node_type["min_workers"] == node_type["max_workers"] == prepared["max_workers"] == n_ips


@pytest.mark.parametrize("name, mutate, error", [
    ("ray_cluster.yaml", lambda c: c.__setitem__("head_node_type", "nope"), ValueError),
    ("ray_cluster.yaml", lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", 9),
     ValueError),                                                         # more than the global max_workers
    ("ray_cluster.yaml", lambda c: c["available_node_types"]["head"].__setitem__("max_workers", "1"),
     jsonschema.ValidationError),
    ("ray_cluster_local.yaml", lambda c: c["provider"].pop("worker_ips"), click.ClickException),
    ("ray_cluster_local.yaml", lambda c: c.__setitem__("available_node_types", {"x": {}}), click.ClickException),
    ("ray_cluster_local.yaml", lambda c: c.__setitem__("head_ip", c["provider"]["head_ip"]),
     jsonschema.ValidationError),                                         # head_ip belongs under provider:
])
def test_the_ray_up_checks_can_fail(name, mutate, error):
    broken = load(name)
    mutate(broken)
    with pytest.raises(error):
        ray_up_checks(broken)


def test_validates_against_rays_schema(schema, cluster):
    jsonschema.validate(cluster, schema)


@pytest.mark.parametrize("mutate", [
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", 0.5),  # launcher: integers
    lambda c: c.pop("provider"),
    lambda c: c.__setitem__("workers", 2),
    lambda c: c["available_node_types"]["head"].pop("node_config"),
])
def test_the_schema_check_can_fail(schema, cluster, mutate):
    broken = copy.deepcopy(cluster)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_gpu_sweep_essentials(cluster):
    import ray

    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}          # no trials on the head
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t.get("max_workers", 0) > 0 for t in gpu_types)
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert any("pip install" in c and "/home/ray/richkd" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["/home/ray/richkd"] == "."
    assert any("data" in k for k in cluster["file_mounts"]) and any("teachers" in k for k in cluster["file_mounts"])
    assert any("mlflow server" in c and "--host 127.0.0.1" in c for c in cluster["head_setup_commands"])
    options = " ".join(cluster["docker"]["run_options"])
    assert "RICHKD_STORAGE=/mnt/richkd/tune_runs" in options and "RICHKD_CACHE=/mnt/richkd/cache" in options
    assert "-v /mnt/richkd:/mnt/richkd" in options
    assert any("mount -t nfs4" in c and "/mnt/richkd" in c for c in cluster["initialization_commands"])


def test_the_cifar_space_reads_the_cluster_environment(tmp_path, monkeypatch):
    """The env vars the cluster sets are the ones the shipped CIFAR spec expands."""
    from richkd.tune.spec import load_spec

    env = {"RICHKD_STORAGE": str(tmp_path / "shared" / "tune_runs"), "RICHKD_CACHE": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "RICHKD_CIFAR100": str(tmp_path / "cifar"),
           "RICHKD_TEACHER_R32X4": str(tmp_path / "t.pth"), "RICHKD_CLIP_PRETRAINED": "openai"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)
    spec = load_spec(REPO / "search_spaces" / "cifar100_resnet32x4_resnet8x4.yaml", check_resources=False,
                     check_data=False)
    assert spec.tune.storage_path == env["RICHKD_STORAGE"]
    assert spec.mlflow.tracking_uri == "http://127.0.0.1:5000" and spec.mlflow.artifact_location is None
    assert spec.base_config.teaching.cache_dir == env["RICHKD_CACHE"]
    assert spec.base_config.teacher.checkpoint == env["RICHKD_TEACHER_R32X4"]
    assert (spec.tune.cpu, spec.tune.gpu) == (4, 0.25)


@pytest.mark.parametrize("name", YAMLS)
def test_installs_are_pinned_with_no_unpinned_fallback(name):
    config = load(name)
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in config.get(key, [])]
    installs = [c for c in commands if "pip install" in c]
    assert installs, "the project must be installed on every node"
    for command in installs:
        assert re.search(r"-c \S*richkd/constraints\.txt", command), command
        assert "||" not in command, f"an install must fail loudly, not fall back: {command}"
    assert any("[cluster]" in c for c in installs)          # ray[default]: dashboard and `ray job submit`
    guard = next(c for c in commands if "constraints.txt" in c and "pip install" not in c)
    assert commands.index(guard) < commands.index(installs[0])


def test_the_setup_stops_when_the_constraints_file_is_missing(local, tmp_path):
    guard = next(c for c in local["setup_commands"] if "constraints.txt" in c and "pip install" not in c)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    missing = subprocess.run(["bash", "-c", guard], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "constraints.txt is missing" in missing.stderr
    (tmp_path / "richkd").mkdir()
    (tmp_path / "richkd" / "constraints.txt").write_text("ray==2.60.0\n")
    assert subprocess.run(["bash", "-c", guard], env=env).returncode == 0


def test_the_cluster_extra_pins_the_ray_of_the_images_and_constraints(cluster):
    import ray

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = extras["cluster"]
    assert requirement == f"ray[default]=={constraints_pins()['ray']}" == f"ray[default]=={ray.__version__}"
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def local_env(local: dict) -> dict[str, str]:
    """The variables ray_cluster_local.yaml writes into ~/richkd-env.sh (which every Ray command sources)."""
    (writer,) = [c for c in local["setup_commands"] if "richkd-env.sh" in c]
    return dict(re.findall(r"'export (\w+)=([^']*)'", writer))


def aws_env(cluster: dict) -> dict[str, str]:
    return dict(o[3:].split("=", 1) for o in cluster["docker"]["run_options"] if o.startswith("-e "))


def test_on_prem_essentials(local):
    provider = local["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    env = local_env(local)
    shared = "/mnt/richkd/"
    for key in ("RICHKD_STORAGE", "RICHKD_CACHE", "RICHKD_DATA", "HF_HOME"):
        assert env[key].startswith(shared), key                         # one folder, same path on every node
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and env["RAY_AUTH_MODE"] == "token"
    assert any("mount -t nfs" in c and "/mnt/richkd" in c for c in local["initialization_commands"])
    assert any("mountpoint -q /mnt/richkd" in c and "exit 1" in c for c in local["initialization_commands"])
    starts = local["head_start_ray_commands"] + local["worker_start_ray_commands"]
    assert all(c.startswith("source ~/richkd-env.sh && ") for c in starts)   # Ray (and so every trial) gets env
    (server,) = [c for c in local["head_start_ray_commands"] if "mlflow server" in c]
    assert "sqlite:////mnt/richkd/mlflow.db" in server and "--host 127.0.0.1" in server
    assert local["file_mounts"]["~/richkd"] == "."


@pytest.mark.parametrize("name", YAMLS)
def test_token_auth_on_every_node_with_the_token_synced(name):
    config = load(name)
    env = aws_env(config) if name == "ray_cluster.yaml" else local_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    (remote,) = [r for r, src in config["file_mounts"].items() if src == "~/.ray/auth_token"]
    assert remote.endswith("/.ray/auth_token")               # Ray's default token path on the node


@pytest.mark.parametrize("name", YAMLS)
def test_every_variable_the_cifar_spec_reads_is_set_on_the_cluster(name):
    spec_text = (REPO / "search_spaces" / "cifar100_resnet32x4_resnet8x4.yaml").read_text()
    wanted = set(re.findall(r"\$\{(\w+)", spec_text)) | {"MLFLOW_TRACKING_URI"}
    config = load(name)
    env = aws_env(config) if name == "ray_cluster.yaml" else local_env(config)
    assert wanted and wanted <= set(env), wanted - set(env)
