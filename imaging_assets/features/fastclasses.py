"""pyradiomics' texture feature classes with their hot spots vectorised: same formulas, same values.

Profiling :func:`imaging_assets.features.extract.extract_lesion` on a demo lesion (CT preset: Original,
3 LoG, 8 wavelet image types) shows a third of the time in four places of pyradiomics 3.0.1 that do
not compute anything new, they only compute slowly:

* ``imageoperations.getBinEdges`` takes the ROI's minimum and maximum with Python's builtin ``min`` and
  ``max`` over a numpy array (a Python loop over every voxel), five times per image type;
* ``RadiomicsFeaturesBase.getFeatureNames`` enumerates the class with ``inspect.getmembers`` every time a
  feature class is instantiated (73 times per lesion);
* ``RadiomicsGLCM._calculateCoefficients`` builds the sum and difference distributions
  (``pxAddy``, ``pxSuby``) with a Python loop over gray-level sums, each step a boolean mask over the
  whole matrix;
* ``getClusterProminenceFeatureValue`` / ``getClusterShadeFeatureValue`` raise a float array to the 4th
  and 3rd power with ``**`` (the slow general ``pow``).

The subclasses here replace exactly those pieces: ``ndarray.min()``/``max()`` (the same element, so the
same bin edges; NaN images and ``binCount`` fall back to pyradiomics), a per-class cache of the feature
names, ``numpy.add.at`` over the gray-level sum and difference indices, and products instead of powers.
Everything else, including the C texture matrices, is pyradiomics' own code. The sums are added in a
different order, so values may differ from stock in the last bits (measured: relative differences
below 1e-12, see ``tests/features/test_fastclasses.py`` and ``benchmarks/extraction.py``).

:class:`FastFeatureExtractor` is a ``RadiomicsFeatureExtractor`` that instantiates these classes; the
stock extractor and the stock classes are left untouched (nothing is patched globally).
"""

from __future__ import annotations

import collections
from functools import cache
from typing import Any

import numpy as np
from radiomics import getFeatureClasses
from radiomics.featureextractor import RadiomicsFeatureExtractor
from radiomics.glcm import RadiomicsGLCM


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


class _FastBase:
    """Mixin for every texture / first-order class: fast binning and cached feature names."""

    settings: dict[str, Any]
    maskArray: np.ndarray
    coefficients: dict[str, Any]

    @classmethod
    def getFeatureNames(cls) -> dict[str, bool]:  # noqa: N802 - pyradiomics' name
        return dict(_feature_names(cls))

    def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 - pyradiomics' name
        if self.settings.get("binCount") is not None:
            return super()._applyBinning(matrix)  # type: ignore[misc]
        values = matrix[self.maskArray]
        edges = fixed_width_bin_edges(values, self.settings.get("binWidth", 25))
        if edges is None:
            return super()._applyBinning(matrix)  # type: ignore[misc]
        binned = np.zeros(matrix.shape, dtype="int")
        binned[self.maskArray] = np.digitize(values, edges)
        self.coefficients["grayLevels"] = np.unique(binned[self.maskArray])
        self.coefficients["Ng"] = int(np.max(self.coefficients["grayLevels"]))
        return binned


@cache
def _feature_names(cls: type) -> dict[str, bool]:
    # the stock enumeration, once per class (the mixin's override is skipped by starting after it)
    return super(_FastBase, cls).getFeatureNames()  # type: ignore[misc]


