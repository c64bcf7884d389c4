"""Linking SEG / RTSTRUCT files to series, and NIfTI/NRRD manifests: synthetic files and the real test data."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.dicom.records import FILE_FIELDS, SEGMENTATION_FIELDS, SERIES_FIELDS
from imaging_assets.dicom.segmentations import (
    SegmentationReadError,
    link_segmentations,
    read_manifest,
    read_segmentation_info,
)
from imaging_assets.dicom.series import assemble_series, slice_normal

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
PATIENT = "SYNTH-001"


# --------------------------------------------------------------------------------------------------
# helpers: image records, series, and small SEG / RTSTRUCT files written with pydicom
# --------------------------------------------------------------------------------------------------
def image_records(
    folder: str | Path,
    n: int = 10,
    step: float = 2.0,
    *,
    series_uid: str,
    for_uid: str,
    origin: Any = (-50.0, -50.0, 0.0),
    orientation: Any = AXIAL,
    spacing: Any = (1.0, 1.0),
    size: tuple[int, int] = (100, 100),
    patient: str | None = PATIENT,
    modality: str = "CT",
) -> list[dict[str, Any]]:
    """FILE_FIELDS records of an n-slice single-frame series (nothing is written to disk)."""
    normal = slice_normal(orientation)
    out = []
    for i in range(n):
        rec: dict[str, Any] = {k: None for k in FILE_FIELDS}
        rec.update(
            path=f"{folder}/img{i:03d}.dcm",
            kind="image",
            sop_instance_uid=f"{series_uid}.{i + 1}",
            sop_class_uid=CT_CLASS,
            series_instance_uid=series_uid,
            frame_of_reference_uid=for_uid,
            modality=modality,
            patient_key=patient_key(patient) if patient else None,
            instance_number=i + 1,
            rows=size[0],
            columns=size[1],
            number_of_frames=1,
            image_position=[float(x) for x in np.asarray(origin, float) + i * step * normal],
            image_orientation=[float(x) for x in orientation],
            pixel_spacing=[float(x) for x in spacing],
        )
        out.append(rec)
    return out


def seg_record(path: Path, kind: str, **kw: Any) -> dict[str, Any]:
    """A FILE_FIELDS record of a SEG/RTSTRUCT file as the crawler would make it (overridable)."""
    rec: dict[str, Any] = {k: None for k in FILE_FIELDS}
    rec.update(path=str(path), kind=kind, number_of_frames=0, referenced_series_uids=[],
               patient_key=patient_key(PATIENT))
    rec.update(kw)
    return rec


def _base(path: Path, sop_class: str, modality: str, patient: str = PATIENT) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = patient
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def write_rtstruct(
    path: Path,
    rois: list[tuple[int, str, list[np.ndarray]]],
    *,
    for_uid: str | None,
    ref_series: str | None = None,
    ref_instances: list[str] = (),  # type: ignore[assignment]
    contour_instances: list[str] | None = None,
    patient: str = PATIENT,
) -> Path:
    """An RTSTRUCT; rois = [(number, name, [contour points (k, 3), ...])]; no top-level FrameOfReferenceUID."""
    ds = _base(path, RTSTRUCT_CLASS, "RTSTRUCT", patient)
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    for number, name, contours in rois:
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        if for_uid:
            item.ReferencedFrameOfReferenceUID = for_uid
        ds.StructureSetROISequence.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = DicomSequence()
        for j, pts in enumerate(contours):
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [float(x) for x in np.asarray(pts, float).reshape(-1)]
            if contour_instances:
                ci = Dataset()
                ci.ReferencedSOPClassUID = CT_CLASS
                ci.ReferencedSOPInstanceUID = contour_instances[j % len(contour_instances)]
                c.ContourImageSequence = DicomSequence([ci])
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    fr = Dataset()
    if for_uid:
        fr.FrameOfReferenceUID = for_uid
    if ref_series:
        se = Dataset()
        se.SeriesInstanceUID = ref_series
        se.ContourImageSequence = DicomSequence()
        for uid in ref_instances:
            ci = Dataset()
            ci.ReferencedSOPClassUID = CT_CLASS
            ci.ReferencedSOPInstanceUID = uid
            se.ContourImageSequence.append(ci)
        st = Dataset()
        st.ReferencedSOPInstanceUID = generate_uid()
        st.RTReferencedSeriesSequence = DicomSequence([se])
        fr.RTReferencedStudySequence = DicomSequence([st])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([fr])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(
    path: Path,
    segments: list[tuple[int, str]],
    *,
    for_uid: str,
    ref_series: str | None,
    ref_instances: list[str] = (),  # type: ignore[assignment]
    frame_positions: list[Any] = (),  # type: ignore[assignment]
    orientation: Any = AXIAL,
    spacing: Any = (1.0, 1.0),
    size: tuple[int, int] = (100, 100),
    seg_type: str = "BINARY",
    sop_class: str = SEG_CLASS,
    patient: str = PATIENT,
) -> Path:
    """A SEG header (no pixel data: the linker never reads pixels)."""
    ds = _base(path, sop_class, "SEG", patient)
    ds.FrameOfReferenceUID = for_uid
    ds.SegmentationType = seg_type
    ds.Rows, ds.Columns = size
    ds.NumberOfFrames = len(frame_positions)
    ds.SegmentSequence = DicomSequence()
    for number, label in segments:
        s = Dataset()
        s.SegmentNumber = number
        s.SegmentLabel = label
        ds.SegmentSequence.append(s)
    if ref_series:
        se = Dataset()
        se.SeriesInstanceUID = ref_series
        se.ReferencedInstanceSequence = DicomSequence()
        for uid in ref_instances:
            ri = Dataset()
            ri.ReferencedSOPClassUID = CT_CLASS
            ri.ReferencedSOPInstanceUID = uid
            se.ReferencedInstanceSequence.append(ri)
        ds.ReferencedSeriesSequence = DicomSequence([se])
    shared = Dataset()
    po = Dataset()
    po.ImageOrientationPatient = [float(x) for x in orientation]
    pm = Dataset()
    pm.PixelSpacing = [float(x) for x in spacing]
    pm.SliceThickness = 1.0
    shared.PlaneOrientationSequence = DicomSequence([po])
    shared.PixelMeasuresSequence = DicomSequence([pm])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence()
    for pos in frame_positions:
        f = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(x) for x in pos]
        f.PlanePositionSequence = DicomSequence([pp])
        ds.PerFrameFunctionalGroupsSequence.append(f)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def square(center: Any, half: float = 5.0) -> np.ndarray:
    """A closed square contour in the axial plane around ``center``."""
    x, y, z = (float(c) for c in center)
    return np.array([[x - half, y - half, z], [x + half, y - half, z], [x + half, y + half, z], [x - half, y + half, z]])


def by_path(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in rows}


def key_of(series: list[dict[str, Any]], folder: str | Path) -> str:
    (s,) = [s for s in series if os.path.dirname(s["files"][0]) == str(folder)]
    return s["series_key"]


# --------------------------------------------------------------------------------------------------
# rule 1: referenced series
# --------------------------------------------------------------------------------------------------
def test_seg_links_by_referenced_series(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    series = assemble_series(imgs)
    seg = write_seg(
        tmp_path / "seg" / "seg.dcm",
        [(1, "tumour"), (2, "node")],
        for_uid="1.2.3.9",
        ref_series="1.2.3.1",
        ref_instances=[r["sop_instance_uid"] for r in imgs],
        frame_positions=[r["image_position"] for r in imgs[2:5]],
        seg_type="FRACTIONAL",
    )
    (row,) = link_segmentations(imgs + [seg_record(seg, "seg")], series)
    assert list(row) == list(SEGMENTATION_FIELDS)
    assert row["linked_series_key"] == series[0]["series_key"]
    assert row["link_rule"] == "referenced_series" and row["unlinked_reason"] is None
    assert row["segmentation_type"] == "FRACTIONAL"
    assert row["n_segments"] == 2
    assert row["segment_numbers"] == [1, 2] and row["segment_labels"] == ["tumour", "node"]
    assert row["seg_key"] == hashlib.sha1(str(seg).encode()).hexdigest()[:16]
    assert row["frame_of_reference_uid"] == "1.2.3.9"
    assert row["patient_key"] == patient_key(PATIENT)
    assert row["kind"] == "seg" and row["image_path"] is None


def test_labelmap_background_segment_is_not_listed(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    seg = write_seg(
        tmp_path / "lm.dcm",
        [(0, "Background"), (1, "Liver"), (3, "Spleen")],
        for_uid="1.2.3.9",
        ref_series="1.2.3.1",
        seg_type="LABELMAP",
        sop_class=LABELMAP_CLASS,
    )
    (row,) = link_segmentations([seg_record(seg, "seg")], assemble_series(imgs))
    assert row["segmentation_type"] == "LABELMAP"
    assert row["segment_numbers"] == [1, 3] and row["segment_labels"] == ["Liver", "Spleen"]
    assert row["link_rule"] == "referenced_series"


def test_split_series_prefers_the_part_holding_the_referenced_instances(tmp_path):
    a = image_records(tmp_path / "copy_a", series_uid="1.2.3.1", for_uid="1.2.3.9")
    b = image_records(tmp_path / "copy_b", series_uid="1.2.3.1", for_uid="1.2.3.9", spacing=(0.5, 0.5))
    for r in b:
        r["sop_instance_uid"] += "00"
    series = assemble_series(a + b)
    assert len(series) == 2  # split by folder: pixel spacing conflicts
    seg = write_seg(tmp_path / "seg.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series="1.2.3.1",
                    ref_instances=[r["sop_instance_uid"] for r in b[:3]])
    (row,) = link_segmentations(a + b + [seg_record(seg, "seg")], series)
    assert row["linked_series_key"] == key_of(series, tmp_path / "copy_b")
    assert row["link_rule"] == "referenced_series"


def test_missing_referenced_instances_refuse_the_link(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    refs = [r["sop_instance_uid"] for r in imgs] + ["1.2.3.1.77", "1.2.3.1.78"]
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square((0, 0, 4))])], for_uid="1.2.3.9",
                        ref_series="1.2.3.1", ref_instances=refs)
    (row,) = link_segmentations(imgs + [seg_record(rs, "rtstruct")], assemble_series(imgs))
    assert row["linked_series_key"] is None and row["link_rule"] is None
    reason = row["unlinked_reason"]
    assert "references 12 SOP instance(s) of series 1.2.3.1" in reason
    assert "2 of which are not in the catalogued series" in reason and "1.2.3.1.77" in reason


def test_instances_are_read_from_disk_when_only_segmentation_records_are_given(tmp_path):
    """The ingest asset passes only SEG/RTSTRUCT records: SOP UIDs of series files are read lazily."""
    imgs = image_records(tmp_path / "ct", n=4, series_uid="1.2.3.1", for_uid="1.2.3.9")
    for r in imgs:  # tiny DICOM files holding just what the SOP lookup reads
        ds = _base(Path(r["path"]), CT_CLASS, "CT")
        ds.SOPInstanceUID = r["sop_instance_uid"]
        ds.file_meta.MediaStorageSOPInstanceUID = r["sop_instance_uid"]
        Path(r["path"]).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(r["path"], enforce_file_format=True)
    series = assemble_series(imgs)
    good = write_rtstruct(tmp_path / "good.dcm", [(1, "GTV", [square((0, 0, 2))])], for_uid="1.2.3.9",
                          ref_series="1.2.3.1", ref_instances=[imgs[1]["sop_instance_uid"]])
    bad = write_rtstruct(tmp_path / "bad.dcm", [(1, "GTV", [square((0, 0, 2))])], for_uid="1.2.3.9",
                         ref_series="1.2.3.1", ref_instances=["1.2.3.1.999"])
    rows = by_path(link_segmentations([seg_record(good, "rtstruct"), seg_record(bad, "rtstruct")], series))
    assert rows[str(good)]["link_rule"] == "referenced_series"
    assert "1.2.3.1.999" in rows[str(bad)]["unlinked_reason"]


def test_explicit_reference_with_other_frame_of_reference_links_when_geometry_agrees(tmp_path, caplog):
    """rt-utils writes its own FrameOfReferenceUID into RTSTRUCTs: the explicit series reference wins
    when every contour point lies inside the series; otherwise the link is refused."""
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    series = assemble_series(imgs)
    inside = write_rtstruct(tmp_path / "inside.dcm", [(1, "GTV", [square((0, 0, 6))])], for_uid="9.9.9",
                            ref_series="1.2.3.1")
    outside = write_rtstruct(tmp_path / "outside.dcm", [(1, "GTV", [square((0, 0, 300))])], for_uid="9.9.9",
                             ref_series="1.2.3.1")
    with caplog.at_level(logging.WARNING, logger="imaging_assets.dicom.segmentations"):
        rows = by_path(link_segmentations([seg_record(inside, "rtstruct"), seg_record(outside, "rtstruct")], series))
    assert rows[str(inside)]["link_rule"] == "referenced_series"
    assert rows[str(inside)]["frame_of_reference_uid"] == "9.9.9"
    assert any("differs from its own" in m for m in caplog.messages)
    reason = rows[str(outside)]["unlinked_reason"]
    assert rows[str(outside)]["linked_series_key"] is None
    assert "9.9.9" in reason and "1.2.3.9" in reason and "0%" in reason


def test_series_of_another_patient_is_not_linked(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9", patient="SOMEONE-ELSE")
    seg = write_seg(tmp_path / "seg.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series="1.2.3.1")
    (row,) = link_segmentations([seg_record(seg, "seg")], assemble_series(imgs))
    assert row["linked_series_key"] is None
    assert "another patient" in row["unlinked_reason"]


# --------------------------------------------------------------------------------------------------
# rule 2: referenced instances
# --------------------------------------------------------------------------------------------------
def test_referenced_instances_rule(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    other = image_records(tmp_path / "mr", series_uid="1.2.3.2", for_uid="1.2.3.9", modality="MR")
    series = assemble_series(imgs + other)
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square((0, 0, 2)), square((0, 0, 4))])],
                        for_uid="1.2.3.9", contour_instances=[imgs[1]["sop_instance_uid"], imgs[2]["sop_instance_uid"]])
    (row,) = link_segmentations(imgs + other + [seg_record(rs, "rtstruct")], series)
    assert row["link_rule"] == "referenced_instances"
    assert row["linked_series_key"] == key_of(series, tmp_path / "ct")


def test_referenced_instances_partly_missing_refuse_the_link(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square((0, 0, 2)), square((0, 0, 4))])],
                        for_uid="1.2.3.9", contour_instances=[imgs[1]["sop_instance_uid"], "1.2.3.1.404"])
    (row,) = link_segmentations(imgs + [seg_record(rs, "rtstruct")], assemble_series(imgs))
    assert row["linked_series_key"] is None
    assert "1 of which" not in row["unlinked_reason"]
    assert "1 is not catalogued (e.g. 1.2.3.1.404)" in row["unlinked_reason"]


# --------------------------------------------------------------------------------------------------
# rule 3: frame of reference + extent
# --------------------------------------------------------------------------------------------------
def _three_modalities(tmp_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CT, MR and PET of one patient sharing a frame of reference, each in <modality>/image."""
    imgs = (
        image_records(tmp_path / "p1/CT/image", series_uid="1.2.3.1", for_uid="1.2.3.9", modality="CT")
        + image_records(tmp_path / "p1/MR/image", n=12, series_uid="1.2.3.2", for_uid="1.2.3.9", modality="MR",
                        origin=(-60.0, -60.0, -2.0))
        + image_records(tmp_path / "p1/PET/image", n=8, step=3.0, series_uid="1.2.3.3", for_uid="1.2.3.9",
                        modality="PT", spacing=(4.0, 4.0), size=(30, 30))
    )
    return imgs, assemble_series(imgs)


