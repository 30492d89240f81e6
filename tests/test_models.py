"""Tests for the CIFAR model zoo: output contract, gradients, checkpoint names, strict loading and saving."""
from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.nn as nn

from richkd.models import (MODELS, CheckpointError, ModelOutput, create_model, family_of, load_teacher,
                           save_model_checkpoint)

ALL_MODELS = [n for n in MODELS.names() if family_of(n)[0] == "cifar"]  # ImageNet family: test_imagenet_models

# pooled penultimate widths, from the official model code (docs/method.md#the-official-code) and mdistiller's
# model files
EXPECTED_FEAT_DIM = {
    "resnet8": 64, "resnet14": 64, "resnet20": 64, "resnet32": 64, "resnet44": 64, "resnet56": 64, "resnet110": 64,
    "resnet8x4": 256, "resnet32x4": 256,
    "wrn_16_1": 64, "wrn_16_2": 128, "wrn_40_1": 64, "wrn_40_2": 128,
    "vgg8": 512, "vgg11": 512, "vgg13": 512, "vgg16": 512, "vgg19": 512,
    "ResNet18": 512, "ResNet34": 512, "ResNet50": 2048,
    "MobileNetV2": 1280, "ShuffleV1": 960, "ShuffleV2": 1024,
}


def test_registry_holds_exactly_the_zoo():
    assert set(ALL_MODELS) == set(EXPECTED_FEAT_DIM)


def _final_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1, "every zoo model has exactly one linear layer: the classifier"
    return linears[0]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_contract_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 7)
    assert model.feat_dim == EXPECTED_FEAT_DIM[name]
    assert out.feat.shape == (2, model.feat_dim)
    # feat is exactly the input of the final linear layer
    fc = _final_linear(model)
    assert fc.in_features == model.feat_dim and fc.out_features == 7
    torch.testing.assert_close(fc(out.feat), out.logits)

    nn.functional.cross_entropy(out.logits, torch.tensor([1, 5])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_other_square_input_size(name):
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 3) and out.feat.shape == (1, model.feat_dim)


def test_resnet8_parameter_count_by_hand():
    # resnet8 (n=1, widths 16/16/32/64), 100 classes, counted from mdistiller/models/cifar/resnet.py:
    # stem conv 3*16*9=432, bn 32
    # layer1: 2 convs 16*16*9 + 2 bns (32 each)                          = 4672
    # layer2: 16*32*9 + 32*32*9 + 2 bns(64) + 1x1 downsample 16*32 + bn 64 = 14528
    # layer3: 32*64*9 + 64*64*9 + 2 bns(128) + 32*64 + bn 128               = 57728
    # fc 64*100 + 100                                                       = 6500
    model = create_model("resnet8", 100)
    assert sum(p.numel() for p in model.parameters()) == 432 + 32 + 4672 + 14528 + 57728 + 6500


# Key names and shapes checked by reading the upstream model files at
# megvii-research/mdistiller@e8c5bb33 mdistiller/models/cifar/{resnet,wrn,vgg,resnetv2,mobilenetv2,
# ShuffleNetv1,ShuffleNetv2}.py (module attribute names and nn.Sequential indices), and the identical names in
# HobbitLong/RepDistiller models/{vgg,wrn,mobilenetv2}.py, which trained the public cifar_teachers checkpoints.
KNOWN_KEYS = {
    "resnet8x4": {
        "conv1.weight": (32, 3, 3, 3),
        "bn1.running_mean": (32,),
        "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.0.downsample.1.running_var": (256,),
        "layer3.0.bn2.num_batches_tracked": (),
        "fc.weight": (100, 256),
        "fc.bias": (100,),
    },
    "resnet32x4": {"layer1.4.conv2.weight": (64, 64, 3, 3), "layer3.4.bn2.weight": (256,), "fc.weight": (100, 256)},
    "resnet56": {"layer1.8.conv2.weight": (16, 16, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1)},
    "wrn_40_2": {
        "conv1.weight": (16, 3, 3, 3),
        "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.conv1.weight": (32, 16, 3, 3),
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block1.layer.5.conv2.weight": (32, 32, 3, 3),
        "block3.layer.0.convShortcut.weight": (128, 64, 1, 1),
        "bn1.running_var": (128,),
        "fc.weight": (100, 128),
    },
    "vgg13": {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.0.bias": (64,),
        "block0.1.running_mean": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.num_batches_tracked": (),
        "classifier.weight": (100, 512),
    },
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block4.1.weight": (512,), "classifier.weight": (100, 512)},
    "ResNet50": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.1.running_mean": (256,),
        "layer4.2.bn3.weight": (2048,),
        "linear.weight": (100, 2048),
    },
    "MobileNetV2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.running_mean": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
        "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.6.0.conv.7.weight": (160,),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "ShuffleV1": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),  # ungrouped after the 24-channel stem
        "layer1.0.conv3.weight": (216, 18, 1, 1),  # 240 - 24 concatenated channels, groups 3
        "layer2.0.conv1.weight": (60, 80, 1, 1),
        "layer3.3.bn3.weight": (960,),
        "linear.weight": (100, 960),
    },
    "ShuffleV2": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (24, 1, 3, 3),  # DownBlock first, depthwise
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer1.1.conv1.weight": (58, 58, 1, 1),
        "layer2.7.bn3.weight": (116,),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.weight": (1024,),
        "linear.weight": (100, 1024),
    },
}
ABSENT_KEYS = {
    "resnet8x4": ["layer1.1.downsample.0.weight", "layer1.0.relu.weight"],
    "wrn_40_2": ["block1.layer.1.convShortcut.weight"],
    "wrn_40_1": ["block1.layer.0.convShortcut.weight"],  # 16 -> 16 channels: identity shortcut
    "vgg8": ["block0.3.weight", "classifier.0.weight"],
    "ResNet50": ["layer1.1.shortcut.0.weight", "fc.weight"],
    "ShuffleV1": ["layer1.1.shortcut.0.weight"],
}