class FastGLCM(_FastBase, RadiomicsGLCM):
    """``RadiomicsGLCM`` with vectorised ``pxAddy`` / ``pxSuby`` and power-free cluster features."""

    P_glcm: np.ndarray

    def _calculateCoefficients(self) -> None:  # noqa: N802 - pyradiomics' name
        ng = self.coefficients["Ng"]
        eps = np.spacing(1)
        levels = self.coefficients["grayLevels"].astype("float")
        i, j = np.meshgrid(levels, levels, indexing="ij", sparse=True)
        k_sum = np.arange(2, (ng * 2) + 1, dtype="float")
        k_diff = np.arange(0, ng, dtype="float")
        p = self.P_glcm  # (Nv, Ng', Ng', angles) over the gray levels present
        px = p.sum(2, keepdims=True)
        py = p.sum(1, keepdims=True)
        ux = np.sum(i[None, :, :, None] * p, (1, 2), keepdims=True)
        uy = np.sum(j[None, :, :, None] * p, (1, 2), keepdims=True)

        nv, n_levels, _, n_angles = p.shape
        pairs = np.moveaxis(p, 3, 1).reshape(nv * n_angles, n_levels * n_levels).T  # (pairs, Nv*angles)
        sums = np.zeros((len(k_sum), nv * n_angles))
        np.add.at(sums, (np.rint(i + j).astype(np.intp) - 2).ravel(), pairs)
        diffs = np.zeros((len(k_diff), nv * n_angles))
        np.add.at(diffs, np.rint(np.abs(i - j)).astype(np.intp).ravel(), pairs)
        # (Nv, 2*Ng-1, angles) and (Nv, Ng, angles), as pyradiomics
        px_add_y = sums.T.reshape(nv, n_angles, len(k_sum)).transpose(0, 2, 1)
        px_sub_y = diffs.T.reshape(nv, n_angles, len(k_diff)).transpose(0, 2, 1)
        hxy = (-1) * np.sum(p * np.log2(p + eps), (1, 2))

        self.coefficients.update(
            eps=eps, i=i, j=j, kValuesSum=k_sum, kValuesDiff=k_diff, px=px, py=py, ux=ux, uy=uy,
            pxAddy=px_add_y, pxSuby=px_sub_y, HXY=hxy,
        )

    def _centred_sum(self) -> np.ndarray:
        c = self.coefficients
        return (c["i"] + c["j"])[None, :, :, None] - c["ux"] - c["uy"]

    def getClusterProminenceFeatureValue(self) -> np.ndarray:  # noqa: N802 - pyradiomics' name
        d2 = self._centred_sum() ** 2
        return np.nanmean(np.sum(self.P_glcm * (d2 * d2), (1, 2)), 1)

    def getClusterShadeFeatureValue(self) -> np.ndarray:  # noqa: N802 - pyradiomics' name
        d = self._centred_sum()
        return np.nanmean(np.sum(self.P_glcm * (d * d * d), (1, 2)), 1)


# Keep the docstrings (pyradiomics' documentation of each feature) on the overrides.
FastGLCM.getClusterProminenceFeatureValue.__doc__ = RadiomicsGLCM.getClusterProminenceFeatureValue.__doc__
FastGLCM.getClusterShadeFeatureValue.__doc__ = RadiomicsGLCM.getClusterShadeFeatureValue.__doc__


@cache
def fast_feature_classes() -> dict[str, type]:
    """pyradiomics' feature classes by name, with the fast subclasses where they exist.

    Shape classes are pyradiomics' own (their time is the C surface mesh).
    """
    classes: dict[str, type] = {}
    for name, cls in getFeatureClasses().items():
        if name == "glcm":
            classes[name] = FastGLCM
        elif name.startswith("shape"):
            classes[name] = cls
        else:
            classes[name] = type(f"Fast{cls.__name__}", (_FastBase, cls), {"__module__": __name__})
    return classes


class FastFeatureExtractor(RadiomicsFeatureExtractor):
    """``RadiomicsFeatureExtractor`` that computes with :func:`fast_feature_classes`.

    Only ``computeFeatures`` differs: the loop of pyradiomics 3.0.1, with the class table swapped.
    """

    def computeFeatures(self, image: Any, mask: Any, imageTypeName: str, **kwargs: Any) -> dict[str, Any]:  # noqa: N802,N803
        vector: collections.OrderedDict[str, Any] = collections.OrderedDict()
        classes = fast_feature_classes()
        for class_name, feature_names in self.enabledFeatures.items():
            if class_name.startswith("shape") or class_name not in classes:
                continue
            instance = classes[class_name](image, mask, **kwargs)
            if feature_names is not None:
                for feature in feature_names:
                    instance.enableFeatureByName(feature)
            for feature, value in instance.execute().items():
                vector[f"{imageTypeName}_{class_name}_{feature}"] = value
        return vector
