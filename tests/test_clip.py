"""richkd.clip: tiny open_clip model round trip, preprocessing, prompt averaging, prompt sets, offline errors."""
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import richkd.clip as rc
from richkd.clip import loading
from richkd.data.batch import Batch
from richkd.io import sha256_file

REPO = Path(__file__).resolve().parents[1]

# the official RichKD code's templates, verbatim (docs/method.md#the-official-code): no trailing periods.
RICHKD12 = (
    "a photo of a {}",
    "a blurry photo of a {}",
    "a cropped photo of a {}",
    "a close-up photo of a {}",
    "a low resolution photo of a {}",
    "a bright photo of a {}",
    "a picture of a {}",
    "a detailed image of a {}",
    "a sketch of a {}",
    "a natural photo of a {} in the wild",
    "a realistic image of a {}",
    "a high quality photo of a {}",
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def fixed_images(n=3, size=32):
    """Deterministic images in [0, 1] that differ per sample."""
    x = torch.linspace(0, 1, n * 3 * size * size).reshape(n, 3, size, size)
    return (x * 7.3 + torch.arange(n).view(n, 1, 1, 1) * 0.37) % 1.0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return rc.init_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return rc.load_clip(rc.TINY_CLIP_MODEL, str(tiny_path))


# -- tiny model ---------------------------------------------------------------------------------------------------
def test_tiny_model_loads_identically_in_a_fresh_process(tiny, tiny_path, tmp_path):
    """A fresh interpreter (like a Ray trial) registers the config itself and loads via pretrained=PATH."""
    out = tmp_path / "sub.pt"
    code = (
        "import sys, torch, richkd.clip as rc\n"
        + inspect.getsource(fixed_images) +
        "c = rc.load_clip('richkd-tiny', sys.argv[1])\n"
        "torch.save({'img': c.encode_images(fixed_images()),\n"
        "            'txt': c.encode_text_classifier(['aquarium_fish', 'cat'], ['a photo of a {}.', 'art of {}']),\n"
        "            'weights_id': c.weights_id, 'logit_scale': c.logit_scale}, sys.argv[2])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_path), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sub = torch.load(out, weights_only=True)
    assert torch.equal(sub["img"], tiny.encode_images(fixed_images()))
    assert torch.equal(sub["txt"], tiny.encode_text_classifier(["aquarium_fish", "cat"], ["a photo of a {}.",
                                                                                          "art of {}"]))
    assert sub["weights_id"] == tiny.weights_id == sha256_file(tiny_path)
    assert sub["logit_scale"] == tiny.logit_scale


def test_tiny_model_file_is_small_frozen_and_described(tiny, tiny_path):
    assert tiny_path.stat().st_size < 5 * 2**20
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.embed_dim == 64 and tiny.image_size == 32
    assert tiny.preprocess_id == "bicubic32-openai-meanstd"
    assert tiny.model_name == "richkd-tiny" and tiny.pretrained == str(tiny_path)
    assert abs(tiny.logit_scale - 1 / 0.07) < 0.05  # open_clip's init, log(1/0.07), stored in fp16
    assert next(tiny.model.parameters()).dtype == torch.float32


def test_init_tiny_clip_is_seeded_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = rc.init_tiny_clip(tmp_path / "a.pt", seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b = rc.init_tiny_clip(tmp_path / "b.pt", seed=1)
    c = rc.init_tiny_clip(tmp_path / "c.pt", seed=2)
    sa, sb, sc = (torch.load(p, weights_only=True) for p in (a, b, c))
    key = "text_projection"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


# -- image side ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [28, 32])
def test_encode_images_shape_norm_dtype(tiny, size):
    feats = tiny.encode_images(fixed_images(4, size))
    assert feats.shape == (4, 64) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))


def test_encode_images_applies_clip_mean_std_at_native_size(tiny):
    x = fixed_images(2, 32)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(tiny.model.encode_image((x - mean) / std), dim=-1)
    torch.testing.assert_close(tiny.encode_images(x), expected, rtol=0, atol=1e-6)


def test_encode_images_accepts_grayscale_and_rejects_uint8(tiny):
    gray = fixed_images(2, 28)[:, :1]
    torch.testing.assert_close(tiny.encode_images(gray), tiny.encode_images(gray.expand(-1, 3, -1, -1)))
    with pytest.raises(ValueError, match="float"):
        tiny.encode_images((fixed_images(1) * 255).to(torch.uint8))


def test_preprocess_resizes_bicubic_and_center_crops_shortest_side():
    x = torch.rand(1, 3, 32, 64)
    out = rc.preprocess_images(x, 32, (0.5,) * 3, (0.25,) * 3)  # shortest side already 32: crop only
    torch.testing.assert_close(out, (x[..., 16:48] - 0.5) / 0.25)
    small = torch.rand(2, 3, 28, 28)
    up = rc.preprocess_images(small, 224, (0.0,) * 3, (1.0,) * 3)
    expected = F.interpolate(small, size=(224, 224), mode="bicubic", align_corners=False,
                             antialias=True).clamp(0, 1)
    torch.testing.assert_close(up, expected)
    assert 0.0 <= float(up.min()) and float(up.max()) <= 1.0  # bicubic overshoot clamped, as PIL's uint8 would


# -- text side ----------------------------------------------------------------------------------------------------
def test_average_prompt_embeddings_normalises_each_before_the_mean():
    # class 0: prompts (3, 0) and (0, 1); normalise-each -> (1,0),(0,1) -> mean (.5,.5) -> (1/sqrt2, 1/sqrt2).
    # mean-then-normalise would give (1.5, .5)/|.| = (0.9487, 0.3162): a different answer.
    emb = torch.tensor([[[3.0, 0.0], [0.0, 1.0]],
                        [[0.0, 2.0], [0.0, 5.0]]])
    out = rc.average_prompt_embeddings(emb)
    r = 2 ** -0.5
    torch.testing.assert_close(out, torch.tensor([[r, r], [0.0, 1.0]]))
    wrong = F.normalize(emb.mean(dim=1), dim=-1)
    assert not torch.allclose(out[0], wrong[0], atol=1e-3)


def test_text_classifier_with_a_fake_text_encoder(tiny, monkeypatch):
    """Wiring: prompts formatted class-major from cleaned names, then normalise-each / mean / renormalise."""
    table = {"x aquarium fish": [3.0, 0.0], "y aquarium fish": [0.0, 1.0],
             "x cat": [0.0, 2.0], "y cat": [0.0, 5.0]}
    seen = []

    def fake_encode_texts(texts):
        seen.extend(texts)
        return torch.tensor([table[t] for t in texts])

    monkeypatch.setattr(tiny, "encode_texts", fake_encode_texts)
    out = tiny.encode_text_classifier(["aquarium_fish", "cat"], ["x {}", "y {}"], clean=True)
    assert seen == ["x aquarium fish", "y aquarium fish", "x cat", "y cat"]
    r = 2 ** -0.5
    torch.testing.assert_close(out, torch.tensor([[r, r], [0.0, 1.0]]))


def test_text_classifier_matches_open_clip_build_zero_shot_classifier(tiny):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    names = ["aquarium_fish", "maple_tree", "cat"]
    ours = tiny.encode_text_classifier(names, rc.load_prompt_set("richkd12"), clean=True)
    ref = build_zero_shot_classifier(tiny.model, tiny.tokenizer, [rc.clean_class_name(n) for n in names],
                                     list(RICHKD12), num_classes_per_batch=2)
    assert ours.shape == (3, 64) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.T, rtol=0, atol=1e-5)
    raw = tiny.encode_text_classifier(names, RICHKD12, clean=False)  # underscores kept (official code)
    assert not torch.allclose(raw[0], ours[0], atol=1e-4)


