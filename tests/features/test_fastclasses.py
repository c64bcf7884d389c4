"""The fused feature pass gives pyradiomics' values and leaves pyradiomics alone.

Each comparison runs pyradiomics' own classes and the fused pass on the same input (the whole image, or
the same crop for the real cases and demo lesions), so the only difference is the feature computation;
the tolerance is 1e-10 relative (with the same near-zero floor as ``test_extract``).
"""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import getFeatureClasses, imageoperations
from radiomics.featureextractor import RadiomicsFeatureExtractor

from imaging_assets.features import extract
from imaging_assets.features.extract import extract_lesion, max_relative_difference
from imaging_assets.features.fastclasses import FastFeatureExtractor, fixed_width_bin_edges
from imaging_assets.features.params import load_params

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


def volume(seed: int, flat_lesion: bool = False, gaps: bool = False, flat: bool = False
           ) -> tuple[sitk.Image, sitk.Image]:
    """CT-like noise with a textured lesion; ``gaps``: gray levels with empty bins between them; ``flat``:
    one value in the whole lesion (one gray level: every texture matrix is 1 x 1)."""
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
    if flat:
        values = np.full(shape, 35.0)
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
    "euclidean weighting": {"binWidth": 10, "weightingNorm": "euclidean"},
    "infinity weighting": {"binWidth": 10, "weightingNorm": "infinity"},
    "no weighting norm": {"binWidth": 10, "weightingNorm": "no_weighting"},
    "force2D, distances 1 and 2": {"binWidth": 25, "force2D": True, "distances": [1, 2]},
    "force2D along y, gldm alpha": {"binWidth": 5, "force2D": True, "force2Ddimension": 1, "gldm_a": 2},
    # IBSI-like configurations: fine fixed bins, resegmentation, per-image-type bin widths below
    "ibsi fine bins, resegmented": {"binWidth": 1, "resegmentRange": [-200, 300]},
}
CASES = ["textured", "one slice", "gapped levels", "flat lesion"]


def case_volume(case: str) -> tuple[sitk.Image, sitk.Image]:
    return volume(3, flat_lesion=case == "one slice", gaps=case == "gapped levels", flat=case == "flat lesion")


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("case", CASES)
def test_fast_extractor_equals_stock(name: str, case: str) -> None:
    image, mask = case_volume(case)
    params = {
        "imageType": {"Original": {}, "LoG": {"sigma": [1.0]}, "Wavelet": {}},
        "featureClass": ALL_CLASSES,
        "setting": {"label": 1, "minimumROIDimensions": 2, **SETTINGS[name]},
    }
    stock = _features(RadiomicsFeatureExtractor(params).execute(image, mask))
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert len(stock) > 500
    assert_close(stock, fast)


@pytest.mark.parametrize("preset", ["ct", "mr", "pet", "default"])
@pytest.mark.parametrize("case", CASES)
def test_every_preset_equals_stock(preset: str, case: str) -> None:
    """The presets' settings (resampling, normalisation, LoG, wavelet, their feature lists) on each edge case."""
    image, mask = case_volume(case)
    params = load_params(preset)
    stock = _features(RadiomicsFeatureExtractor(params).execute(image, mask))
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert_close(stock, fast)


def test_custom_settings_per_image_type_deprecated_and_listed_features_equal_stock() -> None:
    """Per-image-type bin widths, a feature subset in the parameter file's order, deprecated features named
    explicitly (pyradiomics' own classes compute those) and MCC."""
    image, mask = case_volume("textured")
    params = {
        "imageType": {"Original": {"binWidth": 5}, "LoG": {"sigma": [2.0], "binWidth": 10}, "Square": {}},
        "featureClass": {"firstorder": ["Median", "StandardDeviation", "Mean"], "ngtdm": [],
                         "glcm": ["MCC", "Idn", "SumAverage", "Dissimilarity"], "gldm": None,
                         "glszm": ["ZonePercentage"], "shape": None},
        "setting": {"label": 1, "binWidth": 25},
    }
    stock = _features(RadiomicsFeatureExtractor(params).execute(image, mask))
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert list(stock) == list(fast)  # pyradiomics' key order
    assert "original_firstorder_StandardDeviation" in fast and "original_glcm_MCC" in fast
    assert "original_ngtdm_Busyness" in fast  # an empty list enables the whole class, as in pyradiomics
    assert_close(stock, fast)


