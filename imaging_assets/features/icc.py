"""Intraclass correlation over many features at once.

:func:`icc` takes the cohort array ``x`` of shape ``(n_targets, k_raters, n_features)`` (lesions x
perturbations, or lesions x {test, retest}) and returns, per feature, the ICC and its F-based confidence
interval, all features in one vectorised pass (no Python loop over features).

Formulas (Shrout & Fleiss 1979; McGraw & Wong 1996; identical to ``pingouin.intraclass_corr``)
-------------------------------------------------------------------------------------------------
With ``n`` targets, ``k`` raters, per feature the two-way ANOVA without replication::

    MSR = k * sum_i (row_mean_i - grand)^2 / (n - 1)             between targets
    MSC = n * sum_j (col_mean_j - grand)^2 / (k - 1)             between raters
    MSE = sum_ij (x_ij - row_mean_i - col_mean_j + grand)^2 / ((n - 1)(k - 1))   residual

``'ICC3'`` = ICC(3,1) = McGraw & Wong ICC(C,1): two-way mixed, consistency, single measure::

    ICC3 = (MSR - MSE) / (MSR + (k - 1) MSE)
    F = MSR / MSE,  df1 = n - 1,  df2 = (n - 1)(k - 1)
    FL = F / F_{1-a/2}(df1, df2),  FU = F * F_{1-a/2}(df2, df1)
    CI = [(FL - 1) / (FL + k - 1),  (FU - 1) / (FU + k - 1)]

``'ICC2'`` = ICC(2,1) = McGraw & Wong ICC(A,1): two-way random, absolute agreement, single measure::

    ICC2 = (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / n)
    v = (k - 1)(n - 1) (k ICC2 MSC + (n (1 + (k - 1) ICC2) - k ICC2) MSE)^2
        / ((n - 1) k^2 ICC2^2 MSC^2 + ((n (1 + (k - 1) ICC2) - k ICC2) MSE)^2)
    FU = F_{1-a/2}(n - 1, v),  FL = F_{1-a/2}(v, n - 1)
    CI = [n (MSR - FU MSE) / (FU (k MSC + (k n - k - n) MSE) + n MSR),
          n (FL MSR - MSE) / (k MSC + (k n - k - n) MSE + n FL MSR)]

(``v`` is pingouin's Satterthwaite expression multiplied by ``MSE^2`` in numerator and denominator, which
is the same number and stays finite when ``MSE = 0``.) ICCs are not clipped: a negative ICC (more
disagreement than between-target variance) is returned as such, like pingouin does.

Degenerate features (documented behaviour)
------------------------------------------
* any NaN or infinite value in a feature -> ICC and CI NaN (the design must be balanced; drop lesions
  with failed extractions before, see :func:`stack_features`);
* zero variance (every value of the feature identical) -> NaN;
* no between-target and no residual variation (``MSR == MSE == 0``: only the raters differ) -> NaN;
* ``MSE == 0`` with ``MSR > 0`` (perfectly reproducible) -> ICC3 = 1 with CI [1, 1]; ICC2 from its
  formula (1 when the raters agree absolutely too, CI [1, 1]).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)

#: Kinds of ICC :func:`icc` computes, with their McGraw & Wong names.
ICC_KINDS: dict[str, str] = {"ICC3": "ICC(C,1)", "ICC2": "ICC(A,1)"}


def _as_cube(x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"icc expects an array of shape (n_targets, k_raters, n_features); got shape {arr.shape}")
    n, k, _ = arr.shape
    if n < 2 or k < 2:
        raise ValueError(f"icc needs at least 2 targets and 2 raters; got {n} targets and {k} raters")
    return arr


def mean_squares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-way ANOVA mean squares (MSR, MSC, MSE) per feature of ``x`` (n_targets, k_raters, n_features).

    NaNs propagate (a feature with a NaN gets NaN mean squares).
    """
    x = _as_cube(x)
    n, k, _ = x.shape
    grand = x.mean(axis=(0, 1))
    rows = x.mean(axis=1)
    cols = x.mean(axis=0)
    msr = k * ((rows - grand) ** 2).sum(axis=0) / (n - 1)
    msc = n * ((cols - grand) ** 2).sum(axis=0) / (k - 1)
    resid = x - rows[:, None, :] - cols[None, :, :] + grand
    mse = (resid**2).sum(axis=(0, 1)) / ((n - 1) * (k - 1))
    return msr, msc, mse


