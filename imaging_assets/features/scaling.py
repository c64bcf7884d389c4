"""Feature scaling for lesion vectors: a Yeo-Johnson power transform, then standardisation.

Radiomics features are skewed over orders of magnitude (volumes, energies, non-uniformities grow with
lesion size; run and zone emphases are ratios of counts). Standardising them as they are lets a few
long-tailed features dominate Euclidean distances, so similar-case search would mostly match outliers.
Each feature is therefore mapped, with parameters fitted on the cohort and stored (so a new lesion is
scaled exactly the same way), by

1. a robust pre-scaling ``u = (x - median) / IQR`` (the IQR replaced by the standard deviation, then by
   1, where it is 0): keeps the power transform's arithmetic in a safe range whatever the feature's units;
2. the Yeo-Johnson transform ``y = YJ_lambda(u)`` with ``lambda`` fitted by maximum likelihood
   (:func:`scipy.stats.yeojohnson_normmax`, on at most :data:`FIT_SAMPLE` seeded rows, lambda clipped to
   ``[-3, 3]``); lambda 1 is the identity;
3. standardisation ``z = (y - mean) / std`` (population std, ``ddof=0``).

Missing values (NaN, +-inf) are ignored when fitting and become 0 (the cohort mean) when transforming: a
missing feature neither attracts nor repels neighbours. A constant or all-missing feature maps to 0.
On the 100-patient demo this raised precision@10 of the ground-truth phenotype from 0.881 (z-scores of the
raw values) to 0.906 (``tests/analysis/test_demo_cohort.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Rows used to fit each feature's lambda (a seeded sample beyond this many).
FIT_SAMPLE = 100_000
LAMBDA_BOUND = 3.0


def yeo_johnson(u: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """:func:`scipy.stats.yeojohnson` per feature: column ``j`` of ``u`` (one row if 1-D) with ``lam[j]``."""
    from scipy import stats

    u = np.asarray(u, dtype=np.float64)
    rows = np.atleast_2d(u)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), rows.shape[1:])
    out = np.empty_like(rows)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(rows.shape[1]):
            out[:, j] = stats.yeojohnson(rows[:, j], lam[j])  # NaN stays NaN
    return out.reshape(u.shape)


@dataclass
class Scaler:
    """Per-feature ``z = (YJ_lambda((x - center) / scale) - mean) / std`` fitted on the cohort.

    Attributes
    ----------
    feature_names
        Feature order of the vector (the robust feature set).
    center, scale
        Robust pre-scaling (median and IQR, see the module docstring).
    lambdas
        Yeo-Johnson lambda per feature (1 = no power transform).
    mean, std
        Mean and population standard deviation of the transformed cohort values.
    """

    feature_names: list[str]
    center: np.ndarray
    scale: np.ndarray
    lambdas: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    _ARRAYS = ("center", "scale", "lambdas", "mean", "std")

    def __post_init__(self) -> None:
        self.feature_names = [str(n) for n in self.feature_names]
        p = len(self.feature_names)
        for name in self._ARRAYS:
            arr = np.asarray(getattr(self, name), dtype=np.float64).reshape(-1)
            if arr.shape != (p,):
                raise ValueError(f"Scaler: {p} feature names but {name} has shape {arr.shape}")
            setattr(self, name, arr)

    @property
    def dim(self) -> int:
        """Vector dimension (number of features)."""
        return len(self.feature_names)

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Scale feature values into float32 vectors.

        Parameters
        ----------
        values
            ``(n, dim)`` or ``(dim,)`` array in :attr:`feature_names` order.

        Returns
        -------
        numpy.ndarray
            float32 array of the same shape; missing values (NaN, +-inf) become 0.
        """
        x = np.asarray(values, dtype=np.float64)
        if x.shape[-1:] != (self.dim,) or x.ndim not in (1, 2):
            raise ValueError(f"Scaler.transform: expected shape (n, {self.dim}) or ({self.dim},), got {x.shape}")
        x = np.where(np.isfinite(x), x, np.nan)
        y = yeo_johnson((x - _finite_or(self.center, 0.0)) / _positive_or_one(self.scale), self.lambdas)
        z = (y - _finite_or(self.mean, 0.0)) / _positive_or_one(self.std)
        z[~np.isfinite(z)] = 0.0
        return z.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists of floats) for storage or asset metadata."""
        return {"feature_names": list(self.feature_names),
                **{name: [float(v) for v in getattr(self, name)] for name in self._ARRAYS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scaler:
        """Inverse of :meth:`to_dict`."""
        missing = {"feature_names", *cls._ARRAYS} - set(data)
        if missing:
            raise ValueError(f"Scaler.from_dict: missing keys {sorted(missing)}")
        return cls(list(data["feature_names"]), *(np.asarray(data[name], float) for name in cls._ARRAYS))


def _finite_or(a: np.ndarray, default: float) -> np.ndarray:
    return np.where(np.isfinite(a), a, default)


def _positive_or_one(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a) & (a > 0), a, 1.0)


def _fit_lambda(u: np.ndarray) -> float:
    from scipy import stats

    if u.size < 3 or np.ptp(u) == 0:
        return 1.0
    try:
        lam = float(stats.yeojohnson_normmax(u))
    except (ValueError, FloatingPointError, OverflowError):
        return 1.0
    return float(np.clip(lam, -LAMBDA_BOUND, LAMBDA_BOUND)) if np.isfinite(lam) else 1.0


def fit_scaler(values: np.ndarray, feature_names: list[str], seed: int = 0) -> Scaler:
    """Fit a :class:`Scaler` on the cohort, ignoring missing values.

    Parameters
    ----------
    values
        ``(n, p)`` feature matrix (NaN/inf = missing).
    feature_names
        The ``p`` feature names, in column order.
    seed
        Seed of the row sample used for lambda when ``n > FIT_SAMPLE``.

    Returns
    -------
    Scaler
        Deterministic for the same input. A feature with no finite value, or a constant one, gets the
        identity transform and maps to 0.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(feature_names):
        raise ValueError(f"fit_scaler: values shape {x.shape} does not match {len(feature_names)} feature names")
    x = np.where(np.isfinite(x), x, np.nan)
    p = x.shape[1]
    center, scale, lambdas = np.zeros(p), np.ones(p), np.ones(p)
    rows = np.arange(x.shape[0])
    if x.shape[0] > FIT_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], FIT_SAMPLE, replace=False))
    for j in range(p):
        col = x[:, j]
        col = col[~np.isnan(col)]
        if col.size == 0:
            continue
        q1, med, q3 = np.percentile(col, [25, 50, 75])
        center[j] = med
        spread = q3 - q1 if q3 > q1 else float(np.std(col))
        scale[j] = spread if spread > 0 else 1.0
        sample = x[rows, j]
        lambdas[j] = _fit_lambda((sample[~np.isnan(sample)] - center[j]) / scale[j])
    y = yeo_johnson((x - center) / scale, lambdas)
    with np.errstate(invalid="ignore", divide="ignore"):
        counts = np.sum(~np.isnan(y), axis=0)
        mean = np.where(counts > 0, np.nansum(y, axis=0) / np.maximum(counts, 1), 0.0)
        var = np.nansum((y - mean) ** 2, axis=0) / np.maximum(counts, 1)
    std = np.sqrt(np.where(counts > 0, var, 1.0))
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return Scaler(list(feature_names), center, scale, lambdas, mean, std)