@pytest.mark.parametrize("modality", ["CT", "MR", "PET"])
def test_frame_of_reference_extent_prefers_the_series_in_the_nearest_folder(tmp_path, modality):
    imgs, series = _three_modalities(tmp_path)
    rs = write_rtstruct(tmp_path / f"p1/{modality}/mask/RS.dcm", [(1, "GTV", [square((0, 0, z)) for z in (4, 6, 8)])],
                        for_uid="1.2.3.9", ref_series="1.2.3.404", ref_instances=["1.2.3.404.1"])
    (row,) = link_segmentations(imgs + [seg_record(rs, "rtstruct", referenced_series_uids=["1.2.3.404"])], series)
    assert row["link_rule"] == "frame_of_reference_extent"
    assert row["linked_series_key"] == key_of(series, tmp_path / f"p1/{modality}/image")


def test_frame_of_reference_extent_containment_beats_folder_proximity(tmp_path):
    imgs, series = _three_modalities(tmp_path)
    # x = 45..55: half inside the CT (x <= 49.5 mm, same folder), outside the MR (x <= 39.5 mm), all inside
    # the PET (x <= 68 mm): a series containing every point beats the nearer, partly overlapping one
    rs = write_rtstruct(tmp_path / "p1/CT/mask/RS.dcm", [(1, "GTV", [square((50, 0, 10), half=5)])],
                        for_uid="1.2.3.9")
    (row,) = link_segmentations(imgs + [seg_record(rs, "rtstruct")], series)
    assert row["linked_series_key"] == key_of(series, tmp_path / "p1/PET/image")


