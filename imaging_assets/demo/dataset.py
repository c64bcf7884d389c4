"""DICOM building blocks shared by the demo's CT, MR, PET and RTSTRUCT writers (pure pydicom)."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian


def new_dataset(sop_class_uid: str, sop_instance_uid: str, implementation_class_uid: str) -> Dataset:
    """An empty dataset with its file meta (Explicit VR Little Endian) and the character set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = implementation_class_uid
    meta.ImplementationVersionName = "IA_DEMO_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def set_slice_plane(ds: Dataset, study_instance_uid: str, plan: Any, k: int) -> None:
    """Study/series identity and the image plane of axial slice ``k`` of ``plan`` (its ``grid``,
    ``series_instance_uid``, ``series_number``, ``frame_of_reference_uid``), monochrome pixels."""
    g = plan.grid
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = plan.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{g.origin_x:g}", f"{g.origin_y:g}", f"{g.z_positions[k]:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{g.z_positions[k]:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = g.rows
    ds.Columns = g.columns
    ds.PixelSpacing = [f"{g.pixel_spacing:g}", f"{g.pixel_spacing:g}"]