@pytest.mark.parametrize("name", sorted(KNOWN_KEYS))
def test_state_dict_names_match_upstream(name):
    sd = create_model(name, 100).state_dict()
    for key, shape in KNOWN_KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in sd, key


def test_create_model_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        create_model("resnet33", 10)
    msg = str(err.value)
    assert "resnet33" in msg and "resnet32x4" in msg and "ShuffleV2" in msg and "wrn_40_2" in msg


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_create_model_rejects_bad_num_classes(bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet8", bad)


def _trained_resnet8(num_classes: int = 10) -> nn.Module:
    """A resnet8 whose BN running stats and weights are not at their init values."""
    torch.manual_seed(1)
    model = create_model("resnet8", num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
        model.fc.bias.add_(0.5)
    return model.eval()


def test_save_load_round_trip_is_strict_frozen_and_identical(tmp_path, caplog):
    src = _trained_resnet8()
    path = tmp_path / "sub" / "ckpt_epoch_240.pth"
    save_model_checkpoint(src, path, epoch=240, best_acc=71.5)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "epoch", "best_acc"} and raw["epoch"] == 240
    assert [p.name for p in path.parent.iterdir()] == ["ckpt_epoch_240.pth"]  # no temp file left

    with caplog.at_level(logging.INFO, logger="richkd.models.checkpoint"):
        model, digest = load_teacher("resnet8", path, num_classes=10)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest in caplog.text
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = src(x), model(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.feat, b.feat, rtol=0, atol=0)


def test_load_accepts_raw_state_dict_state_dict_key_and_dataparallel_prefix(tmp_path):
    src = _trained_resnet8()
    sd = src.state_dict()
    variants = {
        "raw.pth": sd,
        "sd.pth": {"state_dict": sd, "epoch": 3},
        "dp.pth": {"model": {f"module.{k}": v for k, v in sd.items()}},
        # an mdistiller/RepDistiller training file also carries optimizer state and the accuracy
        "full.pth": {"model": sd, "epoch": 240, "best_acc": torch.tensor(71.2),
                     "optimizer": torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9).state_dict()},
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src(x).logits
    for fname, obj in variants.items():
        torch.save(obj, tmp_path / fname)
        model, _ = load_teacher("resnet8", tmp_path / fname, num_classes=10)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0, msg=fname)


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path):
    sd = {k: v for k, v in _trained_resnet8().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": sd}, tmp_path / "old.pth")
    model, _ = load_teacher("resnet8", tmp_path / "old.pth", num_classes=10)
    assert not model.training


def test_renamed_key_gives_one_error_naming_missing_and_unexpected(tmp_path):
    sd = dict(_trained_resnet8().state_dict())
    sd["layer2.0.conv_one.weight"] = sd.pop("layer2.0.conv1.weight")
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_teacher("resnet8", tmp_path / "bad.pth", num_classes=10)
    msg = str(err.value)
    assert "missing keys (1): layer2.0.conv1.weight" in msg
    assert "unexpected keys (1): layer2.0.conv_one.weight" in msg
    assert "mis-shaped" not in msg
    assert "arch" in msg and "num_classes" in msg


def test_wrong_num_classes_names_the_misshaped_keys(tmp_path):
    save_model_checkpoint(_trained_resnet8(num_classes=10), tmp_path / "c10.pth")
    with pytest.raises(CheckpointError) as err:
        load_teacher("resnet8", tmp_path / "c10.pth", num_classes=100)
    msg = str(err.value)
    assert "fc.weight: checkpoint (10, 64) vs model (100, 64)" in msg
    assert "fc.bias: checkpoint (10,) vs model (100,)" in msg
    assert "'resnet8'" in msg and "num_classes=100" in msg


def test_wrong_architecture_lists_are_truncated(tmp_path):
    save_model_checkpoint(_trained_resnet8(), tmp_path / "r8.pth")
    with pytest.raises(CheckpointError) as err:
        load_teacher("wrn_16_1", tmp_path / "r8.pth", num_classes=10)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "more)" in msg
    assert "block1.layer.0.bn1.weight" in msg  # first missing key is named
    assert len(msg) < 3000


def test_missing_file_and_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        load_teacher("resnet8", tmp_path / "nope.pth", num_classes=10)

    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_teacher("resnet8", tmp_path / "junk.pth", num_classes=10)

    torch.save({"epoch": 3}, tmp_path / "nosd.pth")
    with pytest.raises(CheckpointError, match="no state_dict found"):
        load_teacher("resnet8", tmp_path / "nosd.pth", num_classes=10)


class _NotAllowed:  # a pickled custom class must be refused by weights_only=True
    pass


def test_file_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"model": _trained_resnet8().state_dict(), "extra": _NotAllowed()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_teacher("resnet8", tmp_path / "obj.pth", num_classes=10)


def test_save_refuses_reserved_extra_key(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_model_checkpoint(_trained_resnet8(), tmp_path / "x.pth", model="oops")
