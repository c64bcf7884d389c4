"""Segmentation objects (DICOM SEG, RTSTRUCT, NIfTI/NRRD masks) and their link to an image series.

:func:`link_segmentations` turns SEG / RTSTRUCT file records into
:data:`~imaging_assets.dicom.records.SEGMENTATION_FIELDS` rows, one per segmentation file, each linked to
at most one series of :func:`imaging_assets.dicom.series.assemble_series`. :func:`read_manifest` does the
same for NIfTI/NRRD image + mask pairs listed in a CSV file. :func:`read_segmentation_info` reads what the
linker needs from one SEG/RTSTRUCT file (segments, references, points in patient space) and is public so
that later stages can reuse it.

Link rules, tried in this order (``link_rule`` records the one that linked):

1. ``referenced_series``: a series whose SeriesInstanceUID is one the segmentation references
   (SEG ReferencedSeriesSequence, RTSTRUCT RTReferencedSeriesSequence, plus the catalog record's
   ``referenced_series_uids``). When several series share that UID (a series split by folder), the one
   whose FrameOfReferenceUID matches, then the one holding most of the referenced SOP instances, then the
   one nearest on disk wins. The link is refused (row unlinked, with the reason) when

   * some SOP instance the segmentation references is not in that series (its images are missing, as in
     rt-utils' ``invalid_reference_rt.dcm``): contours/frames would land on absent slices;
   * the two FrameOfReferenceUIDs differ *and* the segmentation's points are not all inside the series'
     volume. An explicit reference with a different frame of reference but matching geometry is linked
     (rt-utils writes its own FrameOfReferenceUID into RTSTRUCTs; a warning is logged).

2. ``referenced_instances``: no referenced series is catalogued, but the SOP instances the segmentation
   references (ContourImageSequence, ReferencedInstanceSequence, SourceImageSequence) are found in a
   series; as in rule 1, all of them must be in that one series.

3. ``frame_of_reference_extent``: neither the referenced series nor any referenced instance is
   catalogued. Candidates are the series with the segmentation's FrameOfReferenceUID (and the same
   patient_key when both are known) that have complete geometry. For each candidate the fraction of the
   segmentation's points (RTSTRUCT contour vertices; corners of SEG frames) inside the series' volume is
   computed (the box spanned by the slices along the series' own row, column and normal axes, widened by
   half a voxel; so oblique series are handled). Candidates with no point inside are dropped. The best is
   chosen by, in order: contains all points (fraction >= 0.999); **nearest on disk** (the most leading
   folder components shared by the segmentation file and the series' first file, so an RTSTRUCT in
   ``STS_001/CT/dicom/mask`` prefers the series in ``STS_001/CT/dicom/image`` over the MR and PET series of
   the same frame of reference); larger fraction inside; usable (no geometry flags); more slices; and
   finally the smaller series_key (deterministic). Exactly one row per segmentation file is produced; the
   other candidates are only logged.

A refused rule-1/rule-2 link does not fall through to rule 3 (the same frame of reference would pick the
same incomplete series). Otherwise the row is unlinked: ``linked_series_key`` and ``link_rule`` are None and
``unlinked_reason`` says why (unreadable file, not a SEG/RTSTRUCT, RTSTRUCT without any contour data, SEG without segments,
referenced series absent and nothing sharing its frame of reference/extent, patient mismatch, ...).

Segments: SEG SegmentSequence (SegmentNumber, SegmentLabel; segment 0 of a LABELMAP SEG is background and
is not listed); RTSTRUCT StructureSetROISequence (ROINumber, ROIName) restricted to ROIs that have contour
data (ROIs without contours are logged and kept in :attr:`SegmentationInfo.empty_rois`).

Manifests (:func:`read_manifest`): each CSV row (image, mask) gives one segmentation row with
``link_rule = 'manifest'`` and each distinct image one series row (geometry from the header only); a
missing/unreadable file, an empty mask or a mask on another grid than its image leaves the row unlinked with
the reason; nothing raises for a bad file.

``seg_key`` is ``sha1(path)[:16]`` (the path is unique in the catalog; SOP instance UIDs are not: rt-utils
ships three RTSTRUCTs with one SOP instance UID); for manifest rows ``sha1("image path|mask path")[:16]``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.dicom.pseudonym import patient_key as make_patient_key
from imaging_assets.dicom.records import NRRD_SUFFIXES, SEGMENTATION_FIELDS, SERIES_FIELDS
from imaging_assets.dicom.series import MIN_SLICES, slice_normal
from imaging_assets.dicom.values import cs_problem
from imaging_assets.errors import SegmentationReadError, error_text

logger = logging.getLogger(__name__)

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: A candidate "contains" the segmentation when at least this fraction of its points is inside.
CONTAINS_FRACTION = 0.999


@dataclass
class SegmentationInfo:
    """What the linker (and later stages) need from one SEG or RTSTRUCT file.

    Attributes
    ----------
    points
        (N, 3) points in patient coordinates (mm): RTSTRUCT contour vertices, or the four corners of every
        SEG frame. Empty when the file has none.
    referenced_instances
        SOP instance UID -> referenced series UID (or None when the reference does not say which series).
    empty_rois
        RTSTRUCT ROIs (number, name) without any contour data.
    """

    path: str
    kind: str  # 'seg' | 'rtstruct'
    sop_instance_uid: str | None
    series_instance_uid: str | None
    frame_of_reference_uid: str | None
    patient_key: str | None
    segmentation_type: str | None
    segment_numbers: list[int]
    segment_labels: list[str]
    referenced_series_uids: list[str]
    referenced_instances: dict[str, str | None]
    points: np.ndarray
    empty_rois: list[tuple[int, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# reading SEG / RTSTRUCT
# --------------------------------------------------------------------------------------------------
def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(x) for x in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n and np.all(np.isfinite(arr)) else None


def _group_value(groups: Sequence[Any], sequence: str, attribute: str) -> Any:
    """First ``sequence[0].attribute`` found in the functional groups given (per-frame first, then shared)."""
    for g in groups:
        if g is None:
            continue
        seq = g.get(sequence)
        if seq:
            value = seq[0].get(attribute)
            if value is not None:
                return value
    return None


def _read_rtstruct(ds: Any, info: dict[str, Any]) -> None:
    rois: dict[int, str] = {}
    roi_for: dict[int, str | None] = {}
    for item in ds.get("StructureSetROISequence") or []:
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError):
            continue
        rois[number] = _str(item.get("ROIName")) or ""
        roi_for[number] = _str(item.get("ReferencedFrameOfReferenceUID"))
    with_data: dict[int, int] = {}
    points: list[np.ndarray] = []
    instances: dict[str, str | None] = {}
    for rc in ds.get("ROIContourSequence") or []:
        try:
            number = int(rc.ReferencedROINumber)
        except (AttributeError, TypeError, ValueError):
            continue
        for contour in rc.get("ContourSequence") or []:
            data = contour.get("ContourData")
            if data:
                arr = np.asarray([float(x) for x in data], dtype=float)
                if arr.size and arr.size % 3 == 0 and np.all(np.isfinite(arr)):
                    points.append(arr.reshape(-1, 3))
                    with_data[number] = with_data.get(number, 0) + 1
            for ci in contour.get("ContourImageSequence") or []:
                uid = _str(ci.get("ReferencedSOPInstanceUID"))
                if uid:
                    instances.setdefault(uid, None)
    ref_series: list[str] = []
    ref_fors: list[str] = []
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        if _str(fr.get("FrameOfReferenceUID")):
            ref_fors.append(_str(fr.get("FrameOfReferenceUID")))  # type: ignore[arg-type]
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                suid = _str(se.get("SeriesInstanceUID"))
                if suid and suid not in ref_series:
                    ref_series.append(suid)
                for ci in se.get("ContourImageSequence") or []:
                    uid = _str(ci.get("ReferencedSOPInstanceUID"))
                    if uid:
                        instances[uid] = suid
    numbers = sorted(with_data)
    info["segment_numbers"] = numbers
    info["segment_labels"] = [rois.get(n, "") for n in numbers]
    info["empty_rois"] = [(n, rois[n]) for n in sorted(rois) if n not in with_data]
    info["points"] = np.vstack(points) if points else np.zeros((0, 3))
    info["referenced_series_uids"] = ref_series
    info["referenced_instances"] = instances
    for_uid = _str(ds.get("FrameOfReferenceUID"))
    if not for_uid:
        fors = Counter(roi_for[n] for n in numbers if roi_for.get(n))
        for_uid = fors.most_common(1)[0][0] if fors else (ref_fors[0] if ref_fors else None)
    info["frame_of_reference_uid"] = for_uid
    if info["empty_rois"]:
        logger.info(
            "%s: %d ROI(s) without contour data are not counted as segments: %s",
            info["path"],
            len(info["empty_rois"]),
            ", ".join(f"{n} {name!r}" for n, name in info["empty_rois"]),
        )


def _read_seg(ds: Any, info: dict[str, Any]) -> None:
    seg_type = _str(ds.get("SegmentationType"))
    numbers, labels = [], []
    for item in ds.get("SegmentSequence") or []:
        try:
            number = int(item.SegmentNumber)
        except (AttributeError, TypeError, ValueError):
            continue
        if number == 0:  # LABELMAP background
            continue
        numbers.append(number)
        labels.append(_str(item.get("SegmentLabel")) or "")
    ref_series: list[str] = []
    instances: dict[str, str | None] = {}
    for se in ds.get("ReferencedSeriesSequence") or []:
        suid = _str(se.get("SeriesInstanceUID"))
        if suid and suid not in ref_series:
            ref_series.append(suid)
        for ri in se.get("ReferencedInstanceSequence") or []:
            uid = _str(ri.get("ReferencedSOPInstanceUID"))
            if uid:
                instances[uid] = suid
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    rows, cols = ds.get("Rows"), ds.get("Columns")
    corners: list[np.ndarray] = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence") or []:
        for di in frame.get("DerivationImageSequence") or []:
            for si in di.get("SourceImageSequence") or []:
                uid = _str(si.get("ReferencedSOPInstanceUID"))
                if uid:
                    instances.setdefault(uid, None)
        pos = _floats(_group_value([frame, shared], "PlanePositionSequence", "ImagePositionPatient"), 3)
        if pos is None:
            continue
        ori = _floats(_group_value([frame, shared], "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        spacing = _floats(_group_value([frame, shared], "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ori is None or spacing is None or not rows or not cols:
            corners.append(pos[None, :])
            continue
        du = ori[:3] * spacing[1] * (int(cols) - 1)
        dv = ori[3:] * spacing[0] * (int(rows) - 1)
        corners.append(np.stack([pos, pos + du, pos + dv, pos + du + dv]))
    info["segmentation_type"] = seg_type
    info["segment_numbers"] = numbers
    info["segment_labels"] = labels
    info["points"] = np.vstack(corners) if corners else np.zeros((0, 3))
    info["referenced_series_uids"] = ref_series
    info["referenced_instances"] = instances
    info["frame_of_reference_uid"] = _str(ds.get("FrameOfReferenceUID"))


def read_segmentation_info(path: str | os.PathLike[str], secret: str | None = None) -> SegmentationInfo:
    """Read segments, references and patient-space points of one SEG or RTSTRUCT file.

    Parameters
    ----------
    path
        The DICOM file. Pixel data is not read.
    secret
        Pseudonymisation secret for the ``patient_key`` (see :func:`imaging_assets.dicom.pseudonym.patient_key`).

    Returns
    -------
    SegmentationInfo

    Raises
    ------
    SegmentationReadError
        When the file is not readable DICOM, not a SEG/RTSTRUCT, or its structure is malformed; the
        message names the file and the problem.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise SegmentationReadError(f"{path} could not be read as DICOM: {error_text(exc)}") from exc
    except Exception as exc:  # corrupt headers surface as many exception types; never let one escape
        raise SegmentationReadError(f"{path} could not be read as DICOM: {error_text(exc)}") from exc
    try:
        sop_class = _str(ds.get("SOPClassUID"))
        modality = _str(ds.get("Modality"))
        if sop_class in SEG_SOP_CLASSES or (sop_class is None and modality == "SEG"):
            kind = "seg"
        elif sop_class == RTSTRUCT_SOP_CLASS or (sop_class is None and modality == "RTSTRUCT"):
            kind = "rtstruct"
        else:
            raise SegmentationReadError(
                f"{path} is not a SEG or RTSTRUCT (SOP class {sop_class}, modality {modality})"
            )
        pid = _str(ds.get("PatientID"))
        info: dict[str, Any] = {
            "path": path,
            "kind": kind,
            "sop_instance_uid": _str(ds.get("SOPInstanceUID")),
            "series_instance_uid": _str(ds.get("SeriesInstanceUID")),
            "patient_key": make_patient_key(pid, secret) if pid else None,
            "segmentation_type": None,
        }
        if kind == "seg":
            _read_seg(ds, info)
        else:
            _read_rtstruct(ds, info)
    except SegmentationReadError:
        raise
    except Exception as exc:  # malformed values deep inside sequences: say which file
        what = ds.get("Modality") or "DICOM"
        raise SegmentationReadError(f"{path} has a malformed {what} structure: {error_text(exc)}") from exc
    return SegmentationInfo(**info)


