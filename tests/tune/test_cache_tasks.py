"""A sweep's caches built as Ray tasks in row blocks equal the in-process `prepare_caches` entries, byte for byte."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from richkd.cache import prepare_caches
from richkd.cache.row_blocks import assemble_entry, block_ranges, block_root, compute_block
from richkd.config import Config
from richkd.models.checkpoint import CheckpointError
from richkd.tune.spec import spec_from_mapping

from tests.cluster_fixtures import make_ray_cluster  # noqa: F401  (a fixture, registered by pytest)
from tests.factories import base_spec, imagenet_config, make_assets, make_imagenet_assets, shared_ray


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tune_assets")


def assert_same_entries(built: list, reference: list) -> None:
    """Same entry names, manifests equal but for the creation time, every array file identical."""
    assert [Path(p).name for p in built] == [Path(p).name for p in reference]
    for a, b in zip(built, reference):
        ma, mb = (json.loads((Path(p) / "manifest.json").read_text()) for p in (a, b))
        ma.pop("created"), mb.pop("created")
        assert ma == mb
        files = sorted(f.name for f in Path(a).iterdir())
        assert files == sorted(f.name for f in Path(b).iterdir())
        for name in [f for f in files if f.endswith(".npy")]:
            assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), (Path(a).name, name)


@pytest.mark.parametrize("n_rows, batch, shards, expect", [
    (400, 256, 2, [(0, 256), (256, 400)]),
    (400, 128, 2, [(0, 256), (256, 400)]),             # 4 batches: 2 + 2
    (400, 128, 3, [(0, 256), (256, 384), (384, 400)]),  # 4 batches: 2 + 1 + 1
    (100, 256, 4, [(0, 100)]),                          # one batch: one shard
    (0, 64, 2, []),
])
def test_row_blocks_fall_on_batch_boundaries(n_rows, batch, shards, expect):
    assert block_ranges(n_rows, batch, shards) == expect


def test_row_blocks_of_several_views_assemble_into_the_in_process_entry(assets, tmp_path):
    """No Ray: the row block computation and the assembly alone, with 2 cached views (row v * N + i layout)."""
    from richkd.cache import plan_caches

    raw = base_spec(assets, tmp_path)["config"]
    cfg = Config.from_dict({**raw, "data": {**raw["data"], "augment": "standard"},
                            "teaching": {"cache_dir": str(tmp_path / "sharded"), "views": 2}})
    plan = plan_caches(cfg)
    assert [j.kind for j in plan.missing] == ["teacher", "clip-image", "clip-text"]
    for job in plan.missing[:2]:
        root = block_root(job)
        ranges = block_ranges(job.n_rows, job.batch_size, 2)
        assert len(ranges) == 2
        blocks = [compute_block(job, a, b, root) for a, b in reversed(ranges)]   # any order
        assemble_entry(job, blocks, root)
        assert not root.exists()                                                  # blocks deleted
    reference = prepare_caches(cfg.with_overrides({"teaching.cache_dir": str(tmp_path / "whole")}))
    assert_same_entries(plan.paths[:2], reference[:2])


@pytest.mark.slow
def test_sweep_caches_are_built_by_ray_tasks_in_two_shards(assets, tmp_path):
    from richkd.tune.cache_tasks import build_caches
    from richkd.tune.runner import prepare_nodes

    spec = spec_from_mapping(base_spec(assets, tmp_path, tune={"num_samples": 1, "resources": {"cpu": 1},
                                                               "storage_path": str(tmp_path / "runs")}))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    bad = spec.cache_probe_configs[0].with_overrides({"teacher.checkpoint": str(broken)})
    photos = imagenet_config(make_imagenet_assets(tmp_path / "inet"), tmp_path / "inet_cache")
    shared_ray()                                                        # 2 CPU slots: 2 row shards per entry
    records, _ = prepare_nodes(spec)
    again = build_caches(spec.cache_probe_configs, cpu=1)              # everything exists now: only checked
    with pytest.raises(CheckpointError, match="broken.pth"):            # the task's own error, not Ray's wrapper
        build_caches([bad], cpu=1, shards=2)
    photo = build_caches([photos], cpu=1)                               # a photo dataset's own sharded entries
    assert sorted(b["entry"].split("-")[0] for b in photo.built) == ["clip", "photo"]     # in completion order
    assert all(s["pid"] != os.getpid() for b in photo.built for s in b["shards"])
    whole = prepare_caches(photos.with_overrides({"teaching.cache_dir": str(tmp_path / "inet_whole")}))
    assert [p.name for p in photo.paths[0]] == [p.name for p in whole]
    for a, b in zip(photo.paths[0], whole):
        arrays = sorted(f.relative_to(a) for f in Path(a).rglob("*.npy"))
        assert arrays and arrays == sorted(f.relative_to(b) for f in Path(b).rglob("*.npy"))
        assert all((Path(a) / f).read_bytes() == (Path(b) / f).read_bytes() for f in arrays)
    (record,) = records
    cfg = spec.cache_probe_configs[0]
    assert record["dir"] == str(tmp_path / "cache") and record["signature"]
    assert [n.split("-")[0] for n in record["entries"]] == ["teacher", "clip", "clip"]
    assert again.built == [] and [[p.name for p in ps] for ps in again.paths] == [record["entries"]]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert entries == sorted(record["entries"])         # no shard folders left, no entry for the broken teacher
    reference = prepare_caches(cfg.with_overrides({"teaching.cache_dir": str(tmp_path / "whole")}))
    assert_same_entries([tmp_path / "cache" / n for n in record["entries"]], reference)


@pytest.mark.slow
def test_shards_run_in_ray_workers_on_the_nodes_of_a_cluster_that_see_the_files(assets, tmp_path, make_ray_cluster):
    """Head + worker (1 CPU each) share the shards; a node that joins without seeing the assets (its own empty
    folder over them, where mount namespaces are permitted) gets no cache task."""
    import ray

    from richkd.tune.cache_tasks import build_caches, shard_count

    from tests.cluster_fixtures import hiding_unsupported

    if ray.is_initialized():      # the session's shared Ray (tests.factories.shared_ray): connect to the cluster
        ray.shutdown()
    cfg = spec_from_mapping(base_spec(assets, tmp_path)).cache_probe_configs[0]
    other = cfg.with_overrides({"teaching.cache_dir": str(tmp_path / "other")})
    cluster = make_ray_cluster(workers=[{"num_cpus": 1}], head={"num_cpus": 1})
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        assert shard_count(1, 0) == 2                                   # one CPU slot per node
        result = build_caches([cfg], cpu=1)
        blind = None
        if hiding_unsupported() is None:
            blind = cluster.add_worker(num_cpus=1, hide=[assets])       # joins later, started alone
            assert shard_count(1, 0) == 3
            second = build_caches([other], cpu=1)
    finally:
        ray.shutdown()
    seeing = {cluster.head.node_id, cluster.workers[0].node_id}
    for built in [result.built] + ([second.built] if blind else []):
        by_kind = {b["entry"].rsplit("-", 1)[0]: b for b in built}
        assert sorted(by_kind) == ["clip-image", "clip-text", "teacher"]
        for kind in ("teacher", "clip-image"):
            shards = by_kind[kind]["shards"]
            assert [(s["start"], s["stop"]) for s in shards] == [(0, 256), (256, 400)]
            assert {s["node_id"] for s in shards} == seeing              # never the blind node
            assert os.getpid() not in {s["pid"] for s in shards}
        assert by_kind["clip-text"]["shards"][0]["node_id"] in seeing
    reference = prepare_caches(cfg.with_overrides({"teaching.cache_dir": str(tmp_path / "whole")}))
    assert_same_entries(result.paths[0], reference)
    if blind:
        assert_same_entries(second.paths[0], reference)
