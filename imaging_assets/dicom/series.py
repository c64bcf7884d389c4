"""Series assembly and geometry quality control.

:func:`assemble_series` turns file-catalog records (:data:`~imaging_assets.dicom.records.FILE_FIELDS`,
``kind == 'image'``) into one :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row per image series,
with its slices sorted along the slice normal and its geometry checked.

Grouping
    Files are grouped by ``(SeriesInstanceUID, FrameOfReferenceUID)``. When the files of one group lie in
    more than one folder and those folders disagree (orientation, pixel spacing, rows/columns, or a slice
    position that occurs in two folders), the group is split by folder: each folder becomes its own series
    and the folder path becomes the split part of its key. Folders that agree are merged (a series copied
    in halves into two folders is still one series). Within one folder nothing is split: conflicts there
    are reported as flags.

Keys
    ``series_key = sha1("<series uid>|<frame of reference uid>|<split part>")[:16]`` where a missing UID is
    the empty string and the split part is ``""`` for an unsplit series and the folder path otherwise; the
    key is therefore stable across runs (and across moves of the archive for unsplit series).

Slice order
    Slices (single-frame files, or the frames of multi-frame files, using ``frame_positions``) are sorted
    by the projection of their ImagePositionPatient on the slice normal (row cosines x column cosines of
    the first slice's ImageOrientationPatient), ascending; ties by InstanceNumber, path and frame index.
    Never by z or InstanceNumber alone, so oblique and sagittal/coronal series sort correctly. A series
    with missing position/orientation falls back to InstanceNumber order and is flagged.

Geometry flags (codes of :data:`~imaging_assets.dicom.records.GEOMETRY_FLAGS`, each with a sentence)
    * ``duplicate_positions``: two slices whose projections differ by less than ``duplicate_tolerance``
      (0.01 mm).
    * ``missing_slices``: a step larger than ``gap_factor`` (1.5) x the median step.
    * ``nonuniform_spacing``: a step (not a gap, not a duplicate) that differs from the median step by
      more than ``max(spacing_rtol * median, spacing_atol)`` = ``max(10 %, 0.1 mm)``.
    * ``mixed_orientation``: a slice whose orientation cosines differ from the first slice's by more than
      ``orientation_tolerance`` (1e-3, max abs component difference).
    * ``gantry_tilt``: the in-plane part of the offset between successive slices (the component
      perpendicular to the normal) exceeds ``max(tilt_rtol * step, tilt_atol)`` = ``max(0.01 x step,
      0.001 mm)``, i.e. a tilt of more than about 0.57 degrees. Real gantry tilts are several degrees;
      rounding of positions in the header stays far below this.
    * ``too_few_slices``: fewer than ``min_slices`` (3) distinct slice positions.
    * ``inconsistent_pixel_spacing``: PixelSpacing differs by more than ``pixel_spacing_tolerance``
      (0.001 mm) from the first slice's.
    * ``inconsistent_size``: Rows/Columns differ between slices.
    * ``missing_geometry``: a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing
      (or a multi-frame file has no per-frame positions).
    * ``color_pixels``: a file holds colour pixels: ``samples_per_pixel`` > 1 (RGB, YBR) or a
      PhotometricInterpretation other than MONOCHROME1/2 (PALETTE COLOR holds palette indices, not grey
      values). Radiomics needs one grey value per voxel; such a series would only fail at extraction.
      Records without these fields (catalogued before they existed) are not flagged.

``usable`` is True when there is no flag. Slice numbers in the sentences are 1-based, in slice order.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imaging_assets.dicom.records import GEOMETRY_FLAGS, SERIES_FIELDS

logger = logging.getLogger(__name__)

#: Default tolerances (all keyword arguments of :func:`assemble_series`).
GAP_FACTOR = 1.5
SPACING_RTOL = 0.10
SPACING_ATOL = 0.10  # mm
DUPLICATE_TOLERANCE = 0.01  # mm along the normal
ORIENTATION_TOLERANCE = 1e-3  # max abs difference of direction cosines
TILT_RTOL = 0.01  # in-plane offset per mm of step (~0.57 degrees)
TILT_ATOL = 1e-3  # mm
PIXEL_SPACING_TOLERANCE = 1e-3  # mm
MIN_SLICES = 3

#: How many individual problems a flag sentence lists before "and N more".
_MAX_LISTED = 3


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def _vector(value: Any, n: int) -> np.ndarray | None:
    """``value`` as a finite float vector of length ``n``, or None when absent or malformed."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return None
    if arr.size != n or not np.all(np.isfinite(arr)):
        return None
    return arr


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _mm(x: float) -> str:
    s = f"{x:.2f}"
    if s.endswith("0"):
        s = s[:-1]
    return f"{s} mm"


