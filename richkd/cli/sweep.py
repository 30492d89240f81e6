"""`richkd sweep | export | finalize | ui`: each handler calls one operation of the sweep layer's front door
(richkd.tune, which loads ray, optuna and mlflow only when an operation runs)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Callable, Optional

from richkd import tune
from richkd.cli.common import (Interrupted, UserError, add_command, add_quiet_arg, add_ray_args, add_set_arg,
                               add_storage_args, at_least_one, interactive, verbosity)
from richkd.tracking import UI_PORT, experiment_links, local_ui
from richkd.tune.errors import SpecError
from richkd.tune.paths import DEFAULT_STORAGE, resolve_tracking_uri

SWEEP_EPILOG = """examples:
  richkd sweep search_spaces/smoke.yaml
  richkd sweep search_spaces/fmnist_demo.yaml --set tune.num_samples=4 --name fm4
  richkd sweep search_spaces/cifar100_resnet32x4_resnet8x4.yaml --address auto     # on a Ray cluster
  richkd sweep --resume fm4                                                      # after an interruption
  richkd sweep search_spaces/smoke.yaml --check                                  # validate only
  richkd sweep --resume smoke --storage /data/sweeps                             # a sweep run with --storage

Exit codes: 0 every trial ran, 2 bad input (nothing launched), 3 some trials ended in error, 4 the Ray
cluster went away, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM; after 4, 130 and 143 --resume continues.
"""

EXPORT_EPILOG = """examples:
  richkd export smoke && richkd train --config tune_runs/smoke/best_config.yaml   # reproduce the best trial
  richkd export fm4 --storage /data/sweeps --out /tmp/fm4
  richkd export fmnist_robust                                 # + pareto_front.json (multi-objective sweep)
  richkd export smoke --pareto val_top1,val_ece               # a front of any reported metrics
"""

FINALIZE_EPILOG = """examples:
  richkd finalize smoke --top 1 --seeds 2
  richkd finalize cifar100_r32x4_r8x4 --top 3 --seeds 3 --set train.epochs=240
"""

UI_EPILOG = """examples:
  richkd ui                                          # tune_runs/mlflow.db at http://127.0.0.1:5000
  richkd ui --port 5001 --storage /data/sweeps       # /data/sweeps/mlflow.db
  richkd ui --tracking-uri sqlite:///tune_runs/demo/mlflow.db     # the demo's store
