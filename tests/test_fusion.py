"""Tests for richkd.fusion: exact identities and hand-computed fused values."""
import math

import pytest
import torch

from richkd.fusion import fuse_features, fuse_logits


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z_t = (torch.randn(4, 5, generator=g) * 5).to(dtype)
    cos = (torch.rand(4, 5, generator=g) * 2 - 1).to(dtype)
    return z_t, cos


def test_alpha_one_is_exactly_the_teacher():
    z_t, cos = _inputs()
    out = fuse_logits(z_t, cos, alpha=1.0, clip_logit_scale=100.0)
    assert torch.equal(out, z_t)


def test_alpha_zero_is_exactly_scaled_cosine():
    z_t, cos = _inputs()
    for scale in (1.0, 100.0):
        out = fuse_logits(z_t, cos, alpha=0.0, clip_logit_scale=scale)
        assert torch.equal(out, scale * cos)


def test_hand_computed_mix():
    z_t = torch.tensor([[2.0, -1.0]])
    cos = torch.tensor([[0.5, -0.25]])
    # 0.7 * [2, -1] + 0.3 * s * [0.5, -0.25]
    torch.testing.assert_close(fuse_logits(z_t, cos, 0.7, 1.0), torch.tensor([[1.55, -0.775]]))
    torch.testing.assert_close(fuse_logits(z_t, cos, 0.7, 100.0), torch.tensor([[16.4, -8.2]]))


def test_fp16_inputs_give_fp32_output():
    z_t, cos = _inputs(torch.float16)
    out = fuse_logits(z_t, cos, alpha=0.7, clip_logit_scale=100.0)
    assert out.dtype == torch.float32
    expected = 0.7 * z_t.double() + 0.3 * 100.0 * cos.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="class"):
        fuse_logits(torch.zeros(2, 10), torch.zeros(2, 100), 0.7, 1.0)


def test_fuse_features_unit_norm_and_lambda_one():
    g = torch.Generator().manual_seed(1)
    e_t = torch.randn(6, 8, generator=g)
    e_c = torch.randn(6, 8, generator=g)
    fused = fuse_features(e_t, e_c, 0.3)
    torch.testing.assert_close(fused.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(fuse_features(e_t, e_c, 1.0), e_t / e_t.norm(dim=1, keepdim=True))
    torch.testing.assert_close(fuse_features(e_t, e_c, 0.0), e_c / e_c.norm(dim=1, keepdim=True))


def test_fuse_features_hand_value():
    e_t = torch.tensor([[1.0, 0.0]])
    e_c = torch.tensor([[0.0, 1.0]])
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(fuse_features(e_t, e_c, 0.5), torch.tensor([[r, r]]))
    # 0.75 * [1, 0] + 0.25 * [0, 1] = [0.75, 0.25] -> / sqrt(0.625)
    n = math.sqrt(0.625)
    torch.testing.assert_close(fuse_features(e_t, e_c, 0.75), torch.tensor([[0.75 / n, 0.25 / n]]))
