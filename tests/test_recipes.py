"""configs/: the official CIFAR-100 recipes, one per teacher -> student pair the official repository configures
for KD and DKD (docs/method.md#recipes). Each builds its models and loads a teacher checkpoint of the right
shapes strictly (a random state_dict generated from the teacher model itself, saved in mdistiller's format)."""
from pathlib import Path

import pytest
import torch

from richkd.config import Config
from richkd.models import create_model, load_teacher

REPO = Path(__file__).resolve().parents[1]
# teacher, student, mdistiller's DKD beta for the pair (its configs/cifar100/dkd/*.yaml; alpha 1, T 4 throughout)
PAIRS = [
    ("resnet56", "resnet20", 2.0), ("resnet110", "resnet32", 2.0), ("resnet32x4", "resnet8x4", 8.0),
    ("wrn_40_2", "wrn_16_2", 6.0), ("wrn_40_2", "wrn_40_1", 6.0), ("vgg13", "vgg8", 6.0),
    ("resnet32x4", "ShuffleV1", 8.0), ("resnet32x4", "ShuffleV2", 8.0), ("wrn_40_2", "ShuffleV1", 8.0),
    ("vgg13", "MobileNetV2", 6.0), ("ResNet50", "MobileNetV2", 8.0),
]


def test_every_recipe_is_listed():
    assert {p.name for p in (REPO / "configs").glob("cifar100_*_richkd.yaml")} == {
        f"cifar100_{t}_{s}_richkd.yaml" for t, s, _ in PAIRS}


@pytest.mark.parametrize("teacher, student, beta", PAIRS, ids=[f"{t}-{s}" for t, s, _ in PAIRS])
def test_recipe_builds_its_models_and_loads_a_teacher_strictly(teacher, student, beta, tmp_path):
    cfg = Config.from_yaml(REPO / "configs" / f"cifar100_{teacher}_{student}_richkd.yaml")
    assert (cfg.teacher.arch, cfg.student.arch, cfg.data.dataset) == (teacher, student, "cifar100")
    assert cfg.teacher.checkpoint == f"download_ckpts/cifar_teachers/{teacher}_vanilla/ckpt_epoch_240.pth"
    # the official recipe: lr 0.01 for the light students, 0.05 otherwise; 240 epochs, x0.1 at 150/180/210
    assert cfg.optim.lr == (0.01 if student in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
    assert (cfg.train.epochs, cfg.optim.milestones, cfg.data.batch_size) == (240, (150, 180, 210), 64)
    assert (cfg.loss.fusion_alpha, cfg.loss.temperature, cfg.loss.logit_weight, cfg.loss.feat_weight) == (
        0.7, 3.0, 3.0, 0.8)
    assert (cfg.loss.dkd_alpha, cfg.loss.dkd_beta, cfg.loss.dkd_warmup_epochs) == (1.0, beta, 20)
    assert cfg.teaching.mode == "official" and cfg.clip.clean_class_names is False

    model = create_model(teacher, 100)
    with torch.no_grad():   # a random checkpoint of exactly this model's keys and shapes
        state = {k: (torch.randn_like(v) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = tmp_path / teacher / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": state}, path)
    loaded, _ = load_teacher(teacher, path, 100)     # strict=True inside
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    net = create_model(student, 100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out_s, out_t = net(x), loaded(x)
    assert out_s.logits.shape == out_t.logits.shape == (2, 100)
    assert out_s.feat.shape == (2, net.feat_dim) and out_t.feat.shape == (2, loaded.feat_dim)
