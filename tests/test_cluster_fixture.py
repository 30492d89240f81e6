"""The cluster test fixtures are what they claim: two real Ray nodes that Ray tells apart, a worker that cannot
see a hidden folder, a raylet that can be killed, and a real MLflow tracking server."""
from __future__ import annotations

import time

import pytest

# the imported fixtures (make_ray_cluster, mlflow_server) are registered by pytest for this module
from tests.cluster_fixtures import REPO, group_pids, hiding_unsupported, make_ray_cluster, mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow


def test_two_nodes_with_a_folder_only_the_head_sees(make_ray_cluster, tmp_path):
    shared = tmp_path / "shared_only"
    shared.mkdir()
    (shared / "marker.txt").write_text("on the head's disk")
    can_hide = hiding_unsupported() is None           # without it: the same checks on two ordinary nodes
    cluster = make_ray_cluster(workers=[{"hide": [shared] if can_hide else []}])
    head, worker = cluster.head, cluster.workers[0]
    assert head.node_id and worker.node_id and head.node_id != worker.node_id
    assert worker.hidden == ((shared.resolve(),) if can_hide else ())

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.is_initialized():      # the session's shared Ray (tests.factories.shared_ray): connect to this cluster
        ray.shutdown()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        @ray.remote(num_cpus=1)
        def look(folder: str) -> tuple:
            import os

            import richkd   # the nodes import this checkout's package (PYTHONPATH)

            return (ray.get_runtime_context().get_node_id(), sorted(os.listdir(folder)),
                    os.path.dirname(os.path.dirname(richkd.__file__)))

        def on(node):
            return look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))

        results = ray.get([on(node).remote(str(shared)) for node in (head, worker)], timeout=120)
        seen = {node_id: (files, repo) for node_id, files, repo in results}
        by_resource = ray.get(look.options(resources={worker.resource: 1}).remote(str(shared)), timeout=120)
    finally:
        ray.shutdown()
    assert set(seen) == {head.node_id, worker.node_id}          # two distinct nodes ran the pinned tasks
    assert seen[head.node_id][0] == ["marker.txt"]              # the head sees the folder's file
    assert seen[worker.node_id][0] == ([] if can_hide else ["marker.txt"])   # the worker: an empty tmpfs
    assert {repo for _, repo in seen.values()} == {str(REPO)}
    assert by_resource[0] == worker.node_id                     # the custom resource pins to that node too
    assert (shared / "marker.txt").is_file()                    # hiding never touched the real folder

    pid = worker.kill_raylet()
    deadline = time.monotonic() + 60
    while worker.alive and time.monotonic() < deadline:         # `ray start --block` notices and exits
        time.sleep(0.2)
    assert not worker.alive, worker.log_tail()
    assert pid not in [p for p, _ in group_pids(worker.proc.pid)]
    assert head.alive
    if not can_hide:
        pytest.skip(f"two nodes checked; the hidden folder was not: {hiding_unsupported()}")


def test_the_mlflow_server_records_a_run_and_stops(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.create_experiment("fixture-check")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "val_top1", 42.5, step=1)
    client.set_terminated(run.info.run_id)
    fresh = MlflowClient(tracking_uri=mlflow_server.uri).get_run(run.info.run_id)
    assert fresh.data.metrics == {"val_top1": 42.5} and fresh.info.status == "FINISHED"
    assert (mlflow_server.folder / "mlflow.db").is_file()

    server_group = mlflow_server.proc.pid
    assert len(group_pids(server_group)) >= 2                    # the CLI and the server process(es) it started
    mlflow_server.stop()
    assert not mlflow_server.healthy() and group_pids(server_group) == []   # nothing left holding the port
