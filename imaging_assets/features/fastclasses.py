"""pyradiomics' feature classes fused into one vectorised pass per image type: same matrices, same values.

pyradiomics 3.0.1 computes a segment's features one class and one feature at a time: for every filtered
image (Original, each LoG sigma, each wavelet band) and every class it converts the SimpleITK image to
numpy again, crops it again (two ``CropImageFilter`` runs), discretises it again, builds the class's
texture matrix in C and then calls one ``get<Feature>FeatureValue`` method per feature, each a handful
of small numpy reductions with a ``nanmean`` over the angles. On a small lesion that Python, not the C
matrices, is most of the time (``benchmarks/extraction.py`` prints both).

:class:`FastFeatureExtractor` is a ``RadiomicsFeatureExtractor`` whose ``execute`` is pyradiomics' own
(loading, mask checks, resegmentation, shape, the image-type generators), except for the loop body:

* per image type the image is viewed as numpy once, cropped to the ROI's bounding box by slicing (the
  region ``cropToTumorMask`` would cut) and discretised once (:func:`fixed_width_bin_edges`, numpy's
  min/max instead of Python's over every voxel; ``binCount`` and NaN images use pyradiomics' own
  ``binImage``): first order and the five texture classes share it, as they share the settings;
* per texture class, pyradiomics' own C function computes the matrix (``radiomics.cMatrices``) and
  one function here computes **every** feature of the class from it: the same post-processing as
  pyradiomics (empty gray levels, symmetry, ``weightingNorm``, empty angles and sizes removed), the
  shared intermediate sums (marginals, means, sum/difference distributions, entropies) computed once,
  the angles kept as an axis, and one ``nanmean`` over the angles for all features at the end;
* first order computes its statistics from one float64 vector of the ROI's voxels.

The formulas are pyradiomics' own, term for term; only the order in which numbers are added differs
(e.g. the sum and difference distributions come from one ``bincount``, the MCC matrix from a matrix
product), so values agree with stock to the last bits (measured: relative differences below 1e-12, see
``tests/features/test_fastclasses.py``). Anything else falls back to pyradiomics' classes, unchanged:
voxel-based extraction, a feature the fused pass does not compute (the deprecated ones a parameter file
names explicitly), an unknown feature name (pyradiomics' ``LookupError``) and any exception in a fused
pass (logged; the class is then recomputed by pyradiomics, whose per-feature error handling applies).
Shape classes are pyradiomics' own (their time is the C surface mesh). Nothing in pyradiomics is
patched: the stock extractor and classes stay available for the tests and the benchmark.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Mapping
from functools import cache
from itertools import chain
from typing import Any

import numpy as np
import SimpleITK as sitk
from radiomics import cMatrices, generalinfo, getFeatureClasses, imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

logger = logging.getLogger(__name__)

EPS = np.spacing(1)
FeatureValues = dict[str, Any]


def fixed_width_bin_edges(values: np.ndarray, bin_width: float) -> np.ndarray | list[float] | None:
    """``imageoperations.getBinEdges`` for a fixed bin width, with numpy's min / max.

    Returns None when ``values`` holds NaN (Python's ``min`` and numpy's disagree there: the caller
    falls back to pyradiomics so the result is stock's, whatever it is).
    """
    minimum = values.min()
    maximum = values.max()
    if minimum != minimum or maximum != maximum:  # NaN
        return None
    low = minimum - (minimum % bin_width)
    edges = np.arange(low, maximum + 2 * bin_width, bin_width)
    if len(edges) == 1:  # flat region: one bin of two edges, as pyradiomics
        return [edges[0] - 0.5, edges[0] + 0.5]
    return edges


def discretise(image: np.ndarray, mask: np.ndarray, settings: Mapping[str, Any]) -> np.ndarray:
    """``imageoperations.binImage(image, mask, **settings)[0]``: bin numbers inside the ROI, 0 outside."""
    values = image[mask]
    edges = None
    if settings.get("binCount") is None:
        edges = fixed_width_bin_edges(values, settings.get("binWidth", 25))
    if edges is None:
        return imageoperations.binImage(image, mask, **settings)[0]
    binned = np.zeros(image.shape, dtype="int")
    binned[mask] = np.digitize(values, edges)
    return binned


def _angle_weights(angles: np.ndarray, spacing: tuple[float, ...], norm: str, distance: Callable) -> np.ndarray:
    """pyradiomics' per-angle weights for ``weightingNorm`` (``distance`` maps the offset in mm to a weight)."""
    pixel_spacing = spacing[::-1]
    weights = np.empty(len(angles))
    for a_idx, a in enumerate(angles):
        if norm in ("infinity", "euclidean", "manhattan"):
            weights[a_idx] = distance(norm, np.abs(a) * pixel_spacing)
        else:
            if norm != "no_weighting":
                logger.warning('weigthing norm "%s" is unknown, W is set to 1', norm)
            weights[a_idx] = 1
    return weights


def _glcm_distance(norm: str, offset_mm: np.ndarray) -> float:
    if norm == "infinity":
        return np.exp(-max(offset_mm) ** 2)
    if norm == "euclidean":
        return np.exp(-np.sum(offset_mm ** 2))
    return np.exp(-np.sum(offset_mm) ** 2)


def _glrlm_distance(norm: str, offset_mm: np.ndarray) -> float:
    if norm == "infinity":
        return max(offset_mm)
    if norm == "euclidean":
        return np.sqrt(np.sum(offset_mm ** 2))
    return np.sum(offset_mm)


def _drop_empty_angles(p: np.ndarray, totals: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """pyradiomics: with more than one angle, angles whose matrix is empty are removed; empty totals -> NaN."""
    if p.shape[axis] > 1:
        keep = totals != 0
        if not keep.all():
            p, totals = np.compress(keep, p, axis), totals[keep]
    totals = totals.astype(float)
    totals[totals == 0] = np.nan
    return p, totals


def _entropy(p: np.ndarray, axis: Any) -> np.ndarray:
    return -np.sum(p * np.log2(p + EPS), axis)


def _mean_over_angles(per_angle: Mapping[str, np.ndarray]) -> FeatureValues:
    """``nanmean`` over the angles of every feature at once (numpy's ``nanmean`` only where a NaN is)."""
    names = list(per_angle)
    values = np.array([per_angle[k] for k in names])
    means = np.nanmean(values, 1) if np.isnan(values).any() else values.mean(1)
    return dict(zip(names, means, strict=True))


class _NotFused(Exception):  # noqa: N818 - control flow inside this module, never raised out of it
    """A case the fused pass leaves to pyradiomics' own class (e.g. an empty texture matrix)."""


# ------------------------------------------------------------------------------------------ first order
def firstorder_features(values: np.ndarray, binned_values: np.ndarray, settings: Mapping[str, Any],
                        spacing: tuple[float, ...]) -> FeatureValues:
    """Every ``RadiomicsFirstOrder`` feature of a segment from its voxels (float64) and their bins."""
    x = np.sort(values)  # percentiles and median read the sorted voxels (numpy's linear rule, below)
    shift = settings.get("voxelArrayShift", 0)
    n = x.size
    shifted_sq = np.sum((x + shift) ** 2)
    counts = np.bincount(binned_values)
    p_i = counts[counts > 0].astype(float)
    p_i /= np.sum(p_i) if n else 1.0
    minimum, maximum = x[0], x[-1]
    p10, p25, p75, p90 = _sorted_percentiles(x, (10, 25, 75, 90))
    mean = np.mean(x)
    centred = x - mean
    c2 = centred * centred
    robust = x[np.searchsorted(x, p10, "left"):np.searchsorted(x, p90, "right")]  # p10 <= x <= p90
    m2 = np.mean(c2)
    m3 = np.mean(c2 * centred)
    m4 = np.mean(c2 * c2)
    m2_safe = m2 if m2 != 0 else 1.0
    half = n // 2
    median = x[half] if n % 2 else np.mean(x[half - 1:half + 1])
    return {
        "10Percentile": p10,
        "90Percentile": p90,
        "Energy": shifted_sq,
        "Entropy": -1.0 * np.sum(p_i * np.log2(p_i + EPS)),
        "InterquartileRange": p75 - p25,
        "Kurtosis": m4 / m2_safe ** 2.0,
        "Maximum": maximum,
        "Mean": mean,
        "MeanAbsoluteDeviation": np.mean(np.absolute(centred)),
        "Median": median,
        "Minimum": minimum,
        "Range": maximum - minimum,
        "RobustMeanAbsoluteDeviation": np.mean(np.absolute(robust - np.mean(robust))),
        "RootMeanSquared": np.sqrt(shifted_sq / float(n)) if n else 0,
        "Skewness": m3 / m2_safe ** 1.5,
        "TotalEnergy": shifted_sq * np.multiply.reduce(spacing),
        "Uniformity": np.nansum(p_i ** 2),
        "Variance": m2,  # numpy's std squared
    }


def _sorted_percentiles(x: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``numpy.percentile(x, q)`` (method "linear") of an already sorted ``x``, for each ``q``."""
    out = []
    for q in qs:
        virtual = (q / 100) * (x.size - 1)
        below = math.floor(virtual)
        above = min(below + 1, x.size - 1)
        gamma = virtual - below
        a, b = x[below], x[above]
        diff = b - a
        # numpy's _lerp: from the nearer end
        out.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return out


# ------------------------------------------------------------------------------------------------ GLCM
def glcm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                  spacing: tuple[float, ...], wanted: frozenset[str] = frozenset({"MCC"})) -> FeatureValues:
    """Every ``RadiomicsGLCM`` feature, per angle, then one ``nanmean`` over the angles.

    The matrix is held angle first, ``(angles, Ng, Ng)``. Sums of ``P`` times a function of ``(i, j)`` run
    over its non-zero entries only (zero entries add exactly 0 to pyradiomics' sums: ``0 * log2(eps)``
    is 0); features that depend on ``(i, j)`` only through ``i + j`` or ``|i - j|`` are summed over the
    sum / difference distributions, and those of one index over the marginals. MCC (an eigen
    decomposition per angle, most of the class's time) only when ``wanted`` names it.
    """
    ng = int(levels[-1])
    raw, angles = cMatrices.calculate_glcm(binned, mask, np.array(settings.get("distances", [1])), ng,
                                           settings.get("force2D", False), settings.get("force2Ddimension", 0))
    index = levels - 1
    p = raw[0].transpose(2, 0, 1)[:, index[:, None], index[None, :]]  # (angles, Ng, Ng), levels present
    if settings.get("symmetricalGLCM", True):
        p = p + p.transpose(0, 2, 1)
    norm = settings.get("weightingNorm")
    if norm is not None:
        weights = _angle_weights(angles, spacing, norm, _glcm_distance)
        p = np.sum(p * weights[:, None, None], 0, keepdims=True)
    p, totals = _drop_empty_angles(p, np.sum(p, (1, 2)), axis=0)
    if np.isnan(totals).any():
        raise _NotFused("an empty GLCM (no voxel pair in the ROI)")
    p /= totals[:, None, None]

    lv = levels.astype(float)
    n_angles, n_levels = p.shape[0], p.shape[1]
    px, py = p.sum(2), p.sum(1)  # (angles, Ng)
    ux, uy = px @ lv, py @ lv
    flat = p.reshape(n_angles, -1)  # (angles, Ng * Ng)
    n_sum, n_diff = 2 * ng - 1, ng
    k_sum, k_diff = np.arange(2, (ng * 2) + 1, dtype="float"), np.arange(0, ng, dtype="float")
    rows = np.arange(n_angles)[:, None]
    sum_index = (rows * n_sum + (np.rint(lv[:, None] + lv[None, :]).astype(np.intp) - 2).ravel()).ravel()
    diff_index = (rows * n_diff + np.rint(np.abs(lv[:, None] - lv[None, :])).astype(np.intp).ravel()).ravel()
    p_sum = np.bincount(sum_index, flat.ravel(), n_angles * n_sum).reshape(n_angles, n_sum)
    p_diff = np.bincount(diff_index, flat.ravel(), n_angles * n_diff).reshape(n_angles, n_diff)
    ij = (lv[:, None] * lv[None, :]).ravel()

    def per_angle_sum(terms: np.ndarray) -> np.ndarray:
        return np.add.reduce(terms.reshape(n_angles, -1), 1)

    logs = np.zeros_like(flat)  # log2(p + eps) only where p > 0: elsewhere the term p * log2(...) is 0
    np.log2(flat + EPS, out=logs, where=flat > 0)
    hxy = -per_angle_sum(flat * logs)
    centred_sum = k_sum[None, :] - (ux + uy)[:, None]  # (i + j) - ux - uy, per gray-level sum
    cs2 = centred_sum * centred_sum
    sum_squares = np.sum(px * (lv[None, :] - ux[:, None]) ** 2, 1)
    sigx, sigy = sum_squares ** 0.5, np.sum(py * (lv[None, :] - uy[:, None]) ** 2, 1) ** 0.5
    autocorrelation = flat @ ij
    corr = (autocorrelation - ux * uy) / (sigx * sigy + EPS)  # sum P (i - ux)(j - uy) = sum P ij - ux uy
    corr[sigx * sigy == 0] = 1
    diff_avg = p_diff @ k_diff
    hx, hy = _entropy(px, 1), _entropy(py, 1)
    pxpy = px[:, :, None] * py[:, None, :]
    log_pxpy = np.log2(pxpy + EPS)
    hxy1 = -per_angle_sum(p * log_pxpy)
    hxy2 = -per_angle_sum(pxpy * log_pxpy)
    div = np.fmax(hx, hy)
    imc1 = hxy - hxy1
    imc1[div != 0] /= div[div != 0]
    imc1[div == 0] = 0
    imc2 = (1 - np.e ** (-2 * (hxy2 - hxy))) ** 0.5
    imc2[hxy2 == hxy] = 0

    kd2 = k_diff ** 2
    per_angle = {
        "Autocorrelation": autocorrelation,
        "ClusterProminence": np.sum(p_sum * (cs2 * cs2), 1),
        "ClusterShade": np.sum(p_sum * (cs2 * centred_sum), 1),
        "ClusterTendency": np.sum(p_sum * cs2, 1),
        "Contrast": p_diff @ kd2,
        "Correlation": corr,
        "DifferenceAverage": diff_avg,
        "DifferenceEntropy": _entropy(p_diff, 1),
        "DifferenceVariance": np.sum(p_diff * (k_diff[None, :] - diff_avg[:, None]) ** 2, 1),
        "Id": p_diff @ (1 / (1 + k_diff)),
        "Idm": np.sum(p_diff / (1 + kd2), 1),
        "Idmn": np.sum(p_diff / (1 + kd2 / ng ** 2), 1),
        "Idn": np.sum(p_diff / (1 + k_diff / ng), 1),
        "Imc1": imc1,
        "Imc2": imc2,
        "InverseVariance": np.sum(p_diff[:, 1:] / kd2[1:], 1),
        "JointEnergy": np.einsum("ij,ij->i", flat, flat),
        "JointEntropy": hxy,
        "MaximumProbability": flat.max(1),
        "SumAverage": p_sum @ k_sum,
        "SumEntropy": _entropy(p_sum, 1),
        "SumSquares": sum_squares,
    }
    if "MCC" in wanted:
        per_angle["MCC"] = _glcm_mcc(p, px, py)
    out = _mean_over_angles(per_angle)
    out["JointAverage"] = ux.mean()
    if "MCC" in out and n_levels < 2:  # flat region: pyradiomics returns 1
        out["MCC"] = 1
    return out


def _glcm_mcc(p: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Maximal correlation coefficient per angle: sqrt of Q's second largest eigenvalue (as pyradiomics)."""
    ratio = p / (px[:, :, None] * py[:, None, :] + EPS)  # P(i,k) / (px(i) py(k) + eps)
    q = np.einsum("aik,ajk->aij", ratio, p)  # (angles, i, j): sum_k ratio(i,k) P(j,k)
    eigen = np.linalg.eigvals(q)
    eigen.sort()
    if eigen.shape[1] < 2:
        return np.ones(p.shape[0])
    return np.sqrt(eigen[:, -2]).real


# ----------------------------------------------------------------------------------------------- GLRLM
def glrlm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                   spacing: tuple[float, ...]) -> FeatureValues:
    """Every ``RadiomicsGLRLM`` feature, per angle, then one ``nanmean`` over the angles."""
    ng = int(levels[-1])
    p, angles = cMatrices.calculate_glrlm(binned, mask, ng, np.max(binned.shape), settings.get("force2D", False),
                                          settings.get("force2Ddimension", 0))
    p = p[0][levels - 1]  # (Ng, run lengths, angles)
    norm = settings.get("weightingNorm")
    if norm is not None:
        weights = _angle_weights(angles, spacing, norm, _glrlm_distance)
        p = np.sum(p * weights[None, None, :], 2, keepdims=True)
    p, nr = _drop_empty_angles(p, np.sum(p, (0, 1)))
    pr, pg = np.sum(p, 0), np.sum(p, 1)  # (runs, angles), (Ng, angles)
    i = levels.astype(float)[:, None]
    j = np.arange(1, p.shape[1] + 1, dtype=np.float64)
    used = np.sum(pr, 1) != 0
    if not used.all():
        p, j, pr = p[:, used], j[used], pr[used]
    j = j[:, None]
    i2, j2 = i ** 2, j ** 2
    pg_n, pr_n = pg / nr, pr / nr
    u_i, u_j = np.sum(pg_n * i, 0), np.sum(pr_n * j, 0)
    p_n = p / nr
    i3, j3 = i2[:, :, None], j2[None, :, :]
    per_angle = {
        "GrayLevelNonUniformity": np.sum(pg ** 2, 0) / nr,
        "GrayLevelNonUniformityNormalized": np.sum(pg ** 2, 0) / nr ** 2,
        "GrayLevelVariance": np.sum(pg_n * (i - u_i) ** 2, 0),
        "HighGrayLevelRunEmphasis": np.sum(pg * i2, 0) / nr,
        "LongRunEmphasis": np.sum(pr * j2, 0) / nr,
        "LongRunHighGrayLevelEmphasis": np.sum(p * (j3 * i3), (0, 1)) / nr,
        "LongRunLowGrayLevelEmphasis": np.sum(p * j3 / i3, (0, 1)) / nr,
        "LowGrayLevelRunEmphasis": np.sum(pg / i2, 0) / nr,
        "RunEntropy": _entropy(p_n, (0, 1)),
        "RunLengthNonUniformity": np.sum(pr ** 2, 0) / nr,
        "RunLengthNonUniformityNormalized": np.sum(pr ** 2, 0) / nr ** 2,
        "RunPercentage": nr / np.sum(pr * j, 0),
        "RunVariance": np.sum(pr_n * (j - u_j) ** 2, 0),
        "ShortRunEmphasis": np.sum(pr / j2, 0) / nr,
        "ShortRunHighGrayLevelEmphasis": np.sum(p * i3 / j3, (0, 1)) / nr,
        "ShortRunLowGrayLevelEmphasis": np.sum(p / (i3 * j3), (0, 1)) / nr,
    }
    return _mean_over_angles(per_angle)


# ------------------------------------------------------------------------------------------ GLSZM / GLDM
def _size_features(p: np.ndarray, levels: np.ndarray, total: float, names: Mapping[str, str]) -> FeatureValues:
    """The features GLSZM (zones by size) and GLDM (dependences by size) share, from ``p`` (Ng, sizes)."""
    ps, pg = np.sum(p, 0), np.sum(p, 1)
    j = np.arange(1, p.shape[1] + 1, dtype=np.float64)
    used = ps != 0
    if not used.all():
        p, j, ps = p[:, used], j[used], ps[used]
    i = levels.astype(float)
    i2, j2 = i ** 2, j ** 2
    pg_n, ps_n = pg / total, ps / total
    u_i, u_j = np.sum(pg_n * i), np.sum(ps_n * j)
    p_n = p / total
    i3, j3 = i2[:, None], j2[None, :]
    values = {
        "GrayLevelNonUniformity": np.sum(pg ** 2) / total,
        "GrayLevelNonUniformityNormalized": np.sum(pg ** 2) / total ** 2,
        "GrayLevelVariance": np.sum(pg_n * (i - u_i) ** 2),
        "HighGrayLevel": np.sum(pg * i2) / total,
        "Large": np.sum(ps * j2) / total,
        "LargeHighGrayLevel": np.sum(p * (j3 * i3)) / total,
        "LargeLowGrayLevel": np.sum(p * j3 / i3) / total,
        "LowGrayLevel": np.sum(pg / i2) / total,
        "Entropy": _entropy(p_n, None),
        "NonUniformity": np.sum(ps ** 2) / total,
        "NonUniformityNormalized": np.sum(ps ** 2) / total ** 2,
        "Small": np.sum(ps / j2) / total,
        "SmallHighGrayLevel": np.sum(p * i3 / j3) / total,
        "SmallLowGrayLevel": np.sum(p / (i3 * j3)) / total,
        "Variance": np.sum(ps_n * (j - u_j) ** 2),
    }
    return {names.get(k, k): v for k, v in values.items()}


_GLSZM_NAMES = {
    "HighGrayLevel": "HighGrayLevelZoneEmphasis", "Large": "LargeAreaEmphasis",
    "LargeHighGrayLevel": "LargeAreaHighGrayLevelEmphasis", "LargeLowGrayLevel": "LargeAreaLowGrayLevelEmphasis",
    "LowGrayLevel": "LowGrayLevelZoneEmphasis", "Entropy": "ZoneEntropy", "NonUniformity": "SizeZoneNonUniformity",
    "NonUniformityNormalized": "SizeZoneNonUniformityNormalized", "Small": "SmallAreaEmphasis",
    "SmallHighGrayLevel": "SmallAreaHighGrayLevelEmphasis", "SmallLowGrayLevel": "SmallAreaLowGrayLevelEmphasis",
    "Variance": "ZoneVariance",
}
_GLDM_NAMES = {
    "HighGrayLevel": "HighGrayLevelEmphasis", "Large": "LargeDependenceEmphasis",
    "LargeHighGrayLevel": "LargeDependenceHighGrayLevelEmphasis",
    "LargeLowGrayLevel": "LargeDependenceLowGrayLevelEmphasis", "LowGrayLevel": "LowGrayLevelEmphasis",
    "Entropy": "DependenceEntropy", "NonUniformity": "DependenceNonUniformity",
    "NonUniformityNormalized": "DependenceNonUniformityNormalized", "Small": "SmallDependenceEmphasis",
    "SmallHighGrayLevel": "SmallDependenceHighGrayLevelEmphasis",
    "SmallLowGrayLevel": "SmallDependenceLowGrayLevelEmphasis", "Variance": "DependenceVariance",
}


def glszm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                   spacing: tuple[float, ...]) -> FeatureValues:
    """Every ``RadiomicsGLSZM`` feature."""
    ng = int(levels[-1])
    p = cMatrices.calculate_glszm(binned, mask, ng, np.sum(mask), settings.get("force2D", False),
                                  settings.get("force2Ddimension", 0))
    p = p[0][levels - 1]  # (Ng, zone sizes)
    nz = np.sum(p)
    nz = nz if nz != 0 else 1
    n_voxels = np.sum(np.sum(p, 0) * np.arange(1, p.shape[1] + 1, dtype=np.float64))
    n_voxels = n_voxels if n_voxels != 0 else 1
    out = _size_features(p, levels, nz, _GLSZM_NAMES)
    out["ZonePercentage"] = nz / n_voxels
    return out


def gldm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                  spacing: tuple[float, ...]) -> FeatureValues:
    """Every non-deprecated ``RadiomicsGLDM`` feature."""
    ng = int(levels[-1])
    p = cMatrices.calculate_gldm(binned, mask, np.array(settings.get("distances", [1])), ng,
                                 settings.get("gldm_a", 0), settings.get("force2D", False),
                                 settings.get("force2Ddimension", 0))
    p = p[0][levels - 1]  # (Ng, dependence sizes)
    nz = np.sum(p)
    nz = nz if nz != 0 else 1
    out = _size_features(p, levels, nz, _GLDM_NAMES)
    del out["GrayLevelNonUniformityNormalized"]  # deprecated in GLDM (= first order Uniformity)
    return out


# ----------------------------------------------------------------------------------------------- NGTDM
def ngtdm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                   spacing: tuple[float, ...]) -> FeatureValues:
    """Every ``RadiomicsNGTDM`` feature."""
    p = cMatrices.calculate_ngtdm(binned, mask, np.array(settings.get("distances", [1])), int(levels[-1]),
                                  settings.get("force2D", False), settings.get("force2Ddimension", 0))[0]
    p = p[p[:, 0] != 0]  # (Ng present, [count, s_i, gray level])
    nvp = np.sum(p[:, 0])
    p_i, s_i, i = p[:, 0] / nvp, p[:, 1], p[:, 2]
    ngp = np.sum(p[:, 0] > 0)
    zero = p_i == 0
    both = zero[:, None] | zero[None, :]
    pi_si = p_i * s_i
    sum_pi_si = np.sum(pi_si)
    sum_s_i = np.sum(s_i)
    i_diff = i[:, None] - i[None, :]
    i_diff2 = i_diff ** 2

    coarseness = 1 / sum_pi_si if sum_pi_si != 0 else 1000000.0
    div = ngp * (ngp - 1)
    contrast = (np.sum(p_i[:, None] * p_i[None, :] * i_diff2) * sum_s_i / nvp) / div if div != 0 else 0
    i_pi = i * p_i
    absdiff = np.abs(i_pi[:, None] - i_pi[None, :])
    absdiff[both] = 0
    absdiff = np.sum(absdiff)
    busyness = sum_pi_si / absdiff if absdiff != 0 else 0
    numerator = pi_si[:, None] + pi_si[None, :]
    numerator[both] = 0
    divisor = p_i[:, None] + p_i[None, :]
    divisor[divisor == 0] = 1
    complexity = np.sum(np.abs(i_diff) * numerator / divisor) / nvp
    strength = (p_i[:, None] + p_i[None, :]) * i_diff2
    strength[both] = 0
    strength = np.sum(strength)
    strength = strength / sum_s_i if sum_s_i != 0 else 0
    return {"Busyness": busyness, "Coarseness": coarseness, "Complexity": complexity, "Contrast": contrast,
            "Strength": strength}


