"""Feature scaling of lesion vectors: Yeo-Johnson (checked against scipy) then standardisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from imaging_assets.features.scaling import Scaler, fit_scaler, yeo_johnson


@pytest.mark.parametrize("lam", [-1.5, 0.0, 0.4, 2.0, 2.8])
def test_yeo_johnson_applies_each_feature_its_own_lambda(lam):
    u = np.random.default_rng(3).normal(0, 4, (200, 2))
    y = yeo_johnson(u, [lam, 1.0])
    np.testing.assert_allclose(y[:, 0], stats.yeojohnson(u[:, 0], lam), rtol=1e-12)
    np.testing.assert_allclose(y[:, 1], u[:, 1], rtol=1e-12)  # lambda 1 is the identity
    np.testing.assert_allclose(yeo_johnson(u[0], [lam, 1.0]), y[0], rtol=1e-12)  # one row, 1-D
    assert np.isnan(yeo_johnson(np.array([[np.nan, 1.0]]), [lam, 1.0])[0, 0])


def test_scaler_round_trip_and_transform():
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.normal(5, 3, 300), rng.lognormal(3, 1.2, 300), rng.exponential(1e6, 300),
                         -rng.lognormal(0, 1, 300)])
    sc = fit_scaler(x, ["normal", "lognormal", "energy", "negative"])
    z = sc.transform(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-5)
    # skewed features come out near-symmetric; the normal one keeps lambda near 1 (identity)
    assert np.all(np.abs(stats.skew(z, axis=0)) < 0.3), stats.skew(z, axis=0)
    assert np.all(np.abs(stats.skew(x[:, 1:], axis=0)) > 1.5)
    assert abs(sc.lambdas[0] - 1.0) < 0.3
    # monotone per feature: ranks are kept
    for j in range(4):
        assert np.array_equal(np.argsort(x[:, j], kind="stable"), np.argsort(z[:, j].astype(float), kind="stable"))
    back = Scaler.from_dict(sc.to_dict())
    assert back.feature_names == sc.feature_names
    np.testing.assert_array_equal(back.transform(x), z)
    assert sc.transform(x[0]).shape == (4,)
    np.testing.assert_array_equal(sc.transform(x[0]), z[0])
    with pytest.raises(ValueError, match="expected shape"):
        sc.transform(x[:, :3])
    with pytest.raises(ValueError, match="missing keys"):
        Scaler.from_dict({"feature_names": ["a"], "mean": [0.0]})


def test_scaler_nan_and_constant_features():
    x = np.array([[1.0, 7.0, np.nan], [3.0, 7.0, np.nan], [2.0, 7.0, np.nan], [np.nan, 7.0, np.nan]])
    sc = fit_scaler(x, ["f", "const", "missing"])
    z = sc.transform(np.array([[np.nan, 7.0, 5.0], [3.0, np.inf, np.nan], [1.0, 7.0, 0.0]]))
    assert np.all(np.isfinite(z))
    assert z[0, 0] == 0.0 and z[1, 1] == 0.0 and z[1, 2] == 0.0  # missing -> the cohort mean
    assert np.all(z[:, 1] == 0.0)  # constant feature
    assert z[1, 0] > 0 > z[2, 0]
    with pytest.raises(ValueError, match="does not match"):
        fit_scaler(x, ["f"])


def test_scaler_is_deterministic_and_samples_large_cohorts(monkeypatch):
    import imaging_assets.features.scaling as scaling

    x = np.random.default_rng(2).lognormal(0, 1, (500, 3))
    a, b = fit_scaler(x, list("abc")), fit_scaler(x, list("abc"))
    np.testing.assert_array_equal(a.lambdas, b.lambdas)
    monkeypatch.setattr(scaling, "FIT_SAMPLE", 100)
    c = fit_scaler(x, list("abc"))
    np.testing.assert_allclose(c.lambdas, a.lambdas, atol=0.35)
    np.testing.assert_allclose(c.transform(x).mean(axis=0), 0, atol=1e-5)
