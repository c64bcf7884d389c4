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


def _drop_empty_angles(p: np.ndarray, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pyradiomics: with more than one angle, angles whose matrix is empty are removed; empty totals -> NaN."""
    if p.shape[-1] > 1:
        keep = totals != 0
        if not keep.all():
            p, totals = p[..., keep], totals[keep]
    totals = totals.astype(float)
    totals[totals == 0] = np.nan
    return p, totals


def _entropy(p: np.ndarray, axis: Any) -> np.ndarray:
    return -np.sum(p * np.log2(p + EPS), axis)


# ------------------------------------------------------------------------------------------ first order
def firstorder_features(values: np.ndarray, binned_values: np.ndarray, settings: Mapping[str, Any],
                        spacing: tuple[float, ...]) -> FeatureValues:
    """Every ``RadiomicsFirstOrder`` feature of a segment from its voxels (float64) and their bins."""
    x = values
    shift = settings.get("voxelArrayShift", 0)
    n = x.size
    shifted_sq = np.sum((x + shift) ** 2)
    counts = np.bincount(binned_values)
    p_i = counts[counts > 0].astype(float)
    p_i /= np.sum(p_i) if n else 1.0
    minimum, maximum = np.min(x), np.max(x)
    p10, p25, p75, p90 = np.percentile(x, [10, 25, 75, 90])
    mean = np.mean(x)
    centred = x - mean
    robust = x[(x - p10 >= 0) & (x - p90 <= 0)]
    m2 = np.mean(np.power(centred, 2))
    m3 = np.mean(np.power(centred, 3))
    m4 = np.mean(np.power(centred, 4))
    m2_safe = m2 if m2 != 0 else 1.0
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
        "Median": np.median(x),
        "Minimum": minimum,
        "Range": maximum - minimum,
        "RobustMeanAbsoluteDeviation": np.mean(np.absolute(robust - np.mean(robust))),
        "RootMeanSquared": np.sqrt(shifted_sq / float(n)) if n else 0,
        "Skewness": m3 / m2_safe ** 1.5,
        "TotalEnergy": shifted_sq * np.multiply.reduce(spacing),
        "Uniformity": np.nansum(p_i ** 2),
        "Variance": np.std(x) ** 2,
    }


# ------------------------------------------------------------------------------------------------ GLCM
def glcm_features(binned: np.ndarray, mask: np.ndarray, levels: np.ndarray, settings: Mapping[str, Any],
                  spacing: tuple[float, ...], wanted: frozenset[str] = frozenset({"MCC"})) -> FeatureValues:
    """Every ``RadiomicsGLCM`` feature, per angle, then one ``nanmean`` over the angles.

    MCC (an eigen decomposition per angle, most of the class's time) only when ``wanted`` names it.
    """
    ng = int(levels[-1])
    p, angles = cMatrices.calculate_glcm(binned, mask, np.array(settings.get("distances", [1])), ng,
                                         settings.get("force2D", False), settings.get("force2Ddimension", 0))
    index = levels - 1
    p = p[0][np.ix_(index, index)]  # (Ng, Ng, angles) over the gray levels present
    if settings.get("symmetricalGLCM", True):
        p += np.transpose(p, (1, 0, 2)).copy()
    norm = settings.get("weightingNorm")
    if norm is not None:
        weights = _angle_weights(angles, spacing, norm, _glcm_distance)
        p = np.sum(p * weights[None, None, :], 2, keepdims=True)
    p, totals = _drop_empty_angles(p, np.sum(p, (0, 1)))
    p /= totals[None, None, :]

    # Shared intermediates. Every feature that depends on (i, j) only through i + j or |i - j| is summed
    # over the sum / difference distributions, and every one that depends on one index only over the
    # marginals: the same terms as pyradiomics' sums over the whole matrix, grouped (exact algebra).
    lv = levels.astype(float)
    n_angles = p.shape[2]
    flat = p.reshape(-1, n_angles)  # (Ng * Ng, angles)
    px, py = p.sum(1), p.sum(0)  # (Ng, angles)
    col = lv[:, None]
    ux, uy = np.sum(col * px, 0), np.sum(col * py, 0)
    k_sum, k_diff = np.arange(2, (ng * 2) + 1, dtype="float"), np.arange(0, ng, dtype="float")
    offsets = np.arange(n_angles)[None, :]
    sum_index = (np.rint(lv[:, None] + lv[None, :]).astype(np.intp).reshape(-1, 1) - 2) * n_angles + offsets
    diff_index = np.rint(np.abs(lv[:, None] - lv[None, :])).astype(np.intp).reshape(-1, 1) * n_angles + offsets
    p_sum = np.bincount(sum_index.ravel(), flat.ravel(), len(k_sum) * n_angles).reshape(len(k_sum), n_angles)
    p_diff = np.bincount(diff_index.ravel(), flat.ravel(), len(k_diff) * n_angles).reshape(len(k_diff), n_angles)
    ks, kd = k_sum[:, None], k_diff[:, None]
    hxy = _entropy(p, (0, 1))

    centred_sum = ks - ux - uy  # (i + j) - ux - uy, per gray-level sum
    cs2 = centred_sum * centred_sum
    dx2, dy2 = (col - ux) ** 2, (col - uy) ** 2
    sum_squares = np.sum(px * dx2, 0)
    sigx, sigy = sum_squares ** 0.5, np.sum(py * dy2, 0) ** 0.5
    autocorrelation = (lv * lv[:, None]).ravel() @ flat
    corr = (autocorrelation - ux * uy) / (sigx * sigy + EPS)  # sum P (i - ux)(j - uy) = sum P ij - ux uy
    corr[sigx * sigy == 0] = 1
    diff_avg = np.sum(kd * p_diff, 0)
    hx, hy = _entropy(px, 0), _entropy(py, 0)
    pxpy = px[:, None, :] * py[None, :, :]
    log_pxpy = np.log2(pxpy + EPS)
    hxy1 = -np.sum(p * log_pxpy, (0, 1))
    hxy2 = -np.sum(pxpy * log_pxpy, (0, 1))
    div = np.fmax(hx, hy)
    imc1 = hxy - hxy1
    imc1[div != 0] /= div[div != 0]
    imc1[div == 0] = 0
    imc2 = (1 - np.e ** (-2 * (hxy2 - hxy))) ** 0.5
    imc2[hxy2 == hxy] = 0

    kd2 = kd ** 2
    per_angle = {
        "Autocorrelation": autocorrelation,
        "ClusterProminence": np.sum(p_sum * (cs2 * cs2), 0),
        "ClusterShade": np.sum(p_sum * (cs2 * centred_sum), 0),
        "ClusterTendency": np.sum(p_sum * cs2, 0),
        "Contrast": np.sum(p_diff * kd2, 0),
        "Correlation": corr,
        "DifferenceAverage": diff_avg,
        "DifferenceEntropy": _entropy(p_diff, 0),
        "DifferenceVariance": np.sum(p_diff * (kd - diff_avg) ** 2, 0),
        "Id": np.sum(p_diff / (1 + kd), 0),
        "Idm": np.sum(p_diff / (1 + kd2), 0),
        "Idmn": np.sum(p_diff / (1 + kd2 / ng ** 2), 0),
        "Idn": np.sum(p_diff / (1 + kd / ng), 0),
        "Imc1": imc1,
        "Imc2": imc2,
        "InverseVariance": np.sum(p_diff[1:] / kd2[1:], 0),
        "JointEnergy": np.einsum("ij,ij->j", flat, flat),
        "JointEntropy": hxy,
        "MaximumProbability": np.amax(flat, 0),
        "SumAverage": np.sum(ks * p_sum, 0),
        "SumEntropy": _entropy(p_sum, 0),
        "SumSquares": sum_squares,
    }
    if "MCC" in wanted:
        per_angle["MCC"] = _glcm_mcc(p, px, py)
    names = list(per_angle)
    means = np.nanmean(np.array([per_angle[k] for k in names]), 1)
    out = dict(zip(names, means, strict=True))
    out["JointAverage"] = ux.mean()
    if "MCC" in out and p.shape[0] < 2:  # flat region: pyradiomics returns 1
        out["MCC"] = 1
    return out


def _glcm_mcc(p: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Maximal correlation coefficient per angle: sqrt of Q's second largest eigenvalue (as pyradiomics)."""
    ratio = p / (px[:, None, :] * py[None, :, :] + EPS)  # P(i,k) / (px(i) py(k) + eps)
    # (angles, i, j): sum_k ratio(i,k) P(j,k); einsum's own loop, not BLAS (whose idle threads spin against
    # LAPACK's eigvals on two cores: 14x slower measured)
    q = np.einsum("ika,jka->aij", ratio, p)
    eigen = np.linalg.eigvals(q)
    eigen.sort()
    if eigen.shape[1] < 2:
        return np.ones(p.shape[2])
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
    names = list(per_angle)
    return dict(zip(names, np.nanmean(np.array([per_angle[k] for k in names]), 1), strict=True))


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
            wanted = default_features(class_name) if names is None and class_name in FUSED_CLASSES else names
            values = None
            if same_grid and class_name in FUSED_CLASSES and set(wanted) <= fused_feature_names(class_name):
                try:
                    if binned is None:
                        binned = discretise(array, mask_box, kwargs)
                        levels = np.unique(binned[mask_box])
                    if class_name == "firstorder":
                        values = firstorder_features(array[mask_box].astype("float"), binned[mask_box], kwargs,
                                                     spacing)
                    elif class_name == "glcm":
                        values = glcm_features(binned, mask_box, levels, kwargs, spacing, frozenset(wanted))
                    else:
                        values = TEXTURE_FUNCTIONS[class_name](binned, mask_box, levels, kwargs, spacing)
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

