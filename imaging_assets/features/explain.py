"""Why two lesions are close: the share of each feature group in their squared distance, and the features
that agree and differ most, in plain language (pure code: no warehouse, no Dagster).

A similar-case distance is the L2 distance between two scaled robust-feature vectors (see
:mod:`~imaging_assets.features.scaling`), so its square is a sum over features, ``d^2 = sum_i (a_i - b_i)^2``,
and each feature's term is exactly its contribution. Features are grouped into a **partition**, so the
group shares sum to 1:

* features of the original image by pyradiomics class: ``Shape``, ``First-order intensity`` and one group
  per texture class (``GLCM texture``, ``GLRLM texture``, ``GLSZM texture``, ``GLDM texture``,
  ``NGTDM texture``);
* features of a filtered image by filter family, whatever their class: ``LoG filtered``, ``Wavelet
  filtered``, ``Square filtered``, ...

``differ`` lists the features with the largest terms (their share of ``d^2`` included). ``agree`` lists the
features where the two lesions are closest, preferring features where both are unusual in the same
direction (score ``|a - b| / (1 + min(|a|, |b|))`` when ``a`` and ``b`` share a sign, else ``|a - b|``):
"both are among the most spherical lesions" tells a reader more than "both are average". Each entry gives
the feature's plain-language name (``GLCM Contrast (LoG sigma=2 mm)``), both raw values when known, and
both lesions' percentiles in their feature space's cohort (from the quantiles stored with the scaler; the
scaling is monotone, so percentiles of scaled values are those of the raw values).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import numpy as np

#: Percentile grid of the stored quantiles (0, 1, ..., 100).
QUANTILE_GRID = np.linspace(0.0, 100.0, 101)

_CLASS_GROUPS = {
    "shape": "Shape", "shape2D": "Shape", "firstorder": "First-order intensity",
    "glcm": "GLCM texture", "glrlm": "GLRLM texture", "glszm": "GLSZM texture", "gldm": "GLDM texture",
    "ngtdm": "NGTDM texture",
}
_CLASS_LABELS = {"glcm": "GLCM", "glrlm": "GLRLM", "glszm": "GLSZM", "gldm": "GLDM", "ngtdm": "NGTDM"}
_FILTER_FAMILIES = {
    "log": "LoG", "wavelet": "Wavelet", "square": "Square", "squareroot": "Square-root",
    "logarithm": "Logarithm", "exponential": "Exponential", "gradient": "Gradient", "lbp": "LBP",
}
#: Readable names of pyradiomics features whose CamelCase split reads badly.
_FEATURE_WORDS = {
    "10Percentile": "10th percentile", "90Percentile": "90th percentile", "Maximum3DDiameter": "Maximum 3D diameter",
    "Maximum2DDiameterSlice": "Maximum 2D diameter (axial)", "Maximum2DDiameterColumn": "Maximum 2D diameter (coronal)",
    "Maximum2DDiameterRow": "Maximum 2D diameter (sagittal)", "Idm": "IDM", "Idmn": "IDMN", "Id": "ID", "Idn": "IDN",
    "Imc1": "IMC1", "Imc2": "IMC2", "MCC": "MCC", "RootMeanSquared": "Root mean squared",
    "SurfaceVolumeRatio": "Surface-to-volume ratio", "InterquartileRange": "Interquartile range",
    "RobustMeanAbsoluteDeviation": "Robust mean absolute deviation", "MeanAbsoluteDeviation": "Mean absolute deviation",
}


def _split(name: str) -> tuple[str, str, str]:
    parts = name.split("_", 2)
    if len(parts) != 3:
        return "original", "", name
    return parts[0], parts[1], parts[2]


def _family(image_type: str) -> str:
    return image_type.split("-", 1)[0].lower()


@lru_cache(maxsize=65536)
def feature_group(name: str) -> str:
    """The group of a pyradiomics feature name (see the module docstring): ``Shape``, ``GLCM texture``, ...,
    or ``<Filter> filtered`` for any feature of a filtered image."""
    image_type, cls, _ = _split(name)
    if image_type != "original":
        fam = _family(image_type)
        return f"{_FILTER_FAMILIES.get(fam, fam.capitalize())} filtered"
    return _CLASS_GROUPS.get(cls, cls or "Other")


def _words(feature: str) -> str:
    if feature in _FEATURE_WORDS:
        return _FEATURE_WORDS[feature]
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", feature)
    words = spaced.split(" ")
    return " ".join([words[0]] + [w.lower() if len(w) > 1 and w[1:].islower() else w for w in words[1:]])


def _filter_label(image_type: str) -> str | None:
    if image_type == "original":
        return None
    m = re.match(r"^log-sigma-(\d+)-(\d+)-mm-(\dD)$", image_type)
    if m:
        sigma = float(f"{m.group(1)}.{m.group(2)}")
        return f"LoG σ={sigma:g} mm"
    fam, _, rest = image_type.partition("-")
    label = _FILTER_FAMILIES.get(fam.lower(), fam)
    if fam.lower() == "wavelet":
        return f"wavelet {rest}" if rest else "wavelet"
    if rest:
        return f"{label} {rest.replace('-', ' ')}"
    return label if fam.lower() == "lbp" else label.lower()


@lru_cache(maxsize=65536)
def plain_name(name: str) -> str:
    """A person's name for a feature: ``original_shape_Sphericity`` -> ``Sphericity``,
    ``log-sigma-2-0-mm-3D_glcm_Contrast`` -> ``GLCM Contrast (LoG σ=2 mm)``,
    ``wavelet-LLH_firstorder_Mean`` -> ``Intensity mean (wavelet LLH)``."""
    image_type, cls, feature = _split(name)
    words = _words(feature)
    if cls in ("shape", "shape2D"):
        base = words
    elif cls == "firstorder":
        base = f"Intensity {words[:1].lower() + words[1:]}"
    elif cls in _CLASS_LABELS:
        base = f"{_CLASS_LABELS[cls]} {words}"
    else:
        base = words
    label = _filter_label(image_type)
    return f"{base} ({label})" if label else base


def percentile(z: float, quantiles: Sequence[float] | np.ndarray | None) -> float | None:
    """Percentile (0-100) of a scaled value among its space's lesions, from the 101 stored quantiles
    (:func:`quantiles_of`); None when none are stored."""
    if quantiles is None:
        return None
    q = np.asarray(quantiles, dtype=float).reshape(-1)
    if q.size != QUANTILE_GRID.size or not np.isfinite(q).all():
        return None
    return _percentile_of(float(z), q.tolist())


_GRID = QUANTILE_GRID.tolist()


def _percentile_of(z: float, q: list[float]) -> float | None:
    """:func:`percentile` on a validated, finite quantile list (bisect: a few µs, called per shown feature)."""
    if not math.isfinite(z):
        return None
    # a value equal to tied quantiles (a feature with many equal values) gets the middle of the tie
    lo, hi = bisect.bisect_left(q, z), bisect.bisect_right(q, z)
    if hi - lo > 1:
        return float((_GRID[lo] + _GRID[hi - 1]) / 2)
    if z <= q[0]:
        return 0.0
    if z >= q[-1]:
        return 100.0
    j = bisect.bisect_right(q, z)  # q[j-1] <= z < q[j]
    x0, x1 = q[j - 1], q[j]
    return float(_GRID[j - 1] + (_GRID[j] - _GRID[j - 1]) * (z - x0) / (x1 - x0)) if x1 > x0 else float(_GRID[j - 1])


def percentile_words(v: float | None) -> str:
    """``93rd percentile`` (``no percentile`` for None): how the CLI and the search page print one."""
    if v is None:
        return "no percentile"
    n = int(round(v))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix} percentile"


def quantiles_of(values: np.ndarray) -> np.ndarray:
    """The 0th..100th percentiles of each column of ``values`` (shape ``(101, n_features)``), NaN-aware."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2 or v.shape[0] == 0:
        return np.full((QUANTILE_GRID.size, v.shape[-1] if v.ndim == 2 else 0), np.nan)
    return np.nanpercentile(v, QUANTILE_GRID, axis=0)