"""


def stoppable(run: Callable, next_step: Callable[[], str]):
    """run() under richkd.tune.stop_signals: Ctrl-C and SIGTERM stop a sweep (or finalize) alike. A sweep
    stopped inside Tuner.fit returns its outcome with `stopped_by` set (exit code 128 + signal); stopped anywhere
    else, it is an Interrupted with next_step() (exit code 128 + signal, from `main`)."""
    with tune.stop_signals() as received:
        try:
            result = run()
        except KeyboardInterrupt as exc:
            signum = received[0] if received else getattr(exc, "signum", signal.SIGINT)
            raise Interrupted(next_step(), signum=signum) from None
    if received and hasattr(result, "stopped_by"):
        result.stopped_by = received[0]
    return result


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.resume and args.spec:
        raise UserError("give either a SPEC file or --resume NAME, not both")
    if not args.resume and not args.spec:
        raise UserError("sweep needs a SPEC file (see search_spaces/) or --resume NAME")
    at_least_one(num_cpus=args.num_cpus, num_samples=args.num_samples)
    if args.resume:
        group = tune.read_group(args.resume, args.storage)
        if group is not None:
            return _run_arms(group[1], args)
        storage = f" --storage {args.storage}" if args.storage else ""
        outcome = stoppable(lambda: tune.resume_sweep(args.resume, storage=args.storage, address=args.address,
                                                      num_cpus=args.num_cpus, verbose=verbosity(args),
                                                      progress=interactive()),
                            lambda: f"continue with `richkd sweep --resume {args.resume}{storage}`")
        metric = tune.read_sweep_record(args.resume, args.storage).spec.tune.metric
        print(tune.describe_outcome(outcome, metric))
        return outcome.exit_code
    options = {"name": args.name, "tune.num_samples": args.num_samples, "tune.storage_path": args.storage,
               "mlflow.tracking_uri": args.tracking_uri}
    specs = tune.load_specs(args.spec, list(args.set) + [f"{k}={v}" for k, v in options.items() if v])
    if args.check:
        for spec in specs.values():
            warm = tune.load_warm_start(spec)
            if warm is not None:
                print(warm.describe())
            t = spec.tune
            print(f"spec {spec.name!r} is valid: {len(spec.params)} searched keys, {t.num_samples} samples, "
                  f"{t.search.algorithm} + {t.scheduler.type} (max_t={spec.max_t}), "
                  + (f"objectives {', '.join(f'{m} ({d})' for m, d in t.objective_pairs)} (ASHA uses {t.metric}), "
                     if t.multi_objective else "")
                  + f"{len(spec.cache_probe_configs)} cache configuration(s); results -> {spec.experiment_path}")
        return 0
    return _run_arms(specs, args) if len(specs) > 1 else _run_one(next(iter(specs.values())), args)


def _run_arms(specs: dict, args: argparse.Namespace) -> int:
    name = tune.group_for(specs).name
    storage = f" --storage {args.storage}" if args.storage else ""
    outcomes = stoppable(lambda: tune.run_arms(specs, address=args.address, num_cpus=args.num_cpus,
                                               verbose=verbosity(args), progress=interactive()),
                         lambda: f"continue with `richkd sweep --resume {name}{storage}`")
    print(f"arms of {name}: {', '.join(specs)}; compare them with `richkd finalize {name}{storage}`")
    return max(o.exit_code for o in outcomes)


def _run_one(spec, args: argparse.Namespace) -> int:
    def next_step() -> str:
        if tune.sweep_record_exists(spec.experiment_path):
            return f"continue with `richkd sweep --resume {tune.sweep_ref(spec.name, spec.experiment_path)}`"
        return "no trial had started; run the same command again"

    outcome = stoppable(lambda: tune.run_sweep(spec, address=args.address, num_cpus=args.num_cpus,
                                               verbose=verbosity(args), progress=interactive()), next_step)
    print(tune.describe_outcome(outcome, spec.tune.metric))
    return outcome.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    pareto = None if args.pareto is None else [m for m in args.pareto.split(",") if m.strip()]
    result = tune.export_sweep(args.sweep, storage=args.storage, tracking_uri=args.tracking_uri, out_dir=args.out,
                               pareto=pareto)
    print(tune.describe_export(result, tune.read_sweep_record(args.sweep, args.storage).spec.tune.metric))
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    arms = tune.read_group(args.sweep, args.storage) is not None
    if arms and args.top not in (None, 1):
        raise UserError(f"finalize {args.sweep}: an arms comparison re-trains each arm's best (top 1); drop --top")
    at_least_one(top=args.top, seeds=args.seeds, num_cpus=args.num_cpus)
    common = dict(seeds=args.seeds, storage=args.storage, progress=interactive(), tracking_uri=args.tracking_uri,
                  overrides=args.set, holdout=args.holdout, address=args.address, num_cpus=args.num_cpus,
                  force=args.force)
    if arms:
        print(tune.describe_comparison(stoppable(
            lambda: tune.finalize_arms(args.sweep, **common),
            lambda: f"run `richkd finalize {args.sweep}` again with --force to start over")))
    else:
        print(tune.describe_finalize(stoppable(
            lambda: tune.finalize_sweep(args.sweep, top=args.top, out_dir=args.out, **common),
            lambda: "the finalists written so far are kept; run it again with --force to replace them, or with "
                    "--out DIR")))
    return 0


def ui_command(tracking_uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """`mlflow ui` on the sweep store, bound to localhost (the store has no authentication); one worker
    process is plenty for one person browsing and starts much faster than MLflow's default of four."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
            "--port", str(port), "--workers", "1"]


