"""`richkd train | cache | clip | models`: single runs and their inputs."""
from __future__ import annotations

import argparse
from pathlib import Path

from richkd.cli.common import (UserError, add_command, add_config_args, add_quiet_arg, at_least_one, interactive,
                               load_config)
from richkd.config import Config


def cmd_train(args: argparse.Namespace) -> int:
    from richkd.cache import prepare_caches
    from richkd.io import ensure_writable
    from richkd.trainer import NonFiniteLossError, Run, evaluates_at, load_train_state
    from richkd.validate import check_data_fit, check_resources

    if not args.config and not args.resume:
        raise UserError("train needs --config FILE (or --resume CKPT)")
    resume = load_train_state(args.resume) if args.resume else None
    # without --config, the checkpoint's own (full) config
    cfg = load_config(args.config, args.set, base=Config.from_dict(resume["config"]) if resume else None)
    # a resumed run continues in its own folder: last.pt and the outputs together
    out_dir = args.out or (Path(args.resume).parent if resume is not None else Path("tune_runs") / "runs" / cfg.name)
    out_dir = ensure_writable(out_dir, "the run's output folder (--out)", create=False)   # before training; ~ expanded
    if cfg.train.checkpoint_dir is None or resume is not None:
        cfg = cfg.with_overrides({"train.checkpoint_dir": str(out_dir)})
    check_resources(cfg)
    check_data_fit(cfg)    # e.g. loss.nce_k vs a small data.max_train_samples: before the caches are built
    # progress lines also without a terminal (CI, nohup, logs): a cache build is never silent
    prepare_caches(cfg, progress=not args.quiet, splits=("train", "test") if args.final else ("train",))
    run = Run(cfg, progress=interactive() and not args.quiet)
    if not run.has_val:
        print(f"data.val_fraction is {cfg.data.val_fraction:g}: training on the whole training split "
              f"({len(run.train_set)} rows); no validation metrics are reported"
              + ("" if args.final else " (add --final for the test split)"), flush=True)
    if resume is not None:
        run.load_state(resume)
        print(f"resumed from {args.resume} at epoch {run.epoch}")

    def on_epoch(report) -> None:
        m = report.metrics
        if not run.has_val:   # data.val_fraction 0: announced above, nothing to validate on
            val = ""
        elif evaluates_at(report.epoch, cfg.train):
            val = f"  val top-1 {m['val_top1']:.2f}%"
        else:
            val = f"  val: not evaluated (train.eval_every={cfg.train.eval_every})"
        print(f"epoch {m['epoch']:>3}/{cfg.train.epochs}  loss {m['train_loss']:.4f}{val}  "
              f"({m['epoch_time_s']:.1f}s)", flush=True)

    try:
        result = run.train(on_epoch=on_epoch, final=args.final)
    except NonFiniteLossError as exc:   # a diverged run is a config problem, not a crash; nothing NaN was saved
        raise UserError(f"{exc}; the last checkpoint in {cfg.train.checkpoint_dir} is from the last finite epoch "
                        "(none if it was epoch 1)") from None
    model_path = run.save_outputs(result, out_dir)
    m = result.metrics
    parts = [f"val top-1 {m['val_top1']:.2f}%" if "val_top1" in m else "no validation split"]
    if result.test_metrics:
        parts.append(f"test top-1 {result.test_metrics['test_top1']:.2f}% (last epoch)")
    print(f"done: {', '.join(parts)}; model {model_path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from richkd.models import MODELS, create_model, family_of

    at_least_one(num_classes=args.num_classes)
    for family in ("cifar", "imagenet"):
        names = [n for n in MODELS.names() if family_of(n)[0] == family]
        print(f"{family} family ({family_of(names[0])[1]} px inputs):")
        for name in names:
            model = create_model(name, args.num_classes)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"  {name:<14} input {family_of(name)[1]:>3} px  feat_dim {model.feat_dim:>5}  "
                  f"params {n_params / 1e6:6.2f}M")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from richkd.cache import describe, prepare_caches
    from richkd.validate import check_resources

    if args.list:
        cache_dir = args.cache_dir or load_config(args.config, args.set).teaching.cache_dir
        if not Path(cache_dir).is_dir():   # a mistyped folder must not look like an empty cache
            raise UserError(f"cache folder {str(cache_dir)!r} does not exist; pass the folder of an existing cache "
                            "(--cache-dir DIR, or --config FILE for its teaching.cache_dir)")
        rows = describe(cache_dir)
        for row in rows:
            print(f"{row['kind']:<11} {row['key']}  {row['mb']:>9.2f} MB  {row['created']}  {row['path']}")
        if not rows:
            print(f"no cache entries in {cache_dir} (build them with `richkd cache --config FILE`)")
        return 0
    if not args.config:
        raise UserError("cache needs --config (or --list)")
    at_least_one(images=args.images, classes=args.classes)
    cfg = load_config(args.config, args.set)
    check_resources(cfg)
    if args.plan:
        if cfg.data.dataset != "imagenet" or cfg.teaching.mode != "cached":
            raise UserError("cache --plan estimates the sharded multi-view caches of data.dataset: imagenet with "
                            "teaching.mode: cached")
        from richkd.cache.entries import default_shard_rows
        from richkd.cache.estimate import estimate_caches, format_estimate

        plan = estimate_caches(cfg, images=args.images, num_classes=args.classes, calibrate=not args.no_timing)
        print(format_estimate(plan, cfg, default_shard_rows()))
        return 0
    for path in prepare_caches(cfg, progress=True):
        print(path)
    return 0


