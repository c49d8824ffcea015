"""Tests for ntk_poison.metrics: rates by enumeration, crossings and fits on curves whose
answers are known in closed form, the median distance against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from ntk_poison import metrics


# --------------------------------------------------------------------------- rates

def test_binary_rates_by_enumeration():
    f_p = np.array([[0.3, -0.2, 0.1, -1.0], [-0.3, 0.2, 0.1, 1.0]])    # (T=2, m=4)
    f_c = np.array([[0.2, 0.5, -0.1, -1.0], [-0.1, 0.4, 0.3, -2.0]])
    np.testing.assert_array_equal(metrics.attack_success_rate(f_p, 1.0), [0.5, 0.75])
    np.testing.assert_array_equal(metrics.attack_success_rate(f_p, -2.0), [0.5, 0.25])
    np.testing.assert_array_equal(metrics.trigger_alone_asr(f_c, 1.0), [0.5, 0.5])
    # poisoned says target, clean does not
    np.testing.assert_array_equal(metrics.flip_rate(f_p, f_c, 1.0), [0.25, 0.25])
    labels = np.array([1.0, -1.0, -1.0, -1.0])
    np.testing.assert_array_equal(metrics.clean_accuracy(f_p, labels), [0.75, 0.0])
    assert metrics.attack_success_rate(f_p[0], 1.0) == 0.5


def test_multiclass_rates_by_enumeration():
    f = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    assert metrics.attack_success_rate(f, 1, multiclass=True) == 0.5
    assert metrics.attack_success_rate(f, np.eye(3)[1], multiclass=True) == 0.5   # one-hot
    assert metrics.clean_accuracy(f, np.array([1, 0, 2, 0]), multiclass=True) == 0.75
    ff = np.stack([f, f[::-1]])                                           # (T, m, c)
    np.testing.assert_array_equal(metrics.attack_success_rate(ff, 1, multiclass=True),
                                  [0.5, 0.5])


# --------------------------------------------------------------------------- curves

def test_half_and_first_crossings_interpolate_in_log_x():
    xs = np.array([0.0, 1.0, 10.0, 100.0])
    assert metrics.half_crossing(xs, [0.0, 0.0, 1.0, 1.0]) == pytest.approx(np.sqrt(10.0))
    assert metrics.half_crossing(xs, [1.0, 1.0, 1.0, 1.0]) is None
    assert metrics.half_crossing(xs, [1.0, 1.0, 0.0, 0.0]) == pytest.approx(np.sqrt(10.0))
    assert metrics.first_crossing(xs, [1.0, 1.5, 3.0, 4.0], 2.0) == pytest.approx(10 ** (1 / 3))
    assert metrics.first_crossing(xs, [1.0, 1.5, 1.9, 1.0], 2.0) is None
    assert metrics.first_crossing(xs, [3.0, 1.0, 1.0, 1.0], 2.0) == 0.0      # at the start
    # x = 0 is drawn at the smallest positive x over zero_divisor: halfway in log
    # between 1/2 and 1, and between 1/10 and 1
    assert metrics.first_crossing(xs, [0.0, 1.0, 1.0, 1.0], 0.5) == pytest.approx(
        np.sqrt(0.5))
    assert metrics.first_crossing(xs, [1.0, 0.0, 0.0, 0.0], 0.5, direction="down",
                                  zero_divisor=10.0) == pytest.approx(np.sqrt(0.1))
    with pytest.raises(ValueError, match="direction"):
        metrics.first_crossing(xs, xs, 1.0, direction="sideways")


def test_kappa_half_rule_on_known_curves():
    """The defence's kappa_half: first kappa where rel <= 1/2, kappa = 0 a decade low."""
    x = np.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    half = lambda rel: metrics.first_crossing(x, rel, 0.5, direction="down",  # noqa: E731
                                              zero_divisor=10.0)
    assert half(np.array([1.0, 0.9, 0.7, 0.5, 0.2, 0.1])) == pytest.approx(1.0)
    assert half(np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.1])) == pytest.approx(
        np.exp(0.5 * np.log(3.0)), rel=1e-12)                 # between 1 and 3, in log
    assert half(np.ones(6)) is None


def test_interp_at_and_loglog_slope_on_power_laws():
    xs = np.geomspace(0.1, 100, 9)
    ys = 3.0 * xs ** 1.7
    assert metrics.loglog_slope(xs, ys) == pytest.approx(1.7, rel=1e-12)
    assert metrics.interp_at(xs, ys, 2.5) == pytest.approx(3.0 * 2.5 ** 1.7, rel=1e-12)
    assert metrics.interp_at(xs, -ys, 2.5) == pytest.approx(3.0 * 2.5 ** 1.7, rel=1e-12)
    assert np.isnan(metrics.loglog_slope([1.0, -1.0], [1.0, 2.0]))


def test_fit_linear_growth_on_a_line():
    x = np.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0])
    f = metrics.fit_linear_growth(x, 0.8 + 0.25 * x, growth_max=10.0)
    assert f["c"] == pytest.approx(0.25, rel=1e-12) and f["rel_rms"] < 1e-12
    assert f["intercept"] == pytest.approx(0.8, rel=1e-12) and f["n_points"] == 6
    f = metrics.fit_linear_growth(x, 0.8 + 0.25 * x, growth_max=0.5)  # 0.8 -> <= 1.2: x <= 1.6
    assert f["n_points"] == 4 and f["kappa_max"] == 1.0
    assert metrics.fit_linear_growth(x, -np.ones(6), 1.0)["c"] is None


# --------------------------------------------------------------------------- scales

@pytest.mark.parametrize("shape", [(40, 7), (40, 3, 3, 1)])
def test_median_distance_equals_scipy(shape, rng):
    X = rng.standard_normal(shape)
    want = np.median(pdist(X.reshape(len(X), -1)))
    assert metrics.median_distance(X) == pytest.approx(want, rel=1e-12)
    assert metrics.median_distance(X, n=10) == pytest.approx(
        np.median(pdist(X[:10].reshape(10, -1))), rel=1e-12)
