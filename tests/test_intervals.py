"""Intervals and the recovered-vs-random test against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qktrace.intervals import bootstrap_mean, paired_sign_test, wilson


@pytest.mark.parametrize("k,n", [(13, 20), (0, 20), (20, 20), (1, 3), (450, 900)])
def test_wilson_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    np.testing.assert_allclose([low, high], [expected.low, expected.high], atol=1e-12)


def test_wilson_is_vectorised_and_nan_for_no_prompts():
    low, high = wilson(np.array([1, 0, 3]), np.array([2, 0, 4]))
    assert np.isnan(low[1]) and np.isnan(high[1])
    assert low[0] < 0.5 < high[0] and low[2] < 0.75 < high[2]


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    k = rng.binomial(40, 0.3, size=4000)
    low, high = wilson(k, 40)
    coverage = np.mean((low <= 0.3) & (0.3 <= high))
    assert 0.93 < coverage < 0.97


def test_bootstrap_mean_is_near_the_normal_interval():
    x = np.random.default_rng(2).normal(1.0, 2.0, size=400)
    low, high = bootstrap_mean(x)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert abs(low - (x.mean() - half)) < 0.05 and abs(high - (x.mean() + half)) < 0.05


def test_sign_test_separates_a_real_effect_from_none():
    rng = np.random.default_rng(3)
    random = rng.binomial(1, 0.5, size=(10, 60)).astype(float)
    assert paired_sign_test(np.ones(60), random) < 0.001  # always flips; random half the time
    same = random[0]
    assert paired_sign_test(same, same[None].repeat(3, 0)) == 1.0  # no difference at all
    assert paired_sign_test(np.zeros(60), random) > 0.99  # worse than random
    # exact for a few prompts: 5 prompts all better -> 1/32
    assert paired_sign_test(np.ones(5), np.zeros((2, 5))) == pytest.approx(1 / 32)


def test_sign_test_skips_prompts_that_do_not_count():
    rec = np.array([1.0, np.nan, 1.0, 1.0])
    rand = np.array([[0.0, 1.0, 0.0, 0.0]])
    assert paired_sign_test(rec, rand) == pytest.approx(1 / 8)