def test_the_fused_pass_computes_every_class_it_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback: on ordinary input pyradiomics' classes are never instantiated."""
    image, mask = case_volume("textured")
    calls = []
    monkeypatch.setattr(FastFeatureExtractor, "_stock_class", lambda self, name, *a: calls.append(name))
    params = {"imageType": {"Original": {}, "Wavelet": {}}, "featureClass": ALL_CLASSES,
              "setting": {"label": 1, "binWidth": 25}}
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert calls == [] and len(fast) > 500


def test_an_empty_texture_matrix_goes_to_pyradiomics_with_its_values() -> None:
    """A lesion of isolated voxels has no GLCM pair: pyradiomics' class (NaN features) answers, as stock."""
    image, _ = case_volume("textured")
    lesion = np.zeros((14, 40, 40), np.uint8)
    lesion[3, 5, 5] = lesion[7, 20, 20] = lesion[11, 30, 12] = 1
    mask = sitk.GetImageFromArray(lesion)
    mask.CopyInformation(image)
    params = {"imageType": {"Original": {}}, "featureClass": {"glcm": None, "firstorder": None},
              "setting": {"label": 1, "binWidth": 25, "minimumROIDimensions": 1}}
    stock = _features(RadiomicsFeatureExtractor(params).execute(image, mask))
    fast = _features(FastFeatureExtractor(params).execute(image, mask))
    assert_close(stock, fast)


def test_a_single_voxel_fails_as_in_pyradiomics() -> None:
    image, _ = case_volume("textured")
    lesion = np.zeros((14, 40, 40), np.uint8)
    lesion[7, 20, 20] = 1
    mask = sitk.GetImageFromArray(lesion)
    mask.CopyInformation(image)
    params = {"featureClass": ALL_CLASSES, "setting": {"label": 1}}
    with pytest.raises(ValueError) as stock:
        RadiomicsFeatureExtractor(params).execute(image, mask)
    with pytest.raises(ValueError) as fast:
        FastFeatureExtractor(params).execute(image, mask)
    assert str(stock.value) == str(fast.value)


CASES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pyradiomics-cases"
PRESET_OF = {"lung1": "ct", "lung2": "ct", "brain1": "mr", "brain2": "mr", "breast1": "mr"}


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(PRESET_OF))
def test_reference_cases_with_their_preset_equal_stock_classes(case: str) -> None:
    """pyradiomics' own test cases, the project's extraction (crop + fused pass) vs the same crop with
    pyradiomics' classes: the fused pass alone, at 1e-10."""
    image_path, label_path = CASES_DIR / f"{case}_image.nrrd", CASES_DIR / f"{case}_label.nrrd"
    if not (image_path.is_file() and label_path.is_file()):
        pytest.skip(f"pyradiomics reference case {case} is absent from {CASES_DIR}")
    image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    params = load_params(PRESET_OF[case])
    assert_close(stock_classes_on_the_crop(image, mask, params), extract_lesion(image, mask, 1, params))


def stock_classes_on_the_crop(image: sitk.Image, mask: sitk.Image, params: dict, label: int = 1) -> dict[str, float]:
    """``extract_lesion`` with pyradiomics' own extractor in place of the fused one."""
    with patch.object(extract, "_extractor", lambda p, h: _stock_extractor(p)):
        return extract_lesion(image, mask, label, params)


def _stock_extractor(params: dict) -> RadiomicsFeatureExtractor:
    ex = RadiomicsFeatureExtractor(dict(params))
    ex.settings["additionalInfo"] = False
    return ex


def test_demo_lesions_equal_stock_classes() -> None:
    """Every lesion of the first demo patients (the generator's CT with its segmentations), CT preset."""
    from imaging_assets.demo.generator import render_patient

    params = load_params("ct")
    checked = 0
    for index in range(2):
        rp = render_patient(0, index)
        g = rp.spec.series[0].grid
        image = sitk.GetImageFromArray(rp.volumes[0])
        image.SetSpacing((g.pixel_spacing, g.pixel_spacing, g.slice_spacing))
        image.SetOrigin((g.origin_x, g.origin_y, g.z_positions[0]))
        for lesion in rp.masks[0]:
            if lesion.sum() < 2:
                continue
            mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
            mask.CopyInformation(image)
            assert_close(stock_classes_on_the_crop(image, mask, params), extract_lesion(image, mask, 1, params))
            checked += 1
    assert checked >= 3


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
