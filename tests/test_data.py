"""richkd.data: real-format tiny CIFAR-100, real Debian Fashion-MNIST, ImageFolder, splits, transforms, loaders."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from richkd.config import DataConfig
from richkd.data import (CIFAR10_CLASSES, CIFAR100_CLASSES, FASHION_MNIST_CLASSES, Batch, DatasetNotFoundError,
                         build_data, make_loader, normalize, read_idx, to_float_images)
from richkd.data.sources import DEBIAN_FASHION_MNIST_DIR
from richkd.data.splits import stratified_take
from richkd.data.transforms import crop_flip, draw_crop_flip

from tests.data_fixtures import patch_cifar100_md5, write_idx, write_image_tree, write_tiny_cifar100, write_tiny_fashion


@pytest.fixture(autouse=True)
def _isolated_default_root(tmp_path, monkeypatch):
    """The default data folder points at an empty temp dir, so no test reads the user's ~/.cache."""
    empty = tmp_path / "default-data-root"
    empty.mkdir()
    monkeypatch.setenv("RICHKD_DATA", str(empty))


@pytest.fixture
def tiny_cifar(tmp_path, monkeypatch):
    root = tmp_path / "cifar"
    info = write_tiny_cifar100(root)       # 60 train rows (5 classes x 12), 20 test rows
    patch_cifar100_md5(monkeypatch, info["md5"])
    info["root"] = str(root)
    return info


def cifar_cfg(root, **kw) -> DataConfig:
    return DataConfig(dataset="cifar100", root=root, **kw)