def test_frame_of_reference_extent_without_overlap_is_unlinked(tmp_path):
    imgs, series = _three_modalities(tmp_path)
    rs = write_rtstruct(tmp_path / "p1/CT/mask/RS.dcm", [(1, "GTV", [square((0, 0, 500))])], for_uid="1.2.3.9",
                        ref_series="1.2.3.404")
    (row,) = link_segmentations([seg_record(rs, "rtstruct")], series)
    assert row["linked_series_key"] is None
    assert "3 series share its FrameOfReferenceUID 1.2.3.9" in row["unlinked_reason"]
    assert "none overlaps its extent" in row["unlinked_reason"]
    assert "1.2.3.404" in row["unlinked_reason"]


def test_frame_of_reference_extent_uses_the_oblique_box_of_the_series(tmp_path):
    a = math.radians(30)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))
    imgs = image_records(tmp_path / "ct", n=10, step=2.0, series_uid="1.2.3.1", for_uid="1.2.3.9",
                         orientation=orientation, origin=(0.0, 0.0, 0.0), size=(50, 50))
    series = assemble_series(imgs)
    assert series[0]["usable"]
    normal = slice_normal(orientation)
    col = np.array(orientation[3:])
    inside_pts = np.array([[10.0, 0, 0] + 20 * col + 9 * normal, [30.0, 0, 0] + 40 * col + 9 * normal])
    # inside the axis-aligned bounding box of the slices (x 0..49, y -9..42, z 0..40) but 33 mm along the
    # normal, beyond the last slice (18 mm): outside the oblique volume
    corner = np.array([25.0, -5.0, 35.0])
    assert float((corner - 0) @ normal) > 19
    inside = write_rtstruct(tmp_path / "in.dcm", [(1, "A", [inside_pts])], for_uid="1.2.3.9")
    outside = write_rtstruct(tmp_path / "out.dcm", [(1, "B", [corner[None, :]])], for_uid="1.2.3.9")
    rows = by_path(link_segmentations([seg_record(inside, "rtstruct"), seg_record(outside, "rtstruct")], series))
    assert rows[str(inside)]["link_rule"] == "frame_of_reference_extent"
    assert rows[str(outside)]["linked_series_key"] is None


