"""README.md reads true: its search-space examples validate as printed, and the config and spec keys it names exist."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from richkd.config import dotted_keys

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def yaml_blocks() -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", README, re.DOTALL)]


def test_the_search_space_example_is_a_valid_spec_as_printed(monkeypatch):
    """The example under "Writing a search space", loaded from the repository root as `richkd sweep` would (file
    and dataset checks off: CIFAR-100, the teacher and CLIP ViT-L-14 weights are not on a test machine)."""
    from richkd.tune.spec import spec_from_mapping

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    example = next(b for b in yaml_blocks() if "space" in b)
    spec = spec_from_mapping(example, base_dir=REPO, check_resources=False, check_data=False)
    assert spec.name == "cifar100_fusion" and spec.max_t == 240
    assert spec.space_keys == ["loss.fusion_alpha", "loss.clip_logit_scale", "clip.prompt_set", "loss.feat_weight",
                               "loss.feat_lambda"]
    assert len(spec.points) == 2 and spec.tune.num_samples == 32
    assert (spec.tune.cpu, spec.tune.gpu, spec.tune.scheduler.grace_period) == (4, 0.25, 5)

    # the multi-objective `tune:` under "Tuning for robustness" fits the same spec
    robust = next(b for b in yaml_blocks() if "space" not in b and isinstance(b.get("tune", {}).get("metric"), list))
    multi = spec_from_mapping({**example, "tune": {**example["tune"], **robust["tune"]}}, base_dir=REPO,
                              check_resources=False, check_data=False)
    assert multi.tune.objective_pairs == (("val_top1", "max"), ("val_corrupt_top1", "max"), ("val_ece", "min"))
    assert multi.base_config.robustness.enabled


def test_config_and_spec_keys_named_in_the_readme_exist():
    from richkd.tune.settings import TuneSettings

    config_keys = set(dotted_keys())
    tune_keys = {f"tune.{f.name}" for f in dataclasses.fields(TuneSettings)}
    spans = re.findall(r"`([^`\n]+)`", README)                  # inline code, e.g. `--set loss.fusion_alpha=0.8`
    named = {key for span in spans for key in re.findall(
        r"(?<![\w./-])((?:data|student|teacher|clip|loss|teaching|optim|train|robustness|tune)\.[a-z_]+)\b(?!/)", span)}
    assert {"loss.fusion_alpha", "train.eval_every", "tune.metric"} <= named     # the scan sees them
    unknown = sorted(k for k in named if k not in config_keys | tune_keys)
    assert unknown == [], f"README.md names keys that do not exist: {unknown}"


def test_the_layout_lists_every_module():
    layout = README.split("## Layout")[1].split("```")[1]
    package = REPO / "richkd"
    for entry in sorted(package.iterdir()):
        if entry.name.startswith(("_", ".")) and entry.name != "__main__.py" or entry.suffix not in ("", ".py"):
            continue
        if entry.is_dir() and not (entry / "__init__.py").is_file():
            continue
        shown = f"richkd/{entry.name}/" if entry.is_dir() else entry.name
        assert shown in layout, f"README.md's Layout does not list {shown}"
    tune_line = layout.split("richkd/tune/")[1].split("richkd/report/")[0]
    for module in sorted((package / "tune").glob("*.py")):
        if module.stem != "__init__":
            assert re.search(rf"\b{module.stem}\b", tune_line), f"Layout: richkd/tune/{module.name} missing"
