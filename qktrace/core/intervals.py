"""Sampling uncertainty of the rates and means qktrace reports, and recovered vs random tests.

- `wilson`: the 95% Wilson score interval of a proportion (an accuracy, a flip rate). Chosen over
  the normal ("Wald") interval because it stays inside [0, 1] and keeps its coverage at the small
  counts and extreme rates studies meet (20 prompts, a flip rate of 1.0).
- `bootstrap_mean`: a percentile bootstrap interval of a mean (a mean Δp), over prompts.
- `paired_sign_test`: whether an effect of the recovered subspace exceeds the random subspaces'
  on the same prompts: a sign-flip permutation test of the per-prompt differences (recovered
  minus the mean of the random draws), one-sided. It treats the random draws as fixed, so it
  says "better than these random subspaces on these prompts", with the prompts as the sample.

Plain numpy (and xarray for the labelled `rate`, `mean` and `vs_random` the stores use), so the
CLI and the summaries use it without a model.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from scipy import stats

LEVEL = 0.95

# the variables `swap_intervals` and `answer_intervals` add beside the rates and means
SWAP_INTERVALS = (
    "flip_rate_low",
    "flip_rate_high",
    "mean_delta_p_target_low",
    "mean_delta_p_target_high",
    "flip_rate_p_vs_random",
    "mean_delta_p_target_p_vs_random",
)
ANSWER_INTERVALS = (
    "answer_flip_rate_low",
    "answer_flip_rate_high",
    "mean_delta_p_answer_low",
    "mean_delta_p_answer_high",
    "mean_delta_answer_logit_diff_low",
    "mean_delta_answer_logit_diff_high",
    "answer_flip_rate_p_vs_random",
    "mean_delta_answer_logit_diff_p_vs_random",
)


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
    with warnings.catch_warnings():  # a prompt no draw counts (all NaN) drops out: no warning
        warnings.simplefilter("ignore", RuntimeWarning)
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


# --------------------------------------------------------------------------------------------
# labelled versions: the intervals and tests the stores keep beside each rate and mean


def rate(name: str, hits: xr.DataArray, eligible: xr.DataArray, dim: str = "prompt") -> xr.Dataset:
    """``name`` = hits / eligible summed over `dim`, with ``name_low``/``name_high``: its 95%
    Wilson interval (NaN where no prompt is eligible). hits counts only eligible prompts."""
    k = (hits & eligible).sum(dim) if hits.dtype == bool else (hits * eligible).sum(dim)
    k, n = xr.broadcast(k, eligible.sum(dim))
    low, high = wilson(k.values, n.values)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = k / n
    return xr.Dataset(
        {name: value, f"{name}_low": k.copy(data=low), f"{name}_high": k.copy(data=high)}
    )


def mean(name: str, values: xr.DataArray, dim: str = "prompt") -> xr.Dataset:
    """``name`` = the mean of the finite `values` over `dim`, with ``name_low``/``name_high``:
    its 95% percentile bootstrap interval over that dim (`bootstrap_mean`, seed 0)."""

    def bounds(x: np.ndarray) -> np.ndarray:
        return np.array(bootstrap_mean(x))

    ci = xr.apply_ufunc(
        bounds, values.astype(np.float64), input_core_dims=[[dim]], output_core_dims=[["_b"]],
        vectorize=True, dask_gufunc_kwargs={"output_sizes": {"_b": 2}},
    )  # fmt: skip
    finite = values.where(np.isfinite(values))
    return xr.Dataset(
        {
            name: finite.mean(dim),
            f"{name}_low": ci.isel(_b=0, drop=True),
            f"{name}_high": ci.isel(_b=1, drop=True),
        }
    )


def vs_random(
    name: str, values: xr.DataArray, random: np.ndarray, subspace: str, dim: str = "prompt"
) -> xr.DataArray:
    """``name``: per recovered subspace (NaN for the random ones), the `paired_sign_test`
    p-value that its per-prompt `values` exceed the random subspaces' on the same prompts.

    values [..., subspace, prompt] (NaN where a prompt does not count); `random` marks the
    random draws along `subspace`. Every recovered subspace is tested against all the draws.
    """
    random = np.asarray(random, dtype=bool)
    draws = values.isel({subspace: np.flatnonzero(random)}).transpose(..., subspace, dim)
    template = values.isel({dim: 0}, drop=True).reset_coords(drop=True)
    p = xr.full_like(template, np.nan, dtype=np.float64)
    if not random.any():
        return p.rename(name)
    for s in np.flatnonzero(~random):
        rec = values.isel({subspace: s}).transpose(..., dim)
        flat_rec = rec.values.reshape(-1, rec.sizes[dim])
        flat_draws = draws.values.reshape(-1, draws.sizes[subspace], draws.sizes[dim])
        tested = [paired_sign_test(r, d) for r, d in zip(flat_rec, flat_draws, strict=True)]
        p.loc[{subspace: values[subspace].values[s]}] = np.array(tested).reshape(
            rec.isel({dim: 0}).shape
        )
    return p.rename(name)


def swap_intervals(effects: xr.Dataset) -> xr.Dataset:
    """Beside an attention-level swap's ``flip_rate`` and ``mean_delta_p_target``: their 95%
    intervals (``*_low``/``*_high``: Wilson over the prompts that attended to orig, bootstrap over
    prompts) and ``*_p_vs_random`` per recovered subspace (`vs_random`).

    `effects` holds per-prompt ``flip``, ``attends_orig`` and ``delta_p_target`` over
    ``subspace`` (with its bool ``random`` coordinate) and ``prompt``, as `qktrace.intervene`
    returns them or stacked over heads."""
    flip, attends = effects["flip"], effects["attends_orig"]
    delta = effects["delta_p_target"]
    random = effects["random"].values
    flips = rate("flip_rate", flip, attends)
    deltas = mean("mean_delta_p_target", delta)
    return xr.Dataset(
        {
            "flip_rate_low": flips["flip_rate_low"],
            "flip_rate_high": flips["flip_rate_high"],
            "mean_delta_p_target_low": deltas["mean_delta_p_target_low"],
            "mean_delta_p_target_high": deltas["mean_delta_p_target_high"],
            "flip_rate_p_vs_random": vs_random(
                "flip_rate_p_vs_random", flip.astype(float).where(attends), random, "subspace"
            ),
            "mean_delta_p_target_p_vs_random": vs_random(
                "mean_delta_p_target_p_vs_random", delta, random, "subspace"
            ),
        }
    )


def answer_intervals(effects: xr.Dataset, subspace: str, random: str) -> xr.Dataset:
    """Beside the answer-level ``answer_flip_rate`` and ``mean_delta_answer_logit_diff`` (and
    ``mean_delta_p_answer``): 95% intervals (``*_low``/``*_high``; the flip rate over the prompts
    answered correctly before the edit) and ``*_p_vs_random`` per recovered subspace (for the
    logit difference the test is one-sided the other way: a swap that works lowers it)."""
    flip, correct = effects["answer_flip"], effects["answer_correct"]
    logit_diff = effects["delta_answer_logit_diff"]
    draws = effects[random].values
    out = rate("answer_flip_rate", flip, correct).drop_vars("answer_flip_rate")
    for name, values in (
        ("mean_delta_p_answer", effects["delta_p_answer"]),
        ("mean_delta_answer_logit_diff", logit_diff),
    ):
        out = out.assign(mean(name, values).drop_vars(name).data_vars)
    out["answer_flip_rate_p_vs_random"] = vs_random(
        "answer_flip_rate_p_vs_random", flip.astype(float).where(correct), draws, subspace
    )
    out["mean_delta_answer_logit_diff_p_vs_random"] = vs_random(
        "mean_delta_answer_logit_diff_p_vs_random", -logit_diff, draws, subspace
    )
    return out
