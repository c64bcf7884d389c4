"""The fused feature pass gives pyradiomics' values (to the last bits) and leave pyradiomics alone.

Everything runs on the whole image (no crop), so the only difference from stock is the classes
themselves; the tolerance is 1e-12 relative (with the same near-zero floor as ``test_extract``).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import getFeatureClasses, imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

from imaging_assets.features.extract import max_relative_difference
from imaging_assets.features.fastclasses import FastFeatureExtractor, fixed_width_bin_edges

TOL = 1e-10  # the bound: sums grouped differently move cancelling features (ClusterShade) by ~1e-12
ALL_CLASSES = {"firstorder": None, "glcm": None, "glrlm": None, "glszm": None, "gldm": None, "ngtdm": None,
               "shape": None}


def _features(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def assert_close(stock: dict[str, float], fast: dict[str, float]) -> None:
    """Same keys, and the extraction module's relative-difference rule (near-zero floor included) <= TOL."""
    assert stock.keys() == fast.keys()
    worst, where = max_relative_difference(stock, fast)
    assert worst <= TOL, f"{where}: stock {stock[where]} vs fast {fast[where]}"


def volume(seed: int, flat_lesion: bool = False, gaps: bool = False) -> tuple[sitk.Image, sitk.Image]:
    """CT-like noise with a textured lesion; ``gaps``: gray levels with empty bins between them."""
    rng = np.random.default_rng(seed)
    shape = (14, 40, 40)
    z, y, x = np.indices(shape)
    hu = -700 + 60 * rng.standard_normal(shape)
    d2 = ((z - 7) * 2.5) ** 2 + ((y - 20) * 0.8) ** 2 + ((x - 19) * 0.8) ** 2
    lesion = d2 <= 7.5 ** 2
    if flat_lesion:  # one slice only: the z angles of the texture matrices are empty
        lesion &= z == 7
    values = 40 + 45 * np.sin(0.7 * x) * np.cos(0.5 * y) + 30 * rng.standard_normal(shape)
    if gaps:  # only a few widely spaced levels: many gray-level sums / differences never occur
        values = rng.choice([-200.0, 10.0, 35.0, 300.0], size=shape)
    hu[lesion] = values[lesion]
    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.5))
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


SETTINGS = {
    "bin width": {"binWidth": 25, "voxelArrayShift": 1000},
    "bin count": {"binCount": 16},
    "asymmetric weighted glcm": {"binWidth": 10, "symmetricalGLCM": False, "weightingNorm": "manhattan"},
    "force2D, distances 1 and 2": {"binWidth": 25, "force2D": True, "distances": [1, 2]},
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("case", ["textured", "one slice", "gapped levels"])
def test_fast_extractor_equals_stock(name: str, case: str) -> None:
    image, mask = volume(3, flat_lesion=case == "one slice", gaps=case == "gapped levels")
    params = {
        "imageType": {"Original": {}, "LoG": {"sigma": [1.0]}, "Wavelet": {}},
        "featureClass": ALL_CLASSES,
        "setting": {"label": 1, "minimumROIDimensions": 2, **SETTINGS[name]},
    }
    stock = _features(RadiomicsFeatureExtractor(params).execute(image, mask))
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert len(stock) > 500
    assert_close(stock, fast)


def test_pyradiomics_itself_is_not_patched() -> None:
    FastFeatureExtractor({})
    assert all(cls.__module__.startswith("radiomics.") for cls in getFeatureClasses().values())
    assert imageoperations.getBinEdges.__module__ == "radiomics.imageoperations"


@pytest.mark.parametrize("values", [
    np.array([-1000.0, -990.5, 20.0, 310.25]),
    np.array([50, 75, 100, 125], dtype=np.int16),  # edges exactly on multiples of the width
    np.array([-3, -3, -3], dtype=np.int32),  # flat region: one bin
    np.array([0.0, 0.0]),
    np.random.default_rng(0).normal(0.0, 1e-3, 1000),  # wavelet-sized values, tiny width below
])
@pytest.mark.parametrize("width", [25, 0.5, 1e-4])
def test_bin_edges_are_pyradiomics_bin_edges(values: np.ndarray, width: float) -> None:
    expected = imageoperations.getBinEdges(values, binWidth=width)
    got = fixed_width_bin_edges(values, width)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert np.array_equal(np.digitize(values, got), np.digitize(values, expected))


def test_bin_edges_leave_nan_to_pyradiomics() -> None:
    assert fixed_width_bin_edges(np.array([1.0, np.nan, 3.0]), 1.0) is None