# --------------------------------------------------------------------------------------------------
# geometry of a series row
# --------------------------------------------------------------------------------------------------
@dataclass
class _Box:
    origin: np.ndarray
    axes: np.ndarray  # rows: row direction, column direction, normal
    lo: np.ndarray
    hi: np.ndarray


def _series_box(series: dict[str, Any]) -> _Box | None:
    """The volume covered by a series in its own axes (widened by half a voxel), or None without geometry."""
    ori = _floats(series.get("orientation"), 6)
    spacing = _floats(series.get("pixel_spacing"), 2)
    origin = _floats(series.get("origin"), 3)
    offsets = series.get("slice_offsets")
    rows, cols = series.get("rows"), series.get("columns")
    if ori is None or spacing is None or origin is None or not offsets or not rows or not cols:
        return None
    try:
        normal = slice_normal(ori)
    except ValueError:
        return None
    offs = np.asarray([float(x) for x in offsets])
    step = series.get("slice_spacing")
    half_step = 0.5 * float(step) if step else 0.5
    base = float(origin @ normal)
    lo = np.array([-0.5 * spacing[1], -0.5 * spacing[0], offs.min() - base - half_step])
    hi = np.array(
        [
            (int(cols) - 0.5) * spacing[1],
            (int(rows) - 0.5) * spacing[0],
            offs.max() - base + half_step,
        ]
    )
    return _Box(origin, np.stack([ori[:3], ori[3:], normal]), lo, hi)