TEXTURE_FUNCTIONS: dict[str, Callable[..., FeatureValues]] = {
    "glcm": glcm_features, "glrlm": glrlm_features, "glszm": glszm_features, "gldm": gldm_features,
    "ngtdm": ngtdm_features,
}
FUSED_CLASSES = ("firstorder", *TEXTURE_FUNCTIONS)


@cache
def fused_feature_names(class_name: str) -> frozenset[str]:
    """The features of ``class_name`` the fused pass computes: pyradiomics' non-deprecated ones."""
    return frozenset(name for name, deprecated in getFeatureClasses()[class_name].getFeatureNames().items()
                     if not deprecated)


@cache
def default_features(class_name: str) -> tuple[str, ...]:
    """What pyradiomics' ``enableAllFeatures`` enables, in its order (the class's enumeration order)."""
    return tuple(name for name, deprecated in getFeatureClasses()[class_name].getFeatureNames().items()
                 if not deprecated)


# ------------------------------------------------------------------------------------------- extractor
class FastFeatureExtractor(RadiomicsFeatureExtractor):
    """``RadiomicsFeatureExtractor`` that computes each image type's features in one fused pass.

    ``execute`` is pyradiomics 3.0.1's, step for step, except the loop over image types (module
    docstring); voxel-based extraction is pyradiomics' own.
    """

    def execute(self, imageFilepath: Any, maskFilepath: Any, label: int | None = None,  # noqa: N803
                label_channel: int | None = None, voxelBased: bool = False) -> dict[str, Any]:  # noqa: N803
        if voxelBased:
            return super().execute(imageFilepath, maskFilepath, label, label_channel, voxelBased)
        settings = self.settings.copy()
        if label is not None:
            settings["label"] = label
        else:
            label = settings.get("label", 1)
        if label_channel is not None:
            settings["label_channel"] = label_channel
        import radiomics.featureextractor as fe

        if fe.geometryTolerance != settings.get("geometryTolerance"):
            self._setTolerance()
        general = None
        if settings.get("additionalInfo", False):
            general = generalinfo.GeneralInfo()
            general.addGeneralSettings(settings)
            general.addEnabledImageTypes(self.enabledImagetypes)

        vector: collections.OrderedDict[str, Any] = collections.OrderedDict()
        image, mask = self.loadImage(imageFilepath, maskFilepath, general, **settings)
        bbox, corrected = imageoperations.checkMask(image, mask, **settings)
        if corrected is not None:
            if general is not None:
                general.addMaskElements(image, corrected, label, "corrected")
            mask = corrected
        resegmented = None
        if settings.get("resegmentRange", None) is not None:
            resegmented = imageoperations.resegmentMask(image, mask, **settings)
            bbox, corrected = imageoperations.checkMask(image, resegmented, **settings)
            if general is not None:
                general.addMaskElements(image, resegmented, label, "resegmented")
        if general is not None:
            vector.update(general.getGeneralInfo())
        if settings.get("resegmentShape", False) and resegmented is not None:
            mask = resegmented
        vector.update(self.computeShape(image, mask, bbox, **settings))
        if not settings.get("resegmentShape", False) and resegmented is not None:
            mask = resegmented

        generators: Any = []
        for image_type, custom in self.enabledImagetypes.items():
            args = settings.copy()
            args.update(custom)
            generators = chain(generators, getattr(imageoperations, f"get{image_type}Image")(image, mask, **args))
        # The box cropToTumorMask would cut (no padding), as numpy slices (x, y, z -> z, y, x).
        box = tuple(slice(int(bbox[2 * d]), int(bbox[2 * d + 1]) + 1) for d in range(mask.GetDimension()))[::-1]
        mask_box = sitk.GetArrayViewFromImage(mask)[box] == label
        for filtered, image_type_name, kwargs in generators:
            vector.update(self._image_type_features(filtered, mask, bbox, box, mask_box, image_type_name, kwargs))
        return vector

    def _image_type_features(self, filtered: sitk.Image, mask: sitk.Image, bbox: Any, box: tuple[slice, ...],
                             mask_box: np.ndarray, image_type_name: str, kwargs: dict[str, Any]) -> FeatureValues:
        """All enabled non-shape features of one filtered image, in pyradiomics' key order."""
        vector: FeatureValues = {}
        enabled = {k: v for k, v in self.enabledFeatures.items() if not k.startswith("shape")}
        same_grid = filtered.GetSize() == mask.GetSize()  # else pyradiomics' crop decides, as in stock
        array = sitk.GetArrayViewFromImage(filtered)[box]
        spacing = filtered.GetSpacing()
        binned = None
        for class_name, names in enabled.items():
            # no name (None or an empty list) enables every non-deprecated feature, as pyradiomics' execute()
            wanted = default_features(class_name) if not names and class_name in FUSED_CLASSES else names
            values = None
            if same_grid and class_name in FUSED_CLASSES and set(wanted) <= fused_feature_names(class_name):
                try:
                    if binned is None:
                        binned = discretise(array, mask_box, kwargs)
                        levels = np.flatnonzero(np.bincount(binned[mask_box]))  # np.unique, without a sort
                    if class_name == "firstorder":
                        values = firstorder_features(array[mask_box].astype("float"), binned[mask_box], kwargs,
                                                     spacing)
                    elif class_name == "glcm":
                        values = glcm_features(binned, mask_box, levels, kwargs, spacing, frozenset(wanted))
                    else:
                        values = TEXTURE_FUNCTIONS[class_name](binned, mask_box, levels, kwargs, spacing)
                except _NotFused as why:
                    logger.debug("%s on %s left to pyradiomics: %s", class_name, image_type_name, why)
                    values = None
                except Exception:  # noqa: BLE001 - pyradiomics recomputes the class with its own error handling
                    logger.warning("fused %s pass failed on %s: recomputing with pyradiomics", class_name,
                                   image_type_name, exc_info=True)
                    values = None
            if values is None:
                values = self._stock_class(class_name, names, filtered, mask, bbox, kwargs)
                wanted = list(values)
            for feature in wanted:
                vector[f"{image_type_name}_{class_name}_{feature}"] = np.float64(values[feature])
        return vector

    def _stock_class(self, class_name: str, names: list[str] | None, filtered: sitk.Image, mask: sitk.Image,
                     bbox: Any, kwargs: dict[str, Any]) -> FeatureValues:
        """pyradiomics' own class on pyradiomics' own crop (its ``computeFeatures`` for one class)."""
        image_c, mask_c = imageoperations.cropToTumorMask(filtered, mask, bbox, padDistance=0)
        instance = getFeatureClasses()[class_name](image_c, mask_c, **kwargs)
        for feature in names or ():
            instance.enableFeatureByName(feature)
        return dict(instance.execute())

