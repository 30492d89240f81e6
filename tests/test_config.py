"""Typed config: unknown keys, ranges, overrides, flattening, YAML round trip."""
import pytest
import yaml

from richkd.config import Config, ConfigError, dotted_keys
from richkd.schema import flatten, parse_override


def test_defaults_are_the_official_richkd_recipe():
    cfg = Config()
    assert (cfg.loss.fusion_alpha, cfg.loss.temperature, cfg.loss.logit_weight, cfg.loss.feat_weight,
            cfg.loss.ce_weight) == (0.7, 3.0, 3.0, 0.8, 1.0)
    assert cfg.optim.milestones == (150, 180, 210) and cfg.train.epochs == 240
    assert cfg.loss.resolved_feat_lambda == 0.7  # tied to alpha, like the official code
    assert cfg.clip.clean_class_names is False   # "aquarium_fish", as the official code's prompts
    assert (cfg.loss.kd_form, cfg.loss.logit_stand, cfg.loss.nce_sampling) == ("kl", False, "other_class")
    # mdistiller's DKD settings for CIFAR-100, used when kd_form is dkd
    assert (cfg.loss.dkd_alpha, cfg.loss.dkd_beta, cfg.loss.dkd_warmup_epochs) == (1.0, 8.0, 20)


def test_fidelity_keys_are_searchable_and_checked():
    keys = set(dotted_keys())
    assert {"loss.kd_form", "loss.dkd_alpha", "loss.dkd_beta", "loss.dkd_warmup_epochs", "loss.logit_stand",
            "loss.nce_sampling", "teaching.mode"} <= keys
    assert Config().with_overrides({"teaching.mode": "official"}).teaching.mode == "official"
    with pytest.raises(ConfigError, match=r"teaching.views: cached views need teaching.mode=cached \(official"):
        Config().with_overrides({"teaching.mode": "official", "teaching.views": 4})
    assert Config().with_overrides({"data.val_fraction": 0}).data.val_fraction == 0
    with pytest.raises(ConfigError, match="robustness.enabled: robustness metrics are measured on the validation"):
        Config().with_overrides({"data.val_fraction": 0, "robustness.enabled": True})


def test_unknown_top_level_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'lose'.*did you mean 'loss'"):
        Config.from_dict({"lose": {}})


def test_unknown_nested_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"'loss.fusion_alpa'.*did you mean 'loss.fusion_alpha'"):
        Config.from_dict({"loss": {"fusion_alpa": 0.5}})


@pytest.mark.parametrize("override, message", [
    ({"loss.fusion_alpha": 1.5}, r"loss.fusion_alpha: 1.5 is out of range"),
    ({"loss.temperature": 0}, r"loss.temperature: 0.0 is out of range"),
    ({"optim.lr": -1}, r"optim.lr"),
    ({"data.dataset": "cifar1000"}, r"did you mean 'cifar100'"),
    ({"optim.milestones": [180, 150]}, r"increasing"),
    ({"train.epochs": 2.5}, r"expected an integer"),
    ({"data.download": "yes"}, r"expected true or false"),
    ({"loss.logit_weight": 0, "loss.feat_weight": 0}, r"richkd needs"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        Config().with_overrides(override)


def test_with_overrides_is_validated_and_immutable():
    cfg = Config.from_dict({"loss": {"method": "supervised"}})
    new = cfg.with_overrides({"optim.lr": 0.01, "data.dataset": "cifar100"})
    assert new.optim.lr == 0.01 and new.data.dataset == "cifar100"
    assert cfg.optim.lr == 0.05
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        cfg.with_overrides({"optim.lrr": 0.1})
    with pytest.raises(ConfigError, match="unknown config key 'optm'"):
        cfg.with_overrides({"optm.lr": 0.1})
    with pytest.raises(ConfigError, match="seed.x: seed is a value, not a section"):
        cfg.with_overrides({"seed.x": 1})
    with pytest.raises(ConfigError, match="loss: is a section; set its keys"):   # not: the other keys reset
        cfg.with_overrides({"loss": {"temperature": 4.0}})


def test_flat_dict_round_trip_and_yaml(tmp_path):
    cfg = Config.from_dict({"loss": {"method": "supervised"}, "optim": {"milestones": [3, 4]}})
    flat = cfg.to_flat_dict()
    assert flat["optim.milestones"] == [3, 4] and flat["loss.method"] == "supervised"
    assert Config().with_overrides(flat) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert Config.from_yaml(path) == cfg
    assert set(flat) == set(dotted_keys())
    assert flatten({"a": {"b": 1}}) == {"a.b": 1}


def test_yaml_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_yaml(listy)


def test_parse_override_uses_yaml_scalars():
    assert parse_override("optim.lr=0.01") == ("optim.lr", 0.01)
    assert parse_override("data.download=true") == ("data.download", True)
    assert parse_override("teacher.checkpoint=null") == ("teacher.checkpoint", None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_uses_clip_only_when_fusion_needs_it():
    t = {"arch": "resnet8", "checkpoint": "t.pt"}
    assert Config.from_dict({"teacher": t}).uses_clip
    assert not Config.from_dict({"teacher": t, "loss": {"method": "kd"}}).uses_clip
    assert not Config.from_dict({"teacher": t, "loss": {"fusion_alpha": 1.0, "feat_weight": 0}}).uses_clip
    assert not Config.from_dict({"teacher": t, "loss": {"zero_clip_logits": True, "feat_weight": 0}}).uses_clip
    assert Config.from_dict({"teacher": t, "loss": {"logit_weight": 0, "feat_lambda": 0.5}}).uses_clip
