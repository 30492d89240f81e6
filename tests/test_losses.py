"""Tests for richkd.losses: KD against explicit formulas, CRD sampling / memory / NCE / gradients."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from richkd.losses import ContrastMemory, EmbedHead, FusedCRD, kd_loss, nce_loss


# ----- KD --------------------------------------------------------------------------------------

def _kd_numpy(z_s, z_t, t):
    """T^2 * mean_i sum_k p_T log(p_T / p_S), written out."""
    z_s = np.asarray(z_s, dtype=np.float64) / t
    z_t = np.asarray(z_t, dtype=np.float64) / t
    p_s = np.exp(z_s) / np.exp(z_s).sum(axis=1, keepdims=True)
    p_t = np.exp(z_t) / np.exp(z_t).sum(axis=1, keepdims=True)
    return t * t * np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1))


Z_S = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
Z_T = [[3.0, 1.0, 0.0], [0.0, 2.0, -2.0]]


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_kd_matches_explicit_formula(t):
    got = kd_loss(torch.tensor(Z_S), torch.tensor(Z_T), t)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(_kd_numpy(Z_S, Z_T, t), rel=1e-5)


def test_kd_closed_form_value():
    # p_T = (1/4, 1/2, 1/4), p_S uniform: KL = 0.5 ln 0.75 + 0.5 ln 1.5 = 0.5 ln 1.125
    z_t = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))
    got = kd_loss(torch.zeros(1, 3), z_t, 1.0)
    assert got.item() == pytest.approx(0.5 * math.log(1.125), rel=1e-5)


def test_kd_zero_for_equal_logits_and_fp16_inputs():
    z = torch.tensor(Z_S)
    assert kd_loss(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)
    got = kd_loss(z.half(), torch.tensor(Z_T).half(), 3.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_kd_numpy(Z_S, Z_T, 3.0), rel=1e-3)


def test_kd_gradient_is_t_times_prob_difference():
    t = 3.0
    z_s = torch.tensor(Z_S, requires_grad=True)
    z_t = torch.tensor(Z_T)
    kd_loss(z_s, z_t, t).backward()
    expected = t * (F.softmax(z_s.detach() / t, 1) - F.softmax(z_t / t, 1)) / z_s.shape[0]
    torch.testing.assert_close(z_s.grad, expected)


# ----- CRD: sampling ----------------------------------------------------------------------------

def _targets():
    # imbalanced classes, interleaved so that class order != row order
    cls = [0] * 5 + [1] * 3 + [2] * 7 + [3] * 1
    g = torch.Generator().manual_seed(3)
    return torch.tensor(cls)[torch.randperm(len(cls), generator=g)]


@pytest.mark.parametrize("sampling, rejection_ratio", [("other_class", 32), ("other_class", 0), ("uniform", 32)])
def test_negatives_come_only_from_other_classes_and_cover_them_uniformly(monkeypatch, sampling, rejection_ratio):
    import richkd.losses.crd as crd

    monkeypatch.setattr(crd, "_REJECTION_RATIO", rejection_ratio)   # 0: the large-N rejection sampler
    targets = _targets()
    n = targets.numel()
    mem = ContrastMemory(4, targets, nce_k=8, sampling=sampling)          # class 2 has 16 - 7 = 9 others
    torch.manual_seed(0)
    index = torch.arange(n)
    counts = torch.zeros(n, n)
    for _ in range(300):
        ci = mem.sample(index)
        assert ci.shape == (n, 9) and ci.dtype == torch.int64
        assert torch.equal(ci[:, 0], index)
        neg = ci[:, 1:]
        assert int(neg.min()) >= 0 and int(neg.max()) < n
        assert not (targets[neg] == targets[index].unsqueeze(1)).any()
        counts.index_put_((index.unsqueeze(1).expand_as(neg), neg), torch.ones_like(neg, dtype=torch.float),
                          accumulate=True)
    for i in range(n):
        others = (targets != targets[i]).nonzero().flatten()
        c = counts[i, others]
        expected = 300 * 8 / others.numel()
        assert (c > 0).all(), f"row {i}: some other-class rows are never drawn"
        assert (c - expected).abs().max() < 0.5 * expected   # loose uniformity (>= 160 draws per cell)


@pytest.mark.parametrize("sampling", ["other_class", "uniform"])
def test_sampling_is_reproducible_under_manual_seed(sampling):
    mem = ContrastMemory(4, _targets(), nce_k=5, sampling=sampling)
    index = torch.tensor([0, 3, 7])
    torch.manual_seed(11)
    a = mem.sample(index)
    torch.manual_seed(11)
    b = mem.sample(index)
    assert torch.equal(a, b)


@pytest.mark.parametrize("keys_per_chunk, rejection_ratio", [(1 << 24, 32), (20, 32), (1 << 24, 0)])
def test_other_class_sampling_draws_k_distinct_rows_per_sample(monkeypatch, keys_per_chunk, rejection_ratio):
    """The official CRD dataset's draw: K rows of other classes WITHOUT replacement for every sample; the
    uniform sampler draws with replacement (with K = 8 of 9 rows, repeats are all but certain). keys_per_chunk 20:
    one sample per chunk of keys; rejection_ratio 0: the rejection sampler large N uses, here on small N."""
    import richkd.losses.crd as crd

    monkeypatch.setattr(crd, "_KEYS_PER_CHUNK", keys_per_chunk)
    monkeypatch.setattr(crd, "_REJECTION_RATIO", rejection_ratio)
    targets = _targets()
    index = torch.arange(targets.numel()).repeat(4)
    torch.manual_seed(0)
    distinct = ContrastMemory(4, targets, nce_k=8).sample(index)[:, 1:]
    assert all(len(set(row)) == 8 for row in distinct.tolist())
    assert not (targets[distinct] == targets[index].unsqueeze(1)).any()
    iid = ContrastMemory(4, targets, nce_k=8, sampling="uniform").sample(index)[:, 1:]
    assert any(len(set(row)) < 8 for row in iid.tolist())
    # class 2 has exactly 9 other rows: 8 distinct of them leave out exactly one, a different one across draws
    rows2 = (targets == 2).nonzero().flatten()
    left_out = {tuple(sorted(set((targets != 2).nonzero().flatten().tolist()) - set(row)))
                for row in distinct[torch.isin(index, rows2)].tolist()}
    assert all(len(x) == 1 for x in left_out) and len(left_out) > 1


def test_nce_k_too_large_is_a_clear_error():
    targets = _targets()          # class 2 has only 9 rows of other classes
    with pytest.raises(ValueError, match=r"loss\.nce_k=9 exceeds the 9 samples of other classes"):
        FusedCRD(8, 8, None, 4, targets, nce_k=9)
    FusedCRD(8, 8, None, 4, targets, nce_k=8)       # the largest allowed value builds


# ----- CRD: memory, Z and the NCE value -----------------------------------------------------------

def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nce_numpy(out, n_data):
    """mdistiller ContrastLoss written out (without its 1e-7 eps): out (B, K+1) = P, column 0 positive."""
    b, cols = out.shape
    c = (cols - 1) / n_data
    pos = np.log(out[:, 0] / (out[:, 0] + c))
    neg = np.log(c / (out[:, 1:] + c))
    return -(pos.sum() + neg.sum()) / b


@pytest.mark.parametrize("mom", [0.5, 0.8])    # 0.5 (CRD's default) cannot tell mom from 1 - mom
@pytest.mark.parametrize("mode", ["dense", "gather"])
def test_nce_value_and_updates_by_hand(mode, mom):
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    n, d, k, tau = 6, 2, 2, 0.5
    mem = ContrastMemory(d, targets, nce_k=k, temperature=tau, momentum=mom, score_mode=mode)
    m_s = _unit([[1, 0], [0, 1], [1, 1], [1, -1], [2, 1], [-1, 2]])
    m_t = _unit([[0, 1], [1, 0], [-1, 1], [1, 2], [3, -1], [1, 1]])
    mem.memory_student.copy_(torch.tensor(m_s, dtype=torch.float32))
    mem.memory_teacher.copy_(torch.tensor(m_t, dtype=torch.float32))
    v_s = _unit([[1, 2], [-2, 1]])
    v_t = _unit([[2, -1], [1, 1]])
    index = torch.tensor([0, 3])
    ci = torch.tensor([[0, 2, 5], [3, 0, 4]])

    log_p_s, log_p_t = mem(torch.tensor(v_s, dtype=torch.float32), torch.tensor(v_t, dtype=torch.float32),
                           index, contrast_index=ci)
    # CRD out_v1: student embedding vs TEACHER memory; out_v2: teacher embedding vs STUDENT memory
    e_s = np.exp(np.einsum("bkd,bd->bk", m_t[ci.numpy()], v_s) / tau)
    e_t = np.exp(np.einsum("bkd,bd->bk", m_s[ci.numpy()], v_t) / tau)
    z_s, z_t = e_s.mean() * n, e_t.mean() * n
    np.testing.assert_allclose(log_p_s.numpy(), np.log(e_s / z_s), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_p_t.numpy(), np.log(e_t / z_t), rtol=1e-5, atol=1e-5)
    assert math.exp(mem.log_z_student.item()) == pytest.approx(z_s, rel=1e-5)
    assert math.exp(mem.log_z_teacher.item()) == pytest.approx(z_t, rel=1e-5)
    loss = nce_loss(log_p_s, n) + nce_loss(log_p_t, n)
    assert loss.item() == pytest.approx(_nce_numpy(e_s / z_s, n) + _nce_numpy(e_t / z_t, n), rel=1e-5)

    # momentum update at the positives only, rows renormalised
    new_s, new_t = m_s.copy(), m_t.copy()
    new_s[[0, 3]] = _unit(mom * m_s[[0, 3]] + (1 - mom) * v_s)
    new_t[[0, 3]] = _unit(mom * m_t[[0, 3]] + (1 - mom) * v_t)
    np.testing.assert_allclose(mem.memory_student.numpy(), new_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mem.memory_teacher.numpy(), new_t, rtol=1e-5, atol=1e-6)

    # second batch: Z stays fixed at the first batch's value, scores use the updated memory
    v2 = _unit([[0, 1], [1, 0]])
    log_p_s2, _ = mem(torch.tensor(v2, dtype=torch.float32), torch.tensor(v2, dtype=torch.float32),
                      torch.tensor([1, 4]), contrast_index=torch.tensor([[1, 3, 4], [4, 0, 3]]))
    e_s2 = np.exp(np.einsum("bkd,bd->bk", new_t[[[1, 3, 4], [4, 0, 3]]], v2) / tau)
    np.testing.assert_allclose(log_p_s2.numpy(), np.log(e_s2 / z_s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gather_bytes", [1 << 28, 1])    # 1: the gather path works one sample at a time
def test_dense_and_gather_scores_agree_with_gradients(monkeypatch, gather_bytes):
    import richkd.losses.crd as crd

    monkeypatch.setattr(crd, "_GATHER_BYTES", gather_bytes)
    targets = torch.arange(40) % 4
    torch.manual_seed(0)
    a = ContrastMemory(8, targets, nce_k=20, score_mode="dense")
    b = ContrastMemory(8, targets, nce_k=20, score_mode="gather")
    b.load_state_dict(a.state_dict())
    v = F.normalize(torch.randn(5, 8), dim=1)
    index = torch.tensor([1, 7, 12, 30, 39])
    ci = a.sample(index)
    grads = []
    for mem in (a, b):
        vs = v.clone().requires_grad_()
        vt = v.clone().flip(0).requires_grad_()
        ls, lt = mem(vs, vt, index, contrast_index=ci)
        (nce_loss(ls, 40) + nce_loss(lt, 40)).backward()
        grads.append((ls.detach(), lt.detach(), vs.grad, vt.grad))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.memory_student, b.memory_student)


def test_memory_init_range_rows_unit_after_updates_and_state_dict():
    targets = torch.arange(30) % 3
    torch.manual_seed(0)
    crd = FusedCRD(6, 5, 7, 16, targets, nce_k=10)
    stdv = 1 / math.sqrt(16 / 3)
    mem = crd.contrast
    assert mem.memory_student.shape == (30, 16) and mem.memory_teacher.shape == (30, 16)
    assert mem.memory_student.abs().max() <= stdv and mem.memory_teacher.abs().max() <= stdv
    assert torch.isnan(mem.log_z_student) and torch.isnan(mem.log_z_teacher)
    touched = torch.zeros(30, dtype=torch.bool)
    for step in range(4):
        index = torch.randperm(30)[:8]
        touched[index] = True
        loss = crd(torch.randn(8, 6), torch.randn(8, 5), torch.randn(8, 7), 0.7, index)
        assert torch.isfinite(loss) and loss.item() > 0
    for bank in (mem.memory_student, mem.memory_teacher):
        torch.testing.assert_close(bank[touched].norm(dim=1), torch.ones(int(touched.sum())))
    assert torch.isfinite(mem.log_z_student) and torch.isfinite(mem.log_z_teacher)

    sd = crd.state_dict()
    for key in ("contrast.memory_student", "contrast.memory_teacher", "contrast.log_z_student",
                "contrast.log_z_teacher", "embed_student.linear.weight", "embed_clip.linear.weight"):
        assert key in sd
    assert not any(k.endswith(("class_of", "class_order", "class_start", "class_count")) for k in sd)
    fresh = FusedCRD(6, 5, 7, 16, targets, nce_k=10)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.contrast.memory_teacher, mem.memory_teacher)
    assert torch.equal(fresh.contrast.log_z_student, mem.log_z_student)


# ----- FusedCRD: gradients and argument checks ----------------------------------------------------

def _crd_inputs(b=6, half=False):
    h_s = torch.randn(b, 6, requires_grad=True)
    h_t = torch.randn(b, 5, requires_grad=True)     # pretend constants from frozen teachers
    e_c = torch.randn(b, 7, requires_grad=True)
    if half:
        h_t, e_c = h_t.detach().half().requires_grad_(), e_c.detach().half().requires_grad_()
    return h_s, h_t, e_c


def test_gradients_reach_heads_but_not_teacher_inputs():
    torch.manual_seed(0)
    crd = FusedCRD(6, 5, 7, 16, torch.arange(30) % 3, nce_k=10)
    h_s, h_t, e_c = _crd_inputs()
    loss = crd(h_s, h_t, e_c, 0.7, torch.arange(6))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for head in (crd.embed_student, crd.embed_teacher, crd.embed_clip):
        assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    assert h_s.grad is not None and h_s.grad.abs().sum() > 0
    assert h_t.grad is None and e_c.grad is None


def test_student_side_trains_student_head_teacher_side_trains_teacher_heads():
    """Pairing check (mdistiller out_v1 / out_v2): each NCE term reaches only its own side's heads."""
    torch.manual_seed(0)
    crd = FusedCRD(6, 5, 7, 16, torch.arange(30) % 3, nce_k=10)
    h_s, h_t, e_c = _crd_inputs()
    v_s = crd.embed_student(h_s)
    from richkd.fusion import fuse_features
    v_t = fuse_features(crd.embed_teacher(h_t.detach()), crd.embed_clip(e_c.detach()), 0.7)
    log_p_s, log_p_t = crd.contrast(v_s, v_t, torch.arange(6))
    nce_loss(log_p_s, 30).backward(retain_graph=True)
    assert crd.embed_student.linear.weight.grad.abs().sum() > 0
    assert crd.embed_teacher.linear.weight.grad is None and crd.embed_clip.linear.weight.grad is None
    crd.zero_grad(set_to_none=True)
    nce_loss(log_p_t, 30).backward()
    assert crd.embed_student.linear.weight.grad is None
    assert crd.embed_teacher.linear.weight.grad.abs().sum() > 0 and crd.embed_clip.linear.weight.grad.abs().sum() > 0


def test_teacher_only_and_argument_errors():
    torch.manual_seed(0)
    targets = torch.arange(30) % 3
    h_s, h_t, e_c = _crd_inputs(half=True)             # fp16 cached teacher/CLIP features are accepted
    index = torch.arange(6)
    no_clip = FusedCRD(6, 5, None, 16, targets, nce_k=10)
    assert no_clip.embed_clip is None
    assert torch.isfinite(no_clip(h_s, h_t, None, 1.0, index))
    with pytest.raises(ValueError, match="without a CLIP head"):
        no_clip(h_s, h_t, e_c, 0.7, index)
    with_clip = FusedCRD(6, 5, 7, 16, targets, nce_k=10)
    with pytest.raises(ValueError, match="e_clip"):
        with_clip(h_s, h_t, None, 0.7, index)
    loss = with_clip(h_s, h_t, e_c, 0.7, index)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert with_clip.embed_clip.linear.weight.grad is not None


def test_embed_head_shapes_and_norm():
    head = EmbedHead(12, 4)
    out = head(torch.randn(3, 3, 2, 2))   # flattened to (3, 12)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
