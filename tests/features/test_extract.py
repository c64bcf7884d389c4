"""Cropped pyradiomics extraction gives the stock values; batches survive failing lesions.

Tolerance rule (used by every comparison here): for each feature ``k`` with stock value ``a`` and cropped
value ``b``::

    |a - b| <= 1e-4 * max(|a|, 1e-6 * S)

where ``S`` is the largest ``|value|`` among the stock features of the same image type and feature class
(``wavelet-LLH_glcm_*``, ...), at least 1. The floor only matters for values that are ~0 (e.g. a skewness
of 1e-13 that comes out as 3e-13). Both must be NaN or both finite, and every stock key must be present.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.features.extract import (
    ExtractionJob,
    FileLesionLoader,
    LesionError,
    extract_lesion,
    extract_lesion_detailed,
    extract_many,
    stock_extract,
)
from imaging_assets.features.params import (
    PRESETS_DIR,
    crop_margin_mm,
    crop_margin_voxels,
    load_params,
    params_hash,
    preset_for_modality,
)

CASES_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "pyradiomics-cases"
REL_TOL = 1e-4
ABS_FLOOR = 1e-6


def assert_same_features(stock: dict[str, float], mine: dict[str, float]) -> None:
    """The tolerance rule of the module docstring, with a readable report of the worst offenders."""
    assert set(stock) == set(mine), f"feature sets differ: {sorted(set(stock) ^ set(mine))[:10]}"
    scale: dict[str, float] = {}
    for key, a in stock.items():
        if math.isfinite(a):
            group = key.rsplit("_", 1)[0]
            scale[group] = max(scale.get(group, 1.0), abs(a))
    bad = []
    for key, a in stock.items():
        b = mine[key]
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{key}: stock {a} vs cropped {b}"
            continue
        tol = REL_TOL * max(abs(a), ABS_FLOOR * scale[key.rsplit("_", 1)[0]])
        if abs(a - b) > tol:
            bad.append((abs(a - b) / max(abs(a), 1e-300), key, a, b))
    assert not bad, f"{len(bad)} features differ, worst: {sorted(bad, reverse=True)[:5]}"


# ---------------------------------------------------------------------------------------------- synthetic
GLCM = ["Autocorrelation", "JointAverage", "Contrast", "Correlation", "Idm", "JointEntropy", "Imc1"]
NATIVE = {
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 2.0]}, "Wavelet": {}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": GLCM, "glszm": None},
    "setting": {"binWidth": 25, "voxelArrayShift": 1000, "label": 1},
}
RESAMPLED = {**NATIVE, "setting": {**NATIVE["setting"], "interpolator": "sitkBSpline",
                                   "resampledPixelSpacing": [1, 1, 1], "padDistance": 5}}
NORMALIZED = {**NATIVE, "setting": {**NATIVE["setting"], "normalize": True, "normalizeScale": 100,
                                    "binWidth": 5, "voxelArrayShift": 300}}
VARIANTS = {"native": NATIVE, "resampled": RESAMPLED, "normalized": NORMALIZED}


def ct_like(
    size: tuple[int, int, int] = (96, 96, 24),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    center_index: tuple[float, float, float] = (48, 48, 12),
    radius_mm: float = 6.0,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image]:
    """Noisy lung-like background, a textured soft-tissue sphere and a bright block at the far x edge."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    d = np.sqrt(((x - center_index[0]) * spacing[0]) ** 2 + ((y - center_index[1]) * spacing[1]) ** 2
                + ((z - center_index[2]) * spacing[2]) ** 2)
    hu = -800.0 + 40.0 * rng.standard_normal(d.shape) + 60.0 * np.sin(0.3 * y)
    lesion = d <= radius_mm
    hu[lesion] = 30.0 + 50.0 * np.sin(0.9 * x[lesion]) * np.cos(0.7 * y[lesion]) + 25.0 * rng.standard_normal(
        int(lesion.sum()))
    hu[:, :, nx - 8:] = 900.0  # wraps into a periodic wavelet of a lesion at x = 0
    image = sitk.GetImageFromArray(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    mask = sitk.GetImageFromArray(lesion.astype(np.uint8))
    for im in (image, mask):
        im.SetSpacing(spacing)
        im.SetOrigin((-30.0, 12.5, -100.0))
    return image, mask


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crop_matches_stock_for_a_lesion_at_the_border(variant: str) -> None:
    params = VARIANTS[variant]
    image, mask = ct_like(center_index=(5, 48, 12))  # touches x = 0: the crop clamps there
    res = extract_lesion_detailed(image, mask, 1, params)
    assert res.crop_index[0] == 0
    if variant != "resampled":
        assert res.cropped and res.crop_size[1] < image.GetSize()[1]
    assert_same_features(stock_extract(image, mask, 1, params), res.features)


def test_crop_is_much_smaller_than_the_image_and_exact() -> None:
    image, mask = ct_like(size=(160, 160, 24), center_index=(80, 80, 12))
    res = extract_lesion_detailed(image, mask, 1, NATIVE)
    assert np.prod(res.crop_size) < 0.5 * np.prod(image.GetSize())
    assert_same_features(stock_extract(image, mask, 1, NATIVE), res.features)


def test_crop_false_is_stock_and_keys_are_pyradiomics_names() -> None:
    image, mask = ct_like(size=(48, 48, 16), center_index=(24, 24, 8))
    feats = extract_lesion(image, mask, 1, NATIVE, crop=False)
    assert_same_features(stock_extract(image, mask, 1, NATIVE), feats)
    assert "original_firstorder_Mean" in feats and "log-sigma-1-0-mm-3D_glcm_Idm" in feats
    assert "wavelet-LLH_glszm_ZonePercentage" in feats
    assert not any(k.startswith("diagnostics_") for k in feats)
    assert all(isinstance(v, float) for v in feats.values())


def test_preset_ct_on_a_small_lesion_matches_stock() -> None:
    image, mask = ct_like(size=(64, 64, 20), center_index=(40, 30, 10), radius_mm=5.0)
    ct = load_params(preset_for_modality("CT"))
    assert_same_features(stock_extract(image, mask, 1, ct), extract_lesion(image, mask, 1, "ct"))


def test_float_and_multilabel_masks_select_the_same_voxels_as_pyradiomics() -> None:
    image, mask = ct_like(size=(64, 64, 16), center_index=(30, 30, 8))
    arr = sitk.GetArrayFromImage(mask).astype(np.float32) * 2.0  # label 2, float pixel type
    arr[0:2, 0:3, 0:3] = 1.0  # another lesion
    fmask = sitk.GetImageFromArray(arr)
    fmask.CopyInformation(mask)
    assert_same_features(stock_extract(image, fmask, 2, NATIVE), extract_lesion(image, fmask, 2, NATIVE))


def test_empty_mask_absent_label_single_voxel_and_full_mask_raise_clear_errors() -> None:
    image, mask = ct_like(size=(32, 32, 8), center_index=(16, 16, 4), radius_mm=3.0)
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    with pytest.raises(LesionError, match="empty"):
        extract_lesion(image, empty, 1, NATIVE)
    with pytest.raises(LesionError, match=r"label 3 is not present.*\[1\]"):
        extract_lesion(image, mask, 3, NATIVE)
    one = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    one.CopyInformation(mask)
    one[5, 6, 3] = 1
    with pytest.raises(LesionError, match="single voxel"):
        extract_lesion(image, one, 1, NATIVE)
    full = sitk.Image(mask.GetSize(), sitk.sitkUInt8) + 1
    full.CopyInformation(mask)
    with pytest.raises(LesionError, match="every voxel"):
        extract_lesion(image, full, 1, NATIVE)


# --------------------------------------------------------------------------------------------- batches
class CrashingLoader:
    """Kills its worker process (as a segfault or the OOM killer would)."""

    def __call__(self) -> tuple[sitk.Image, sitk.Image, int]:
        os._exit(3)


@pytest.fixture(scope="module")
def lesion_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lesions")
    image, mask = ct_like(size=(64, 64, 16), center_index=(20, 30, 8), radius_mm=5.0, seed=3)
    arr = sitk.GetArrayFromImage(mask)
    arr[4:12, 36:44, 44:52] = 2  # a second, cubic lesion
    labels = sitk.GetImageFromArray(arr)
    labels.CopyInformation(mask)
    one = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    one.CopyInformation(mask)
    one[10, 10, 4] = 1
    paths = {"image": out / "image.nrrd", "labels": out / "labels.nrrd", "one": out / "one.nrrd"}
    sitk.WriteImage(image, str(paths["image"]))
    sitk.WriteImage(labels, str(paths["labels"]))
    sitk.WriteImage(one, str(paths["one"]))
    return paths


def _jobs(files: dict[str, Path]) -> list[ExtractionJob]:
    img, lab = str(files["image"]), str(files["labels"])
    return [
        ExtractionJob("a", FileLesionLoader(img, lab, 1), NATIVE),
        ExtractionJob("b", FileLesionLoader(img, lab, 2), NATIVE),
        ExtractionJob("missing", FileLesionLoader(img, str(files["image"].parent / "nope.nrrd"), 1), NATIVE),
        ExtractionJob("one-voxel", FileLesionLoader(img, str(files["one"]), 1), NATIVE),
        ExtractionJob("empty", FileLesionLoader(img, str(files["one"]), 7), NATIVE),
    ]


def test_extract_many_pool_equals_in_process_and_failures_are_outcomes(lesion_files: dict[str, Path]) -> None:
    ticks: list[tuple[int, int]] = []
    serial = {o.lesion_id: o for o in extract_many(_jobs(lesion_files), workers=1)}
    pooled = {o.lesion_id: o for o in extract_many(_jobs(lesion_files), workers=2,
                                                   progress=lambda d, t: ticks.append((d, t)))}
    assert set(serial) == set(pooled) == {"a", "b", "missing", "one-voxel", "empty"}
    assert ticks == [(k, 5) for k in range(1, 6)]
    for lid in ("a", "b"):
        s, p = serial[lid], pooled[lid]
        assert s.ok and p.ok and s.features == p.features
        assert (s.params_hash, s.image_hash, s.mask_hash) == (p.params_hash, p.image_hash, p.mask_hash)
        assert s.params_hash == params_hash(NATIVE) and s.pyradiomics_version.lstrip("v").startswith("3.")
        assert s.elapsed_s > 0 and len(s.image_hash or "") == 40
    assert serial["a"].features != serial["b"].features
    assert "nope.nrrd" in (pooled["missing"].error or "")
    assert "single voxel" in (pooled["one-voxel"].error or "")
    assert "label 7 is not present" in (pooled["empty"].error or "")
    for lid in ("missing", "one-voxel", "empty"):
        assert pooled[lid].features is None and not pooled[lid].ok


def test_a_crashing_worker_fails_only_its_lesion(lesion_files: dict[str, Path]) -> None:
    img, lab = str(lesion_files["image"]), str(lesion_files["labels"])
    jobs = [
        ExtractionJob("crash", CrashingLoader(), NATIVE),
        ExtractionJob("a", FileLesionLoader(img, lab, 1), NATIVE),
        ExtractionJob("lambda", lambda: None, NATIVE),  # cannot be sent to a worker
        ExtractionJob("b", FileLesionLoader(img, lab, 2), NATIVE),
    ]
    out = {o.lesion_id: o for o in extract_many(jobs, workers=2)}
    assert set(out) == {"crash", "a", "lambda", "b"}
    assert out["crash"].error is not None and "WorkerCrashed" in out["crash"].error
    assert out["lambda"].error is not None and "pickle" in out["lambda"].error.lower()
    assert out["a"].ok and out["b"].ok


# ---------------------------------------------------------------------------------------------- params
def test_crop_margin_grows_with_sigma_and_wavelet_level() -> None:
    def native(sigmas: list[float], level: int) -> dict:
        return {"imageType": {"Original": {}, "LoG": {"sigma": sigmas}, "Wavelet": {"level": level}}}

    assert crop_margin_mm(native([1.0], 1)) < crop_margin_mm(native([1.0, 3.0], 1)) < crop_margin_mm(
        native([5.0], 1))
    wavelet_only = [{"imageType": {"Wavelet": {"level": lv}}} for lv in (1, 2, 3)]
    margins = [crop_margin_mm(p) for p in wavelet_only]
    assert margins[0] < margins[1] < margins[2]
    assert crop_margin_mm({"imageType": {"Wavelet": {"wavelet": "haar"}}}) < margins[0]
    assert crop_margin_mm({"imageType": {"Original": {}}}) == 0.0
    # per-axis voxels follow the spacing; 12 sigma for the LoG
    assert crop_margin_voxels(native([2.0], 1), (0.5, 1.0, 5.0)) == (48, 24, 6)
    # resampling: filters run on pyradiomics' padded box, the margin follows padDistance and the interpolator
    res = {"imageType": {"LoG": {"sigma": [3.0]}}, "setting": {"resampledPixelSpacing": [1, 1, 1],
                                                               "interpolator": "sitkBSpline"}}
    wider = {**res, "setting": {**res["setting"], "padDistance": 20}}
    linear = {**res, "setting": {**res["setting"], "interpolator": "sitkLinear"}}
    assert crop_margin_mm(linear) < crop_margin_mm(res) < crop_margin_mm(wider)
    assert math.isinf(crop_margin_mm({"imageType": {"Original": {}, "Square": {}}}))


def test_params_hash_is_canonical() -> None:
    a = {"setting": {"binWidth": 25, "label": 1}, "imageType": {"Original": {}}}
    b = {"imageType": {"Original": {}}, "setting": {"label": 1, "binWidth": 25}}
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash({**a, "setting": {"binWidth": 20, "label": 1}})
    assert len(params_hash(a)) == 64


def test_presets_exist_validate_and_map_modalities(caplog: pytest.LogCaptureFixture) -> None:
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    assert preset_for_modality("CT") == PRESETS_DIR / "ct.yaml"
    assert preset_for_modality("mr").name == "mr.yaml"
    assert preset_for_modality("PT").name == "pet.yaml"
    with caplog.at_level("WARNING"):
        assert preset_for_modality("US").name == "default.yaml"
    assert "no pyradiomics preset for modality 'US'" in caplog.text
    for name in ("ct", "mr", "pet", "default"):
        params = load_params(name)
        assert params == load_params(PRESETS_DIR / f"{name}.yaml")
        ex = RadiomicsFeatureExtractor(params)  # pyradiomics' schema validation
        assert {"Original", "LoG", "Wavelet"} <= set(ex.enabledImagetypes)
        assert {"shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"} <= set(ex.enabledFeatures)
    with pytest.raises(FileNotFoundError, match="available"):
        load_params("xray")


# -------------------------------------------------------------------------------------------- real data
CASES = {"lung1": "ct", "lung2": "ct", "brain1": "mr", "brain2": "mr", "breast1": "mr"}


def _case(name: str) -> tuple[sitk.Image, sitk.Image]:
    image, label = CASES_DIR / f"{name}_image.nrrd", CASES_DIR / f"{name}_label.nrrd"
    if not (image.is_file() and label.is_file()):
        pytest.skip(f"pyradiomics reference case {name} is absent from {CASES_DIR}")
    return sitk.ReadImage(str(image)), sitk.ReadImage(str(label))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_case_with_its_preset_matches_stock(case: str) -> None:
    image, mask = _case(case)
    params = load_params(CASES[case])
    assert_same_features(stock_extract(image, mask, 1, params), extract_lesion(image, mask, 1, params))


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("case", ["lung1", "brain1", "breast1"])
def test_reference_case_native_grid_filters_match_stock(case: str) -> None:
    """The preset's filters without resampling: LoG and wavelet then run on the whole image in stock."""
    image, mask = _case(case)
    params = load_params(CASES[case])
    params["setting"].pop("resampledPixelSpacing")
    res = extract_lesion_detailed(image, mask, 1, params)
    assert_same_features(stock_extract(image, mask, 1, params), res.features)
    if case == "lung1":
        assert np.prod(res.crop_size) < 0.1 * np.prod(image.GetSize())


MIRP_DIR = CASES_DIR.parent / "dicom" / "mirp-edge-masks"


@pytest.mark.realdata
def test_degenerate_masks_give_an_outcome_each_never_a_crash() -> None:
    """mirp's edge cases: uniform images with empty, one-voxel, full and disconnected masks."""
    if not MIRP_DIR.is_dir():
        pytest.skip(f"{MIRP_DIR} is absent")
    jobs = []
    for case in ("uninformative", "uninformative_slice"):
        image = MIRP_DIR / case / "image" / f"{case}.nii.gz"
        for kind in ("empty", "one_voxel", "full", "disconnected"):
            mask = MIRP_DIR / case / "mask" / f"{kind}_mask.nii.gz"
            jobs.append(ExtractionJob(f"{case}/{kind}", FileLesionLoader(str(image), str(mask), 1), "ct"))
    out = {o.lesion_id: o for o in extract_many(jobs, workers=1)}
    assert len(out) == 8
    for case in ("uninformative", "uninformative_slice"):
        assert "empty" in (out[f"{case}/empty"].error or "")
        assert "single voxel" in (out[f"{case}/one_voxel"].error or "")
        assert "every voxel" in (out[f"{case}/full"].error or "")
        assert out[f"{case}/disconnected"].ok, out[f"{case}/disconnected"].error