def cmd_clip_init_tiny(args: argparse.Namespace) -> int:
    from richkd.clip import TINY_CLIP_MODEL, init_tiny_clip
    from richkd.io import ensure_writable

    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"{path} exists; keeping it (use --force to overwrite)")
        return 0
    ensure_writable(path.parent, "the folder of PATH", create=False)
    init_tiny_clip(path, seed=args.seed)
    print(f"wrote a tiny random-weight CLIP to {path}; use it with clip.model={TINY_CLIP_MODEL} "
          f"clip.pretrained={path}")
    return 0


def cmd_clip_prompts(args: argparse.Namespace) -> int:
    from richkd.clip import PROMPT_SETS, load_prompt_set

    for name in PROMPT_SETS:
        ps = load_prompt_set(name)
        print(f"{name:<18} {len(ps.templates):>3} templates  e.g. {ps.templates[0]!r}")
    return 0


def cmd_clip_zeroshot(args: argparse.Namespace) -> int:
    from richkd.clip import load_clip, load_prompt_set, zero_shot_accuracy
    from richkd.data import build_data, make_loader
    from richkd.device import resolve_device

    cfg = load_config(args.config, args.set)
    device = resolve_device(cfg.device)
    data = build_data(cfg.data)
    clip = load_clip(cfg.clip.model, cfg.clip.pretrained, device=device)
    prompts = load_prompt_set(cfg.clip.prompt_set)
    classifier = clip.encode_text_classifier(data.class_names, prompts.templates, clean=cfg.clip.clean_class_names)
    dataset = data.val if args.split == "val" else data.test
    loader = make_loader(dataset, cfg.clip.batch_size, shuffle=False, seed=0)
    acc = 100.0 * zero_shot_accuracy(clip, loader, classifier)   # CLIP encodes without gradients
    print(f"CLIP {cfg.clip.model} ({cfg.clip.pretrained}) zero-shot top-1 on {cfg.data.dataset}/{args.split} "
          f"with prompt set {prompts.name!r} ({len(prompts.templates)} templates): {acc:.2f}%")
    return 0


TRAIN_EPILOG = """examples:
  richkd train --config tune_runs/demo/configs/kd.yaml --set train.epochs=2      # after `richkd demo`
  richkd train --config tune_runs/demo/configs/richkd.yaml --set loss.fusion_alpha=0.8 --out /tmp/r08
  richkd train --config configs/cifar100_resnet32x4_resnet8x4_richkd.yaml        # the CIFAR-100 recipe
  richkd train --config tune_runs/smoke/best_config.yaml                         # a sweep's best trial
  richkd train --resume tune_runs/runs/demo_kd/last.pt --set train.epochs=6       # continue a run
  richkd train --config tune_runs/demo/configs/kd.yaml --final                   # + test split at the end

Writes last.pt (every epoch), student.pt, config.yaml and result.json into --out. The test split is read
only with --final (final reporting; never use it to pick a model).
"""

MODELS_EPILOG = """examples:
  richkd models                      # CIFAR-100 heads (100 classes)
  richkd models --num-classes 10     # parameter counts for a 10-class dataset
"""