def test_clean_class_name_and_format_prompts():
    assert rc.clean_class_name("aquarium_fish") == "aquarium fish"
    assert rc.clean_class_name("sweet_pepper ") == "sweet pepper"
    assert rc.format_prompts(["maple_tree"], ["a {} here", "{}"], clean=False) == ["a maple_tree here", "maple_tree"]
    assert rc.format_prompts(["a_b", "c"], ["p {}.", "q {}"]) == ["p a b.", "q a b", "p c.", "q c"]


# -- prompt sets --------------------------------------------------------------------------------------------------
def test_richkd12_is_the_official_list_verbatim():
    ps = rc.load_prompt_set("richkd12")
    assert ps.name == "richkd12" and ps.templates == RICHKD12 and len(ps) == 12


def test_openai_imagenet80_comes_from_open_clip_metadata():
    ps = rc.load_prompt_set("openai_imagenet80")
    assert len(ps.templates) == 80 and len(set(ps.templates)) == 80
    assert ps.templates[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in ps.templates)


def test_simple_and_single_sets():
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    assert rc.load_prompt_set("simple").templates == tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)
    assert rc.load_prompt_set("single").templates == ("a photo of a {}.",)
    assert set(rc.PROMPT_SETS) == {"richkd12", "openai_imagenet80", "simple", "single"}