def _floats_out(v: Iterable[float]) -> list[float]:
    """Plain floats for Arrow/DuckDB, with -0.0 turned into 0.0."""
    return [float(x) + 0.0 for x in v]


def _vec_str(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(x):.4g}" for x in v) + "]"


def _noun(plural: str, n: int) -> str:
    """``slices`` -> ``slice`` when n == 1."""
    return plural[:-1] if n == 1 else plural


def _instance(s: _Slice) -> float:
    """InstanceNumber for sorting ties (missing ones last)."""
    return float(s.instance_number) if s.instance_number is not None else math.inf


def _slice_label(s: _Slice) -> str:
    """``name.dcm`` for a single-frame file, ``name.dcm frame 3`` for a frame of a multi-frame file."""
    name = os.path.basename(s.path)
    n_frames = _int(s.record.get("number_of_frames")) or 1
    return f"{name} frame {s.frame + 1}" if n_frames > 1 or s.frame > 0 else name


#: PhotometricInterpretation values whose pixels are grey values.
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})


def _colour(record: dict[str, Any]) -> bool:
    """Does this file hold colour pixels (several samples per pixel, or a non-grey photometric)?"""
    spp = _int(record.get("samples_per_pixel"))
    photometric = (record.get("photometric_interpretation") or "").strip().upper()
    return (spp is not None and spp > 1) or bool(photometric and photometric not in _GREY)


