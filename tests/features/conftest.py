"""Fixtures for the feature tests: one synthetic scan written as a DICOM series and as volume files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def write_dicom_series(
    folder: Path,
    values: np.ndarray,
    *,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    row_cos: Sequence[float] = (1.0, 0.0, 0.0),
    col_cos: Sequence[float] = (0.0, 1.0, 0.0),
    intercept: float = -1024.0,
    modality: str = "CT",
) -> list[str]:
    """Write ``values`` (numpy order k, j, i; integers, e.g. HU) as single-frame DICOM images.

    Stored values are ``values - intercept`` (unsigned 16 bit), RescaleSlope 1, so the series loads back
    as ``values`` exactly. ``spacing`` is (column step i, row step j, slice step k) in mm, as SimpleITK
    orders it. Returns the file paths in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_cos, col_cos = np.asarray(row_cos, float), np.asarray(col_cos, float)
    normal = np.cross(row_cos, col_cos)
    stored = np.rint(np.asarray(values, np.float64) - intercept)
    assert stored.min() >= 0 and stored.max() <= 65535, "values do not fit 16 bits with this intercept"
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    series_uid, for_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, plane in enumerate(stored.astype(np.uint16)):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = modality
        ds.PatientID = "SYNTHETIC"
        ds.StudyDate = "20200101"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * float(spacing[2]) * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def write_volume(path: Path, values: np.ndarray, like: sitk.Image | None = None, *, origin=None, spacing=None,
                 direction=None) -> Path:
    """Write a numpy array (k, j, i) with SimpleITK (NIfTI / NRRD by the ending), geometry from ``like``."""
    img = sitk.GetImageFromArray(values)
    if like is not None:
        img.CopyInformation(like)
    if origin is not None:
        img.SetOrigin(tuple(float(v) for v in origin))
    if spacing is not None:
        img.SetSpacing(tuple(float(v) for v in spacing))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    sitk.WriteImage(img, str(path))
    return path


def synthetic_ct(shape: tuple[int, int, int] = (14, 40, 44), radius_mm: float = 7.0, seed: int = 0,
                 spacing: Sequence[float] = (0.75, 0.75, 2.5)) -> tuple[np.ndarray, np.ndarray]:
    """Integer HU (k, j, i): noisy soft tissue, a textured sphere at the centre; and its 0/1 mask."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    d = np.sqrt(((i - ni / 2) * spacing[0]) ** 2 + ((j - nj / 2) * spacing[1]) ** 2 + ((k - nk / 2) * spacing[2]) ** 2)
    hu = 40.0 + 30.0 * rng.standard_normal(d.shape) + 20.0 * np.sin(0.4 * j)
    lesion = d <= radius_mm
    hu[lesion] = 90.0 + 70.0 * np.sin(0.9 * i[lesion]) * np.cos(0.7 * j[lesion]) + 35.0 * rng.standard_normal(
        int(lesion.sum()))
    return np.clip(np.rint(hu), -1000, 3000).astype(np.int16), lesion.astype(np.uint8)


@pytest.fixture()
def dicom_series_writer() -> Callable[..., list[str]]:
    """:func:`write_dicom_series`: values as a DICOM series, returns the paths."""
    return write_dicom_series


@pytest.fixture()
def volume_writer() -> Callable[..., Path]:
    """:func:`write_volume`: an array as a NIfTI / NRRD file."""
    return write_volume


@pytest.fixture()
def ct_volume() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`synthetic_ct`: integer HU and a 0/1 lesion mask."""
    return synthetic_ct