CACHE_EPILOG = """examples:
  richkd cache --config tune_runs/demo/configs/richkd.yaml      # teacher + CLIP caches of the demo's student
  richkd cache --config configs/cifar100_resnet32x4_resnet8x4_richkd.yaml --set teaching.views=4
  richkd cache --list --config tune_runs/demo/configs/richkd.yaml   # entries in that config's cache folder
  richkd cache --list --cache-dir tune_runs/demo/cache
  richkd cache --config configs/imagenet_resnet34_resnet18_richkd.yaml --plan --images 1281167   # size, time

Caches are keyed by content (teacher file hash, CLIP weights, data rows, views); `richkd train` and
`richkd sweep` build missing ones themselves, this command builds them ahead of time.
"""

INIT_TINY_EXAMPLES = """\
  richkd clip init-tiny /tmp/tiny_clip.pt    # offline random-weight CLIP (clip.model=richkd-tiny)
  richkd clip init-tiny /tmp/tiny_clip.pt --seed 1 --force
  richkd train --config tune_runs/demo/configs/richkd.yaml --set clip.pretrained=/tmp/tiny_clip.pt
"""
PROMPTS_EXAMPLE = "  richkd clip prompts      # each set (clip.prompt_set): its number of templates and the first one\n"
ZEROSHOT_EXAMPLES = """\
  richkd clip zeroshot --config tune_runs/demo/configs/richkd.yaml --set clip.prompt_set=richkd12
  richkd clip zeroshot --config configs/cifar100_resnet32x4_resnet8x4_richkd.yaml --split test   # final only
"""


def add_commands(subparsers) -> None:
    p = add_command(subparsers, "train", "train one run (supervised teacher, KD or RichKD student)", TRAIN_EPILOG,
                    cmd_train)
    add_config_args(p, required=False)
    p.add_argument("--out", help="output folder (default tune_runs/runs/<name>; with --resume, the checkpoint's "
                   "folder)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a last.pt written by an earlier run (its config "
                   "is used unless --config is given)")
    p.add_argument("--final", action="store_true", help="also evaluate on the test split at the end")
    add_quiet_arg(p, "no progress bars")

    p = add_command(subparsers, "models", "list the model zoo (CIFAR and ImageNet families) with input size and "
                    "feature dimensions", MODELS_EPILOG, cmd_models)
    p.add_argument("--num-classes", type=int, default=100, metavar="N",
                   help="classes of the classifier head, for the parameter counts (default 100)")

    p = add_command(subparsers, "cache", "build (or --list) the teacher and CLIP output caches for a config",
                    CACHE_EPILOG, cmd_cache)
    add_config_args(p, required=False)
    p.add_argument("--list", action="store_true", help="list cache entries instead of building")
    p.add_argument("--cache-dir", metavar="DIR", help="with --list: the cache folder (default: the config's "
                   "teaching.cache_dir)")
    p.add_argument("--plan", action="store_true", help="print the size and build time of the multi-view caches "
                   "(data.dataset: imagenet) instead of building them")
    p.add_argument("--images", type=int, help="with --plan: plan for this many images (e.g. 1281167, all of "
                   "ImageNet-1k) instead of the rows the config reads")
    p.add_argument("--classes", type=int, help="with --plan: plan for this many classes (e.g. 1000)")
    p.add_argument("--no-timing", action="store_true", help="with --plan: sizes only, skip the timing runs")

    clip = add_command(subparsers, "clip", "CLIP utilities: init-tiny, prompts, zeroshot",
                       "examples:\n" + INIT_TINY_EXAMPLES + PROMPTS_EXAMPLE + ZEROSHOT_EXAMPLES)
    clip_sub = clip.add_subparsers(dest="clip_command", required=True, metavar="SUBCOMMAND")
    p = add_command(clip_sub, "init-tiny", "write a tiny random-weight open_clip model for offline use",
                    "examples:\n" + INIT_TINY_EXAMPLES, cmd_clip_init_tiny)
    p.add_argument("path", metavar="PATH", help="the weights file to write (e.g. tune_runs/tiny_clip.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite PATH if it exists (default: keep it)")
    add_command(clip_sub, "prompts", "list the built-in prompt sets", "example:\n" + PROMPTS_EXAMPLE,
                cmd_clip_prompts)
    p = add_command(clip_sub, "zeroshot", "CLIP zero-shot accuracy of a prompt set on a dataset split",
                    "examples:\n" + ZEROSHOT_EXAMPLES, cmd_clip_zeroshot)
    add_config_args(p)
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="val (default) or test (final reporting only)")
