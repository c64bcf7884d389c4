"""Image/mask consistency: a NIfTI / NRRD mask whose geometry does not belong to its image is an error
naming both files, unless the caller opts into resampling (imaging_assets.features.lesions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.errors import LesionError, MaskGeometryError
from imaging_assets.features.lesions import (
    MAX_AXIS_ANGLE_DEG,
    MAX_OUTSIDE_FRACTION,
    MIN_GRID_OVERLAP,
    axis_angle_deg,
    check_mask_geometry,
    grid_overlap,
    load_lesions,
    mask_geometry_problems,
    outside_fraction,
)
from imaging_assets.features.pipeline import extract_one, resolve_inputs

#: A real DICOM origin (not float32-exact: its NIfTI copy is 1e-5 mm off) and spacing.
ORIGIN, SPACING = (-23.437615999999, -86.914145999999, -881.32), (0.976562, 0.976562, 2.5)
SMALL = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None},
    "setting": {"binWidth": 25, "label": 1},
}


def rotation_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def grid(size=(44, 40, 14), spacing=SPACING, origin=ORIGIN, direction=np.eye(3)) -> sitk.Image:
    img = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    return img


def centred_origin(image: sitk.Image, size, spacing, direction: np.ndarray) -> np.ndarray:
    """Origin that puts the centre of a (size, spacing, direction) grid on the centre of ``image``."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    return centre - direction @ (np.asarray(spacing, float) * (np.asarray(size, float) - 1) / 2)


@pytest.fixture()
def scan(tmp_path: Path, dicom_series_writer, volume_writer, ct_volume) -> dict:
    """A DICOM CT series, its lesion mask as NIfTI on the same grid, and masks that do not belong."""
    hu, lesion = ct_volume(spacing=SPACING)
    files = dicom_series_writer(tmp_path / "ct", hu, origin=ORIGIN, spacing=SPACING)
    image = grid()
    size = image.GetSize()
    rotated = rotation_z(12.3)
    out = {"image": Path(files[0]).parent, "grid": image, "lesion": lesion}
    out["same"] = volume_writer(tmp_path / "same.nii.gz", lesion, image)
    out["rotated"] = volume_writer(tmp_path / "rotated.nii.gz", lesion, image, direction=rotated,
                                   origin=centred_origin(image, size, SPACING, rotated))
    out["far"] = volume_writer(tmp_path / "far.nrrd", lesion, image, origin=np.add(ORIGIN, (400.0, 0.0, 0.0)))
    # half the image's width away: the centred lesion falls outside, the grids overlap by ~30 %
    out["shifted"] = volume_writer(tmp_path / "shifted.nii.gz", lesion, image,
                                   origin=np.add(ORIGIN, (0.7 * size[0] * SPACING[0], 0.0, 0.0)))
    # another series of the same session: the same field of view on a coarser (PET-like) grid
    coarse_spacing = np.multiply(SPACING, (4, 4, 2))
    coarse_grid = grid((11, 10, 7), coarse_spacing, centred_origin(image, (11, 10, 7), coarse_spacing, np.eye(3)))
    probe = sitk.GetImageFromArray(lesion)
    probe.CopyInformation(image)
    coarse = sitk.Resample(probe, coarse_grid, sitk.Transform(), sitk.sitkNearestNeighbor)
    assert sitk.GetArrayViewFromImage(coarse).any()
    out["coarse"] = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(coarse, str(out["coarse"]))
    return out


# ------------------------------------------------------------------------------------------ pure rules
def test_tolerances_are_named_constants() -> None:
    assert MAX_AXIS_ANGLE_DEG == 1.0 and MIN_GRID_OVERLAP == 0.5 and MAX_OUTSIDE_FRACTION == 0.5
    assert issubclass(MaskGeometryError, LesionError) and issubclass(MaskGeometryError, ValueError)


def test_axis_angle_ignores_axis_order_and_sign() -> None:
    image = grid()
    assert axis_angle_deg(image, grid(direction=rotation_z(12.3))) == pytest.approx(12.3)
    assert axis_angle_deg(image, grid(direction=rotation_z(0.5))) == pytest.approx(0.5)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert axis_angle_deg(image, grid(direction=lps_to_ras)) == pytest.approx(0.0, abs=1e-6)
    assert axis_angle_deg(image, grid(direction=sagittal)) == pytest.approx(0.0, abs=1e-6)


def test_grid_overlap_and_outside_fraction() -> None:
    image = grid(size=(40, 40, 10), spacing=(1, 1, 1), origin=(0, 0, 0))
    assert grid_overlap(image, image) == 1.0
    assert grid_overlap(image, grid(size=(40, 40, 10), spacing=(1, 1, 1), origin=(20, 0, 0))) == pytest.approx(0.5)
    # a larger grid that holds the image (the uncropped scan) shares all of the smaller box
    assert grid_overlap(image, grid(size=(200, 200, 50), spacing=(1, 1, 1), origin=(-80, -80, -20))) == 1.0
    assert grid_overlap(image, grid(size=(40, 40, 10), spacing=(1, 1, 1), origin=(500, 0, 0))) == 0.0
    arr = np.zeros((10, 40, 40), np.uint8)
    arr[4:6, 10:20, 30:40] = 1  # x 30..39
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(image)
    mask.SetOrigin((5.0, 0.0, 0.0))  # x 35..44: half of it beyond x = 39.5
    assert outside_fraction(image, mask) == (pytest.approx(0.5), 200)
    assert mask_geometry_problems(image, mask) == []  # 50 % outside is still allowed
    mask.SetOrigin((6.0, 0.0, 0.0))
    [problem] = mask_geometry_problems(image, mask)
    assert problem == "60% of the mask's 200 voxels lie outside the image (at most 50% allowed)"