@dataclass(frozen=True)
class FeatureComparison:
    """One feature of two lesions: names, scaled and raw values, percentiles, share of ``d^2``."""

    feature: str
    name: str
    group: str
    reference_z: float
    neighbour_z: float
    reference_value: float | None
    neighbour_value: float | None
    reference_percentile: float | None
    neighbour_percentile: float | None
    share: float


_COMPARISON_FIELDS = tuple(f.name for f in fields(FeatureComparison))


@dataclass(frozen=True)
class Explanation:
    """Why a neighbour is close to its reference (see the module docstring)."""

    distance: float
    #: group name -> share of the squared distance (sums to 1; all 0 when the vectors are identical)
    groups: dict[str, float]
    agree: list[FeatureComparison]
    differ: list[FeatureComparison]
    notes: list[str] = field(default_factory=list)
    #: group name -> number of robust features in it (a group of many features tends to weigh more)
    group_features: dict[str, int] = field(default_factory=dict)

    def to_dict(self, digits: int = 4) -> dict[str, Any]:
        """JSON-ready: ``{"distance", "groups": {name: share}, "agree": [...], "differ": [...]}``."""

        def r(v: Any) -> Any:
            return round(float(v), digits) if isinstance(v, (float, np.floating)) and np.isfinite(v) else v

        def item(c: FeatureComparison) -> dict[str, Any]:
            return {k: r(getattr(c, k)) for k in _COMPARISON_FIELDS}

        out: dict[str, Any] = {"distance": r(self.distance), "groups": {k: r(v) for k, v in self.groups.items()},
                               "agree": [item(c) for c in self.agree], "differ": [item(c) for c in self.differ],
                               "group_features": dict(self.group_features)}
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    def summary(self, top: int = 3) -> str:
        """One line: the groups that make most of the distance, the features that agree and differ most."""
        groups = sorted(self.groups.items(), key=lambda kv: -kv[1])[:top]
        parts = [", ".join(f"{g} {s:.0%}" for g, s in groups if s > 0) or "identical vectors"]
        if self.agree:
            parts.append("agree: " + ", ".join(c.name for c in self.agree[:top]))
        if self.differ:
            parts.append("differ: " + ", ".join(c.name for c in self.differ[:top]))
        return "; ".join(parts)