def _fraction_inside(points: np.ndarray, box: _Box) -> float:
    if points.size == 0:
        return 0.0
    local = (points - box.origin) @ box.axes.T
    inside = np.all((local >= box.lo - 1e-6) & (local <= box.hi + 1e-6), axis=1)
    return float(inside.mean())


def _folder_proximity(a: str, b: str) -> int:
    """How many leading folder components the folders of two files share."""
    try:
        common = os.path.commonpath([os.path.dirname(os.path.abspath(a)), os.path.dirname(os.path.abspath(b))])
    except ValueError:
        return 0
    return len(Path(common).parts)


# --------------------------------------------------------------------------------------------------
# linking
# --------------------------------------------------------------------------------------------------
class _SopIndex:
    """SOP instance UIDs of series files, from catalog records or read lazily from the files' headers."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        self._by_path: dict[str, str | None] = {}
        for r in records:
            if r.get("path") and r.get("sop_instance_uid"):
                self._by_path[str(r["path"])] = str(r["sop_instance_uid"])
        self._by_series: dict[str, set[str]] = {}

    def _sop_of(self, path: str) -> str | None:
        if path not in self._by_path:
            import pydicom

            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                self._by_path[path] = _str(ds.get("SOPInstanceUID"))
            except Exception as exc:  # a vanished or unreadable file: it simply holds no known instance
                logger.warning("could not read SOPInstanceUID of %s: %s", path, exc)
                self._by_path[path] = None
        return self._by_path[path]

    def of(self, series: dict[str, Any]) -> set[str]:
        key = series["series_key"]
        if key not in self._by_series:
            sops = {self._sop_of(str(p)) for p in series.get("files") or []}
            sops.discard(None)
            self._by_series[key] = sops  # type: ignore[assignment]
        return self._by_series[key]


def _is(n: int) -> str:
    return "is" if n == 1 else "are"


def _row(
    record: dict[str, Any],
    info: SegmentationInfo | None,
    linked: str | None,
    rule: str | None,
    reason: str | None,
    frame_of_reference_uid: str | None,
    patient_key: str | None,
) -> dict[str, Any]:
    path = str(record.get("path"))
    row = {
        "seg_key": hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16],
        "path": path,
        "kind": record.get("kind") or (info.kind if info else None),
        "sop_instance_uid": record.get("sop_instance_uid") or (info.sop_instance_uid if info else None),
        "series_instance_uid": record.get("series_instance_uid") or (info.series_instance_uid if info else None),
        "frame_of_reference_uid": frame_of_reference_uid,
        "patient_key": patient_key,
        "segmentation_type": info.segmentation_type if info else None,
        "n_segments": len(info.segment_numbers) if info else None,
        "segment_numbers": list(info.segment_numbers) if info else None,
        "segment_labels": list(info.segment_labels) if info else None,
        "image_path": None,
        "linked_series_key": linked,
        "link_rule": rule if linked else None,
        "unlinked_reason": None if linked else reason,
    }
    return {k: row[k] for k in SEGMENTATION_FIELDS}


def _describe(series: dict[str, Any]) -> str:
    files = series.get("files") or []
    where = os.path.dirname(str(files[0])) if files else "?"
    return f"{series['series_key']} ({series.get('modality') or '?'}, {series.get('n_slices')} slices in {where})"


def _link_one(
    record: dict[str, Any],
    info: SegmentationInfo,
    series: Sequence[dict[str, Any]],
    by_uid: dict[str, list[dict[str, Any]]],
    by_for: dict[str, list[dict[str, Any]]],
    sops: _SopIndex,
) -> tuple[str | None, str | None, str | None]:
    """(linked series_key, rule, unlinked reason) for one readable segmentation."""
    path = str(record.get("path"))
    what = "RTSTRUCT" if info.kind == "rtstruct" else "SEG"
    if info.kind == "rtstruct" and not info.segment_numbers:
        names = ", ".join(repr(name) for _, name in info.empty_rois) or "none"
        return None, None, f"RTSTRUCT has no contour data (ROIs listed: {names})"
    if info.kind == "seg" and not info.segment_numbers:
        return None, None, "SEG has no segments in its SegmentSequence"

    for_uid = _str(record.get("frame_of_reference_uid")) or info.frame_of_reference_uid
    pk = record.get("patient_key") or info.patient_key
    ref_uids: list[str] = []
    for uid in list(record.get("referenced_series_uids") or []) + info.referenced_series_uids:
        if uid and uid not in ref_uids:
            ref_uids.append(uid)
    ref_inst = info.referenced_instances

    def same_patient(s: dict[str, Any]) -> bool:
        return not (pk and s.get("patient_key") and s.get("patient_key") != pk)

    def required_instances(s: dict[str, Any]) -> set[str]:
        """Referenced instances that must be in series ``s``: those referenced under its UID, plus the
        unattributed ones when the segmentation references at most one series."""
        suid = s.get("series_instance_uid")
        return {
            uid for uid, ser in ref_inst.items() if ser == suid or (ser is None and len(ref_uids) <= 1)
        }

    # ---- rule 1: referenced series ---------------------------------------------------------------
    candidates = [s for uid in ref_uids for s in by_uid.get(uid, [])]
    other_patient = [s for s in candidates if not same_patient(s)]
    candidates = [s for s in candidates if same_patient(s)]
    if other_patient and not candidates:
        s = other_patient[0]
        return None, None, (
            f"references series {s['series_instance_uid']}, but that series belongs to another patient "
            f"(patient_key {s.get('patient_key')} vs {pk})"
        )
    if candidates:
        if len(candidates) > 1:
            candidates.sort(
                key=lambda s: (
                    -(bool(for_uid) and s.get("frame_of_reference_uid") == for_uid),
                    -len(required_instances(s) & sops.of(s)) if ref_inst else 0,
                    -_folder_proximity(path, str((s.get("files") or [""])[0])),
                    s["series_key"],
                )
            )
        best = candidates[0]
        if ref_inst:
            required = required_instances(best)
            missing = sorted(required - sops.of(best))
            if missing:
                return None, None, (
                    f"references {len(required)} SOP instance(s) of series {best['series_instance_uid']}, "
                    f"{len(missing)} of which are not in the catalogued series {_describe(best)} "
                    f"(e.g. {missing[0]}); the segmentation would lie on missing images"
                )
        best_for = best.get("frame_of_reference_uid")
        if for_uid and best_for and best_for != for_uid:
            box = _series_box(best)
            frac = _fraction_inside(info.points, box) if box is not None else 0.0
            if frac < CONTAINS_FRACTION:
                return None, None, (
                    f"references series {best['series_instance_uid']} but its FrameOfReferenceUID {for_uid} "
                    f"differs from the series' {best_for}, and only {frac:.0%} of its points lie inside "
                    "that series' volume"
                )
            logger.warning(
                "%s references series %s whose FrameOfReferenceUID %s differs from its own %s; "
                "linked anyway because all its points lie inside the series' volume",
                path,
                best["series_instance_uid"],
                best_for,
                for_uid,
            )
        return best["series_key"], "referenced_series", None

    # ---- rule 2: referenced instances ------------------------------------------------------------
    pool = by_for.get(for_uid, []) if for_uid else [s for s in series if pk and s.get("patient_key") == pk]
    pool = [s for s in pool if same_patient(s)]
    if ref_inst:
        hits = [(len(set(ref_inst) & sops.of(s)), s) for s in pool]
        hits = [(n, s) for n, s in hits if n]
        if hits:
            hits.sort(key=lambda t: (-t[0], t[1]["series_key"]))
            n, best = hits[0]
            missing = sorted(set(ref_inst) - sops.of(best))
            if missing:
                return None, None, (
                    f"references {len(ref_inst)} SOP instance(s); {n} {_is(n)} in series {_describe(best)} but "
                    f"{len(missing)} {_is(len(missing))} not catalogued (e.g. {missing[0]}); "
                    "the segmentation would lie on missing images"
                )
            return best["series_key"], "referenced_instances", None

    # ---- rule 3: frame of reference + extent ---------------------------------------------------------
    refs_text = (
        f"references series {', '.join(ref_uids)}, which {_is(len(ref_uids))} not in the catalog"
        if ref_uids
        else "references no series"
    )
    if ref_inst:
        refs_text += f" (nor are any of its {len(ref_inst)} referenced SOP instances)"
    if not for_uid:
        return None, None, f"{what} {refs_text} and has no FrameOfReferenceUID to fall back on"
    if not pool:
        return None, None, f"{what} {refs_text}, and no catalogued series has its FrameOfReferenceUID {for_uid}"
    if info.points.size == 0:
        return None, None, (
            f"{what} {refs_text}; {len(pool)} series share its FrameOfReferenceUID {for_uid} but the "
            f"{what} has no positions to compare extents with"
        )
    scored = []
    no_geometry = 0
    for s in pool:
        box = _series_box(s)
        if box is None:
            no_geometry += 1
            continue
        frac = _fraction_inside(info.points, box)
        if frac > 0:
            scored.append((frac, s))
    if not scored:
        extra = f" ({no_geometry} without usable geometry)" if no_geometry else ""
        return None, None, (
            f"{what} {refs_text}; {len(pool)} series share its FrameOfReferenceUID {for_uid}{extra} but none "
            "overlaps its extent"
        )
    scored.sort(
        key=lambda t: (
            -(t[0] >= CONTAINS_FRACTION),
            -_folder_proximity(path, str((t[1].get("files") or [""])[0])),
            -t[0],
            -bool(t[1].get("usable")),
            -(t[1].get("n_slices") or 0),
            t[1]["series_key"],
        )
    )
    frac, best = scored[0]
    if len(scored) > 1:
        logger.info(
            "%s: %d series of frame of reference %s overlap it; linked to %s (%.0f%% inside, nearest folder); "
            "others: %s",
            path,
            len(scored),
            for_uid,
            best["series_key"],
            100 * frac,
            ", ".join(f"{s['series_key']} ({100 * f:.0f}%)" for f, s in scored[1:]),
        )
    return best["series_key"], "frame_of_reference_extent", None


def link_segmentations(
    files: Iterable[dict[str, Any]], series: Sequence[dict[str, Any]], secret: str | None = None
) -> list[dict[str, Any]]:
    """Link SEG and RTSTRUCT files to image series.

    Parameters
    ----------
    files
        File-catalog records (:data:`~imaging_assets.dicom.records.FILE_FIELDS`); those with ``kind`` in
        ``('seg', 'rtstruct')`` are linked. Image records may be included too: their SOP instance UIDs
        spare reading the series' headers when referenced instances are checked.
    series
        Series rows of :func:`imaging_assets.dicom.series.assemble_series`.
    secret
        Pseudonymisation secret, used only when a record lacks its ``patient_key``.

    Returns
    -------
    list of dict
        One :data:`~imaging_assets.dicom.records.SEGMENTATION_FIELDS` row per segmentation file, ordered by
        path. The link rules are described in the module docstring. Never raises for a bad file: the row
        then carries the reason.
    """
    records = list(files)
    segs = sorted((r for r in records if r.get("kind") in ("seg", "rtstruct")), key=lambda r: str(r.get("path")))
    by_uid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_for: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in series:
        if s.get("series_instance_uid"):
            by_uid[s["series_instance_uid"]].append(s)
        if s.get("frame_of_reference_uid"):
            by_for[s["frame_of_reference_uid"]].append(s)
    sops = _SopIndex(r for r in records if r.get("kind") == "image")
    rows = []
    for record in segs:
        path = str(record.get("path"))
        try:
            info = read_segmentation_info(path, secret=secret)
        except SegmentationReadError as exc:
            rows.append(
                _row(record, None, None, None, str(exc), _str(record.get("frame_of_reference_uid")),
                     record.get("patient_key"))
            )
            continue
        for_uid = _str(record.get("frame_of_reference_uid")) or info.frame_of_reference_uid
        pk = record.get("patient_key") or info.patient_key
        try:
            linked, rule, reason = _link_one(record, info, series, by_uid, by_for, sops)
        except Exception as exc:  # a bug must not stop the other rows; say which file
            logger.exception("linking %s failed", path)
            linked, rule, reason = None, None, f"linking failed unexpectedly: {error_text(exc)}"
        if linked is None:
            logger.info("%s not linked: %s", path, reason)
        rows.append(_row(record, info, linked, rule, reason, for_uid, pk))
    return rows


# --------------------------------------------------------------------------------------------------
# manifest of NIfTI / NRRD pairs
# --------------------------------------------------------------------------------------------------
_KINDS = ((".nii.gz", "nifti"), (".nii", "nifti"), (".nrrd", "nrrd"), (".nhdr", "nrrd"))


def _volume_kind(path: str) -> str | None:
    low = path.lower()
    return next((kind for suffix, kind in _KINDS if low.endswith(suffix)), None)


@dataclass
class _Volume:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    dimension: int


def _read_volume_header(path: str) -> _Volume:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return _Volume(
        tuple(int(x) for x in reader.GetSize()),
        tuple(float(x) for x in reader.GetSpacing()),
        tuple(float(x) for x in reader.GetOrigin()),
        tuple(float(x) for x in reader.GetDirection()),
        int(reader.GetDimension()),
    )


def _volume_series_row(
    image_path: str, vol: _Volume, patient: str | None, modality: str | None, min_slices: int = MIN_SLICES
) -> dict[str, Any]:
    """A SERIES_FIELDS row for a NIfTI/NRRD image (geometry from its header only)."""
    flags: list[str] = []
    details: list[str] = []
    dim = vol.dimension
    size = list(vol.size) + [1] * (3 - dim) if dim < 3 else list(vol.size[:3])
    spacing = list(vol.spacing) + [1.0] * (3 - dim) if dim < 3 else list(vol.spacing[:3])
    origin = np.array((list(vol.origin) + [0.0] * 3)[:3], dtype=float)
    if dim == 3:
        d = np.asarray(vol.direction, dtype=float).reshape(3, 3)
    elif dim == 2:
        d = np.eye(3)
        d[:2, :2] = np.asarray(vol.direction, dtype=float).reshape(2, 2)
    else:
        d = np.asarray(vol.direction, dtype=float).reshape(dim, dim)[:3, :3]
        flags.append("missing_geometry")
        details.append(f"image has {dim} dimensions; only the first three are described")
    row_dir, col_dir, slice_dir = d[:, 0], d[:, 1], d[:, 2]
    orientation = [float(x) + 0.0 for x in np.concatenate([row_dir, col_dir])]
    try:
        normal = slice_normal(orientation)
    except ValueError as exc:
        normal = None
        flags.append("missing_geometry")
        details.append(f"direction matrix is degenerate: {exc}")
    if any(s <= 0 for s in spacing):
        flags.append("missing_geometry")
        details.append(f"non-positive voxel spacing {spacing}")
    offsets = None
    slice_spacing = None
    first_pos = origin
    if normal is not None:
        positions = origin[None, :] + np.arange(size[2])[:, None] * spacing[2] * slice_dir[None, :]
        proj = positions @ normal
        order = np.argsort(proj, kind="stable")
        offsets = [float(x) + 0.0 for x in proj[order]]
        first_pos = positions[order[0]]
        along = abs(float(slice_dir @ normal))
        slice_spacing = float(spacing[2] * along) if size[2] > 1 else None
        inplane = float(np.linalg.norm(slice_dir - (slice_dir @ normal) * normal))
        if inplane > 0.01 * max(along, 1e-12) and size[2] > 1:
            flags.append("gantry_tilt")
            details.append(
                f"third image axis {np.round(slice_dir, 4).tolist()} is not along the slice normal "
                f"{np.round(normal, 4).tolist()} (sheared volume)"
            )
        if along < 1e-6 and size[2] > 1:
            flags.append("duplicate_positions")
            details.append("third image axis lies in the slice plane: all slices share one position")
    if size[2] < min_slices:
        flags.append("too_few_slices")
        details.append(f"only {size[2]} slice{'s' if size[2] != 1 else ''}; a volume needs at least {min_slices}")
    row = {
        "series_key": hashlib.sha1(image_path.encode("utf-8", "surrogateescape")).hexdigest()[:16],
        "series_instance_uid": None,
        "frame_of_reference_uid": None,
        "study_instance_uid": None,
        "patient_key": patient,
        "modality": modality,
        "study_date": None,
        "series_description": os.path.basename(image_path),
        "body_part": None,
        "is_multiframe": False,
        "n_files": 1,
        "n_slices": int(size[2]),
        "rows": int(size[1]),
        "columns": int(size[0]),
        "pixel_spacing": [float(spacing[1]), float(spacing[0])],
        "slice_spacing": slice_spacing,
        "origin": [float(x) + 0.0 for x in first_pos],
        "orientation": orientation,
        "slice_normal": [float(x) + 0.0 for x in normal] if normal is not None else None,
        "files": [image_path],
        "slice_offsets": offsets,
        "flags": flags,
        "flag_details": details,
        "usable": not flags,
    }
    return {k: row[k] for k in SERIES_FIELDS}


def _grid_mismatch(image: _Volume, mask: _Volume) -> str | None:
    if image.size != mask.size:
        return f"size {'x'.join(map(str, mask.size))} vs image {'x'.join(map(str, image.size))}"
    if not np.allclose(image.spacing, mask.spacing, rtol=1e-4, atol=1e-4):
        return f"spacing {np.round(mask.spacing, 4).tolist()} vs image {np.round(image.spacing, 4).tolist()}"
    if not np.allclose(image.origin, mask.origin, atol=1e-2):
        return f"origin {np.round(mask.origin, 3).tolist()} vs image {np.round(image.origin, 3).tolist()}"
    if not np.allclose(image.direction, mask.direction, atol=1e-4):
        return f"direction {np.round(mask.direction, 4).tolist()} vs image {np.round(image.direction, 4).tolist()}"
    return None


def _mask_labels(path: str) -> list[int]:
    """Distinct non-zero label values of a mask (reads its pixels). Raises ValueError for non-labels."""
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; a label map has 1")
    values = np.unique(sitk.GetArrayFromImage(image))
    values = values[values != 0]
    if values.dtype.kind == "f" and (not np.all(np.isfinite(values)) or not np.all(np.mod(values, 1) == 0)):
        raise ValueError("has non-integer values; a label map holds integer labels")
    return [int(v) for v in values]


def read_manifest(
    manifest_csv: str | os.PathLike[str],
    secret: str | None = None,
    *,
    require_same_grid: bool = True,
    min_slices: int = MIN_SLICES,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a CSV of NIfTI/NRRD image + mask pairs into series rows and segmentation rows.

    Parameters
    ----------
    manifest_csv
        CSV with columns ``image_path``, ``mask_path`` (required) and ``patient_id``, ``modality``
        (optional). Relative paths are relative to the CSV's folder.
    secret
        Pseudonymisation secret for ``patient_key`` (the raw patient id is never stored).
    require_same_grid
        When True (default) a mask whose size, spacing, origin or direction differs from its image's is
        left unlinked with the reason; when False it is linked and the mismatch only logged.
    min_slices
        Images with fewer slices are flagged ``too_few_slices``.

    Returns
    -------
    (series_rows, segmentation_rows)
        One :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row per distinct readable image (key
        ``sha1(absolute image path)[:16]``, ``files = [image path]``, geometry from the header only,
        ``series_description`` = file name) and one
        :data:`~imaging_assets.dicom.records.SEGMENTATION_FIELDS` row per CSV row (kind ``'nifti'`` or
        ``'nrrd'`` from the mask's extension, ``segment_numbers`` = the mask's distinct non-zero labels,
        ``link_rule = 'manifest'``). A missing or unreadable file never raises: the segmentation row is
        kept, unlinked, with a reason naming the file.

    Raises
    ------
    FileNotFoundError
        When ``manifest_csv`` itself does not exist (a configuration error, unlike a missing image/mask).
    ValueError
        When the CSV lacks the ``image_path`` or ``mask_path`` column.
    """
    manifest_csv = Path(manifest_csv)
    base = manifest_csv.parent
    with open(manifest_csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
        missing_cols = [c for c in ("image_path", "mask_path") if c not in columns]
        if missing_cols:
            # the "header" may be a data row of a header-less manifest: its cells are not quoted
            raise ValueError(
                f"manifest {manifest_csv} lacks column(s) {', '.join(missing_cols)} "
                f"({len(reader.fieldnames or [])} column(s) found; needed: image_path, mask_path)"
            )
        entries = [{k: (raw.get(columns[k]) if k in columns else None) for k in
                    ("image_path", "mask_path", "patient_id", "modality")} for raw in reader]

    def resolve(value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        p = Path(os.path.expanduser(value))
        return os.path.abspath(p if p.is_absolute() else base / p)

    series_rows: dict[str, dict[str, Any]] = {}
    volumes: dict[str, _Volume | str] = {}
    seg_rows: list[dict[str, Any]] = []
    seen_pairs: set[tuple[str | None, str | None]] = set()
    for line, entry in enumerate(entries, start=2):
        image, mask = resolve(entry["image_path"]), resolve(entry["mask_path"])
        if (image, mask) in seen_pairs:
            logger.info("%s line %d repeats the pair %s / %s; ignored", manifest_csv, line, image, mask)
            continue
        seen_pairs.add((image, mask))
        patient = make_patient_key(_str(entry["patient_id"]), secret)
        modality = (_str(entry["modality"]) or "").upper() or None
        reasons: list[str] = []
        if modality is not None and (problem := cs_problem(modality)):  # a coded value: never stored verbatim
            reasons.append(f"line {line} of {manifest_csv.name}: modality is not a valid DICOM code string "
                           f"(CS): {problem} (value not shown)")
            modality = None

        img_vol: _Volume | None = None
        if image is None:
            reasons.append(f"line {line} of {manifest_csv.name} has no image_path")
        elif not os.path.isfile(image):
            reasons.append(f"image file {image} does not exist")
        elif _volume_kind(image) is None:
            reasons.append(f"image file {image} is not NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr)")
        else:
            if image not in volumes:
                try:
                    volumes[image] = _read_volume_header(image)
                except Exception as exc:
                    volumes[image] = f"image file {image} could not be read: {error_text(exc)}"
            vol = volumes[image]
            if isinstance(vol, str):
                reasons.append(vol)
            else:
                img_vol = vol
                if image not in series_rows:
                    series_rows[image] = _volume_series_row(image, vol, patient, modality, min_slices=min_slices)
                elif series_rows[image]["patient_key"] != patient:
                    reasons.append(
                        f"image file {image} is listed for two different patients in {manifest_csv.name}"
                    )

        kind = _volume_kind(mask) if mask else None
        labels: list[int] | None = None
        if mask is None:
            reasons.append(f"line {line} of {manifest_csv.name} has no mask_path")
        elif not os.path.isfile(mask):
            reasons.append(f"mask file {mask} does not exist")
        elif kind is None:
            reasons.append(f"mask file {mask} is not NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr)")
        else:
            try:
                mask_vol = _read_volume_header(mask)
                labels = _mask_labels(mask)
            except Exception as exc:
                reasons.append(f"mask file {mask} could not be read as a label map: {error_text(exc)}")
            else:
                if not labels:
                    reasons.append(f"mask file {mask} has no non-zero voxels")
                if img_vol is not None:
                    mismatch = _grid_mismatch(img_vol, mask_vol)
                    if mismatch and require_same_grid:
                        reasons.append(f"mask grid differs from the image grid: {mismatch}")
                    elif mismatch:
                        logger.warning("%s: mask grid differs from image %s: %s", mask, image, mismatch)

        linked = series_rows[image]["series_key"] if image in series_rows and not reasons else None
        key_text = f"{image or ''}|{mask or ''}"
        row = {
            "seg_key": hashlib.sha1(key_text.encode("utf-8", "surrogateescape")).hexdigest()[:16],
            "path": mask,
            "kind": kind or ("nrrd" if (mask or "").lower().endswith(NRRD_SUFFIXES) else "nifti"),
            "sop_instance_uid": None,
            "series_instance_uid": None,
            "frame_of_reference_uid": None,
            "patient_key": patient,
            "segmentation_type": None,
            "n_segments": len(labels) if labels is not None else None,
            "segment_numbers": labels,
            "segment_labels": [str(v) for v in labels] if labels is not None else None,
            "image_path": image,
            "linked_series_key": linked,
            "link_rule": "manifest" if linked else None,
            "unlinked_reason": None if linked else "; ".join(reasons),
        }
        seg_rows.append({k: row[k] for k in SEGMENTATION_FIELDS})
    return list(series_rows.values()), seg_rows