def test_seg_frames_give_the_extent(tmp_path):
    imgs, series = _three_modalities(tmp_path)
    seg = write_seg(tmp_path / "p1/MR/seg/seg.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series=None,
                    frame_positions=[(-60.0, -60.0, 2.0 * k) for k in range(3)])
    (row,) = link_segmentations([seg_record(seg, "seg")], series)
    assert row["link_rule"] == "frame_of_reference_extent"
    assert row["linked_series_key"] == key_of(series, tmp_path / "p1/MR/image")


def test_no_frame_of_reference_and_no_catalogued_reference(tmp_path):
    imgs, series = _three_modalities(tmp_path)
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square((0, 0, 4))])], for_uid=None, ref_series="1.2.3.404")
    (row,) = link_segmentations([seg_record(rs, "rtstruct")], series)
    assert row["linked_series_key"] is None
    assert "no FrameOfReferenceUID" in row["unlinked_reason"]


def test_unknown_frame_of_reference(tmp_path):
    imgs, series = _three_modalities(tmp_path)
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square((0, 0, 4))])], for_uid="7.7.7")
    (row,) = link_segmentations([seg_record(rs, "rtstruct")], series)
    assert "no catalogued series has its FrameOfReferenceUID 7.7.7" in row["unlinked_reason"]


