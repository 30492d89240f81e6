"""ImageNet-family models: torchvision's definitions wrapped to return ModelOutput, strict loading of torchvision
state_dicts (what mdistiller's ImageNet teachers are) and mdistiller's MobileNetV1 layout (`richkd models` lists
both families: tests/test_cli_commands.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from richkd.models import MODELS, CheckpointError, ModelOutput, create_model, family_of, load_teacher

IMAGENET = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v2": 1280, "MobileNetV1": 1024}
TORCHVISION = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
               "resnet50": torchvision.models.resnet50, "mobilenet_v2": torchvision.models.mobilenet_v2}


def test_the_imagenet_family_is_registered_with_224_px_inputs():
    assert {n for n in MODELS.names() if family_of(n)[0] == "imagenet"} == set(IMAGENET)
    assert all(family_of(n) == ("imagenet", 224) for n in IMAGENET)
    assert family_of("resnet8x4") == ("cifar", 32) and family_of("ResNet18") == ("cifar", 32)


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_forward_contract_at_224(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    out = model(torch.randn(1, 3, 224, 224))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (1, 7) and model.feat_dim == IMAGENET[name] and out.feat.shape == (1, IMAGENET[name])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == IMAGENET[name]
    torch.testing.assert_close(linears[0](out.feat), out.logits)   # feat is exactly the classifier's input


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_state_dict_loads_strictly_and_gives_torchvision_logits(tmp_path, name):
    torch.manual_seed(1)
    reference = TORCHVISION[name](num_classes=1000).eval()
    with torch.no_grad():   # non-trivial BN statistics, so a mis-mapped buffer would change the output
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)          # torchvision's hub files are bare state_dicts
    model, sha = load_teacher(name, path, num_classes=1000)
    assert len(sha) == 64 and not model.training
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x))
    assert list(model.state_dict()) == list(reference.state_dict())


def test_a_checkpoint_of_another_depth_is_one_readable_error(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"(?s)does not fit model .resnet34.*missing keys \(80\)"):
        load_teacher("resnet34", path, num_classes=10)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(10, 512\) vs model \(1000, 512\)"):
        load_teacher("resnet18", path, num_classes=1000)


def test_mobilenetv1_has_mdistillers_layout_and_pooling():
    model = create_model("MobileNetV1", num_classes=1000).eval()
    sd = model.state_dict()
    # mdistiller: model.0 = conv_bn(3, 32, 2); model.1..13 = conv_dw (dw conv .0, bn .1, pw conv .3, bn .4); fc
    assert sd["model.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["model.1.0.weight"].shape == (32, 1, 3, 3) and sd["model.1.3.weight"].shape == (64, 32, 1, 1)
    assert sd["model.13.3.weight"].shape == (1024, 1024, 1, 1) and sd["fc.weight"].shape == (1000, 1024)
    assert sum(k.endswith(".weight") and v.dim() == 4 for k, v in sd.items()) == 27   # 1 + 13 * 2 convolutions
    assert sum(p.numel() for p in model.parameters()) == 4_231_976
    # at 224 px the global pool equals mdistiller's nn.AvgPool2d(7) over the last 7x7 map
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = model.model[:-1](x)
        assert maps.shape[-2:] == (7, 7)
        expected = model.fc(nn.AvgPool2d(7)(maps).reshape(-1, 1024))
        torch.testing.assert_close(model(x).logits, expected)
