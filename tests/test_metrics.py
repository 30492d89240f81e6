"""Tests for richkd.metrics on hand-computed examples."""
import pytest
import torch
import torch.nn.functional as F

from richkd.metrics import ClassificationMeter, confidence_categories, expected_calibration_error, topk_correct


def test_topk_hand_example_and_k_larger_than_classes():
    logits = torch.tensor([[0.1, 0.5, 0.4],     # target 2: rank 2
                           [0.9, 0.05, 0.05],   # target 0: rank 1
                           [0.2, 0.3, 0.5]])    # target 0: rank 3
    target = torch.tensor([2, 0, 0])
    assert topk_correct(logits, target, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}
    assert topk_correct(logits, target) == {1: 1, 5: 3}
    with pytest.raises(ValueError):
        topk_correct(logits, target, ks=(0,))


# four classes; confidences 0.9 (correct), 0.7 (wrong), 0.75 (correct), 0.35 (correct)
PROBS = torch.tensor([[0.90, 0.05, 0.03, 0.02],
                      [0.70, 0.10, 0.10, 0.10],
                      [0.10, 0.75, 0.10, 0.05],
                      [0.30, 0.30, 0.35, 0.05]])
TARGET = torch.tensor([0, 1, 1, 2])


def test_ece_hand_example():
    # 5 bins of width 0.2: (0.8,1]: n=1 acc 1 conf .9 -> .1/4 ; (0.6,0.8]: n=2 acc .5 conf .725 -> .225*2/4 ;
    # (0.2,0.4]: n=1 acc 1 conf .35 -> .65/4  => 0.025 + 0.1125 + 0.1625 = 0.3
    assert expected_calibration_error(PROBS, TARGET, n_bins=5) == pytest.approx(0.3, abs=1e-6)
    # one bin: |acc - conf| over everything = |0.75 - 0.675|
    assert expected_calibration_error(PROBS, TARGET, n_bins=1) == pytest.approx(0.075, abs=1e-6)


def test_ece_zero_when_calibrated():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-9)


def test_confidence_categories_hand_example():
    # threshold 0.75: 0.9 correct -> confident_correct; 0.7 wrong -> uncertain_wrong;
    # 0.75 correct (== threshold counts as confident) -> confident_correct; 0.35 correct -> uncertain_correct
    got = confidence_categories(PROBS, TARGET, threshold=0.75)
    assert got == {"confident_correct": 2, "uncertain_correct": 1, "confidently_wrong": 0, "uncertain_wrong": 1}
    got = confidence_categories(PROBS, TARGET, threshold=0.5)
    assert got == {"confident_correct": 2, "uncertain_correct": 1, "confidently_wrong": 1, "uncertain_wrong": 0}


def test_meter_matches_one_shot_functions_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 7, generator=g) * 3
    target = torch.randint(0, 7, (37,), generator=g)
    meter = ClassificationMeter(n_bins=15, confidence_threshold=0.5)
    for lo in range(0, 37, 10):
        meter.update(logits[lo:lo + 10], target[lo:lo + 10])
    out = meter.compute()
    counts = topk_correct(logits, target)
    probs = logits.softmax(dim=1)
    assert out["n"] == 37
    assert out["top1"] == pytest.approx(100.0 * counts[1] / 37)
    assert out["top5"] == pytest.approx(100.0 * counts[5] / 37)
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    assert out["ece"] == pytest.approx(expected_calibration_error(probs, target), abs=1e-6)
    cats = confidence_categories(probs, target, 0.5)
    for name, count in cats.items():
        assert out[f"{name}_pct"] == pytest.approx(100.0 * count / 37)
    meter.reset()
    with pytest.raises(ValueError, match="no batches"):
        meter.compute()


def test_meter_hand_percentages_with_three_classes():
    meter = ClassificationMeter()
    meter.update(torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]]), torch.tensor([2, 0]))
    out = meter.compute()
    assert out["top1"] == pytest.approx(50.0) and out["top5"] == pytest.approx(100.0)
    assert "confident_correct_pct" not in out
