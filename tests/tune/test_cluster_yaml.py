"""ray_cluster.yaml is valid for Ray's own cluster-launcher schema (offline) and has what a GPU sweep needs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


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