def test_check_names_both_and_every_mismatch() -> None:
    image = grid()
    far = grid(origin=np.add(ORIGIN, (0.0, 0.0, 900.0)), direction=rotation_z(12.3))
    arr = np.ones(far.GetSize()[::-1], np.uint8)
    with pytest.raises(MaskGeometryError) as err:
        check_mask_geometry(image, far, "/x/ct", "/x/m.nii.gz", labels=arr)
    msg = str(err.value)
    assert msg.startswith("mask /x/m.nii.gz does not belong to image /x/ct: direction differs by 12.3° "
                          "(tolerance 1°); the grids share 0% of the smaller one's extent")
    assert "100% of the mask's" in msg and "resample_mask=True" in msg
    check_mask_geometry(image, grid(), "/x/ct", "/x/m.nii.gz")  # the same grid: nothing to say


# ----------------------------------------------------------------------------- the CLI's extract path
@pytest.mark.parametrize(("name", "mismatch"), [
    ("rotated", "direction differs by 12.3° (tolerance 1°)"),
    ("far", "100% of the mask's"),
    ("shifted", "of the mask's"),
])
def test_a_mask_of_another_scan_is_refused_naming_both_files(scan: dict, name: str, mismatch: str) -> None:
    with pytest.raises(MaskGeometryError) as err:
        extract_one(scan["image"], scan[name], params=SMALL)
    msg = str(err.value)
    assert f"mask {scan[name]} does not belong to image {scan['image']}: " in msg
    assert mismatch in msg


def test_the_opt_in_resamples_the_mask(scan: dict) -> None:
    out = extract_one(scan["image"], scan["rotated"], params=SMALL, resample_mask=True)
    assert out.ok, out.error
    assert out.features["original_shape_VoxelVolume"] > 0
    # the lesion loader reports what it did
    series, seg = resolve_inputs(scan["image"], scan["rotated"])
    [lesion] = load_lesions(seg, series, resample_mask=True)
    assert lesion.status == "ok" and lesion.notes[0].startswith("resampled mask from 44x40x14")
    # far away, resampling leaves nothing on the grid: a per-lesion status, not a silent fragment
    series, seg = resolve_inputs(scan["image"], scan["far"])
    [far] = load_lesions(seg, series, resample_mask=True)
    assert far.status == "outside_image" and far.mask is None


def test_same_grid_and_same_session_masks_need_no_option(scan: dict) -> None:
    same = extract_one(scan["image"], scan["same"], params=SMALL)
    assert same.ok, same.error
    assert same.features["original_shape_VoxelVolume"] == pytest.approx(
        scan["lesion"].sum() * np.prod(SPACING), rel=1e-6)
    series, seg = resolve_inputs(scan["image"], scan["same"])
    [lesion] = load_lesions(seg, series)
    assert lesion.status == "ok" and lesion.notes == []  # used as it is, no resampling
    # a coarser grid over the same field of view belongs: resampled, with the note
    coarse = extract_one(scan["image"], scan["coarse"], params=SMALL)
    assert coarse.ok, coarse.error
    series, seg = resolve_inputs(scan["image"], scan["coarse"])
    [lesion] = load_lesions(seg, series)
    assert lesion.status == "ok" and lesion.notes[0].startswith("resampled mask from 11x10x7")


def test_lesion_rows_of_a_mask_that_does_not_belong_are_errors_naming_both(scan: dict) -> None:
    """The asset path (load_lesions never raises): an ``error`` row with the same message."""
    series, seg = resolve_inputs(scan["image"], scan["shifted"])
    [lesion] = load_lesions(seg, series)
    assert lesion.status == "error" and lesion.mask is None
    assert f"mask {scan['shifted']} does not belong to image {scan['image']}: " in (lesion.reason or "")


def test_nifti_image_with_a_nifti_mask_of_another_scan(scan: dict, tmp_path: Path, volume_writer) -> None:
    image = volume_writer(tmp_path / "image.nii.gz", scan["lesion"].astype(np.float32) * 100, scan["grid"])
    with pytest.raises(MaskGeometryError, match="does not belong to image .*image.nii.gz: direction differs"):
        extract_one(image, scan["rotated"], params=SMALL)
    assert extract_one(image, scan["same"], params=SMALL).ok


# ---------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_sts_mask_of_another_patient_is_refused_and_own_masks_work(shared_data: Path) -> None:
    base = shared_data / "dicom" / "sts-sarcoma"
    ct, other = base / "STS_001" / "CT", base / "STS_002" / "CT"
    if not (ct.is_dir() and other.is_dir()):
        pytest.skip(f"{ct} or {other} absent")
    with pytest.raises(MaskGeometryError) as err:
        extract_one(ct / "dicom" / "image", other / "nifti" / "mask" / "mask.nii.gz")
    assert f"mask {other / 'nifti' / 'mask' / 'mask.nii.gz'} does not belong to image {ct / 'dicom' / 'image'}" in str(
        err.value)
    # the patient's own NIfTI masks: the CT one is on the CT grid (used as is), the PET one belongs (resampled)
    series, seg = resolve_inputs(ct / "dicom" / "image", ct / "nifti" / "mask" / "mask.nii.gz")
    [own] = load_lesions(seg, series)
    assert own.status == "ok" and own.notes == []
    series, seg = resolve_inputs(ct / "dicom" / "image", base / "STS_001" / "PET" / "nifti" / "mask" / "mask.nii.gz")
    [pet] = load_lesions(seg, series)
    assert pet.status == "ok" and pet.notes[0].startswith("resampled mask from")
