"""`richkd evaluate` (richkd.robustness.evaluate does the work)."""
from __future__ import annotations

import argparse

from richkd.cli.common import add_command, at_least_one

EVALUATE_EPILOG = """examples:
  richkd evaluate tune_runs/demo/kd/student.pt                          # all suites, validation split
  richkd evaluate student.pt --suite corruptions --corruptions gaussian_noise,contrast --severities 1..3
  richkd evaluate student.pt --suite corruptions --reference teacher_eval/robustness.json   # adds mCE
  richkd evaluate student.pt --suite shift --shift-config my_photos.yaml   # your imagefolder config
  richkd evaluate student.pt --split test --corruption-dir data/CIFAR-100-C                 # final report
  richkd evaluate student.pt --mlflow-uri sqlite:///tune_runs/mlflow.db --mlflow-experiment evals
"""


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "evaluate", "robustness, distribution-shift and calibration evaluation of a "
                    "trained student", EVALUATE_EPILOG, cmd_evaluate)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a student.pt written by `richkd train`")
    p.add_argument("--suite", default="robustness",
                   choices=("robustness", "clean", "corruptions", "shift", "calibration"),
                   help="what to evaluate (default robustness: clean + corruptions + calibration [+ shift])")
    p.add_argument("--config", "-c", help="the run config the model was trained with (default: config.yaml "
                   "or result.json next to CHECKPOINT)")
    p.add_argument("--shift-config", metavar="CFG", help="a config whose data section is another dataset with the "
                   "same class names (distribution shift, e.g. an imagefolder)")
    p.add_argument("--reference", metavar="REF.json", help="robustness.json of an earlier run: report CE, mCE and "
                   "relative mCE against it")
    p.add_argument("--corruptions", metavar="A,B", help="comma-separated corruption names, or all (default)")
    p.add_argument("--severities", metavar="1..5", help="severities, e.g. 1..5 (default), 2-4 or 1,3,5")
    p.add_argument("--corruption-dir", metavar="DIR", help="a CIFAR-10-C/100-C folder (<corruption>.npy + "
                   "labels.npy) to evaluate instead of on-the-fly corruptions (needs --split test)")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val (default; model selection) or test (final reporting only)")
    p.add_argument("--max-samples", type=int, metavar="N", help="evaluate a seeded, class-stratified subset")
    p.add_argument("--seed", type=int, default=0, help="corruption noise and subset seed (default 0)")
    p.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default data.eval_batch_size)")
    p.add_argument("--out", "-o", metavar="DIR", help="where robustness.json and reliability.png go (default: "
                   "<checkpoint folder>/robustness-<split>/)")
    p.add_argument("--mlflow-uri", metavar="URI", help="log metrics and files to this MLflow tracking server or "
                   "sqlite:///PATH database (default: no logging)")
    p.add_argument("--mlflow-experiment", default="richkd-evaluate", metavar="NAME",
                   help="MLflow experiment (default richkd-evaluate)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from richkd.robustness.evaluate import evaluate_checkpoint
    from richkd.robustness.report import format_table

    at_least_one(max_samples=args.max_samples, batch_size=args.batch_size)
    report, written = evaluate_checkpoint(args)
    print(format_table(report))
    for path in written:
        print(f"wrote {path}")
    if report.get("mlflow_run_id"):
        print(f"MLflow run {report['mlflow_run_id']} ({args.mlflow_uri}, experiment {args.mlflow_experiment!r})")
    return 0