def test_prompt_set_hash_is_short_stable_and_order_sensitive():
    h = rc.prompt_set_hash(RICHKD12)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == rc.load_prompt_set("richkd12").hash
    assert rc.prompt_set_hash(RICHKD12[::-1]) != h
    assert rc.prompt_set_hash(RICHKD12[:11]) != h


def test_user_yaml_prompt_set(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntemplates:\n  - 'a {} photo'\n  - 'an image of {}'\n")
    ps = rc.load_prompt_set(str(path))
    assert ps == rc.PromptSet("mine", ("a {} photo", "an image of {}"))
    nameless = tmp_path / "other.yaml"
    nameless.write_text("templates: ['{}']\n")
    assert rc.load_prompt_set(nameless).name == "other"


@pytest.mark.parametrize("body, match", [
    ("name: e\ntemplates: []\n", "empty"),
    ("templates: ['a photo of a']\n", "0 '{}'"),
    ("templates: ['a {} and a {}']\n", "2 '{}'"),
    ("templates: ['ok {}', 3]\n", "not a string"),
    ("templates: 'a {}'\n", "list of strings"),
    ("name: x\ntemplate: ['a {}']\n", "unknown key"),
    ("- 'a {}'\n", "mapping"),
    ("templates: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
])
def test_bad_prompt_set_files(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(rc.PromptSetError, match=match):
        rc.load_prompt_set(str(path))


def test_unknown_prompt_set_names_known_sets_and_close_match(tmp_path):
    with pytest.raises(rc.PromptSetError, match="richkd12") as info:
        rc.load_prompt_set("richkd-12")
    assert "Did you mean 'richkd12'" in str(info.value) and "openai_imagenet80" in str(info.value)
    with pytest.raises(rc.PromptSetError, match="does not exist"):
        rc.load_prompt_set(str(tmp_path / "missing.yaml"))
    assert issubclass(rc.PromptSetError, ValueError)


def test_text_classifier_validates_templates(tiny):
    with pytest.raises(rc.PromptSetError, match="exactly one"):
        tiny.encode_text_classifier(["cat"], ["no placeholder"])


# -- loading errors -----------------------------------------------------------------------------------------------
def test_uncached_hub_tag_offline_raises_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))  # guarantee a cache miss
    with pytest.raises(rc.ClipLoadError) as info:
        rc.load_clip("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "local-dir:" in msg and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg
    assert "file's path" in msg
    # the offline fallback is a command a user can run, not a Python function
    assert msg.endswith("For an offline smoke test write random weights with `richkd clip init-tiny PATH` and set "
                        "clip.model=richkd-tiny clip.pretrained=PATH.")
    assert "\n" not in msg


def test_a_failed_download_is_one_error_with_open_clips_reason(monkeypatch):
    """Online, open_clip fetches a tag's weights; its failure is the one ClipLoadError, with open_clip's reason.
    The pre-check (richkd.validate) downloads nothing when online."""
    from open_clip import pretrained as oc_pretrained

    def unreachable(*args, **kwargs):
        raise ConnectionError("huggingface.co is unreachable")

    monkeypatch.setattr(loading, "is_offline_mode", lambda: False)
    monkeypatch.setattr(oc_pretrained, "hf_hub_download", unreachable)
    rc.check_weights("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(rc.ClipLoadError, match=r"cannot be downloaded \(Failed to download .* for laion/CLIP-ViT-B-32-"
                                               r"laion2B-s34B-b79K\. .*huggingface.co is unreachable\)"):
        rc.load_clip("ViT-B-32", "laion2b_s34b_b79k")


def test_unknown_architecture_lists_close_names():
    with pytest.raises(rc.ClipLoadError, match="unknown CLIP architecture 'ViT-B-33'") as info:
        rc.load_clip("ViT-B-33", "openai")
    assert "ViT-B-32" in str(info.value)
    with pytest.raises(rc.ClipLoadError, match="ViT-B-32"):
        rc.load_clip("vit-b-32", "openai")


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(rc.ClipLoadError, match="Tags of ViT-B-32: .*laion2b_s34b_b79k"):
        rc.load_clip("ViT-B-32", "laion2b")
    with pytest.raises(rc.ClipLoadError, match="does not exist"):
        rc.load_clip("ViT-B-32", str(tmp_path / "nope.pt"))
    with pytest.raises(rc.ClipLoadError, match="richkd clip init-tiny"):
        rc.load_clip(rc.TINY_CLIP_MODEL, "openai")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(rc.ClipLoadError, match="could not load CLIP"):
        rc.load_clip(rc.TINY_CLIP_MODEL, str(garbage))


def test_parse_pretrained_reads_tags_files_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rc.parse_pretrained("openai") == rc.PretrainedRef("openai", "tag", None)
    assert rc.parse_pretrained("laion2b_s34b_b79k").absolute() == "laion2b_s34b_b79k"
    # path-looking values are files even when missing (never looked up as tags); ~ is expanded
    for value in ("weights/clip.pt", "clip.safetensors", "big_vision.npz", "~/clip.bin"):
        ref = rc.parse_pretrained(value)
        assert ref.kind == "file" and ref.path == Path(os.path.expanduser(value)), value
    assert rc.parse_pretrained("~/clip.bin").path == tmp_path / "home" / "clip.bin"
    # an existing file with a tag-like name is that file
    (tmp_path / "openai").write_text("x")
    assert rc.parse_pretrained("openai").kind == "file"
    assert rc.parse_pretrained("openai").absolute() == str(tmp_path / "openai")
    ref = rc.parse_pretrained("local-dir:~/clipdir")
    assert (ref.kind, ref.path) == ("dir", tmp_path / "home" / "clipdir")
    assert ref.absolute() == f"local-dir:{tmp_path / 'home' / 'clipdir'}"
    assert rc.parse_pretrained("local-dir:sub/../clipdir").absolute() == f"local-dir:{tmp_path / 'clipdir'}"
    assert rc.parse_pretrained("weights/./clip.pt").absolute() == str(tmp_path / "weights" / "clip.pt")
    assert rc.parse_pretrained("/abs/clip.pt").absolute() == "/abs/clip.pt"
    assert rc.parse_pretrained("s3://bucket/clip.pt").absolute() == "s3://bucket/clip.pt"


def test_local_dir_folder(tiny, tiny_path, tmp_path):
    folder = tmp_path / "clipdir"
    folder.mkdir()
    with pytest.raises(rc.ClipLoadError, match="open_clip_config.json"):
        rc.load_clip("whatever", f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": rc.TINY_CLIP_CONFIG}))
    with pytest.raises(rc.ClipLoadError, match="no weights file"):
        rc.load_clip("whatever", f"local-dir:{folder}")
    shutil.copy(tiny_path, folder / "open_clip_pytorch_model.bin")
    c = rc.load_clip(rc.TINY_CLIP_MODEL, f"local-dir:{folder}")
    assert c.weights_id == sha256_file(tiny_path)
    assert torch.equal(c.encode_images(fixed_images()), tiny.encode_images(fixed_images()))
    with pytest.raises(rc.ClipLoadError, match="does not exist"):
        rc.load_clip(rc.TINY_CLIP_MODEL, f"local-dir:{tmp_path / 'missing'}")


def test_cached_hub_tag_loads_by_path_offline_with_quickgelu(tiny_path, tmp_path, monkeypatch):
    """A tag whose weights sit in the HF cache loads with no network, QuickGELU forced as the tag says."""
    import huggingface_hub.constants as hc
    from open_clip import pretrained as oc_pretrained
    from open_clip.transformer import QuickGELU

    snapshot = tmp_path / "models--richkd--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--richkd--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--richkd--tiny-clip" / "refs" / "main").write_text("abc123")
    shutil.copy(tiny_path, snapshot / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(oc_pretrained._PRETRAINED, rc.TINY_CLIP_MODEL, {
        "faketag": {"hf_hub": "richkd/tiny-clip/", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                    "interpolation": "bicubic", "resize_mode": "shortest", "quick_gelu": True}})
    c = rc.load_clip(rc.TINY_CLIP_MODEL, "faketag")
    assert c.weights_id == "faketag"
    assert c.preprocess_id == "bicubic32-inception-meanstd"
    assert any(isinstance(m, QuickGELU) for m in c.model.modules())


# -- zero-shot ----------------------------------------------------------------------------------------------------
def test_zero_shot_accuracy_on_tuples_batches_and_tensors(tiny):
    images = fixed_images(3, 32)
    class_emb = tiny.encode_images(images)  # class k = image k's own feature: argmax is the identity
    right, wrong = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    assert rc.zero_shot_accuracy(tiny, (images, right), class_emb) == 1.0
    assert rc.zero_shot_accuracy(tiny, (images, wrong), class_emb) == 0.0
    loader = [(images[:2], right[:2], torch.arange(2)), Batch(images[2:], wrong[2:], torch.arange(1))]
    assert rc.zero_shot_accuracy(tiny, loader, class_emb) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no samples"):
        rc.zero_shot_accuracy(tiny, [], class_emb)