# --------------------------------------------------------------------------------------------------
# contents and bad files
# --------------------------------------------------------------------------------------------------
def test_rtstruct_without_contours_is_unlinked(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "Body", []), (2, "GTV", [])], for_uid="1.2.3.9",
                        ref_series="1.2.3.1")
    (row,) = link_segmentations([seg_record(rs, "rtstruct")], assemble_series(imgs))
    assert row["linked_series_key"] is None
    assert row["n_segments"] == 0 and row["segment_numbers"] == []
    assert "no contour data" in row["unlinked_reason"] and "'Body'" in row["unlinked_reason"]


def test_rtstruct_rois_without_contours_are_not_segments(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    rs = write_rtstruct(tmp_path / "rs.dcm", [(1, "Body", []), (4, "GTV", [square((0, 0, 4))])], for_uid="1.2.3.9",
                        ref_series="1.2.3.1")
    info = read_segmentation_info(rs)
    assert info.empty_rois == [(1, "Body")]
    assert info.points.shape == (4, 3)
    (row,) = link_segmentations([seg_record(rs, "rtstruct")], assemble_series(imgs))
    assert row["segment_numbers"] == [4] and row["segment_labels"] == ["GTV"] and row["n_segments"] == 1
    assert row["link_rule"] == "referenced_series"
    assert row["frame_of_reference_uid"] == "1.2.3.9"  # from StructureSetROISequence, not a top-level tag


@pytest.mark.parametrize("content", [b"", b"not dicom at all" * 20])
def test_unreadable_file_is_reported_not_raised(tmp_path, content):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(content)
    (row,) = link_segmentations([seg_record(bad, "seg")], [])
    assert row["linked_series_key"] is None and row["n_segments"] is None
    assert str(bad) in row["unlinked_reason"] and "could not be read" in row["unlinked_reason"]


def test_vanished_file_is_reported_not_raised(tmp_path):
    (row,) = link_segmentations([seg_record(tmp_path / "gone.dcm", "rtstruct")], [])
    assert "gone.dcm could not be read" in row["unlinked_reason"]


def test_an_image_catalogued_as_seg_is_reported(tmp_path):
    p = tmp_path / "ct.dcm"
    _base(p, CT_CLASS, "CT").save_as(p, enforce_file_format=True)
    (row,) = link_segmentations([seg_record(p, "seg")], [])
    assert "is not a SEG or RTSTRUCT" in row["unlinked_reason"]
    with pytest.raises(SegmentationReadError, match="ct.dcm"):
        read_segmentation_info(p)


def test_patient_key_comes_from_the_file_when_the_record_lacks_it(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9", patient=None)
    seg = write_seg(tmp_path / "seg.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series="1.2.3.1", patient="RAW-42")
    (row,) = link_segmentations([seg_record(seg, "seg", patient_key=None)], assemble_series(imgs), secret="s3cret")
    assert row["patient_key"] == patient_key("RAW-42", "s3cret")
    assert "RAW-42" not in str(row)


def test_only_segmentation_records_become_rows_sorted_by_path(tmp_path):
    imgs = image_records(tmp_path / "ct", series_uid="1.2.3.1", for_uid="1.2.3.9")
    s2 = write_seg(tmp_path / "b.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series="1.2.3.1")
    s1 = write_seg(tmp_path / "a.dcm", [(1, "x")], for_uid="1.2.3.9", ref_series="1.2.3.1")
    rows = link_segmentations(imgs + [seg_record(s2, "seg"), seg_record(s1, "seg")], assemble_series(imgs))
    assert [r["path"] for r in rows] == [str(s1), str(s2)]


# --------------------------------------------------------------------------------------------------
# manifest (NIfTI / NRRD pairs), synthetic
# --------------------------------------------------------------------------------------------------
def _write_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5), origin=(-10.0, -20.0, -30.0),
                  direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection([float(x) for x in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _pair(folder: Path, name: str, suffix: str = ".nii.gz", labels=(1, 3), **geo: Any) -> tuple[Path, Path]:
    image = np.arange(6 * 12 * 10, dtype=np.int16).reshape(6, 12, 10)  # z, y, x
    mask = np.zeros_like(image, dtype=np.uint8)
    for i, lab in enumerate(labels):
        mask[1 + i, 2:5, 3:6] = lab
    return (_write_volume(folder / f"{name}_image{suffix}", image, **geo),
            _write_volume(folder / f"{name}_mask{suffix}", mask, **geo))


def _csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    lines = ["image_path,mask_path,patient_id,modality"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_nifti_and_nrrd_pairs_with_relative_paths(tmp_path):
    img1, mask1 = _pair(tmp_path / "vols", "a")
    img2, mask2 = _pair(tmp_path / "vols", "b", suffix=".nrrd", labels=(2,))
    csv = _csv(tmp_path / "manifest.csv", [
        ("vols/a_image.nii.gz", "vols/a_mask.nii.gz", "P1", "ct"),
        (str(img2), str(mask2), "P2", "MR"),
    ])
    series, segs = read_manifest(csv, secret="k")
    assert len(series) == 2 and len(segs) == 2
    assert all(list(s) == list(SERIES_FIELDS) for s in series)
    assert all(list(g) == list(SEGMENTATION_FIELDS) for g in segs)
    s1 = next(s for s in series if s["files"] == [str(img1)])
    assert s1["series_key"] == hashlib.sha1(str(img1).encode()).hexdigest()[:16]
    assert (s1["n_slices"], s1["rows"], s1["columns"]) == (6, 12, 10)
    assert s1["pixel_spacing"] == pytest.approx([0.8, 0.8]) and s1["slice_spacing"] == pytest.approx(2.5)
    assert s1["origin"] == pytest.approx([-10, -20, -30]) and s1["slice_normal"] == pytest.approx([0, 0, 1])
    assert s1["slice_offsets"] == pytest.approx([-30 + 2.5 * k for k in range(6)])
    assert s1["modality"] == "CT" and s1["patient_key"] == patient_key("P1", "k")
    assert s1["usable"] and s1["n_files"] == 1 and s1["is_multiframe"] is False
    g1 = next(g for g in segs if g["image_path"] == str(img1))
    assert g1["kind"] == "nifti" and g1["path"] == str(mask1)
    assert g1["segment_numbers"] == [1, 3] and g1["segment_labels"] == ["1", "3"] and g1["n_segments"] == 2
    assert g1["linked_series_key"] == s1["series_key"] and g1["link_rule"] == "manifest"
    g2 = next(g for g in segs if g["image_path"] == str(img2))
    assert g2["kind"] == "nrrd" and g2["segment_numbers"] == [2] and g2["link_rule"] == "manifest"


def test_manifest_missing_files_keep_their_row_with_a_reason(tmp_path):
    img, mask = _pair(tmp_path, "a")
    csv = _csv(tmp_path / "m.csv", [
        ("nowhere/image.nii.gz", "a_mask.nii.gz", "P1", "CT"),
        ("a_image.nii.gz", "nowhere/mask.nii.gz", "P1", "CT"),
    ])
    series, segs = read_manifest(csv)
    assert [s["files"] for s in series] == [[str(img)]]  # the missing image has no series row
    missing_image, missing_mask = segs
    assert missing_image["linked_series_key"] is None and missing_image["link_rule"] is None
    assert f"image file {tmp_path / 'nowhere/image.nii.gz'} does not exist" == missing_image["unlinked_reason"]
    assert missing_image["segment_numbers"] == [1, 3]
    assert missing_mask["linked_series_key"] is None
    assert f"mask file {tmp_path / 'nowhere/mask.nii.gz'} does not exist" == missing_mask["unlinked_reason"]
    assert missing_mask["n_segments"] is None


def test_manifest_mask_on_another_grid(tmp_path):
    img, _ = _pair(tmp_path, "a")
    _, other = _pair(tmp_path, "b", spacing=(1.0, 1.0, 2.5))
    csv = _csv(tmp_path / "m.csv", [(str(img), str(other), "P1", "CT")])
    (row,) = read_manifest(csv)[1]
    assert row["linked_series_key"] is None and "mask grid differs from the image grid: spacing" in row["unlinked_reason"]
    (row,) = read_manifest(csv, require_same_grid=False)[1]
    assert row["link_rule"] == "manifest"


def test_manifest_empty_mask_is_unlinked(tmp_path):
    img, mask = _pair(tmp_path, "a", labels=())
    (row,) = read_manifest(_csv(tmp_path / "m.csv", [(str(img), str(mask), "P1", "CT")]))[1]
    assert row["n_segments"] == 0 and "has no non-zero voxels" in row["unlinked_reason"]


def test_manifest_oblique_and_flat_images(tmp_path):
    a = math.radians(30)
    direction = (1, 0, 0, 0, math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a))
    img, mask = _pair(tmp_path, "obl", direction=direction)
    flat = _write_volume(tmp_path / "flat_image.nii.gz", np.zeros((1, 8, 8), np.int16))
    flat_mask = _write_volume(tmp_path / "flat_mask.nii.gz", np.ones((1, 8, 8), np.uint8))
    series, segs = read_manifest(_csv(tmp_path / "m.csv", [
        (str(img), str(mask), "P1", "CT"), (str(flat), str(flat_mask), "P1", "CT")]))
    obl = next(s for s in series if s["files"] == [str(img)])
    assert obl["orientation"] == pytest.approx([1, 0, 0, 0, math.cos(a), math.sin(a)])
    assert obl["slice_normal"] == pytest.approx([0, -math.sin(a), math.cos(a)])
    assert obl["usable"] and obl["slice_spacing"] == pytest.approx(2.5)
    flat_row = next(s for s in series if s["files"] == [str(flat)])
    assert flat_row["flags"] == ["too_few_slices"] and flat_row["n_slices"] == 1
    assert all(g["link_rule"] == "manifest" for g in segs)


def test_manifest_without_required_columns_raises(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("image,mask\na.nii.gz,b.nii.gz\n")
    with pytest.raises(ValueError, match="image_path, mask_path"):
        read_manifest(csv)


# --------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_links(shared_data: Path) -> dict[str, Any]:
    crawl_mod = pytest.importorskip("imaging_assets.dicom.crawl", reason="imaging_assets.dicom.crawl not available")
    root = shared_data / "dicom"
    result = crawl_mod.crawl([root], workers=1)
    series = assemble_series(result.records)
    # as the ingest asset does: only the SEG/RTSTRUCT records (series' SOP UIDs are read lazily)
    rows = link_segmentations([r for r in result.records if r["kind"] in ("seg", "rtstruct")], series)
    folder_of = {s["series_key"]: os.path.relpath(os.path.dirname(s["files"][0]), root) for s in series}
    return {"root": root, "series": series, "rows": {os.path.relpath(r["path"], root): r for r in rows},
            "folder_of": folder_of}


STS = [f"sts-sarcoma/STS_00{p}/{m}" for p in (1, 2) for m in ("CT", "MR_T1", "PET")]

# segmentation file -> (folder of the series it must link to, rule); None = unlinked
REAL_LINKS: dict[str, tuple[str | None, str | None]] = {
    "dcmqi/segmentations/23x38x3/seg/label.seg": ("dcmqi/segmentations/23x38x3/image", "referenced_series"),
    "dcmqi/segmentations/24x38x3/seg/label.seg": ("dcmqi/segmentations/24x38x3/image", "referenced_series"),
    "dcmqi/segmentations/liver.dcm": ("dcmqi/segmentations/ct-3slice", "referenced_series"),
    "dcmqi/segmentations/partial_overlaps.dcm": ("dcmqi/segmentations/ct-3slice", "referenced_series"),
    "dcmqi/segmentations/sparse-labelmap-noppv.dcm": ("dcmqi/segmentations/24x38x3/image", "referenced_series"),
    "dcmqi/segmentations/sparse-labelmap-ppv5.dcm": ("dcmqi/segmentations/24x38x3/image", "referenced_series"),
    # references a series that is absent, and no image shares its frame of reference: unlinked
    "dcmqi/sr-example/seg.dcm": (None, None),
    "highdicom-seg/ct_single/seg_image_ct_binary_single_frame.dcm": ("highdicom-seg/ct_single", "referenced_series"),
    "highdicom-seg/seg/seg_image_ct_binary.dcm": ("highdicom-seg/ct_series", "referenced_series"),
    "highdicom-seg/seg/seg_image_ct_binary_fractional.dcm": ("highdicom-seg/ct_series", "referenced_series"),
    "highdicom-seg/seg/seg_image_ct_binary_overlap.dcm": ("highdicom-seg/ct_series", "referenced_series"),
    "highdicom-seg/seg/seg_image_ct_true_fractional.dcm": ("highdicom-seg/ct_series", "referenced_series"),
    "ibsi-digital-phantom/dicom/mask/mask.dcm": ("ibsi-digital-phantom/dicom/image", "referenced_series"),
    # reference the mock CT series, but 3 of their 5 referenced CT instances are absent
    "rt-utils/empty/dummy_rt.dcm": (None, None),
    "rt-utils/mock_data/invalid_reference_rt.dcm": (None, None),
    # no referenced series; its contours sit on 3 CT instances, one of them absent
    "rt-utils/mock_data/non_existent_reference_rt.dcm": (None, None),
    # other FrameOfReferenceUID than the CT's, but references it explicitly and lies inside it
    "rt-utils/mock_data/rt.dcm": ("rt-utils/mock_data", "referenced_series"),
    # RTSTRUCTs reference the original, uncropped (absent) series: the frame of reference (shared by CT, MR
    # and PET) plus the extent finds candidates, the nearest folder decides
    **{f"{d}/dicom/mask/RS.dcm": (f"{d}/dicom/image", "frame_of_reference_extent") for d in STS},
}


@pytest.mark.realdata
def test_real_segmentation_inventory(real_links):
    assert sorted(real_links["rows"]) == sorted(REAL_LINKS)


@pytest.mark.realdata
@pytest.mark.parametrize("seg_path", sorted(REAL_LINKS))
def test_real_segmentation_links(real_links, seg_path):
    folder, rule = REAL_LINKS[seg_path]
    row = real_links["rows"][seg_path]
    if folder is None:
        assert row["linked_series_key"] is None and row["link_rule"] is None
        assert row["unlinked_reason"]
    else:
        assert row["unlinked_reason"] is None
        assert row["link_rule"] == rule
        assert real_links["folder_of"][row["linked_series_key"]] == folder


REAL_SEGMENTS = {
    "dcmqi/segmentations/partial_overlaps.dcm": ("BINARY", [1, 2, 3, 4, 5],
                                                 ["GREEN", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"]),
    "dcmqi/segmentations/sparse-labelmap-ppv5.dcm": ("LABELMAP", [1], ["Liver"]),
    "highdicom-seg/seg/seg_image_ct_binary_overlap.dcm": ("BINARY", [1, 2], ["first segment", "second segment"]),
    "highdicom-seg/seg/seg_image_ct_true_fractional.dcm": ("FRACTIONAL", [1], ["first segment"]),
    "ibsi-digital-phantom/dicom/mask/mask.dcm": ("BINARY", [1], ["ROI"]),
    "rt-utils/mock_data/invalid_reference_rt.dcm": (None, [1, 2, 3, 4], ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]),
    "sts-sarcoma/STS_001/MR_T1/dicom/mask/RS.dcm": (None, [1], ["GTV_Mass_MR_T1"]),
    "sts-sarcoma/STS_002/PET/dicom/mask/RS.dcm": (None, [1], ["GTV_Mass_PET"]),
}


@pytest.mark.realdata
@pytest.mark.parametrize("seg_path", sorted(REAL_SEGMENTS))
def test_real_segment_info(real_links, seg_path):
    seg_type, numbers, labels = REAL_SEGMENTS[seg_path]
    row = real_links["rows"][seg_path]
    assert row["segmentation_type"] == seg_type
    assert row["segment_numbers"] == numbers and row["segment_labels"] == labels
    assert row["n_segments"] == len(numbers)
    assert row["patient_key"].startswith("pk_")


@pytest.mark.realdata
def test_real_unlinked_reasons_say_why(real_links):
    rows = real_links["rows"]
    assert "not in the catalog" in rows["dcmqi/sr-example/seg.dcm"]["unlinked_reason"]
    assert "FrameOfReferenceUID" in rows["dcmqi/sr-example/seg.dcm"]["unlinked_reason"]
    for p in ("rt-utils/empty/dummy_rt.dcm", "rt-utils/mock_data/invalid_reference_rt.dcm"):
        assert "references 5 SOP instance(s)" in rows[p]["unlinked_reason"]
        assert "3 of which are not in the catalogued series" in rows[p]["unlinked_reason"]
    assert "1 is not catalogued" in rows["rt-utils/mock_data/non_existent_reference_rt.dcm"]["unlinked_reason"]


@pytest.mark.realdata
def test_real_rtstruct_frame_of_reference_comes_from_the_structure_set(real_links):
    rows = real_links["rows"]
    assert rows["rt-utils/mock_data/rt.dcm"]["frame_of_reference_uid"].startswith("1.2.826.0.1.3680043.8.498.")
    ct = next(s for s in real_links["series"] if real_links["folder_of"][s["series_key"]] == "rt-utils/mock_data")
    assert rows["rt-utils/mock_data/rt.dcm"]["frame_of_reference_uid"] != ct["frame_of_reference_uid"]


@pytest.mark.realdata
def test_real_sts_manifest(real_links, tmp_path):
    root = real_links["root"]
    lines = []
    for d in STS:
        patient = d.split("/")[1]
        modality = d.split("/")[2].split("_")[0].replace("PET", "PT")
        image = os.path.relpath(root / d / "nifti/image/image.nii.gz", tmp_path)  # relative to the CSV
        lines.append((image, str(root / d / "nifti/mask/mask.nii.gz"), patient, modality))
    lines.append(("missing/image.nii.gz", str(root / STS[0] / "nifti/mask/mask.nii.gz"), "STS_001", "CT"))
    series, segs = read_manifest(_csv(tmp_path / "manifest.csv", lines))
    assert len(series) == 6 and len(segs) == 7
    dicom_series = {real_links["folder_of"][s["series_key"]]: s for s in real_links["series"]}
    expected_slices = {"STS_001/CT": 59, "STS_001/MR_T1": 59, "STS_001/PET": 59,
                       "STS_002/CT": 48, "STS_002/MR_T1": 35, "STS_002/PET": 48}
    for d in STS:
        image = os.path.abspath(root / d / "nifti/image/image.nii.gz")
        (s,) = [s for s in series if s["files"] == [image]]
        assert s["n_slices"] == expected_slices[d.split("/", 1)[1]]
        assert s["usable"], s["flag_details"]
        # the NIfTI copy has the geometry of the DICOM series it was made from (float32 header precision)
        ref = dicom_series[f"{d}/dicom/image"]
        assert (s["rows"], s["columns"], s["n_slices"]) == (ref["rows"], ref["columns"], ref["n_slices"])
        assert s["pixel_spacing"] == pytest.approx(ref["pixel_spacing"], abs=1e-4)
        assert s["slice_spacing"] == pytest.approx(ref["slice_spacing"], abs=1e-4)
        assert s["origin"] == pytest.approx(ref["origin"], abs=1e-3)
        assert s["patient_key"] == ref["patient_key"]
        (g,) = [g for g in segs if g["image_path"] == image]
        assert g["link_rule"] == "manifest" and g["linked_series_key"] == s["series_key"]
        assert g["segment_numbers"] == [1] and g["kind"] == "nifti"
    missing = segs[-1]
    assert missing["linked_series_key"] is None
    assert missing["unlinked_reason"] == f"image file {tmp_path / 'missing/image.nii.gz'} does not exist"
