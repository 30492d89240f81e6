"""`richkd cache`, `richkd clip init-tiny | prompts | zeroshot` and `richkd models` through the command handlers, on
the real mini Fashion-MNIST and the tiny offline CLIP: what they print and what they leave on disk."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from richkd.cli import main


def write(tmp_path: Path, cfg) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


def test_cache_builds_the_entries_a_run_reads_then_lists_and_reuses_them(richkd_cfg, tmp_path, capsys):
    from richkd.cache import prepare_caches

    cfg_file = write(tmp_path, richkd_cfg)
    assert main(["cache", "--config", cfg_file]) == 0
    printed = capsys.readouterr().out.split()
    cache_dir = Path(richkd_cfg.teaching.cache_dir)
    folders = sorted(p for p in cache_dir.iterdir() if (p / "manifest.json").is_file())
    assert sorted(Path(p) for p in printed) == folders
    assert {p.name.rsplit("-", 1)[0] for p in folders} == {"teacher", "clip-image", "clip-text"}
    stamps = {p: (p / "manifest.json").stat().st_mtime_ns for p in folders}
    assert sorted(Path(p) for p in prepare_caches(richkd_cfg)) == folders      # what `richkd train` then reads

    assert main(["cache", "--config", cfg_file]) == 0                        # built once: reused
    assert sorted(Path(p) for p in capsys.readouterr().out.split()) == folders
    assert {p: (p / "manifest.json").stat().st_mtime_ns for p in folders} == stamps

    assert main(["cache", "--list", "--config", cfg_file]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == len(folders)
    for row, folder in zip(rows, folders):
        kind, key = row.split()[:2]
        assert row.endswith(str(folder)) and folder.name == f"{kind}-{key}", row
        assert re.search(r"\s\d+\.\d\d MB\s", row), row
    assert main(["cache", "--list", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == rows


def test_cache_needs_a_config(capsys):
    assert main(["cache"]) == 2
    assert capsys.readouterr().err == "richkd: error: cache needs --config (or --list)\n"


def test_clip_init_tiny_writes_loadable_weights_keeps_them_and_force_overwrites(tmp_path, capsys):
    from richkd.clip import TINY_CLIP_MODEL, load_clip

    path = tmp_path / "clip" / "tiny.pt"
    assert main(["clip", "init-tiny", str(path)]) == 0
    assert capsys.readouterr().out == (f"wrote a tiny random-weight CLIP to {path}; use it with "
                                       f"clip.model={TINY_CLIP_MODEL} clip.pretrained={path}\n")
    first = torch.load(path, weights_only=True)
    clip = load_clip(TINY_CLIP_MODEL, str(path), device=torch.device("cpu"))
    assert clip.embed_dim > 0
    assert main(["clip", "init-tiny", str(path), "--seed", "1"]) == 0       # exists: kept, not overwritten
    assert capsys.readouterr().out == f"{path} exists; keeping it (use --force to overwrite)\n"
    assert all(torch.equal(first[k], v) for k, v in torch.load(path, weights_only=True).items())
    assert main(["clip", "init-tiny", str(path), "--seed", "1", "--force"]) == 0
    capsys.readouterr()
    second = torch.load(path, weights_only=True)
    assert first.keys() == second.keys()
    assert not all(torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())


def test_clip_prompts_lists_every_built_in_set(capsys):
    from richkd.clip import PROMPT_SETS, load_prompt_set

    assert main(["clip", "prompts"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(PROMPT_SETS)
    for line, name in zip(lines, PROMPT_SETS):
        ps = load_prompt_set(name)
        assert re.match(rf"{name}\s+{len(ps.templates)} templates  e\.g\. {re.escape(repr(ps.templates[0]))}$", line)
    assert re.match(r"richkd12\s+12 templates", lines[0])


@pytest.mark.parametrize("split", ["val", "test"])
def test_clip_zeroshot_prints_the_accuracy_of_the_prompt_set(richkd_cfg, tmp_path, capsys, monkeypatch, split):
    import richkd.clip
    from richkd.clip import load_prompt_set
    from richkd.data import build_data

    cfg = richkd_cfg
    data = build_data(cfg.data)
    expected_rows = {"val": len(data.val), "test": len(data.test)}
    assert expected_rows["val"] != expected_rows["test"]
    seen = []
    real = richkd.clip.zero_shot_accuracy
    monkeypatch.setattr(richkd.clip, "zero_shot_accuracy",
                        lambda clip, loader, classifier: seen.append(len(loader.dataset)) or real(clip, loader,
                                                                                                  classifier))
    assert main(["clip", "zeroshot", "--config", write(tmp_path, cfg), "--split", split,
                 "--set", "clip.prompt_set=richkd12"]) == 0
    assert seen == [expected_rows[split]]                    # the split asked for, and only it
    out = capsys.readouterr().out.strip()
    n = len(load_prompt_set("richkd12").templates)
    match = re.fullmatch(rf"CLIP richkd-tiny \({re.escape(cfg.clip.pretrained)}\) zero-shot top-1 on "
                         rf"fashion_mnist/{split} with prompt set 'richkd12' \({n} templates\): (\d+\.\d\d)%", out)
    assert match, out
    assert 0.0 <= float(match.group(1)) <= 100.0


def test_models_lists_every_model_with_its_feature_dimension(capsys):
    """Both families with their input size; every model's feature dimension and size, as the model has them."""
    from richkd.models import MODELS, create_model

    assert main(["models", "--num-classes", "10"]) == 0
    text = capsys.readouterr().out
    assert "resnet32x4" in text and "feat_dim   256" in text and "MobileNetV2" in text
    assert "cifar family (32 px inputs):" in text and "imagenet family (224 px inputs):" in text
    out = text.strip().splitlines()
    line = next(ln for ln in out if ln.split()[:1] == ["resnet50"])
    assert "input 224 px" in line and "feat_dim  2048" in line
    assert "input  32 px" in next(ln for ln in out if ln.split()[:1] == ["resnet8x4"])
    assert [line.split()[0] for line in out if line.endswith("inputs):")] == ["cifar", "imagenet"]
    lines = [line for line in out if line.startswith("  ")]
    assert sorted(line.split()[0] for line in lines) == sorted(MODELS.names())
    for line in lines:
        name, _, size, _, _, dim, _, params = line.split()
        model = create_model(name, 10)
        assert int(dim) == model.feat_dim, name
        assert params == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", name
