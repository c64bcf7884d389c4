"""RTSTRUCT writing for the demo cohort: planar contours from voxel masks, written with pydicom.

Contours are the iso-0.5 lines of each binary slice (marching squares via ``contourpy``, which ships
with matplotlib). They pass half-way between inside and outside voxel centres, so an even-odd
(XOR) rasterisation at voxel centres gives the mask back. A slice whose mask has a hole gets an outer
and an inner contour on the same slice, following the standard RTSTRUCT XOR convention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import contourpy
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTStructureSetStorage

from imaging_assets.demo.dataset import new_dataset

logger = logging.getLogger(__name__)

#: ROI display colours cycled over ROIs.
_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (200, 0, 200))


def mask_to_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2-D binary mask in pixel coordinates.

    Parameters
    ----------
    mask2d : numpy.ndarray
        ``(rows, columns)`` boolean mask.

    Returns
    -------
    list of numpy.ndarray
        Each ``(n, 2)`` array holds ``(column, row)`` vertices of one closed polygon, without repeating
        the first vertex at the end. Holes come out as separate (inner) polygons.
    """
    if not mask2d.any():
        return []
    rows, cols = np.nonzero(mask2d)
    r0, r1 = rows.min() - 1, rows.max() + 2
    c0, c1 = cols.min() - 1, cols.max() + 2
    padded = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    src = mask2d[max(r0, 0) : r1, max(c0, 0) : c1]
    padded[max(0, -r0) : max(0, -r0) + src.shape[0], max(0, -c0) : max(0, -c0) + src.shape[1]] = src
    gen = contourpy.contour_generator(z=padded, name="serial", line_type=contourpy.LineType.Separate)
    out: list[np.ndarray] = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, dtype=np.float64)
        if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        pts = pts + np.array([c0, r0], dtype=np.float64)
        out.append(_drop_collinear(pts))
    return out


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line between their neighbours (closed polygon)."""
    prev = np.roll(pts, 1, axis=0)
    nxt = np.roll(pts, -1, axis=0)
    cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - prev[:, 1]) - (pts[:, 1] - prev[:, 1]) * (
        nxt[:, 0] - prev[:, 0]
    )
    keep = np.abs(cross) > 1e-9
    return pts[keep] if keep.sum() >= 3 else pts


def _ds(v: float) -> str:
    """Format a coordinate as a short DS string (4 decimals, no negative zero)."""
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def build_rtstruct(
    ct_datasets: Sequence[Dataset],
    masks: Sequence[np.ndarray],
    roi_names: Sequence[str],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    structure_set_date: str,
    structure_set_time: str,
    manufacturer: str,
    implementation_class_uid: str,
) -> Dataset:
    """Build an RT Structure Set with one ROI (closed planar contours) per mask.

    Parameters
    ----------
    ct_datasets : sequence of pydicom.dataset.Dataset
        The image slices, in the same order as the first axis of every mask; axial, identity
        orientation, one FrameOfReferenceUID.
    masks : sequence of numpy.ndarray
        ``(slices, rows, columns)`` boolean masks, one per ROI.
    roi_names : sequence of str
        ROI names, one per mask (ROI numbers are 1..n in this order).
    series_instance_uid, sop_instance_uid : str
        UIDs of the new RTSTRUCT series / instance.
    series_number : int
    structure_set_date, structure_set_time : str
        DICOM DA / TM strings (also used for the series/instance creation date and time).
    manufacturer : str
    implementation_class_uid : str
        File meta ImplementationClassUID.

    Returns
    -------
    pydicom.dataset.Dataset
        A dataset with file meta (Explicit VR Little Endian), ready for ``save_as``.
    """
    if len(masks) != len(roi_names):
        raise ValueError(f"{len(masks)} masks but {len(roi_names)} ROI names")
    first = ct_datasets[0]
    for_uid = first.FrameOfReferenceUID

    ds = new_dataset(RTStructureSetStorage, sop_instance_uid, implementation_class_uid)
    ds.InstanceCreationDate = structure_set_date
    ds.InstanceCreationTime = structure_set_time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = first.StudyDate
    ds.StudyTime = first.StudyTime
    ds.SeriesDate = structure_set_date
    ds.SeriesTime = structure_set_time
    ds.AccessionNumber = first.AccessionNumber
    ds.Modality = "RTSTRUCT"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = first.get("InstitutionName", "")
    ds.ReferringPhysicianName = first.get("ReferringPhysicianName", "")
    ds.StudyDescription = first.get("StudyDescription", "")
    ds.SeriesDescription = "RT structures"
    ds.OperatorsName = ""
    ds.ManufacturerModelName = "Demo contouring"
    ds.PatientName = first.PatientName
    ds.PatientID = first.PatientID
    ds.PatientBirthDate = first.PatientBirthDate
    ds.PatientSex = first.PatientSex
    ds.SoftwareVersions = "1"
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = first.get("StudyID", "")
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "LESIONS"
    ds.StructureSetName = "LESIONS"
    ds.StructureSetDate = structure_set_date
    ds.StructureSetTime = structure_set_time

    def _image_ref(slice_ds: Dataset) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = slice_ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = slice_ds.SOPInstanceUID
        return ref

    rt_series = Dataset()
    rt_series.SeriesInstanceUID = first.SeriesInstanceUID
    rt_series.ContourImageSequence = DicomSequence([_image_ref(s) for s in ct_datasets])
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = DicomSequence([rt_series])
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = DicomSequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])

    origin = np.array([float(v) for v in first.ImagePositionPatient[:2]])
    spacing = np.array([float(v) for v in first.PixelSpacing])  # row, column
    zs = [str(s.ImagePositionPatient[2]) for s in ct_datasets]

    roi_seq, contour_seq, obs_seq = [], [], []
    for n, (mask, name) in enumerate(zip(masks, roi_names, strict=True), start=1):
        roi = Dataset()
        roi.ROINumber = n
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_seq.append(roi)

        contours = []
        for k in np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]:
            for poly in mask_to_contours(mask[k]):
                x = origin[0] + poly[:, 0] * spacing[1]
                y = origin[1] + poly[:, 1] * spacing[0]
                data: list[str] = []
                for xi, yi in zip(x, y, strict=True):
                    data.extend((_ds(float(xi)), _ds(float(yi)), zs[k]))
                c = Dataset()
                c.ContourImageSequence = DicomSequence([_image_ref(ct_datasets[k])])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(poly)
                c.ContourNumber = len(contours) + 1
                c.ContourData = data
                contours.append(c)
        if not contours:
            logger.warning("ROI %r is empty; writing it without contours", name)
        rc = Dataset()
        rc.ROIDisplayColor = list(_COLOURS[(n - 1) % len(_COLOURS)])
        rc.ReferencedROINumber = n
        rc.ContourSequence = DicomSequence(contours)
        contour_seq.append(rc)

        obs = Dataset()
        obs.ObservationNumber = n
        obs.ReferencedROINumber = n
        obs.RTROIInterpretedType = "GTV"
        obs.ROIInterpreter = ""
        obs_seq.append(obs)

    ds.StructureSetROISequence = DicomSequence(roi_seq)
    ds.ROIContourSequence = DicomSequence(contour_seq)
    ds.RTROIObservationsSequence = DicomSequence(obs_seq)
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
