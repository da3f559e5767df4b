"""Intervals and the recovered-vs-random test against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qktrace.core.intervals import bootstrap_mean, paired_sign_test, wilson


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


# --------------------------------------------------------------------------------------------
# the intervals and tests beside every rate and mean: computed where the rate is


def _swaps(flip, attends, delta, random):
    import xarray as xr

    ps = ("subspace", "prompt")
    return xr.Dataset(
        {"flip": (ps, flip), "attends_orig": ("prompt", attends), "delta_p_target": (ps, delta)},
        coords={"subspace": [f"s{i}" for i in range(len(random))], "random": ("subspace", random)},
    )


def test_swap_intervals_are_wilson_over_attending_prompts_and_bootstrap_means():
    from qktrace.core.intervals import swap_intervals

    rng = np.random.default_rng(0)
    attends = np.array([True] * 14 + [False] * 6)
    flip = (rng.random((3, 20)) < [[0.8], [0.2], [0.1]]) & attends
    delta = rng.normal([[0.3], [0.0], [0.01]], 0.1, size=(3, 20))
    out = swap_intervals(_swaps(flip, attends, delta, [False, True, True]))
    for s in range(3):
        k = int(flip[s].sum())  # every flip is of an attending prompt; n is 14, not 20
        ci = stats.binomtest(k, 14).proportion_ci(method="wilson")
        np.testing.assert_allclose(
            [out.flip_rate_low[s], out.flip_rate_high[s]], [ci.low, ci.high], atol=1e-12
        )
        np.testing.assert_allclose(
            [out.mean_delta_p_target_low[s], out.mean_delta_p_target_high[s]],
            bootstrap_mean(delta[s]),
        )
    # the recovered subspace is tested against the draws, prompt by prompt; the draws are not
    flip_f = np.where(attends, flip.astype(float), np.nan)
    assert out.flip_rate_p_vs_random[0] == paired_sign_test(flip_f[0], flip_f[1:])
    assert out.mean_delta_p_target_p_vs_random[0] == paired_sign_test(delta[0], delta[1:])
    assert out.mean_delta_p_target_p_vs_random[0] < 0.001
    assert np.isnan(out.flip_rate_p_vs_random[1:]).all()


def test_intervene_and_intervene_answers_keep_intervals_beside_their_rates(llama):
    from qktrace.verbs.answers import intervene_answers
    from qktrace.verbs.intervene import intervene

    prompts = ["The apple is in Box A, the cat is in Box B.", "Which box is the cat in? Box"] * 3
    v = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 6)))[0]
    fx = intervene(llama, prompts, "1.1", v, orig=[1] * 6, target=[4] * 6, n_random=3,
                   progress=False)  # fmt: skip
    n = int(fx.attends_orig.sum())
    assert n > 0
    for s in range(4):
        low, high = wilson(int(fx.flip.values[s].sum()), n)
        np.testing.assert_allclose([fx.flip_rate_low[s], fx.flip_rate_high[s]], [low, high])
        assert fx.mean_delta_p_target_low[s] <= fx.mean_delta_p_target[s]
        assert fx.mean_delta_p_target[s] <= fx.mean_delta_p_target_high[s]
    assert np.isfinite(fx.flip_rate_p_vs_random[0]) and np.isnan(fx.flip_rate_p_vs_random[1])
    ans = intervene_answers(
        llama, prompts, {"1.1": v}, candidates=[[10, 11, 12, 13]] * 6, answer=[0] * 6,
        target_answer=[1] * 6, orig=[1] * 6, target=[4] * 6, n_random=2, progress=False,
    )  # fmt: skip
    low, high = wilson(int(ans.answer_flip.values[0].sum()), int(ans.answer_correct.sum()))
    np.testing.assert_allclose([ans.answer_flip_rate_low[0], ans.answer_flip_rate_high[0]],
                               [low, high])  # fmt: skip
    p = paired_sign_test(-ans.delta_answer_logit_diff.values[0],
                         -ans.delta_answer_logit_diff.values[1:])  # fmt: skip
    assert float(ans.mean_delta_answer_logit_diff_p_vs_random[0]) == p


def test_the_summary_prints_intervals_and_says_when_an_effect_is_like_random():
    from qktrace.core.intervals import swap_intervals
    from qktrace.study.summary import summarize

    rng = np.random.default_rng(0)
    attends = np.ones(30, dtype=bool)
    flip = rng.random((3, 30)) < 0.3  # recovered no better than random
    delta = rng.normal(0, 0.1, size=(3, 30))
    ds = _swaps(flip, attends, delta, [False, True, True])
    ds = ds.assign(
        flip_rate=ds.flip.mean("prompt"), mean_delta_p_target=ds.delta_p_target.mean("prompt")
    ).assign(swap_intervals(ds).data_vars)
    text = summarize(ds)
    low, high = float(ds.flip_rate_low[0]), float(ds.flip_rate_high[0])
    assert f"{float(ds.flip_rate[0]):.3f} [{low:.3f}, {high:.3f}]" in text
    p = float(ds.flip_rate_p_vs_random[0])
    assert p >= 0.05
    assert "Not distinguishable from random subspaces (p >= 0.05)" in text
    assert f"s0 flip rate (p = {p:.3g})" in text


def test_the_summary_shows_p_to_three_digits_and_names_an_effect_random_moved_the_other_way():
    """A p of 0.0496 is not printed as 0.050 (which reads as p >= 0.05); a mean that beats the
    random subspaces only because they moved the other way (its own interval holds 0) is named."""
    from qktrace.core.intervals import swap_intervals
    from qktrace.study.summary import format_p, summarize

    assert (format_p(0.0496), format_p(0.0004), format_p(0.5), format_p(float("nan"))) == (
        "0.0496",
        "<0.001",
        "0.5",
        "",
    )
    rng = np.random.default_rng(1)
    attends = np.ones(40, dtype=bool)
    flip = np.zeros((3, 40), dtype=bool)
    delta = np.concatenate(
        [rng.normal(0, 0.05, size=(1, 40)), rng.normal(-0.2, 0.05, size=(2, 40))]
    )  # the recovered subspace moves nothing; the random ones lower p_target
    ds = _swaps(flip, attends, delta, [False, True, True])
    ds = ds.assign(
        flip_rate=ds.flip.mean("prompt"), mean_delta_p_target=ds.delta_p_target.mean("prompt")
    ).assign(swap_intervals(ds).data_vars)
    assert float(ds.mean_delta_p_target_p_vs_random[0]) < 0.05
    text = summarize(ds)
    assert "Beyond random only because the random subspaces moved it the other way" in text
    assert (
        "s0 mean Δp(target)" in text.split("the other way")[1]
        or "s0" in text.split("the other way")[1]
    )
