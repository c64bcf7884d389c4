"""One pixel type for every source: a DICOM series, a NIfTI and an NRRD copy of one scan give the same
features (imaging_assets.features.extract, rule in its module docstring).

Before the rule, pyradiomics resampled each image in its stored pixel type: a DICOM CT (int16 after the
rescale) was B-spline interpolated *into int16* (values truncated to whole HU), its NIfTI copy (float32)
was not, and the features of identical voxels differed by up to 100 %.

Tolerance: :func:`~imaging_assets.features.extract.max_relative_difference` <= 1e-6, i.e. for every
feature ``|a - b| <= 1e-6 * max(|a|, 1e-6 * S)`` with ``S`` the largest value of the same image type and
feature class (an absolute floor for values that are ~0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.features.extract import (
    extract_lesion,
    extraction_image,
    max_relative_difference,
    stock_extract,
)
from imaging_assets.features.pipeline import extract_one

TOLERANCE = 1e-6

#: Resampling on (B-spline to 1 mm, as the presets do) plus a LoG: the two steps that ran in the stored type.
RESAMPLED = {
    "imageType": {"Original": {}, "LoG": {"sigma": [1.0, 2.0]}},
    "featureClass": {"shape": None, "firstorder": None, "glcm": ["JointAverage", "Contrast", "Idm", "ClusterShade"],
                     "glszm": None},
    "setting": {"binWidth": 10, "voxelArrayShift": 1000, "label": 1, "interpolator": "sitkBSpline",
                "resampledPixelSpacing": [1, 1, 1], "padDistance": 5},
}

# float32-exact geometry, so DICOM's decimal strings, NIfTI's float32 header and NRRD's text agree exactly
ORIGIN, SPACING = (-30.5, 12.25, -100.0), (0.75, 0.75, 2.5)


@pytest.fixture()
def one_scan(tmp_path: Path, dicom_series_writer, volume_writer, ct_volume) -> dict[str, Path]:
    """One synthetic CT as a DICOM series (int16 after rescale), NIfTI float32 and NRRD float64, with one
    NIfTI (uint8) mask on the same grid."""
    hu, lesion = ct_volume(spacing=SPACING)
    files = dicom_series_writer(tmp_path / "dicom", hu, origin=ORIGIN, spacing=SPACING)
    like = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    like.SetOrigin(ORIGIN)
    like.SetSpacing(SPACING)
    return {
        "dicom": Path(files[0]).parent,
        "nifti": volume_writer(tmp_path / "image.nii.gz", hu.astype(np.float32), origin=ORIGIN, spacing=SPACING),
        "nrrd": volume_writer(tmp_path / "image.nrrd", hu.astype(np.float64), origin=ORIGIN, spacing=SPACING),
        "mask": volume_writer(tmp_path / "mask.nii.gz", lesion, origin=ORIGIN, spacing=SPACING),
    }


def test_dicom_nifti_and_nrrd_copies_give_the_same_features(one_scan: dict[str, Path]) -> None:
    stored = {kind: sitk.ReadImage(str(one_scan[kind])).GetPixelIDTypeAsString() for kind in ("nifti", "nrrd")}
    assert stored == {"nifti": "32-bit float", "nrrd": "64-bit float"}
    out = {kind: extract_one(one_scan[kind], one_scan["mask"], params=RESAMPLED, modality="CT")
           for kind in ("dicom", "nifti", "nrrd")}
    for kind, outcome in out.items():
        assert outcome.ok, (kind, outcome.error)
    reference = out["dicom"].features
    assert len(reference) > 60
    for kind in ("nifti", "nrrd"):
        worst, where = max_relative_difference(reference, out[kind].features)
        assert worst <= TOLERANCE, f"{kind} vs DICOM: {worst:.3g} at {where}"
    # the region handed to pyradiomics is the same bytes, whatever the file type
    assert out["dicom"].image_hash == out["nifti"].image_hash == out["nrrd"].image_hash


def test_extraction_image_is_float32_with_float32_geometry_and_leaves_its_input_alone() -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin((-23.437615999999, -86.914145999999, -881.32))  # a real DICOM origin: not float32-exact
    img.SetSpacing((0.976562, 0.976562, 3.269999999999982))
    out = extraction_image(img)
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr.astype(np.float32))
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        expected = np.asarray(getattr(img, get)(), np.float64).astype(np.float32).astype(np.float64)
        np.testing.assert_array_equal(getattr(out, get)(), expected)
    # the caller's image is not modified
    assert img.GetPixelID() == sitk.sitkInt16 and img.GetOrigin()[2] == -881.32
    # every stored type ends up the same: int16, uint16, float64, float32
    for dtype in (np.uint16, np.float64, np.float32):
        other = sitk.GetImageFromArray((arr + 60).astype(dtype))
        other.CopyInformation(img)
        assert extraction_image(other).GetPixelID() == sitk.sitkFloat32
        np.testing.assert_array_equal(sitk.GetArrayFromImage(extraction_image(other)), (arr + 60).astype(np.float32))


def test_stock_comparison_feeds_stock_the_same_float32_image(ct_volume) -> None:
    """stock_extract gives stock pyradiomics the image as extraction sees it, so the equality tests compare
    like with like; on the stored int16 stock resamples into int16 and differs."""
    hu, lesion = ct_volume(shape=(12, 32, 36), radius_mm=6.0, seed=4, spacing=SPACING)
    image, mask = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(lesion)
    for im in (image, mask):
        im.SetOrigin(ORIGIN)
        im.SetSpacing(SPACING)
    ours = extract_lesion(image, mask, 1, RESAMPLED)
    stock = stock_extract(image, mask, 1, RESAMPLED)
    assert max_relative_difference(stock, ours)[0] <= 1e-9
    stock_float = stock_extract(extraction_image(image), mask, 1, RESAMPLED, as_extracted=False)
    assert stock_float == stock
    stock_int16 = stock_extract(image, mask, 1, RESAMPLED, as_extracted=False)
    assert max_relative_difference(stock_float, stock_int16)[0] > 1e-3  # why the rule exists


# -------------------------------------------------------------------------------------------- real data
STS = {"CT": "CT", "MR_T1": "MR", "PET": "PT"}


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("modality", sorted(STS))
def test_sts_dicom_series_and_its_nifti_copy_give_the_same_features(shared_data: Path, modality: str) -> None:
    """STS_001: the DICOM series and the NIfTI copy of the same volume, one NIfTI mask, the modality preset."""
    base = shared_data / "dicom" / "sts-sarcoma" / "STS_001" / modality
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    mask = base / "nifti" / "mask" / "mask.nii.gz"
    from_dicom = extract_one(base / "dicom" / "image", mask, modality=STS[modality])
    from_nifti = extract_one(base / "nifti" / "image" / "image.nii.gz", mask, modality=STS[modality])
    assert from_dicom.ok and from_nifti.ok, (from_dicom.error, from_nifti.error)
    assert from_dicom.params_hash == from_nifti.params_hash
    worst, where = max_relative_difference(from_nifti.features, from_dicom.features)
    print(f"STS_001 {modality}: {len(from_nifti.features)} features, max relative difference {worst:.3g} ({where})")
    assert worst <= TOLERANCE, f"DICOM vs NIfTI: {worst:.3g} at {where}"