def icc(x: np.ndarray, kind: str = "ICC3", alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intraclass correlation of every feature, with its ``1 - alpha`` confidence interval.

    Parameters
    ----------
    x : numpy.ndarray
        Shape ``(n_targets, k_raters, n_features)`` (a 2-D ``(n_targets, k_raters)`` array is one feature).
        Targets are lesions; raters are perturbations (or test and retest).
    kind : {'ICC3', 'ICC2'}
        ``'ICC3'``: ICC(3,1), two-way mixed, consistency, single measure (the default: a perturbation that
        shifts every lesion alike does not count against a feature). ``'ICC2'``: ICC(2,1), two-way random,
        absolute agreement, single measure.
    alpha : float
        ``0.05`` gives the 95 % interval.

    Returns
    -------
    icc, ci_low, ci_high : numpy.ndarray
        Each of shape ``(n_features,)``; NaN for degenerate features (see the module docstring).

    Raises
    ------
    ValueError
        Unknown ``kind``, wrong shape, fewer than 2 targets or raters, ``alpha`` outside (0, 1).
    """
    if kind not in ICC_KINDS:
        raise ValueError(f"unknown ICC kind {kind!r}; expected one of {sorted(ICC_KINDS)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha}")
    x = _as_cube(x)
    n, k, nf = x.shape
    finite = np.isfinite(x).all(axis=(0, 1))
    with np.errstate(invalid="ignore"):
        varying = np.zeros(nf, dtype=bool)
        if nf:
            varying[finite] = (x[:, :, finite].max(axis=(0, 1)) > x[:, :, finite].min(axis=(0, 1)))
    valid = finite & varying
    out = np.full(nf, np.nan), np.full(nf, np.nan), np.full(nf, np.nan)
    if not valid.any():
        return out
    msr, msc, mse = mean_squares(x[:, :, valid])
    valid_idx = np.flatnonzero(valid)
    degenerate = (msr == 0) & (mse == 0)
    df1, df2 = n - 1, (n - 1) * (k - 1)
    q = 1.0 - alpha / 2.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "ICC3":
            value = (msr - mse) / (msr + (k - 1) * mse)
            f_obs = msr / mse
            fl = f_obs / stats.f.ppf(q, df1, df2)
            fu = f_obs * stats.f.ppf(q, df2, df1)
            low = (fl - 1.0) / (fl + (k - 1))
            high = (fu - 1.0) / (fu + (k - 1))
            perfect = (mse == 0) & (msr > 0)
            value[perfect], low[perfect], high[perfect] = 1.0, 1.0, 1.0
        else:
            value = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
            a = n * (1.0 + (k - 1) * value) - k * value
            vn = df2 * (k * value * msc + a * mse) ** 2
            vd = df1 * k**2 * value**2 * msc**2 + (a * mse) ** 2
            v = vn / vd
            f2u = stats.f.ppf(q, n - 1, v)
            f2l = stats.f.ppf(q, v, n - 1)
            c = k * msc + (k * n - k - n) * mse
            low = n * (msr - f2u * mse) / (f2u * c + n * msr)
            high = n * (f2l * msr - mse) / (c + n * f2l * msr)
            perfect = (mse == 0) & (msc == 0) & (msr > 0)
            value[perfect], low[perfect], high[perfect] = 1.0, 1.0, 1.0
    for arr in (value, low, high):
        arr[degenerate] = np.nan
    out[0][valid_idx], out[1][valid_idx], out[2][valid_idx] = value, low, high
    return out


def icc_table(
    values: Mapping[str, np.ndarray] | tuple[np.ndarray, Sequence[str]],
    names: Sequence[str] | None = None,
    kind: str = "ICC3",
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """:func:`icc` as rows ``{feature, icc, ci_low, ci_high, n_targets, k_raters, kind}``.

    Parameters
    ----------
    values : mapping or (array, names) or array
        ``{feature name: (n_targets, k_raters) array}``; or a tuple ``(x, names)`` with ``x`` of shape
        ``(n_targets, k_raters, n_features)``; or such an ``x`` with ``names`` given separately.
    names : sequence of str, optional
        Feature names when ``values`` is a bare array.
    kind, alpha
        As for :func:`icc`.

    Returns
    -------
    list of dict
        One row per feature in input order; NaN ICCs stay NaN (they are not robust).
    """
    if isinstance(values, Mapping):
        names = list(values)
        x = np.stack([np.asarray(values[nm], dtype=float) for nm in names], axis=-1) if names else None
    elif isinstance(values, tuple):
        x, names = np.asarray(values[0], dtype=float), list(values[1])
    else:
        x = np.asarray(values, dtype=float)
        if names is None:
            raise ValueError("icc_table: pass feature names with a bare array")
        names = list(names)
    if x is None or not names:
        return []
    x = _as_cube(x)
    if x.shape[2] != len(names):
        raise ValueError(f"icc_table: {x.shape[2]} features in the array but {len(names)} names")
    value, low, high = icc(x, kind=kind, alpha=alpha)
    n, k, _ = x.shape
    return [
        {"feature": nm, "icc": float(value[i]), "ci_low": float(low[i]), "ci_high": float(high[i]),
         "n_targets": int(n), "k_raters": int(k), "kind": kind}
        for i, nm in enumerate(names)
    ]


def stack_features(
    groups: Sequence[Sequence[Mapping[str, float] | None]],
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str], list[int]]:
    """Build the ``(n_targets, k_raters, n_features)`` array from feature dicts.

    Parameters
    ----------
    groups : sequence of sequence of dict
        ``groups[i][j]`` is the feature dict of target ``i`` under rater ``j`` (pyradiomics names to
        floats). ``None`` marks a failed extraction.
    names : sequence of str, optional
        Features to use (in this order); default: the features present in every complete group, in
        the first complete group's order.

    Returns
    -------
    x, names, kept
        The array (NaN where a kept target lacks a feature), the feature names, and the indices of the
        targets kept: a target with fewer raters than the most common count, or with a failed
        extraction, is left out (ICC needs a balanced design).
    """
    sizes = [len(g) for g in groups]
    if not sizes:
        return np.zeros((0, 0, len(names or ()))), list(names or ()), []
    k = max(set(sizes), key=lambda s: (sizes.count(s), s))
    kept = [i for i, g in enumerate(groups) if len(g) == k and all(d is not None for d in g)]
    if len(kept) < len(groups):
        logger.info("stack_features: %d of %d targets left out (failed or missing raters)",
                    len(groups) - len(kept), len(groups))
    if names is None:
        common: list[str] | None = None
        for i in kept:
            for d in groups[i]:
                if common is None:
                    common = list(d)  # type: ignore[arg-type]
                else:
                    present = set(d)  # type: ignore[arg-type]
                    common = [nm for nm in common if nm in present]
        names = common or []
    names = list(names)
    x = np.full((len(kept), k, len(names)), np.nan)
    for a, i in enumerate(kept):
        for j, d in enumerate(groups[i]):
            x[a, j, :] = [float(d.get(nm, np.nan)) for nm in names]  # type: ignore[union-attr]
    return x, names, kept