def explain(reference: np.ndarray, neighbour: np.ndarray, feature_names: Sequence[str],
            reference_values: Mapping[str, float] | None = None, neighbour_values: Mapping[str, float] | None = None,
            quantiles: np.ndarray | None = None, n: int = 5) -> Explanation:
    """Explain the distance between two scaled vectors of one feature space.

    Parameters
    ----------
    reference, neighbour
        Scaled vectors; only their first ``len(feature_names)`` entries are read (the rest is padding).
    feature_names
        The space's robust features, in vector order.
    reference_values, neighbour_values
        Raw feature values by name (shown beside the names); optional.
    quantiles
        ``(101, len(feature_names))`` scaled quantiles of the space (:func:`quantiles_of`); optional.
    n
        Features listed in ``agree`` and ``differ`` (3-5 read well).

    Raises
    ------
    ValueError
        When a vector is shorter than the feature list.
    """
    p = len(feature_names)
    a = np.asarray(reference, dtype=float).reshape(-1)
    b = np.asarray(neighbour, dtype=float).reshape(-1)
    if a.size < p or b.size < p:
        raise ValueError(f"vectors of {a.size} and {b.size} values for {p} features")
    a, b = a[:p], b[:p]
    terms = (a - b) ** 2
    total = float(terms.sum())
    names = [str(f) for f in feature_names]
    groups_of = [feature_group(f) for f in names]
    groups = {g: 0.0 for g in sorted(set(groups_of), key=_group_order)}
    notes: list[str] = []
    if total > 0:
        for g, t in zip(groups_of, terms):
            groups[g] += float(t) / total
    else:
        notes.append("the two vectors are identical: no group contributes")
    q = None if quantiles is None else np.asarray(quantiles, dtype=float)
    if q is not None and q.shape != (QUANTILE_GRID.size, p):
        notes.append(f"stored quantiles have shape {q.shape}, not ({QUANTILE_GRID.size}, {p}): no percentiles")
        q = None
    if q is None and not any("quantiles" in note for note in notes):
        notes.append("no quantiles stored for this space (rebuild lesion_vectors): no percentiles")

    columns: dict[int, list[float] | None] = {}

    def pct(i: int, z: float) -> float | None:
        if q is None:
            return None
        if i not in columns:
            col = q[:, i]
            columns[i] = col.tolist() if np.isfinite(col).all() else None
        return None if columns[i] is None else _percentile_of(z, columns[i])

    def comparison(i: int) -> FeatureComparison:
        f = names[i]
        rv = None if reference_values is None else reference_values.get(f)
        nv = None if neighbour_values is None else neighbour_values.get(f)
        return FeatureComparison(
            feature=f, name=plain_name(f), group=groups_of[i], reference_z=float(a[i]), neighbour_z=float(b[i]),
            reference_value=None if rv is None else float(rv), neighbour_value=None if nv is None else float(nv),
            reference_percentile=pct(i, float(a[i])), neighbour_percentile=pct(i, float(b[i])),
            share=float(terms[i] / total) if total > 0 else 0.0)

    gap = np.abs(a - b)
    same_side = np.sign(a) == np.sign(b)
    agree_score = np.where(same_side, gap / (1.0 + np.minimum(np.abs(a), np.abs(b))), gap)
    k = max(0, min(n, p))
    agree_idx = _smallest(agree_score, names, k)
    differ_idx = _smallest(-terms, names, k) if total > 0 else []
    return Explanation(distance=float(np.sqrt(total)), groups=groups, agree=[comparison(i) for i in agree_idx],
                       differ=[comparison(i) for i in differ_idx], notes=notes,
                       group_features={g: groups_of.count(g) for g in groups})


def _smallest(score: np.ndarray, names: list[str], k: int) -> list[int]:
    """Indices of the ``k`` smallest scores, ties by name (the order of ``sorted`` by (score, name))."""
    if k <= 0:
        return []
    if k < len(score):  # only the candidates up to the k-th score can be among them (ties included)
        cut = np.partition(score, k - 1)[k - 1]
        cand = np.flatnonzero(score <= cut)
    else:
        cand = np.arange(len(score))
    return sorted(cand.tolist(), key=lambda i: (score[i], names[i]))[:k]


def _group_order(g: str) -> tuple[int, str]:
    order = ["Shape", "First-order intensity", "GLCM texture", "GLRLM texture", "GLSZM texture", "GLDM texture",
             "NGTDM texture"]
    return (order.index(g), g) if g in order else (len(order), g)
