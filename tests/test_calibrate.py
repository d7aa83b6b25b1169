"""Calibration maths (pure numpy): temperature, thresholds, risk-coverage and the band."""

from __future__ import annotations

import numpy as np
import pytest

from pointsman_classifier import calibrate


def test_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 4, n)
    true_logits = rng.normal(0, 1, (n, 4))
    true_logits[np.arange(n), labels] += 1.5
    # sample labels from the calibrated model, then sharpen the logits 3x
    probs = calibrate.softmax(true_logits)
    sampled = np.array([rng.choice(4, p=p) for p in probs])
    t = calibrate.fit_temperature(true_logits * 3.0, sampled)
    assert t == pytest.approx(3.0, rel=0.15)
    before = calibrate.expected_calibration_error(calibrate.softmax(true_logits * 3.0), sampled)
    after = calibrate.expected_calibration_error(calibrate.softmax(true_logits * 3.0, t), sampled)
    assert after < before and after < 0.03


def test_threshold_at_fpr_flags_at_most_that_share() -> None:
    benign = np.linspace(0, 1, 1000)
    t = calibrate.threshold_at_fpr(benign, 0.01)
    assert (benign >= t).mean() <= 0.01
    assert (benign >= np.nextafter(benign[-11], -np.inf)).mean() > 0.01


def test_decide_risk_picks_the_class_furthest_over_its_threshold() -> None:
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.2, 0.5, 0.25, 0.05], [0.5, 0.1, 0.4, 0.0]])
    thresholds = np.array([1.0, 0.6, 0.2, 0.5])
    assert calibrate.decide_risk(probs, thresholds).tolist() == [0, 2, 2]


def test_risk_coverage_curve_and_band() -> None:
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    correct = np.array([True, True, True, True, True, True, True, True, True, False])
    curve = calibrate.risk_coverage_curve(conf, correct)
    assert curve[-1].coverage == 1.0 and curve[-1].accuracy == 0.9
    band = calibrate.ambiguity_band(conf, correct, target_accuracy=0.99, max_escalation=0.10)
    assert band.target_met and band.coverage == pytest.approx(0.9) and band.threshold == 0.3
    strict = calibrate.ambiguity_band(conf, ~correct | (conf > 0.5), 0.99, 0.10)
    assert not strict.target_met and strict.coverage == pytest.approx(0.9)


def test_reliability_bins_count_every_row() -> None:
    probs = calibrate.softmax(np.random.default_rng(1).normal(size=(500, 3)))
    labels = np.random.default_rng(2).integers(0, 3, 500)
    assert sum(n for _, _, n in calibrate.reliability(probs, labels)) == 500