def resolve_ui_store(tracking_uri: Optional[str], storage: Optional[str]) -> str:
    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                               os.path.abspath(storage or DEFAULT_STORAGE))
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise SpecError(f"no MLflow store at {uri[len('sqlite:///'):]}; run a sweep first, or pass --tracking-uri "
                        "(or --storage for a non-default tune_runs folder)")
    return uri


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """A port the UI cannot listen on (in use, privileged, out of range) is one UserError, before the server
    starts: uvicorn's own failure comes after the URL was printed and exits 0."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: expected a port number from 1 to 65535 (default 5000)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn: a just-closed port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}; another "
                            f"`richkd ui` or MLflow server?); pick a free one, e.g. --port {port + 1}") from None


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the sweep's MLflow store, with a link per experiment that opens its runs table. The process
    *becomes* the MLflow server (exec), so Ctrl-C or a SIGTERM reaches the server itself and no orphan keeps the
    port. A tracking server (http/https) is already a UI: its address is printed instead."""
    uri = resolve_ui_store(args.tracking_uri, args.storage)
    if uri.startswith(("http://", "https://")):
        print(f"{uri} is an MLflow tracking server: open {uri} in a browser (`richkd ui` serves local stores such "
              "as sqlite:///.../mlflow.db)")
        return 0
    check_port(args.port)
    cmd = ui_command(uri, args.port)
    print(f"MLflow UI for {uri} at {local_ui(args.port)} (Ctrl-C to stop)")
    for name, link in experiment_links(uri, local_ui(args.port)):
        print(f"  {name}'s runs: {link}")
    sys.stdout.flush()
    # MLflow 3's server also starts GenAI job-runner processes this project never uses: off, so they neither
    # slow the start nor outlive the server
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    os.execve(cmd[0], cmd, env)


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "sweep", "run (or --resume) a hyperparameter sweep from a search-space YAML",
                    SWEEP_EPILOG, cmd_sweep)
    p.add_argument("spec", nargs="?", help="search-space YAML (see search_spaces/)")
    p.add_argument("--resume", metavar="NAME", help="continue an interrupted sweep (its name or folder)")
    p.add_argument("--name", help="sweep name (default: the spec's name:) = folder under the storage path")
    p.add_argument("--num-samples", type=int, help="override tune.num_samples")
    add_set_arg(p, "a spec key, e.g. --set tune.max_concurrent=2 --set config.train.epochs=5")
    add_ray_args(p, "trials and cache builds run as Ray work")
    p.add_argument("--check", action="store_true", help="validate the spec and exit (starts nothing)")
    add_quiet_arg(p)
    add_storage_args(p)

    p = add_command(subparsers, "export", "write best_config.yaml + leaderboard.csv of a sweep", EXPORT_EPILOG,
                    cmd_export)
    p.add_argument("sweep", help="sweep name (under --storage) or its folder")
    p.add_argument("--out", help="output folder (default: the sweep's folder)")
    p.add_argument("--pareto", nargs="?", const="", metavar="METRICS",
                   help="also write pareto_front.json + pareto/<trial>.yaml: the non-dominated trials of the sweep's "
                        "objectives (automatic for multi-objective sweeps) or of the comma-separated METRICS, "
                        "e.g. --pareto val_top1,val_corrupt_top1")
    add_storage_args(p)

    p = add_command(subparsers, "finalize", "re-train the top-K configs over seeds; report test accuracy",
                    FINALIZE_EPILOG, cmd_finalize)
    p.add_argument("sweep", help="sweep name (under --storage) or its folder")
    p.add_argument("--top", type=int, help="how many of the best configs (default: the spec's finalize.top)")
    p.add_argument("--seeds", type=int, help="seeds per config (default: the spec's finalize.seeds)")
    add_set_arg(p, "a config key of the final runs, e.g. --set train.epochs=240")
    p.add_argument("--out", help="output folder (default: the sweep's folder)")
    p.add_argument("--holdout", action="store_true",
                   help="keep the sweep's validation hold-out (default: train on the whole training split)")
    p.add_argument("--force", action="store_true",
                   help="replace the finalists of an earlier finalize in the output folder (default: refused)")
    add_ray_args(p, "the final trainings run as Ray tasks with the sweep's resources")
    add_storage_args(p)

    p = add_command(subparsers, "ui", "browse the sweeps' MLflow store (mlflow ui on 127.0.0.1)", UI_EPILOG, cmd_ui)
    p.add_argument("--port", type=int, default=UI_PORT, help=f"port on 127.0.0.1 to serve it on (default {UI_PORT})")
    add_storage_args(p)

