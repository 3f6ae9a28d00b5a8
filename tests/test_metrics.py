"""Metrics (thesis section 3.3) against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from advshield.attacks import metrics as M
from advshield.core.errors import InputError

# five samples; the last is misclassified without attack, so it is not attacked (N = 4)
CORRECT = np.array([True, True, True, True, False])
SUCCESS = np.array([True, True, False, True, True])
DISTORTION = np.array([0.5, 1.5, 9.0, 1.0, 0.0])


def test_clean_accuracy_success_probability_and_conditional_distortion():
    assert M.clean_accuracy(CORRECT) == 0.8  # N / N' = 4 / 5
    assert M.success_probability(SUCCESS, CORRECT) == 0.75  # 3 of the 4 correct samples broken
    assert M.conditional_distortion(DISTORTION, SUCCESS, CORRECT) == pytest.approx((0.5 + 1.5 + 1.0) / 3)


def test_operating_characteristic_and_p_upp():
    d, p = M.operating_characteristic(DISTORTION, SUCCESS, CORRECT)
    assert d.tolist() == [0.0, 0.5, 1.0, 1.5]
    assert p.tolist() == [0.0, 0.25, 0.5, 0.75]  # rises from P(0) = 0 to P(D_max) = P_suc
    assert p[-1] == M.success_probability(SUCCESS, CORRECT)
    _, at = M.operating_characteristic(DISTORTION, SUCCESS, CORRECT, grid=[0.4, 0.5, 1.2, 100])
    assert at.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert M.p_upp(DISTORTION, SUCCESS, CORRECT, 1.2) == 0.5
    assert M.p_upp(DISTORTION, SUCCESS, CORRECT, 0.5) == 0.25  # "distortion <= D_upp" is inclusive


def test_median_distortion_counts_unbroken_samples_as_infinite():
    # per correct sample: 0.5, 1.5, inf (not broken), 1.0 -> median (1.0 + 1.5) / 2
    assert M.median_distortion(DISTORTION, SUCCESS, CORRECT) == 1.25
    assert M.median_distortion(DISTORTION, np.zeros(5, bool), CORRECT) == math.inf


def test_robust_accuracy_over_an_eps_grid():
    # over all N' = 5 samples: correct and not broken within eps
    assert M.robust_accuracy(CORRECT, SUCCESS, DISTORTION, [0.0, 0.5, 1.0, 2.0]).tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_best_of_takes_the_least_successful_distortion_per_sample():
    success = np.array([[True, False, False], [True, True, False]])
    distortion = np.array([[2.0, 0.1, 9.0], [1.0, 3.0, 0.5]])
    broken, least = M.best_of(success, distortion)
    assert broken.tolist() == [True, True, False]
    assert least.tolist() == [1.0, 3.0, math.inf]  # a failure's distortion never counts


def test_detector_threshold_calibration_and_rates():
    clean = np.arange(1, 101, dtype=float)
    t = M.calibrate_threshold(clean, 0.05)
    assert t == 95.0 and (clean > t).mean() == 0.05
    assert M.calibrate_threshold(clean, 0.0) == 100.0
    assert M.calibrate_threshold(clean, 0.049) == 96.0  # never above the target rate
    fpr, tpr = M.detection_rates(clean, [50.0, 96.0, 99.0, 10.0], t)
    assert (fpr, tpr) == (0.05, 0.5)
    assert M.detection_rates(clean, [50.0, 96.0, 99.0, 10.0], t, mask=[True, True, False, False])[1] == 0.5
    with pytest.raises(InputError, match="0 <= fpr < 1"):
        M.calibrate_threshold(clean, 1.0)


def test_cost_per_image():
    assert M.cost(200, 4.0, 10) == {"gradients_per_image": 20.0, "seconds_per_image": 0.4, "images_per_second": 2.5}
    with pytest.raises(InputError, match="images must be > 0"):
        M.cost(1, 1.0, 0)


def test_summary_and_degenerate_cases():
    s = M.summary(CORRECT, SUCCESS, DISTORTION, d_upp=1.2, eps_grid=[0.5, 1.0])
    assert s == {
        "samples": 5, "correct": 4, "clean_accuracy": 0.8, "p_suc": 0.75, "mean_distortion": pytest.approx(1.0),
        "median_distortion": 1.25, "d_upp": 1.2, "p_upp": 0.5, "eps_grid": [0.5, 1.0],
        "robust_accuracy": pytest.approx([0.6, 0.4]),
    }
    nobody = np.zeros(5, bool)
    assert math.isnan(M.success_probability(SUCCESS, nobody))
    assert math.isnan(M.conditional_distortion(DISTORTION, nobody, CORRECT))  # no success: undefined
    with pytest.raises(InputError, match=r"same shape, got \(5,\) and \(4,\)"):
        M.success_probability(SUCCESS[:4], CORRECT)
