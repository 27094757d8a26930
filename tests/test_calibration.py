"""Expected calibration error: hand-computed cases."""

from __future__ import annotations

import pytest

from critique_rl.train.calibration import calibration_report, confidence_auroc, expected_calibration_error


def test_perfectly_calibrated_is_zero():
    # bin [0.8, 0.9): 5 samples at q = 0.8, 4 correct -> acc 0.8 = conf 0.8
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0)


def test_single_bin_overconfident():
    # all in the last bin: conf 0.95, acc 0.5 -> ECE = |0.5 - 0.95| = 0.45
    assert expected_calibration_error([0.95, 0.95, 0.95, 0.95], [1, 0, 1, 0]) == pytest.approx(0.45)


def test_two_bins_hand_computed():
    # bin 9 ([0.9, 1.0]): q = 0.9, 1.0 (conf 0.95), correct 1, 1 (acc 1.0)  -> |1.0 - 0.95| = 0.05, weight 2/5
    # bin 2 ([0.2, 0.3)): q = 0.2, 0.2, 0.2 (conf 0.2), correct 1, 0, 0 (acc 1/3) -> |1/3 - 0.2| = 2/15, weight 3/5
    # ECE = 2/5 * 0.05 + 3/5 * 2/15 = 0.02 + 0.08 = 0.10
    q = [0.9, 1.0, 0.2, 0.2, 0.2]
    c = [True, True, True, False, False]
    assert expected_calibration_error(q, c) == pytest.approx(0.10)


def test_bin_edges():
    # q = 1.0 goes to the last bin, q = 0.1 to bin 1 (left-closed), q = 0.0 to bin 0
    # bins=10: bin 9 {1.0: correct} -> 0; bin 1 {0.1: wrong} -> |0 - 0.1| * 1/3; bin 0 {0.0: correct} -> 1/3
    assert expected_calibration_error([1.0, 0.1, 0.0], [1, 0, 1]) == pytest.approx((0.1 + 1.0) / 3)


def test_single_bin_pools():
    # bins=1: mean conf (0.2 + 0.8) / 2 = 0.5, acc 1/2 -> ECE 0; with 10 bins each sample is its own bin:
    # bin 2: |0 - 0.2| / 2 = 0.1 ; bin 8: |1 - 0.8| / 2 = 0.1 -> 0.2
    assert expected_calibration_error([0.2, 0.8], [0, 1], bins=1) == pytest.approx(0.0)
    assert expected_calibration_error([0.2, 0.8], [0, 1], bins=10) == pytest.approx(0.2)


def test_errors():
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [1], bins=0)


def test_report_counts_unparsable_as_zero():
    # q: None -> 0 (bin 0, wrong -> 0 error), 0.9 correct -> |1 - 0.9| / 2 = 0.05
    r = calibration_report([None, 0.9], [False, True])
    assert r["ece"] == pytest.approx(0.05)
    assert r["unparsable_rate"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["mean_confidence"] == pytest.approx(0.45)
    # an unparsable confidence on a correct answer is maximally miscalibrated: |1 - 0| = 1
    assert calibration_report([None], [True])["ece"] == pytest.approx(1.0)
    # brier score: ((0 - 0)^2 + (0.9 - 1)^2) / 2 = 0.005; two distinct stated values; AUROC: 0.9 > 0 -> 1
    assert r["brier_score"] == pytest.approx(0.005)
    assert r["distinct_confidences"] == 2
    assert r["auroc"] == pytest.approx(1.0)


def test_auroc_hand_computed():
    # correct q: 0.9, 0.6; wrong q: 0.7, 0.6. pairs: (0.9>0.7)=1, (0.9>0.6)=1, (0.6<0.7)=0, (0.6=0.6)=0.5 -> 2.5/4
    assert confidence_auroc([0.9, 0.6, 0.7, 0.6], [True, True, False, False]) == pytest.approx(0.625)
    # a constant confidence cannot rank: 0.5, whatever its level
    assert confidence_auroc([0.95] * 4, [True, True, True, False]) == pytest.approx(0.5)
    # reversed ranking
    assert confidence_auroc([0.1, 0.9], [True, False]) == pytest.approx(0.0)
    # undefined without both classes
    assert confidence_auroc([0.5, 0.6], [True, True]) is None
    assert confidence_auroc([0.5], [False]) is None


def test_constant_confidence_at_accuracy_has_low_ece_but_chance_auroc():
    r = calibration_report([0.8] * 10, [True] * 8 + [False] * 2)
    assert r["ece"] == pytest.approx(0.0, abs=1e-12)
    assert r["auroc"] == pytest.approx(0.5)
    assert r["distinct_confidences"] == 1
    assert r["brier_score"] == pytest.approx((8 * 0.04 + 2 * 0.64) / 10)