def raw_image(data: np.ndarray, row: int) -> torch.Tensor:
    """CIFAR row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    return torch.from_numpy(data[row].reshape(3, 32, 32).astype(np.float32) / 255.0)


# ----- class names ------------------------------------------------------------------------------------

def test_shipped_class_names():
    assert len(CIFAR100_CLASSES) == 100 and len(set(CIFAR100_CLASSES)) == 100
    assert CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100_CLASSES[-1] == "worm"
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)   # the meta file's order is alphabetical
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                               "ship", "truck")
    from torchvision.datasets import FashionMNIST

    assert list(FASHION_MNIST_CLASSES) == list(FashionMNIST.classes)


# ----- CIFAR-100 through torchvision --------------------------------------------------------------------

def test_cifar100_bundle_contents(tiny_cifar):
    b = build_data(cifar_cfg(tiny_cifar["root"]))
    assert b.name == "cifar100" and b.num_classes == 100 and b.class_names == list(CIFAR100_CLASSES)
    assert len(b.train_clean) == 60 and len(b.test) == 20 and len(b.test_clean) == 20
    assert torch.equal(b.train_targets, torch.from_numpy(tiny_cifar["train_labels"]))
    assert b.train_targets.dtype == torch.int64
    assert b.mean == (0.5071, 0.4867, 0.4408) and b.std == (0.2675, 0.2565, 0.2761)
    # 10% of 60 = 6 val rows; quotas 1.2 per class -> 1 each + the largest-remainder extra to class 0
    assert len(b.val) == 6 and len(b.train) == 54
    assert torch.bincount(b.val.targets, minlength=5).tolist() == [2, 1, 1, 1, 1]
    val_idx, train_idx = set(b.val.indices.tolist()), set(b.train.indices.tolist())
    assert not val_idx & train_idx and val_idx | train_idx == set(range(60))
    # clean items reproduce the raw file pixels, labels and row index exactly
    for ds, data, labels in ((b.val, tiny_cifar["train_data"], tiny_cifar["train_labels"]),
                             (b.train_clean, tiny_cifar["train_data"], tiny_cifar["train_labels"]),
                             (b.test, tiny_cifar["test_data"], tiny_cifar["test_labels"])):
        for pos in (0, len(ds) - 1):
            img, target, index = ds[pos]
            assert img.shape == (3, 32, 32) and img.dtype == torch.float32
            assert torch.allclose(img, raw_image(data, index), atol=1e-6)
            assert target == int(labels[index])
    assert [b.train_clean[i][2] for i in range(60)] == list(range(60))
    assert [b.test[i][2] for i in range(20)] == list(range(20))
    img = b.train[3][0]
    assert img.shape == (3, 32, 32) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_split_is_seeded_and_deterministic(tiny_cifar):
    a = build_data(cifar_cfg(tiny_cifar["root"], split_seed=1))
    again = build_data(cifar_cfg(tiny_cifar["root"], split_seed=1))
    other = build_data(cifar_cfg(tiny_cifar["root"], split_seed=2))
    assert torch.equal(a.val.indices, again.val.indices) and torch.equal(a.train.indices, again.train.indices)
    assert not torch.equal(a.val.indices, other.val.indices)
    assert torch.equal(a.train_clean.indices, other.train_clean.indices)   # underlying rows never move


def test_sample_caps(tiny_cifar):
    b = build_data(cifar_cfg(tiny_cifar["root"], val_fraction=0.2, max_train_samples=10, max_eval_samples=5))
    assert len(b.train) == 10 and len(b.val) == 5 and len(b.test) == 5
    assert len(b.train_clean) == 60 and len(b.test_clean) == 20 and len(b.train_targets) == 60
    full = build_data(cifar_cfg(tiny_cifar["root"], val_fraction=0.2))
    assert set(b.train.indices.tolist()) <= set(full.train.indices.tolist())
    assert set(b.val.indices.tolist()) <= set(full.val.indices.tolist())
    # stratified: 10 of 5 balanced classes -> 2 each
    assert torch.bincount(b.train.targets, minlength=5).tolist() == [2, 2, 2, 2, 2]
    assert torch.equal(b.train.indices, build_data(cifar_cfg(tiny_cifar["root"], val_fraction=0.2,
                                                             max_train_samples=10)).train.indices)


def test_zero_val_fraction_trains_on_the_whole_split_with_no_validation_rows(tiny_cifar):
    from richkd.config import ConfigError

    b = build_data(cifar_cfg(tiny_cifar["root"], val_fraction=0.0))   # a final run (richkd finalize) uses it
    assert len(b.val) == 0 and torch.equal(b.train.indices, torch.arange(60))
    for bad in (-0.1, 0.9):
        with pytest.raises(ConfigError, match=r"data.val_fraction: .* expected a value in \[0.0, 0.9\)"):
            cifar_cfg(tiny_cifar["root"], val_fraction=bad)
    assert len(make_loader(torch.utils.data.TensorDataset(torch.zeros(0)), 8, False, 0)) == 0


def test_missing_cifar_names_folder_and_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(cifar_cfg(str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in msg
    assert "data.download: true" in msg and "meta" in msg and "cifar-100-python.tar.gz" in msg
    with pytest.raises(DatasetNotFoundError, match="RICHKD_DATA"):
        build_data(DataConfig(dataset="cifar10"))          # default root (the empty temp dir)


def test_cifar_md5_mismatch_is_a_clear_error(tmp_path):
    write_tiny_cifar100(tmp_path)                           # real md5 list untouched: our fake fails it
    with pytest.raises(DatasetNotFoundError, match="md5"):
        build_data(cifar_cfg(str(tmp_path)))


# ----- Fashion-MNIST --------------------------------------------------------------------------------------

def test_idx_reader_hand_written(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), arr)
    raw = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])
    (tmp_path / "y").write_bytes(raw)
    assert read_idx(tmp_path / "y").tolist() == [7, 8, 9]
    (tmp_path / "bad").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes([1]))
    with pytest.raises(DatasetNotFoundError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    raw = write_tiny_fashion(tmp_path / "fm")
    b = build_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "fm"), val_fraction=0.5))
    assert len(b.train_clean) == 20 and len(b.test) == 10 and b.class_names == list(FASHION_MNIST_CLASSES)
    img, target, index = b.test_clean[3]
    assert img.shape == (3, 32, 32) and target == 3 and index == 3
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    expected = to_float_images(torch.from_numpy(raw["t10k"][0][3]).view(1, 1, 28, 28), 32)[0]
    assert torch.allclose(img, expected)


def test_fashion_mnist_missing_mentions_debian_package(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_data(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "empty")))
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "data.download: true" in str(err.value)
    assert str(tmp_path / "empty") in str(err.value)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(),
                    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST_DIR} missing); "
                           "`apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_real_debian_files():
    b = build_data(DataConfig(dataset="fashion_mnist"))      # data.root null -> Debian files
    assert len(b.train_clean) == 60000 and len(b.test) == 10000 and b.num_classes == 10
    assert b.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"]
    # the published label files start 9 0 0 3 0 2 7 2 5 5 (train) and 9 2 1 1 6 1 4 6 5 7 (test)
    assert b.train_targets[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert b.test.targets[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    # 6000 per class, 10% val -> exactly 600 per class in val
    assert len(b.val) == 6000 and torch.bincount(b.val.targets).tolist() == [600] * 10
    img, target, index = b.test[0]
    assert img.shape == (3, 32, 32) and target == 9 and index == 0
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.max()) > 0.5
    assert b.mean == (0.2860,) * 3


# ----- ImageFolder ----------------------------------------------------------------------------------------

def test_imagefolder_with_test_folder(tmp_path):
    write_image_tree(tmp_path, {"train": {"cat": 4, "dog": 6}, "test": {"dog": 2}})
    b = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2))
    assert b.class_names == ["cat", "dog"] and b.num_classes == 2
    assert len(b.train_clean) == 10 and len(b.test) == 2 and b.test.targets.tolist() == [1, 1]
    assert b.mean == (0.485, 0.456, 0.406)
    for ds in (b.train_clean, b.test):
        for pos in range(len(ds)):
            img, target, _ = ds[pos]
            assert img.shape == (3, 16, 16)
            channel = 0 if target == 0 else 2            # cat images are red, dog images blue
            assert torch.allclose(img[channel], torch.ones(16, 16)) and float(img.sum()) == pytest.approx(256)


def test_imagefolder_carves_test_when_absent(tmp_path):
    write_image_tree(tmp_path, {"train": {"cat": 10, "dog": 10}})
    b = build_data(DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8))
    assert len(b.test) == 2 and len(b.train_clean) == 18 and sorted(b.test.targets.tolist()) == [0, 1]
    paths = b.train_clean.source.paths + b.test.source.paths
    assert len(set(paths)) == 20


def test_imagefolder_missing_train(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))
    write_image_tree(tmp_path, {"train": {"cat": 2}, "test": {"eel": 1}})
    with pytest.raises(DatasetNotFoundError, match="eel"):
        build_data(DataConfig(dataset="imagefolder", root=str(tmp_path)))


# ----- transforms -----------------------------------------------------------------------------------------

def test_crop_flip_is_a_padded_shifted_maybe_flipped_copy():
    x = torch.rand(64, 3, 8, 8)
    out = crop_flip(x, *draw_crop_flip(64, torch.Generator().manual_seed(0)))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    seen_offsets, seen_flip = set(), set()
    for i in range(64):
        matches = [(r, c, f) for r in range(9) for c in range(9) for f in (False, True)
                   if torch.equal(out[i], (lambda crop: crop.flip(-1) if f else crop)(padded[i, :, r:r + 8, c:c + 8]))]
        assert matches, f"sample {i} is not a crop of the padded image"
        seen_offsets.add(matches[0][:2])
        seen_flip.add(matches[0][2])
    assert seen_flip == {False, True} and len(seen_offsets) > 10
    again = crop_flip(x, *draw_crop_flip(64, torch.Generator().manual_seed(0)))
    assert torch.equal(out, again)


def test_augmented_train_items_change_but_keep_shape(tiny_cifar):
    b = build_data(cifar_cfg(tiny_cifar["root"]))
    assert b.train.augment and not b.val.augment and not b.train_clean.augment
    torch.manual_seed(0)
    changed = 0
    for pos in range(20):
        aug, target, index = b.train[pos]
        clean = b.train_clean[index][0]
        assert aug.shape == clean.shape == (3, 32, 32) and target == b.train_clean[index][1]
        changed += int(not torch.equal(aug, clean))
    assert changed >= 15
    none = build_data(cifar_cfg(tiny_cifar["root"], augment="none"))
    pos = 0
    assert torch.equal(none.train[pos][0], none.train_clean[none.train[pos][2]][0])


def test_to_float_images_resizes_and_repeats_gray():
    u = torch.full((2, 1, 28, 28), 128, dtype=torch.uint8)
    out = to_float_images(u, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 128 / 255), atol=1e-6)


def test_normalize_hand_computed():
    x = torch.full((1, 3, 2, 2), 0.5)
    y = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="channels"):
        normalize(x, (0.5,), (1.0,))


def test_stratified_take_exact_counts():
    targets = torch.tensor([0] * 7 + [1] * 3)
    taken, rest = stratified_take(targets, 5, seed=0)
    # quotas 3.5 / 1.5 -> floors 3 / 1, extra to class 0 (tie, lower id)
    assert torch.bincount(targets[taken]).tolist() == [4, 1]
    assert sorted(taken.tolist() + rest.tolist()) == list(range(10))


# ----- loaders --------------------------------------------------------------------------------------------

def test_make_loader_batches_and_determinism(tiny_cifar):
    b = build_data(cifar_cfg(tiny_cifar["root"]))
    loader = make_loader(b.train, batch_size=16, shuffle=True, seed=3)
    assert len(loader) == 4                                  # ceil(54 / 16)
    epoch0 = list(loader)
    assert all(isinstance(x, Batch) for x in epoch0) and [len(x) for x in epoch0] == [16, 16, 16, 6]
    first = epoch0[0]
    assert first.image.dtype == torch.float32 and first.image.shape == (16, 3, 32, 32)
    assert first.target.dtype == torch.int64 and first.index.dtype == torch.int64
    assert 0.0 <= float(first.image.min()) and float(first.image.max()) <= 1.0
    seen = torch.cat([x.index for x in epoch0])
    assert sorted(seen.tolist()) == sorted(b.train.indices.tolist())
    assert torch.equal(torch.cat([x.target for x in epoch0]), b.train_targets[seen])

    twin = list(make_loader(b.train, batch_size=16, shuffle=True, seed=3))
    for x, y in zip(epoch0, twin):
        assert torch.equal(x.index, y.index) and torch.equal(x.image, y.image)
    epoch1 = list(loader)
    assert not torch.equal(torch.cat([x.index for x in epoch1]), seen)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([x.image for x in loader]), torch.cat([x.image for x in epoch0]))
    other = torch.cat([x.index for x in make_loader(b.train, 16, shuffle=True, seed=4)])
    assert not torch.equal(other, seen)

    assert len(make_loader(b.train, 16, shuffle=True, seed=3, drop_last=True)) == 3
    ordered = list(make_loader(b.test, batch_size=8, shuffle=False, seed=0))
    assert torch.equal(torch.cat([x.index for x in ordered]), torch.arange(20))


@pytest.mark.skipif(sys.platform != "linux", reason="fork-based worker start keeps this test fast on Linux only")
def test_loader_workers_match_main_process(tiny_cifar):
    b = build_data(cifar_cfg(tiny_cifar["root"]))
    main = list(make_loader(b.train, 32, shuffle=True, seed=5))
    loader = make_loader(b.train, 32, shuffle=True, seed=5, num_workers=1)
    workers = list(loader)
    assert len(workers) == len(main) == 2
    for x, y in zip(main, workers):
        assert torch.equal(x.index, y.index) and torch.equal(x.image, y.image)
    second = list(loader)                                    # persistent worker, next epoch
    assert not torch.equal(second[0].index, workers[0].index)


def test_fingerprint_tracks_content(tiny_cifar, tmp_path, monkeypatch):
    a = build_data(cifar_cfg(tiny_cifar["root"]))
    assert a.fingerprint() == build_data(cifar_cfg(tiny_cifar["root"], split_seed=9)).fingerprint()
    other_root = tmp_path / "other"
    info = write_tiny_cifar100(other_root, seed=1)
    patch_cifar100_md5(monkeypatch, info["md5"])
    assert build_data(cifar_cfg(str(other_root))).fingerprint() != a.fingerprint()
