"""Sampling uncertainty of the rates and means qktrace reports, and recovered vs random tests.

- `wilson`: the 95% Wilson score interval of a proportion (an accuracy, a flip rate). Chosen over
  the normal ("Wald") interval because it stays inside [0, 1] and keeps its coverage at the small
  counts and extreme rates studies meet (20 prompts, a flip rate of 1.0).
- `bootstrap_mean`: a percentile bootstrap interval of a mean (a mean Δp), over prompts.
- `paired_sign_test`: whether an effect of the recovered subspace exceeds the random subspaces'
  on the same prompts: a sign-flip permutation test of the per-prompt differences (recovered
  minus the mean of the random draws), one-sided. It treats the random draws as fixed, so it
  says "better than these random subspaces on these prompts", with the prompts as the sample.

Plain numpy, so the CLI and the summaries use it without a model.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

LEVEL = 0.95


def wilson(successes: np.ndarray | float, n: np.ndarray | float, level: float = LEVEL):
    """(low, high) of the Wilson score interval for `successes` out of `n` (NaN where n is 0)."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    z = stats.norm.ppf(0.5 + level / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
        low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    empty = n <= 0
    return np.where(empty, np.nan, low), np.where(empty, np.nan, high)


def bootstrap_mean(
    values: np.ndarray, level: float = LEVEL, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """(low, high) percentile bootstrap interval of the mean of the finite `values`."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_sign_test(
    recovered: np.ndarray, random: np.ndarray, n_perm: int = 10000, seed: int = 0
) -> float:
    """One-sided p-value that the recovered subspace's per-prompt effect exceeds the random ones'.

    recovered [prompt], random [draw, prompt] (NaN where a prompt does not count, e.g. a flip of
    a prompt that did not attend to the original key). The statistic is the mean over prompts of
    recovered minus the draws' mean; its null flips the sign of each prompt's difference. Exact
    when there are at most 16 prompts, else `n_perm` random flips (p never below 1/(n_perm+1)).
    """
    rec = np.asarray(recovered, dtype=np.float64)
    rand = np.asarray(random, dtype=np.float64).reshape(-1, rec.size)
    diff = rec - np.nanmean(rand, axis=0) if rand.size else np.full_like(rec, np.nan)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return float("nan")
    observed = diff.mean()
    if diff.size <= 16:
        signs = 1 - 2 * ((np.arange(2**diff.size)[:, None] >> np.arange(diff.size)) & 1)
        null = (signs * diff).mean(axis=1)
        return float(np.mean(null >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, diff.size))
    null = (signs * diff).mean(axis=1)
    return float((1 + np.sum(null >= observed - 1e-12)) / (n_perm + 1))
