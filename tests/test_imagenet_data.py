"""`data.dataset: imagenet` on tiny real ImageNet-layout folders (Fashion-MNIST photos upscaled to ~224 px, JPEG):
layout, class names, the standard crops, both decoders, per-class subsets and bad input."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from richkd.config import Config, ConfigError
from richkd.data import build_data, make_loader
from richkd.data.imagenet import ImageNetLayoutError, imagenet_wnids
from richkd.data.photos import BadImageError, decode_image, eval_crop, rrc_box
from tests.data_fixtures import FMNIST_WNIDS, write_imagenet_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet") / "imagenet"
    info = write_imagenet_tree(root, train_per_class=6, val_per_class=2, num_classes=4)
    return root, info


def cfg_for(root, **data) -> Config:
    return Config.from_dict({"data": {"dataset": "imagenet", "root": str(root), "image_size": 224,
                                      "val_fraction": 0.25, **data}})


@pytest.fixture(autouse=True)
def private_index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RICHKD_DECODED_CACHE", str(tmp_path / "decoded"))


def test_layout_labels_and_open_clip_class_names(tree):
    root, info = tree
    data = build_data(cfg_for(root).data)
    assert info["classes"] == sorted(FMNIST_WNIDS[:4])
    # labels index the sorted wnid folders; names are open_clip's ImageNet names of those wnids
    assert data.class_names == ["gown", "jeans", "T-shirt", "sweatshirt"]
    assert data.num_classes == 4 and len(data.train_clean) == 24 and len(data.test) == 8
    assert len(data.train) == 18 and len(data.val) == 6        # seeded 25 % hold-out of train/
    src = data.train_clean.source
    for row in range(len(src)):
        folder = Path(src.path(row)).parent.name
        assert info["classes"][int(src.targets[row])] == folder
    assert all("/val/" in data.test.source.path(r) for r in range(len(data.test.source)))


def test_the_shipped_wnid_list_is_timms_imagenet_1k_list():
    timm_dir = Path(importlib.util.find_spec("timm").origin).parent
    assert list(imagenet_wnids()) == (timm_dir / "data" / "_info" / "imagenet_synsets.txt").read_text().split()


def test_training_crops_are_seeded_random_resized_crops_and_eval_is_resize_256_centre_224(tree):
    root, _ = tree
    data = build_data(cfg_for(root).data)
    a = next(iter(make_loader(data.train, 6, shuffle=True, seed=3)))
    b = next(iter(make_loader(data.train, 6, shuffle=True, seed=3)))
    c = next(iter(make_loader(data.train, 6, shuffle=True, seed=4)))
    assert a.image.shape == (6, 3, 224, 224) and torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    # the box of a random crop is torchvision's RandomResizedCrop.get_params under the per-image seed
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(12345)
    expected = RandomResizedCrop.get_params(torch.zeros(1, 264, 224), [0.08, 1.0], [3 / 4, 4 / 3])
    assert rrc_box(264, 224, 12345)[:4] == tuple(expected)
    # evaluation: exactly torchvision's Resize(256) + CenterCrop(224) on the decoded photo
    from torchvision import transforms as T

    batch = next(iter(make_loader(data.test, 8, shuffle=False, seed=0)))
    assert batch.image.dtype == torch.uint8       # workers send uint8; Batch.to makes float in [0, 1] on the device
    assert torch.equal(batch.to("cpu").image, batch.image.float() / 255)
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    for k in range(8):
        image = decode_image(data.test.source.path(int(batch.index[k])))
        assert torch.equal(batch.image[k], reference(image))


def test_pil_and_torchvision_decoders_agree_and_are_part_of_the_identity(tree):
    root, _ = tree
    path = build_data(cfg_for(root).data).train_clean.source.path(1)
    pil = decode_image(path, "pil")
    tv = decode_image(path, "torchvision")
    assert tv.dtype == torch.uint8 and tv.shape == (3, pil.size[1], pil.size[0])
    from torchvision.transforms.functional import pil_to_tensor

    assert (pil_to_tensor(pil).int() - tv.int()).abs().float().mean() < 1.0     # same JPEG, at most rounding
    assert (eval_crop(pil, 224).float() - eval_crop(tv, 224).float()).abs().mean() < 2.0
    fp_pil = build_data(cfg_for(root).data).fingerprint()
    assert build_data(cfg_for(root, decode="torchvision").data).fingerprint() != fp_pil


def test_max_train_per_class_is_a_seeded_stratified_subset(tree):
    root, _ = tree
    full = build_data(cfg_for(root).data)
    sub = build_data(cfg_for(root, max_train_per_class=2).data)
    again = build_data(cfg_for(root, max_train_per_class=2).data)
    other = build_data(cfg_for(root, max_train_per_class=2, split_seed=5).data)
    assert torch.bincount(sub.train.targets, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.equal(sub.train.indices, again.train.indices)
    assert set(sub.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert torch.equal(sub.val.indices, full.val.indices)                   # the hold-out is not capped
    assert not (torch.equal(other.train.indices, sub.train.indices) and torch.equal(other.val.indices, sub.val.indices))
    with pytest.raises(ConfigError, match="data.max_train_per_class"):
        cfg_for(root, max_train_per_class=0)


def test_other_folder_names_need_a_class_map(tmp_path):
    root = tmp_path / "shapes"
    write_imagenet_tree(root, 2, 1, folder_names=["alpha", "beta"])
    with pytest.raises(ImageNetLayoutError, match=r"no class-name map .*alpha, beta.*classes.txt"):
        build_data(cfg_for(root).data)
    (root / "classes.txt").write_text("# folder name\nalpha\tred square\nbeta\tblue circle\n")
    assert build_data(cfg_for(root).data).class_names == ["red square", "blue circle"]
    custom = tmp_path / "names.txt"
    custom.write_text("alpha a thing\n")
    with pytest.raises(ImageNetLayoutError, match=rf"{custom} has no line for 1 class folder\(s\): beta"):
        build_data(cfg_for(root, class_names=str(custom)).data)
    with pytest.raises(ImageNetLayoutError, match="data.class_names: file .* does not exist"):
        build_data(cfg_for(root, class_names=str(tmp_path / "nope.txt")).data)


def test_folders_that_are_not_imagenet_layout_are_one_clear_error(tmp_path, tree):
    src, _ = tree
    with pytest.raises(ImageNetLayoutError, match=r"has no val/ .*train/<wnid>/\*\.JPEG and val/<wnid>/\*\.JPEG"):
        root = tmp_path / "only_train"
        shutil.copytree(src / "train", root / "train")
        build_data(cfg_for(root).data)
    flat = tmp_path / "flat_val"
    shutil.copytree(src / "train", flat / "train")
    (flat / "val").mkdir()
    shutil.copy(next((src / "val").rglob("*.JPEG")), flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ImageNetLayoutError, match="flat ILSVRC2012 validation layout.*val/<wnid>/"):
        build_data(cfg_for(flat).data)
    with pytest.raises(ImageNetLayoutError, match="does not exist"):
        build_data(cfg_for(tmp_path / "missing").data)
    with pytest.raises(ConfigError, match="data.root: an imagenet dataset needs data.root"):
        Config.from_dict({"data": {"dataset": "imagenet"}})


def test_unreadable_images_are_one_error_or_skipped_and_counted(tmp_path, tree):
    src, _ = tree
    root = tmp_path / "bad"
    shutil.copytree(src, root)
    files = sorted((root / "train").rglob("*.JPEG"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])          # a truncated download: no end-of-image marker
    files[1].write_bytes(b"")                               # an empty file
    with pytest.raises(ImageNetLayoutError, match=r"2 unreadable image file\(s\).*truncated.*empty file.*"
                                                  r"data.bad_images: skip"):
        build_data(cfg_for(root).data)
    from richkd.data.imagenet import load_imagenet_splits

    skipping = cfg_for(root, bad_images="skip").data
    splits = load_imagenet_splits(skipping)
    assert splits.skipped == 2 and len(splits.train) == 22
    kept = {splits.train.path(r) for r in range(len(splits.train))}
    assert str(files[0]) not in kept and str(files[1]) not in kept
    # a file whose ends look fine but whose middle is garbage fails at decode time, naming the file
    files[2].write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9")
    train = build_data(cfg_for(root, bad_images="skip", val_fraction=0.1).data).train_clean
    row = next(r for r in range(len(train.source)) if train.source.path(r) == str(files[2]))
    with pytest.raises(BadImageError, match=rf"cannot decode image '{files[2]}'.*replace or delete the file"):
        train.get_batch(torch.tensor([row]))
    assert np.isfinite(train.get_batch(torch.tensor([(row + 1) % len(train)]))[0].numpy()).all()


def test_the_folder_scan_is_memoised_and_redone_when_a_class_folder_changes(tmp_path, tree):
    src, _ = tree
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    assert len(build_data(cfg_for(root).data).train_clean) == 24
    index = list((tmp_path / "decoded").glob("imagenet-index-*"))
    assert len(index) == 1
    assert len(build_data(cfg_for(root).data).train_clean) == 24
    assert list((tmp_path / "decoded").glob("imagenet-index-*")) == index          # reused, not rescanned
    extra = next((root / "train").iterdir())
    shutil.copy(next(extra.iterdir()), extra / "added.JPEG")
    assert len(build_data(cfg_for(root).data).train_clean) == 25


def test_new_data_keys_at_their_defaults_keep_cache_signatures_and_change_them_when_set(tree):
    from richkd.cache import cache_signature

    root, _ = tree
    cfg = cfg_for(root)
    same = cfg.with_overrides({"data.decode": "pil", "data.bad_images": "error"})
    assert cache_signature(same) == cache_signature(cfg)
    for key, value in (("data.decode", "torchvision"), ("data.bad_images", "skip"), ("data.max_train_per_class", 100)):
        assert cache_signature(cfg.with_overrides({key: value})) != cache_signature(cfg), key
