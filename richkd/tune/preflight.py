"""Whole-space checks run by the spec loader before Ray starts: every space value, range end and point builds a valid
config, and (when asked) every model, prompt set, file and dataset a trial can need exists. One SpecError each.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from richkd.clip import load_prompt_set
from richkd.config import Config, ConfigError, flatten
from richkd.data import build_data
from richkd.models import MODELS
from richkd.tune.errors import SpecError
from richkd.tune.params import Param, TrialPlan, config_or_error, from_sample, walk_active
from richkd.validate import check_data_fit, check_resources as check_config_resources

def check_space_values(base: Config, plan: TrialPlan, points: Sequence[dict]) -> None:
    """Every value and range end must be a valid value of its key, and every point a valid config (seeded draws
    are checked when SweepSpec.cache_probe_configs builds them)."""
    for p in plan.params:
        for value in p.corners():
            overrides = p.overrides_for(value)
            try:
                base.with_overrides(overrides)
            except ConfigError as exc:
                # about the key itself, not a cross-field rule such as "richkd needs w_L or w_F"
                if any(str(exc).startswith(f"{k}:") or f"{k!r}" in str(exc) for k in overrides):
                    label = f"variant {value!r}" if p.is_variant else repr(value)
                    raise SpecError(f"space.{p.key}: {label} is not a valid value: {exc}") from None
        if p.key == "clip.prompt_set":
            for value in p.values:
                try:
                    load_prompt_set(value)
                except ValueError as exc:
                    raise SpecError(f"space.clip.prompt_set: {exc}") from None
    for i, point in enumerate(points):
        active = {p.key for p, _ in walk_active(plan.params, flatten(plan.base), from_sample(point))}
        for p in plan.params:
            if p.key in point and p.key not in active:
                raise SpecError(f"points_to_evaluate[{i}].{p.key}: this entry is inactive for the point because "
                                f"its `when:` ({', '.join(c.describe() for c in p.when)}) does not hold; drop it "
                                "from the point")
        config_or_error(plan, point, f"points_to_evaluate[{i}]")


def check_inputs(base: Config, params: Sequence[Param], probes: Sequence[Config], *, check_resources: bool = True,
                 check_data: bool = True) -> None:
    """On the spec's cache probe configs (after check_space_values): unknown models / prompt sets and missing files;
    each distinct dataset built once (memoised in richkd.data); the data-size rules (richkd.validate.check_data_fit)
    with the largest loss.nce_k the space can produce, else every trial that draws it fails after the caches."""
    if check_resources:
        seen = set()
        for cfg in probes:
            key = (json.dumps({k: v for k, v in cfg.to_flat_dict().items() if k.startswith(
                ("student.", "teacher.", "clip.", "data."))}, sort_keys=True, default=str),
                   cfg.loss.method, cfg.uses_clip)
            if key in seen:
                continue
            seen.add(key)
            try:
                check_config_resources(cfg)
            except ConfigError as exc:
                raise SpecError(f"config: {exc}") from None
            root = cfg.data.root
            if root and not cfg.data.download and not Path(root).exists():
                raise SpecError(f"config.data.root: folder {root!r} does not exist (set data.root to the dataset "
                                "folder or data.download: true)")
        for p in params:   # archs in the space that no probe drew
            for k, v in p.corner_overrides():
                if k in ("student.arch", "teacher.arch") and v is not None:
                    try:
                        MODELS.get(v)
                    except KeyError as exc:
                        raise SpecError(f"space.{p.key}: {exc.args[0]}") from None
    if not check_data:
        return
    for cfg in _one_per_dataset(probes):
        try:
            build_data(cfg.data)
        except (ValueError, FileNotFoundError) as exc:
            raise SpecError(f"config.data: {exc}") from None
    largest = max([base.loss.nce_k] + [v for p in params for k, v in p.corner_overrides()
                                       if k == "loss.nce_k" and v is not None])
    for cfg in _one_per_dataset([c for c in probes if c.loss.uses_crd]):
        try:
            check_data_fit(cfg.with_overrides({"loss.nce_k": largest}))
        except ConfigError as exc:
            raise SpecError(f"{'space.loss.nce_k' if largest != base.loss.nce_k else 'config'}: {exc}") from None


def _one_per_dataset(configs: Sequence[Config]) -> list[Config]:
    return list({json.dumps(dataclasses.asdict(c.data), sort_keys=True, default=str): c for c in configs}.values())

