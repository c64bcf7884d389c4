"""Series rows -> SimpleITK volumes in patient space (imaging_assets.features.volumes)."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from imaging_assets.features.extract import extraction_image
from imaging_assets.features.volumes import load_series_image, series_grid, series_sop_instance_uids

# ----------------------------------------------------------------------------------------- helpers


def write_ct_series(
    folder: Path,
    pixels: np.ndarray,
    *,
    origin=(0.0, 0.0, 0.0),
    row_cos=(1.0, 0.0, 0.0),
    col_cos=(0.0, 1.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    dz: float = 2.0,
    slopes=None,
    intercept: float = 0.0,
) -> list[str]:
    """Write ``pixels`` (k, rows, cols; int16) as single-frame CT files; returns paths in ascending order."""
    folder.mkdir(parents=True, exist_ok=True)
    row_cos, col_cos = np.asarray(row_cos, float), np.asarray(col_cos, float)
    normal = np.cross(row_cos, col_cos)
    series_uid, for_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, plane in enumerate(pixels):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = "CT"
        ds.PatientID = "TEST"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * dz * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope = slopes[k] if slopes is not None else 1
        ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(plane.astype(np.int16)).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def row(files, **extra) -> dict:
    return {"series_key": "test", "files": list(files), "is_multiframe": False, **extra}


# ----------------------------------------------------------------------------------------- synthetic


def test_axial_int16_values_and_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 2000, size=(4, 6, 5)).astype(np.int16)
    files = write_ct_series(tmp_path, pixels, origin=(-10, 20, 30), pixel_spacing=(0.7, 0.8), dz=2.5, intercept=-1024)
    img = load_series_image(row(files))
    assert img.GetPixelID() == sitk.sitkInt16
    assert img.GetSize() == (5, 6, 4)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.7, 2.5))
    np.testing.assert_allclose(img.GetOrigin(), (-10, 20, 30))
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), pixels.astype(np.int32) - 1024)
    grid = series_grid(row(files))
    assert grid.GetSize() == img.GetSize()
    assert grid.GetOrigin() == img.GetOrigin() and grid.GetSpacing() == img.GetSpacing()
    assert grid.GetDirection() == img.GetDirection()
    uids = series_sop_instance_uids(row(files))
    assert [u for u, _ in uids] == [pydicom.dcmread(f).SOPInstanceUID for f in files]


def test_oblique_index_maps_to_image_position(tmp_path: Path) -> None:
    a = np.deg2rad(30)
    row_cos, col_cos = (1.0, 0.0, 0.0), (0.0, np.cos(a), -np.sin(a))
    pixels = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    files = write_ct_series(tmp_path, pixels, origin=(5, -3, 7), row_cos=row_cos, col_cos=col_cos,
                            pixel_spacing=(0.5, 0.9), dz=1.5)
    img = load_series_image(row(files))
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ipp = np.array(ds.ImagePositionPatient, float)
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=1e-6)
        # column index i moves along the row cosines by PixelSpacing[1]; row index j along the column cosines
        expected = ipp + 3 * 0.9 * np.array(row_cos) + 2 * 0.5 * np.array(col_cos)
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((3, 2, k)), expected, atol=1e-6)


def test_descending_order_flips_third_axis(tmp_path: Path) -> None:
    pixels = np.stack([np.full((3, 3), v, np.int16) for v in (10, 20, 30)])
    files = write_ct_series(tmp_path, pixels, dz=2.0)
    img = load_series_image(row(files[::-1]))
    assert sitk.GetArrayFromImage(img)[:, 0, 0].tolist() == [30, 20, 10]
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3)[:, 2], (0, 0, -1))
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, 2)), (0, 0, 0), atol=1e-9)


def test_fractional_slopes_give_float32_per_slice(tmp_path: Path) -> None:
    pixels = np.full((3, 2, 2), 100, np.int16)
    files = write_ct_series(tmp_path, pixels, slopes=[0.5, 1.0, 0.25], intercept=1)
    img = load_series_image(row(files))
    assert img.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(img)[:, 0, 0], [51, 101, 26])


def test_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.dcm"
    with pytest.raises(ValueError, match="nope.dcm"):
        load_series_image(row([str(missing)]))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ValueError, match="junk.dcm"):
        load_series_image(row([str(junk)]))
    with pytest.raises(ValueError, match="lists no files"):
        load_series_image(row([]))


def test_nifti_series_row(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.6, 3.0))
    img.SetOrigin((1, 2, 3))
    path = tmp_path / "vol.nii.gz"
    sitk.WriteImage(img, str(path))
    out = load_series_image(row([str(path)]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    np.testing.assert_allclose(out.GetOrigin(), (1, 2, 3))
    grid = series_grid(row([str(path)]))
    assert grid.GetSize() == out.GetSize()


# ----------------------------------------------------------------------------------------- real data


def _sorted_files(folder: Path) -> list[str]:
    files = [str(p) for p in folder.iterdir() if p.is_file()]
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    o = np.array(ds[0].ImageOrientationPatient, float)
    n = np.cross(o[:3], o[3:])
    return [f for _, f in sorted(zip([float(np.dot(n, np.array(d.ImagePositionPatient, float))) for d in ds], files))]


@pytest.mark.realdata
@pytest.mark.parametrize("modality", ["CT", "MR_T1", "PET"])
def test_sts_dicom_equals_nifti_image(shared_data: Path, modality: str) -> None:
    base = shared_data / "dicom" / "sts-sarcoma" / "STS_001" / modality
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    img = load_series_image(row(_sorted_files(base / "dicom" / "image")))
    ref = sitk.ReadImage(str(base / "nifti" / "image" / "image.nii.gz"))
    assert img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    expected = sitk.sitkFloat32 if modality == "PET" else sitk.sitkInt16  # PET has fractional rescale slopes
    assert img.GetPixelID() == expected
    # bit-identical as extraction sees them: float32 voxels (PET: float32 rescale slope), float32 geometry
    a, b = extraction_image(img), extraction_image(ref)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
    assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (b.GetOrigin(), b.GetSpacing(), b.GetDirection())


@pytest.mark.realdata
def test_transfer_syntaxes_decode_identically(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "dcm_qa" / "ts"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    arrays = [sitk.GetArrayFromImage(load_series_image(row([str(folder / f"{i}.dcm")]))) for i in range(1, 10)]
    for i, a in enumerate(arrays[1:], start=2):
        np.testing.assert_array_equal(a, arrays[0], err_msg=f"{i}.dcm differs from 1.dcm")


def _assert_same_as_highdicom(path: str, img: sitk.Image) -> None:
    import highdicom as hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = hd.imread(path).get_volume().to_simpleitk()
    moved = sitk.Resample(sitk.Cast(ref, sitk.sitkFloat32), img, sitk.Transform(), sitk.sitkNearestNeighbor, -12345.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(sitk.Cast(img, sitk.sitkFloat32)))


@pytest.mark.realdata
def test_multiframe_legacy_enhanced_ibsi_phantom(shared_data: Path) -> None:
    path = shared_data / "dicom" / "ibsi-digital-phantom" / "dicom" / "image" / "phantom.dcm"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    img = load_series_image({"series_key": "p", "files": [str(path)], "is_multiframe": True})
    assert img.GetSize() == (5, 4, 4)
    values = sitk.GetArrayFromImage(img)
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(path.parents[2] / "nifti" / "image" / "phantom.nii.gz")))
    # the NIfTI copy has another orientation/spacing; the multiset of grey levels must agree
    np.testing.assert_array_equal(np.sort(values.ravel()), np.sort(nifti.ravel()))
    _assert_same_as_highdicom(str(path), img)
    grid = series_grid({"series_key": "p", "files": [str(path)], "is_multiframe": True})
    assert grid.GetOrigin() == img.GetOrigin() and grid.GetDirection() == img.GetDirection()
    frames = [f for _, f in series_sop_instance_uids({"files": [str(path)], "is_multiframe": True})]
    assert sorted(frames) == [1, 2, 3, 4]  # in slice order along the normal (here the reverse of storage)


@pytest.mark.realdata
def test_multiframe_enhanced_mr(shared_data: Path) -> None:
    path = shared_data / "dicom" / "dcm_qa" / "enh" / "Siemens" / "XA10" / "6_1.dcm"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    img = load_series_image({"series_key": "e", "files": [str(path)], "is_multiframe": True})
    assert img.GetSize()[2] == int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    _assert_same_as_highdicom(str(path), img)


@pytest.mark.realdata
def test_oblique_rt_utils_series(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "rt-utils" / "oriented_data"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    files = sorted(glob.glob(str(folder / "*.dcm")))
    img = load_series_image(row(files))
    ds = pydicom.dcmread(files[0])
    direction = np.array(img.GetDirection()).reshape(3, 3)
    o = np.array(ds.ImageOrientationPatient, float)
    np.testing.assert_allclose(direction[:, 0], o[:3] / np.linalg.norm(o[:3]), atol=1e-6)
    np.testing.assert_allclose(direction[:, 1], o[3:] / np.linalg.norm(o[3:]), atol=1e-6)
    for k, f in enumerate(files):
        ipp = np.array(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((0, 0, k)), ipp, atol=0.01)
