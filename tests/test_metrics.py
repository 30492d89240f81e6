"""Tests for richkd.metrics on hand-computed examples."""
import pytest
import torch
import torch.nn.functional as F

from richkd.metrics import ClassificationMeter, reliability_bins


def test_meter_topk_hand_example_and_top5_of_three_classes():
    meter = ClassificationMeter()
    meter.update(torch.tensor([[0.1, 0.5, 0.4],     # target 2: rank 2
                               [0.9, 0.05, 0.05],   # target 0: rank 1
                               [0.2, 0.3, 0.5]]),   # target 0: rank 3
                 torch.tensor([2, 0, 0]))
    out = meter.compute()
    assert out["top1"] == pytest.approx(100 / 3) and out["top5"] == pytest.approx(100.0)   # top-5 of 3 classes
    assert "confident_correct_pct" not in out                 # categories only with a confidence threshold


# four classes; confidences 0.9 (correct), 0.7 (wrong), 0.75 (correct), 0.35 (correct)
PROBS = torch.tensor([[0.90, 0.05, 0.03, 0.02],
                      [0.70, 0.10, 0.10, 0.10],
                      [0.10, 0.75, 0.10, 0.05],
                      [0.30, 0.30, 0.35, 0.05]])
TARGET = torch.tensor([0, 1, 1, 2])


def measured(probs, target, **kwargs) -> dict:
    """The meter on class probabilities: log-probabilities are logits whose softmax is `probs`."""
    meter = ClassificationMeter(**kwargs)
    meter.update(probs.log(), target)
    return meter.compute()


def test_ece_hand_example():
    # 5 bins of width 0.2: (0.8,1]: n=1 acc 1 conf .9 -> .1/4 ; (0.6,0.8]: n=2 acc .5 conf .725 -> .225*2/4 ;
    # (0.2,0.4]: n=1 acc 1 conf .35 -> .65/4  => 0.025 + 0.1125 + 0.1625 = 0.3
    assert measured(PROBS, TARGET, n_bins=5)["ece"] == pytest.approx(0.3, abs=1e-6)
    # one bin: |acc - conf| over everything = |0.75 - 0.675|
    assert measured(PROBS, TARGET, n_bins=1)["ece"] == pytest.approx(0.075, abs=1e-6)
    # the reliability diagram's bins are the same bins: counts, means, and the ECE they add up to
    confidence, pred = PROBS.max(dim=1)
    bins = reliability_bins(confidence, pred.eq(TARGET), n_bins=5)
    assert bins["count"] == [0, 1, 0, 2, 1] and bins["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins["accuracy"] == [None, 1.0, None, 0.5, 1.0]
    assert bins["confidence"][3] == pytest.approx(0.725) and bins["ece"] == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(confidence, pred.eq(TARGET), n_bins=0)


def test_ece_zero_when_calibrated():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert measured(probs, torch.tensor([0, 0, 0, 1]))["ece"] == pytest.approx(0.0, abs=1e-7)


def test_confidence_categories_hand_example():
    # threshold 0.75: 0.9 correct -> confident_correct; 0.7 wrong -> uncertain_wrong;
    # 0.75 correct (== threshold counts as confident) -> confident_correct; 0.35 correct -> uncertain_correct
    # (the threshold is the meter's own float32 confidence of row 2, 0.75 up to rounding: equality is exact)
    got = measured(PROBS, TARGET, confidence_threshold=float(PROBS.log().softmax(dim=1)[2].max()))
    assert [got[f"{k}_pct"] for k in ("confident_correct", "uncertain_correct", "confidently_wrong",
                                      "uncertain_wrong")] == [50.0, 25.0, 0.0, 25.0]
    got = measured(PROBS, TARGET, confidence_threshold=0.5)
    assert [got[f"{k}_pct"] for k in ("confident_correct", "uncertain_correct", "confidently_wrong",
                                      "uncertain_wrong")] == [50.0, 25.0, 25.0, 0.0]


def test_meter_matches_one_shot_functions_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 7, generator=g) * 3
    target = torch.randint(0, 7, (37,), generator=g)
    meter = ClassificationMeter(n_bins=15, confidence_threshold=0.5)
    for lo in range(0, 37, 10):
        meter.update(logits[lo:lo + 10], target[lo:lo + 10])
    out = meter.compute()
    top5 = logits.topk(5, dim=1).indices.eq(target.view(-1, 1))
    probs = logits.softmax(dim=1)
    assert out["n"] == 37
    assert out["top1"] == pytest.approx(100.0 * int(top5[:, 0].sum()) / 37)
    assert out["top5"] == pytest.approx(100.0 * int(top5.sum()) / 37)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    confidence, pred = probs.max(dim=1)
    assert out["ece"] == pytest.approx(reliability_bins(confidence, pred.eq(target))["ece"], abs=1e-6)
    assert meter.bins()["count"] == reliability_bins(confidence, pred.eq(target))["count"]
    confident, correct = confidence >= 0.5, pred.eq(target)
    for name, (c, k) in {"confident_correct": (True, True), "uncertain_correct": (False, True),
                         "confidently_wrong": (True, False), "uncertain_wrong": (False, False)}.items():
        assert out[f"{name}_pct"] == pytest.approx(100.0 * int(((confident == c) & (correct == k)).sum()) / 37)
    meter.reset()
    with pytest.raises(ValueError, match="no batches"):
        meter.compute()