def _more(items: list[str], total: int) -> str:
    text = "; ".join(items[:_MAX_LISTED])
    if total > _MAX_LISTED:
        text += f"; and {total - _MAX_LISTED} more"
    return text


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit slice normal of an ImageOrientationPatient.

    Parameters
    ----------
    orientation
        Six direction cosines: the row direction (along a row, increasing column index) followed by the
        column direction (down a column, increasing row index), in patient coordinates (LPS).

    Returns
    -------
    numpy.ndarray
        ``row x column`` normalised to unit length, shape (3,).

    Raises
    ------
    ValueError
        When ``orientation`` does not hold six finite numbers or its two directions are (nearly)
        parallel or zero.
    """
    arr = _vector(orientation, 6)
    if arr is None:
        raise ValueError(f"ImageOrientationPatient must be 6 finite numbers, got {orientation!r}")
    normal = np.cross(arr[:3], arr[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(arr)} has parallel or zero direction cosines")
    return normal / norm


def series_key(series_uid: str | None, frame_of_reference_uid: str | None, split_part: str = "") -> str:
    """Stable series id: ``sha1("series uid|frame of reference|split part")[:16]``."""
    text = f"{series_uid or ''}|{frame_of_reference_uid or ''}|{split_part or ''}"
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass
class _Slice:
    """One slice: a single-frame file, or one frame of a multi-frame file."""

    record: dict[str, Any]
    path: str
    frame: int  # 0-based frame index within its file
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: np.ndarray | None
    rows: int | None
    columns: int | None
    instance_number: int | None
    offset: float | None = None
    problems: list[str] = field(default_factory=list)


def _slices_of(record: dict[str, Any]) -> list[_Slice]:
    """Expand one file record into its slices (one per frame for multi-frame files)."""
    path = str(record.get("path"))
    orientation = _vector(record.get("image_orientation"), 6)
    spacing = _vector(record.get("pixel_spacing"), 2)
    rows, cols = _int(record.get("rows")), _int(record.get("columns"))
    inst = _int(record.get("instance_number"))
    n_frames = _int(record.get("number_of_frames")) or 1
    frame_positions = record.get("frame_positions")
    problems: list[str] = []
    if frame_positions is not None and len(frame_positions) > 0:
        positions = [_vector(p, 3) for p in frame_positions]
        if n_frames > 1 and len(positions) != n_frames:
            logger.warning(
                "%s: NumberOfFrames is %d but %d per-frame positions were catalogued; using the positions",
                path,
                n_frames,
                len(positions),
            )
    elif n_frames > 1:
        positions = [None] * n_frames
        problems.append(
            f"multi-frame file {os.path.basename(path)} has {n_frames} frames but no per-frame positions"
        )
    else:
        positions = [_vector(record.get("image_position"), 3)]
    out = []
    for i, pos in enumerate(positions):
        first_problems = problems if i == 0 else []
        out.append(_Slice(record, path, i, pos, orientation, spacing, rows, cols, inst, problems=first_problems))
    return out


# --------------------------------------------------------------------------------------------------
# grouping and splitting
# --------------------------------------------------------------------------------------------------
def _first(values: Iterable[np.ndarray | None]) -> np.ndarray | None:
    return next((v for v in values if v is not None), None)


def _folders_conflict(
    by_folder: dict[str, list[_Slice]],
    orientation_tolerance: float,
    pixel_spacing_tolerance: float,
    duplicate_tolerance: float,
) -> str | None:
    """Why the folders of one (series, frame of reference) group must not be merged, or None."""
    folders = sorted(by_folder)
    ref = by_folder[folders[0]]
    ref_ori = _first(s.orientation for s in ref)
    ref_sp = _first(s.pixel_spacing for s in ref)
    ref_size = next(((s.rows, s.columns) for s in ref if s.rows is not None), None)
    for folder in folders[1:]:
        slices = by_folder[folder]
        ori = _first(s.orientation for s in slices)
        sp = _first(s.pixel_spacing for s in slices)
        size = next(((s.rows, s.columns) for s in slices if s.rows is not None), None)
        if ref_ori is not None and ori is not None and np.max(np.abs(ori - ref_ori)) > orientation_tolerance:
            return f"orientation {_vec_str(ori)} in {folder} differs from {_vec_str(ref_ori)} in {folders[0]}"
        if ref_sp is not None and sp is not None and np.max(np.abs(sp - ref_sp)) > pixel_spacing_tolerance:
            return f"pixel spacing {_vec_str(sp)} in {folder} differs from {_vec_str(ref_sp)} in {folders[0]}"
        if ref_size is not None and size is not None and size != ref_size:
            return f"size {size[0]}x{size[1]} in {folder} differs from {ref_size[0]}x{ref_size[1]} in {folders[0]}"
    # positions that occur in two folders
    normal_src = _first(s.orientation for f in folders for s in by_folder[f])
    if normal_src is None:
        return None
    try:
        normal = slice_normal(normal_src)
    except ValueError:
        return None
    offsets = {}
    for folder in folders:
        offs = np.array([float(s.position @ normal) for s in by_folder[folder] if s.position is not None])
        offsets[folder] = np.sort(offs)
    for i, fa in enumerate(folders):
        for fb in folders[i + 1 :]:
            a, b = offsets[fa], offsets[fb]
            if a.size == 0 or b.size == 0:
                continue
            idx = np.clip(np.searchsorted(b, a), 1, max(b.size - 1, 1))
            nearest = np.minimum(np.abs(a - b[idx - 1]), np.abs(a - b[np.minimum(idx, b.size - 1)]))
            hits = np.flatnonzero(nearest < duplicate_tolerance)
            if hits.size:
                return f"slice position {a[hits[0]]:.2f} mm along the normal occurs in both {fa} and {fb}"
    return None


# --------------------------------------------------------------------------------------------------
# QC of one series
# --------------------------------------------------------------------------------------------------
def _qc_and_row(
    uid: str | None,
    for_uid: str | None,
    split_part: str,
    slices: list[_Slice],
    *,
    gap_factor: float,
    spacing_rtol: float,
    spacing_atol: float,
    duplicate_tolerance: float,
    orientation_tolerance: float,
    tilt_rtol: float,
    tilt_atol: float,
    pixel_spacing_tolerance: float,
    min_slices: int,
) -> dict[str, Any]:
    flags: list[str] = []
    details: list[str] = []

    def flag(code: str, sentence: str) -> None:
        assert code in GEOMETRY_FLAGS, code
        flags.append(code)
        details.append(sentence)

    n = len(slices)
    what = "frames" if any(s.frame > 0 for s in slices) else "slices"

    # ---- missing geometry --------------------------------------------------------------------------
    missing: list[str] = []
    no_pos = sum(s.position is None for s in slices)
    no_ori = sum(s.orientation is None for s in slices)
    no_sp = sum(s.pixel_spacing is None for s in slices)
    problems = [p for s in slices for p in s.problems]
    if problems:
        missing.extend(problems)
    elif no_pos:
        missing.append(f"{no_pos} of {n} {what} lack ImagePositionPatient")
    if no_ori:
        missing.append(f"{no_ori} of {n} {what} lack ImageOrientationPatient")
    if no_sp:
        missing.append(f"{no_sp} of {n} {what} lack PixelSpacing")

    ref_ori = _first(s.orientation for s in slices)
    normal: np.ndarray | None = None
    if ref_ori is not None:
        try:
            normal = slice_normal(ref_ori)
        except ValueError as exc:
            missing.append(str(exc))
    sortable = normal is not None and no_pos == 0 and not problems

    # ---- sort ----------------------------------------------------------------------------------------
    if sortable:
        assert normal is not None
        for s in slices:
            s.offset = float(s.position @ normal)  # type: ignore[operator]
        slices.sort(key=lambda s: (s.offset, _instance(s), s.path, s.frame))
    else:
        slices.sort(key=lambda s: (_instance(s), s.path, s.frame))
    if missing:
        flag("missing_geometry", "Geometry incomplete: " + "; ".join(missing) + (
            "" if sortable else f"; {what} ordered by InstanceNumber instead of position"))

    # ---- orientation ---------------------------------------------------------------------------------
    if ref_ori is not None:
        bad = [
            (i, s) for i, s in enumerate(slices)
            if s.orientation is not None and np.max(np.abs(s.orientation - ref_ori)) > orientation_tolerance
        ]
        if bad:
            i, s = bad[0]
            flag(
                "mixed_orientation",
                f"{len(bad)} of {n} {what} have an orientation different from {_vec_str(ref_ori)}, "
                f"e.g. {what[:-1]} {i + 1} ({_slice_label(s)}) has "
                f"{_vec_str(s.orientation)}",  # type: ignore[arg-type]
            )

    # ---- pixel spacing / size ------------------------------------------------------------------------
    ref_sp = _first(s.pixel_spacing for s in slices)
    if ref_sp is not None:
        groups: Counter[tuple[float, ...]] = Counter()
        for s in slices:
            if s.pixel_spacing is None:
                continue
            if np.max(np.abs(s.pixel_spacing - ref_sp)) > pixel_spacing_tolerance:
                groups[tuple(round(float(x), 4) for x in s.pixel_spacing)] += 1
            else:
                groups[tuple(round(float(x), 4) for x in ref_sp)] += 1
        if len(groups) > 1:
            flag(
                "inconsistent_pixel_spacing",
                "PixelSpacing varies between " + what + ": "
                + ", ".join(f"{_vec_str(k)} mm ({v} {_noun(what, v)})" for k, v in groups.most_common()),
            )
    sizes = Counter((s.rows, s.columns) for s in slices if s.rows is not None and s.columns is not None)
    if len(sizes) > 1:
        flag(
            "inconsistent_size",
            "Rows x Columns vary between " + what + ": "
            + ", ".join(f"{r}x{c} ({v} {_noun(what, v)})" for (r, c), v in sizes.most_common()),
        )

    # ---- colour pixels -------------------------------------------------------------------------------
    colour = [r for r in {id(s.record): s.record for s in slices}.values() if _colour(r)]
    if colour:
        n_records = len({id(s.record) for s in slices})
        ex = colour[0]
        flag(
            "color_pixels",
            f"{len(colour)} of {n_records} {_noun('files', n_records)} hold colour pixels, e.g. "
            f"{os.path.basename(ex.get('path') or '')} (PhotometricInterpretation "
            f"{ex.get('photometric_interpretation') or 'absent'}, SamplesPerPixel "
            f"{ex.get('samples_per_pixel') or 'absent'}); radiomics needs one grey value per voxel",
        )

    # ---- positions along the normal ------------------------------------------------------------------
    offsets = np.array([s.offset for s in slices], dtype=float) if sortable else None
    slice_spacing: float | None = None
    distinct = n
    if offsets is not None and n > 1:
        steps = np.diff(offsets)
        dup = steps < duplicate_tolerance
        distinct = int(n - dup.sum())
        if dup.any():
            clusters: list[list[int]] = []
            for i in np.flatnonzero(dup):
                if clusters and clusters[-1][-1] == i:
                    clusters[-1].append(int(i) + 1)
                else:
                    clusters.append([int(i), int(i) + 1])
            items = [
                f"{what} {c[0] + 1}-{c[-1] + 1} at {offsets[c[0]]:.2f} mm ("
                + ", ".join(_slice_label(slices[j]) for j in c[:4])
                + (", ..." if len(c) > 4 else "")
                + ")"
                for c in clusters
            ]
            flag(
                "duplicate_positions",
                f"{len(clusters)} position(s) along the normal are shared by more than one {what[:-1]} "
                f"({sum(len(c) for c in clusters)} {what} involved): " + _more(items, len(clusters)),
            )
        real = steps[~dup]
        if real.size:
            median = float(np.median(real))
            slice_spacing = median
            tol = max(spacing_rtol * median, spacing_atol)
            gaps, uneven = [], []
            for i, step in enumerate(steps):
                if dup[i]:
                    continue
                if step > gap_factor * median:
                    gaps.append(i)
                elif abs(step - median) > tol:
                    uneven.append(i)
            if gaps:
                items = [f"gap of {_mm(steps[i])} between {what} {i + 1} and {i + 2}" for i in gaps]
                flag(
                    "missing_slices",
                    _more(items, len(gaps))
                    + f" (median step {_mm(median)}; a gap is a step > {gap_factor:g} x median)",
                )
            if uneven:
                items = [f"step of {_mm(steps[i])} between {what} {i + 1} and {i + 2}" for i in uneven]
                flag(
                    "nonuniform_spacing",
                    _more(items, len(uneven))
                    + f" differs from the median step {_mm(median)} by more than {_mm(tol)}",
                )
            # gantry tilt: in-plane component of successive position differences
            assert normal is not None
            worst: tuple[float, float, int] | None = None
            n_tilted = 0
            for i, step in enumerate(steps):
                if dup[i]:
                    continue
                d = slices[i + 1].position - slices[i].position  # type: ignore[operator]
                inplane = float(np.linalg.norm(d - (d @ normal) * normal))
                if inplane > max(tilt_rtol * abs(step), tilt_atol):
                    n_tilted += 1
                    if worst is None or inplane / step > worst[0] / worst[1]:
                        worst = (inplane, float(step), i)
            if worst is not None:
                inplane, step, i = worst
                angle = math.degrees(math.atan2(inplane, step))
                flag(
                    "gantry_tilt",
                    f"slice positions shift {_mm(inplane)} in-plane per {_mm(step)} step between {what} "
                    f"{i + 1} and {i + 2} (tilt about {angle:.1f} degrees; {n_tilted} of {int((~dup).sum())} "
                    "steps are off the slice normal)",
                )
    if (sortable and distinct < min_slices) or (not sortable and n < min_slices):
        count = distinct if sortable else n
        flag(
            "too_few_slices",
            f"only {count} distinct slice position{'s' if count != 1 else ''} among {n} {what}; "
            f"a volume needs at least {min_slices}"
            if sortable and distinct != n
            else f"only {count} {_noun(what, count)}; a volume needs at least {min_slices}",
        )

    # ---- the row -------------------------------------------------------------------------------------
    first = slices[0]
    rec = first.record
    files: list[str] = []
    seen: set[str] = set()
    for s in slices:
        if s.path not in seen:
            seen.add(s.path)
            files.append(s.path)
    records = {id(s.record): s.record for s in slices}
    is_multiframe = any(
        (_int(r.get("number_of_frames")) or 1) > 1 or r.get("frame_positions") is not None for r in records.values()
    )
    row: dict[str, Any] = {
        "series_key": series_key(uid, for_uid, split_part),
        "series_instance_uid": uid,
        "frame_of_reference_uid": for_uid,
        "study_instance_uid": rec.get("study_instance_uid"),
        "patient_key": rec.get("patient_key"),
        "modality": rec.get("modality"),
        "study_date": rec.get("study_date"),
        "series_description": rec.get("series_description"),
        "body_part": rec.get("body_part"),
        "is_multiframe": bool(is_multiframe),
        "n_files": len(files),
        "n_slices": n,
        "rows": first.rows,
        "columns": first.columns,
        "pixel_spacing": _floats_out(first.pixel_spacing) if first.pixel_spacing is not None else None,
        "slice_spacing": slice_spacing,
        "origin": _floats_out(first.position) if first.position is not None else None,
        "orientation": _floats_out(ref_ori) if ref_ori is not None else None,
        "slice_normal": _floats_out(normal) if normal is not None else None,
        "files": files,
        "slice_offsets": _floats_out(offsets) if offsets is not None else None,
        "flags": flags,
        "flag_details": details,
        "usable": not flags,
    }
    return {k: row[k] for k in SERIES_FIELDS}


def assemble_series(
    files: Iterable[dict[str, Any]],
    *,
    gap_factor: float = GAP_FACTOR,
    spacing_rtol: float = SPACING_RTOL,
    spacing_atol: float = SPACING_ATOL,
    duplicate_tolerance: float = DUPLICATE_TOLERANCE,
    orientation_tolerance: float = ORIENTATION_TOLERANCE,
    tilt_rtol: float = TILT_RTOL,
    tilt_atol: float = TILT_ATOL,
    pixel_spacing_tolerance: float = PIXEL_SPACING_TOLERANCE,
    min_slices: int = MIN_SLICES,
) -> list[dict[str, Any]]:
    """Assemble image file records into series rows with geometry QC.

    Parameters
    ----------
    files
        File-catalog records (:data:`~imaging_assets.dicom.records.FILE_FIELDS`). Records whose ``kind``
        is not ``'image'`` are ignored. Multi-frame records contribute one slice per entry of
        ``frame_positions``.
    gap_factor
        A step larger than ``gap_factor`` x the median step is a gap (``missing_slices``).
    spacing_rtol, spacing_atol
        A step that differs from the median by more than ``max(spacing_rtol * median, spacing_atol)`` mm
        (and is not a gap) makes the spacing ``nonuniform_spacing``.
    duplicate_tolerance
        Slices closer than this (mm, along the normal) share a position (``duplicate_positions``); also
        used to detect a position occurring in two folders of one series (split by folder).
    orientation_tolerance
        Largest allowed difference of any direction cosine from the first slice's.
    tilt_rtol, tilt_atol
        Largest allowed in-plane offset between successive slices: ``max(tilt_rtol * step, tilt_atol)`` mm.
    pixel_spacing_tolerance
        Largest allowed difference (mm) of PixelSpacing from the first slice's.
    min_slices
        Fewer distinct slice positions than this is ``too_few_slices``.

    Returns
    -------
    list of dict
        One :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row per series (exactly those keys),
        ordered by series_key. See the module docstring for grouping, splitting, ordering and flags.
    """
    groups: dict[tuple[str | None, str | None], list[_Slice]] = defaultdict(list)
    for record in files:
        if record.get("kind") != "image":
            continue
        groups[(record.get("series_instance_uid"), record.get("frame_of_reference_uid"))].extend(_slices_of(record))

    qc = dict(
        gap_factor=gap_factor,
        spacing_rtol=spacing_rtol,
        spacing_atol=spacing_atol,
        duplicate_tolerance=duplicate_tolerance,
        orientation_tolerance=orientation_tolerance,
        tilt_rtol=tilt_rtol,
        tilt_atol=tilt_atol,
        pixel_spacing_tolerance=pixel_spacing_tolerance,
        min_slices=min_slices,
    )
    rows: list[dict[str, Any]] = []
    for (uid, for_uid), slices in groups.items():
        by_folder: dict[str, list[_Slice]] = defaultdict(list)
        for s in slices:
            by_folder[os.path.dirname(s.path)].append(s)
        parts: list[tuple[str, list[_Slice]]] = [("", slices)]
        if len(by_folder) > 1:
            why = _folders_conflict(by_folder, orientation_tolerance, pixel_spacing_tolerance, duplicate_tolerance)
            if why:
                logger.info(
                    "series %s (frame of reference %s) split into %d series by folder: %s",
                    uid,
                    for_uid,
                    len(by_folder),
                    why,
                )
                parts = sorted(by_folder.items())
        for part, part_slices in parts:
            rows.append(_qc_and_row(uid, for_uid, part, list(part_slices), **qc))
    rows.sort(key=lambda r: r["series_key"])
    keys = Counter(r["series_key"] for r in rows)
    dupes = [k for k, v in keys.items() if v > 1]
    if dupes:  # cannot happen unless two groups hash alike; fail loudly rather than corrupt a primary key
        raise RuntimeError(f"series_key collision for {dupes}")
    return rows
