"""Vectorised ICC against pingouin's ``intraclass_corr``, and its degenerate cases.

pingouin 0.7 names the rows ``ICC(C,1)`` (= ICC(3,1), our ``'ICC3'``) and ``ICC(A,1)`` (= ICC(2,1),
``'ICC2'``); older versions call them ``ICC3`` / ``ICC2``; both spellings are accepted. pingouin rounds
the ``CI95`` column to 2 decimals by default (``pingouin.options['round.column.CI95'] = 2``): the fixture
below switches that rounding off for the test, so the CI bounds compared are pingouin's own unrounded
F-based formula. As a second, independent reference the ICC3 bounds are also recomputed with scipy from
the F statistic and degrees of freedom pingouin returns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from imaging_assets.features.icc import icc, icc_table, mean_squares, stack_features

pg = pytest.importorskip("pingouin")

TOL = 1e-9
PG_NAMES = {"ICC3": ("ICC(C,1)", "ICC3"), "ICC2": ("ICC(A,1)", "ICC2")}


@pytest.fixture
def pingouin_unrounded():
    """pingouin without its default 2-decimal rounding of CI95 (restored afterwards)."""
    saved = dict(pg.options)
    for key in list(pg.options):
        if key.startswith("round.column.CI95"):
            pg.options[key] = None
    pg.options["round"] = None
    try:
        yield pg
    finally:
        pg.options.clear()
        pg.options.update(saved)


def _pingouin_rows(x2d: np.ndarray) -> pd.DataFrame:
    n, k = x2d.shape
    long = pd.DataFrame({"target": np.repeat(np.arange(n), k), "rater": np.tile(np.arange(k), n),
                         "rating": x2d.ravel()})
    return pg.intraclass_corr(data=long, targets="target", raters="rater", ratings="rating").set_index("Type")


def _row(table: pd.DataFrame, kind: str) -> pd.Series:
    for name in PG_NAMES[kind]:
        if name in table.index:
            return table.loc[name]
    raise KeyError(f"pingouin returned none of {PG_NAMES[kind]}: {list(table.index)}")


def _ci(row: pd.Series) -> np.ndarray:
    return np.asarray(row["CI95"] if "CI95" in row.index else row["CI95%"], dtype=float)


def _random_cube(rng: np.random.Generator, n: int, k: int, nf: int) -> np.ndarray:
    """Random ratings with target, rater and residual variance of varying weight per feature."""
    target_sd = rng.uniform(0.0, 3.0, nf)
    rater_sd = rng.uniform(0.0, 1.5, nf)
    return (rng.normal(size=(n, 1, nf)) * target_sd + rng.normal(size=(1, k, nf)) * rater_sd
            + rng.normal(size=(n, k, nf)) + rng.normal(0, 10, nf))


@pytest.mark.parametrize("n,k", [(5, 2), (8, 3), (12, 4), (20, 5), (30, 2), (40, 8), (17, 7)])
@pytest.mark.parametrize("kind", ["ICC3", "ICC2"])
def test_icc_matches_pingouin(pingouin_unrounded, n: int, k: int, kind: str) -> None:
    rng = np.random.default_rng(1000 * n + k)
    x = _random_cube(rng, n, k, 4)
    value, low, high = icc(x, kind=kind)
    for f in range(x.shape[2]):
        ref = _row(_pingouin_rows(x[:, :, f]), kind)
        assert abs(value[f] - float(ref["ICC"])) <= TOL
        ci = _ci(ref)
        assert abs(low[f] - ci[0]) <= TOL, (f, low[f], ci)
        assert abs(high[f] - ci[1]) <= TOL, (f, high[f], ci)
        if kind == "ICC3":  # independent of pingouin's CI code: from its F and df
            f_obs, df1, df2 = float(ref["F"]), float(ref["df1"]), float(ref["df2"])
            fl = f_obs / stats.f.ppf(0.975, df1, df2)
            fu = f_obs * stats.f.ppf(0.975, df2, df1)
            assert abs(low[f] - (fl - 1) / (fl + k - 1)) <= TOL
            assert abs(high[f] - (fu - 1) / (fu + k - 1)) <= TOL


@pytest.mark.parametrize("alpha", [0.01, 0.10])
def test_alpha_changes_width_only(alpha: float) -> None:
    x = _random_cube(np.random.default_rng(3), 15, 4, 5)
    v95, l95, h95 = icc(x)
    v, lo, hi = icc(x, alpha=alpha)
    np.testing.assert_array_equal(v, v95)
    if alpha < 0.05:
        assert np.all(lo < l95) and np.all(hi > h95)
    else:
        assert np.all(lo > l95) and np.all(hi < h95)


@pytest.mark.parametrize("kind", ["ICC3", "ICC2"])
def test_vectorised_equals_loop(kind: str) -> None:
    x = _random_cube(np.random.default_rng(7), 25, 6, 200)
    value, low, high = icc(x, kind=kind)
    assert value.shape == low.shape == high.shape == (200,)
    for f in range(200):
        v1, l1, h1 = icc(x[:, :, f], kind=kind)
        assert v1.shape == (1,)
        np.testing.assert_allclose([value[f], low[f], high[f]], [v1[0], l1[0], h1[0]], rtol=0, atol=1e-12)


def test_mean_squares_partition_total() -> None:
    x = _random_cube(np.random.default_rng(2), 9, 4, 3)
    msr, msc, mse = mean_squares(x)
    sst = ((x - x.mean(axis=(0, 1))) ** 2).sum(axis=(0, 1))
    np.testing.assert_allclose(msr * 8 + msc * 3 + mse * 24, sst, rtol=1e-12)


@pytest.mark.parametrize("kind", ["ICC3", "ICC2"])
def test_perfectly_reproducible_is_one(kind: str) -> None:
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(20, 1, 3)) * [1.0, 100.0, 1e-3]
    x = np.repeat(truth, 5, axis=1)
    value, low, high = icc(x, kind=kind)
    np.testing.assert_allclose(value, 1.0, atol=1e-12)
    np.testing.assert_allclose(low, 1.0, atol=1e-9)
    np.testing.assert_allclose(high, 1.0, atol=1e-12)


def test_consistency_ignores_rater_offsets_agreement_does_not() -> None:
    rng = np.random.default_rng(6)
    truth = rng.normal(size=(30, 1, 1))
    x = truth + np.arange(4)[None, :, None] * 2.0  # each rater shifted: consistent, not in agreement
    assert icc(x, "ICC3")[0][0] == pytest.approx(1.0)
    assert icc(x, "ICC2")[0][0] < 0.5


def test_pure_noise_is_about_zero() -> None:
    x = np.random.default_rng(8).normal(size=(40, 8, 300))
    value, low, high = icc(x)
    assert abs(float(np.mean(value))) < 0.02
    assert np.all(low < 0.1)
    assert np.mean((low <= 0) & (high >= 0)) > 0.9  # ~95 % coverage of the true 0


def test_degenerate_features_are_nan() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(10, 3, 5))
    x[:, :, 1] = 4.2  # constant
    x[2, 1, 2] = np.nan  # a NaN
    x[0, 0, 3] = np.inf  # not finite
    x[:, :, 4] = np.arange(3)[None, :]  # only the raters differ: MSR = MSE = 0
    for kind in ("ICC3", "ICC2"):
        value, low, high = icc(x, kind=kind)
        assert np.isfinite(value[0]) and np.isfinite(low[0]) and np.isfinite(high[0])
        for f in (1, 2, 3, 4):
            assert np.isnan(value[f]) and np.isnan(low[f]) and np.isnan(high[f]), (kind, f)


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="kind"):
        icc(np.zeros((3, 3, 1)), kind="ICC1k")
    with pytest.raises(ValueError, match="at least 2"):
        icc(np.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="shape"):
        icc(np.zeros(5))


def test_icc_table_forms_agree() -> None:
    x = _random_cube(np.random.default_rng(10), 12, 3, 3)
    names = ["a", "b", "c"]
    rows = icc_table((x, names))
    assert [r["feature"] for r in rows] == names
    assert rows[0]["n_targets"] == 12 and rows[0]["k_raters"] == 3
    as_dict = icc_table({nm: x[:, :, i] for i, nm in enumerate(names)})
    assert rows == as_dict == icc_table(x, names=names)
    assert rows[1]["icc"] == pytest.approx(icc(x)[0][1])


def test_stack_features_drops_incomplete_targets() -> None:
    groups = [
        [{"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 2.5}],
        [{"a": 3.0, "b": 4.0}, None],  # failed extraction
        [{"a": 5.0, "b": 6.0, "c": 1.0}, {"a": 5.5, "b": 6.5}],
        [{"a": 7.0}],  # a rater missing
    ]
    x, names, kept = stack_features(groups)
    assert kept == [0, 2] and names == ["a", "b"]
    np.testing.assert_array_equal(x[1], [[5.0, 6.0], [5.5, 6.5]])
