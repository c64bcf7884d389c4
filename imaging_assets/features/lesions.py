"""Lesion masks on the voxel grid of their image series.

:func:`load_lesions` turns one segmentation row (:data:`~imaging_assets.dicom.records.SEGMENTATION_FIELDS`:
a DICOM SEG, an RTSTRUCT, or a NIfTI/NRRD label map) and the series row it is linked to into one
:class:`LesionMask` per segment / ROI / label value (per connected component with
``split_components=True``). Every mask is a ``uint8`` 0/1 ``SimpleITK.Image`` with exactly the series'
grid (the grid :func:`~imaging_assets.features.volumes.load_series_image` returns). Problems never raise:
they become rows with a ``status`` and a ``reason``.

DICOM SEG (decoded with highdicom)
    1. Single-frame series whose instances the SEG references: frames are fetched with
       ``Segmentation.get_pixels_by_source_instance`` for the referenced SOP instance UIDs in slice order
       (multi-frame series: ``get_pixels_by_source_frame`` with the frame numbers in slice order); slices
       the SEG does not cover stay empty.
    2. Otherwise (the SEG references other instances, e.g. a copy of the series, or spatial locations are
       not preserved, or the in-plane size differs): ``Segmentation.get_volume`` builds the SEG's own
       volume from its frame positions, which is resampled by nearest neighbour onto the series grid
       (note ``placed by frame positions``). Voxels that fall outside the grid are counted in a note;
       when all do the status is ``outside_image``.
    BINARY and LABELMAP segments: value > 0. FRACTIONAL: highdicom rescales by MaximumFractionalValue to
    [0, 1]; a voxel is in the mask when its fraction is ``>= fractional_threshold`` (default 0.5, i.e.
    ``value >= 0.5 * MaximumFractionalValue``). Segments may overlap: each is its own mask. A LABELMAP
    background segment (number 0) is never a lesion and is skipped.

RTSTRUCT (rasterised here, with numpy + matplotlib)
    Each contour's points (mm, patient coordinates) are mapped into continuous index space with the
    grid's origin, direction and spacing (``inverse(direction @ diag(spacing)) @ (p - origin)``), so oblique
    and non-axial grids work; integer indices are voxel centres. A contour belongs to the slice nearest to
    the mean of its points' slice index (within half a slice spacing by construction); contours more than
    half a slice beyond the first/last slice are off the grid. A ``CLOSED_PLANAR`` contour marks the voxel
    centres strictly inside its polygon (``matplotlib.path.Path.contains_points``), and contours of one
    slice are combined by XOR (even-odd rule), so inner contours cut holes. ``POINT`` contours mark their
    nearest voxel; ``OPEN_*`` contours enclose nothing and are skipped with a note. A contour whose
    points spread over more than half a slice along the grid normal (not parallel to the slices) is
    still assigned by its mean, with a note. All contours off the grid: ``outside_image``.

NIfTI / NRRD label maps (read with SimpleITK)
    When the mask's grid equals the series grid (same size; spacing within 1e-3 relative; origin within
    1 % of the smallest spacing; direction cosines within 1e-4) the voxels are used as they are (the
    image's geometry is copied to avoid float noise). Otherwise the mask must *belong* to the image
    (:func:`check_mask_geometry`, tolerances :data:`MAX_AXIS_ANGLE_DEG`, :data:`MIN_GRID_OVERLAP`,
    :data:`MAX_OUTSIDE_FRACTION`): grid axes parallel within 1 degree (up to order and sign), the two
    grids sharing at least half of the smaller one's box, and at most half of the mask's non-zero voxels
    outside the image. A mask that belongs (a PET mask on its CT, a finer export of the same contour) is
    resampled with nearest neighbour onto the series grid with the note ``resampled mask from <grid> to
    <grid>`` (and how many voxels fell outside); one that does not (a mask of another scan) gives
    ``error`` rows whose reason names both files and the mismatch, unless ``resample_mask=True``. NIfTI
    and NRRD carry no frame of reference; DICOM SEG / RTSTRUCT files are tied to their series by the
    linker's reference and FrameOfReferenceUID rules
    (:func:`~imaging_assets.dicom.segmentations.link_segmentations`). One lesion per label value in
    ``segment_numbers`` (all non-zero values when the row gives none). A floating-point mask holding
    fractions in (0, 1) is thresholded at ``fractional_threshold``.

Components
    ``split_components=True`` labels each mask with ``SimpleITK.ConnectedComponent`` (full, 26-neighbour
    connectivity) and returns one row per component, ordered by size (descending) then by the first voxel
    in array (slice, row, column) order, numbered 1..n. Off by default: one row per segment with
    ``component = 0``.

Status
    ``ok`` (two voxels or more), ``single_voxel``, ``empty`` (no voxel), ``outside_image`` (the
    segmentation has content but none of it lies on the series grid), ``error`` (the file could not be
    read or decoded, a requested segment is not in the file; ``reason`` names the file). ``mask`` is
    ``None`` for ``error`` and ``outside_image`` rows.

Lesion ids
    :func:`lesion_id` hashes ``"<series uid>|<segmentation identity>|<segment number>|<component>"``.
    The series uid is the row's ``series_instance_uid``; a NIfTI / NRRD series (no UID; its series_key
    hashes the path) uses ``sha1:<hex of the image file's bytes>``, else the ``series_key``. The
    segmentation identity is the SOPInstanceUID for SEG and RTSTRUCT, and ``sha1:<hex of the file's
    bytes>`` for NIfTI / NRRD masks. Ids therefore survive moving or renaming the archive; an unreadable
    mask file falls back to ``file:<basename>``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from imaging_assets.dicom.records import NRRD_SUFFIXES
from imaging_assets.errors import MaskGeometryError, error_text
from imaging_assets.features.volumes import _read_slices, is_volume_file, series_grid

logger = logging.getLogger(__name__)

#: Statuses a :class:`LesionMask` can carry.
LESION_STATUSES: tuple[str, ...] = ("ok", "empty", "single_voxel", "outside_image", "error")

#: Default ROI-name harmonisation: ``(regular expression, canonical name)``, matched case-insensitively
#: against the whole stripped name; the first match wins. GTV / tumour / lesion names with an optional
#: number, ``p`` / ``primary`` / ``mass`` qualifier and modality suffix become ``GTV``.
DEFAULT_ROI_MAPPING: tuple[tuple[str, str], ...] = (
    (
        r"(?:gtv|tumou?r|lesion)"
        r"(?:[\s_\-.]*(?:p|primary|mass|\d+))*"
        r"(?:[\s_\-.]*(?:ct|mri?|pet|pt|t1|t2|mr[\s_\-]*t[12]))?",
        "GTV",
    ),
)

#: Fractional SEG / float mask threshold (fraction of MaximumFractionalValue).
DEFAULT_FRACTIONAL_THRESHOLD = 0.5

#: Largest angle (degrees) between the image's and a NIfTI/NRRD mask's grid axes, matched up to order and
#: sign (so an LPS/RAS flip or a sagittal export of the same grid passes), for the mask to belong to the
#: image: a mask drawn on the image or converted from it agrees to float precision (NIfTI's float32
#: quaternion: < 0.001 degrees), while an oblique series or a registered copy differs by degrees.
MAX_AXIS_ANGLE_DEG = 1.0

#: Least share of the smaller of the two grid boxes that the image and mask grids must have in common: a
#: mask on the image's grid, on the uncropped scan the image was cut from, or on another series of the same
#: session and field of view (STS_001's PET mask on its CT: 98 %) shares nearly all of it, while a grid
#: sharing less than half was made for another field of view (another scan, a shifted export).
MIN_GRID_OVERLAP = 0.5

#: Largest share of the mask's non-zero voxels whose centres may lie outside the image (beyond its outer
#: voxel faces): a lesion cut by the image's border loses a few, while a mask with most of its lesion
#: outside was drawn on another volume, and resampling it would keep an arbitrary fragment.
MAX_OUTSIDE_FRACTION = 0.5


@dataclass
class LesionMask:
    """One lesion (segment, ROI or label value; or one connected component of it) on the series grid.

    Attributes
    ----------
    lesion_id : str
        :func:`lesion_id` of (series, segmentation, segment_number, component).
    series_key, seg_key : str
        Keys of the series and segmentation rows.
    segment_number : int
        SEG segment number, RTSTRUCT ROI number or label value.
    raw_label : str
        SegmentLabel / ROIName / manifest label as stored ("label <n>" for unlabeled masks).
    roi_name : str
        :func:`harmonise_roi_name` of ``raw_label``.
    component : int
        0 for the whole segment; 1..n (largest first) with ``split_components=True``.
    mask : SimpleITK.Image or None
        ``uint8`` 0/1 on the series grid; None for ``error`` and ``outside_image``.
    n_voxels : int
    volume_mm3 : float
        ``n_voxels`` x voxel volume.
    status : str
        One of :data:`LESION_STATUSES`.
    reason : str or None
        Why the status is not ``ok``.
    notes : list of str
        What was done on the way (resampling, placement by frame positions, skipped contours, ...).
    """

    lesion_id: str
    series_key: str
    seg_key: str
    segment_number: int
    raw_label: str
    roi_name: str
    component: int
    mask: sitk.Image | None
    n_voxels: int
    volume_mm3: float
    status: str
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def lesion_id(series_uid: str, seg_identity: str, segment_number: int, component: int) -> str:
    """Stable id of a lesion: ``sha1("<series_uid>|<seg_identity>|<segment_number>|<component>")[:16]``.

    Parameters
    ----------
    series_uid : str
        SeriesInstanceUID of the image series; ``sha1:<content hash>`` of a NIfTI / NRRD image.
    seg_identity : str
        SOPInstanceUID of a SEG / RTSTRUCT; ``sha1:<content hash>`` of a NIfTI / NRRD mask file.
    segment_number : int
        Segment number, ROI number or label value.
    component : int
        0 for the whole segment, 1..n for connected components.

    Returns
    -------
    str
        16 lowercase hex characters; the same inputs give the same id on every run and machine.
    """
    canonical = f"{series_uid or ''}|{seg_identity or ''}|{int(segment_number)}|{int(component)}"
    return hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]


def harmonise_roi_name(raw: str | None, mapping: Sequence[tuple[str, str]] | None = None) -> str:
    """Canonical ROI name for a raw segment label / ROI name.

    Parameters
    ----------
    raw : str
        The name as stored (SegmentLabel, ROIName, manifest label).
    mapping : sequence of (pattern, canonical), optional
        Regular expressions matched case-insensitively against the whole stripped name
        (``re.fullmatch``); the first match gives the canonical name. Defaults to
        :data:`DEFAULT_ROI_MAPPING` (GTV, GTV 1, gtv_1, GTV-2, GTVp, GTV_Mass_CT, Tumor, tumour 2,
        Lesion_3 ... become ``GTV``).

    Returns
    -------
    str
        The canonical name, or the stripped raw name when no pattern matches.
    """
    name = (raw or "").strip()
    for pattern, canonical in mapping if mapping is not None else DEFAULT_ROI_MAPPING:
        if re.fullmatch(pattern, name, flags=re.IGNORECASE):
            return canonical
    return name


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class _Raw:
    """A decoded segment before status/component handling."""

    number: int
    label: str | None
    array: np.ndarray | None  # bool (k, j, i) on the grid; None with status set
    status: str | None = None  # 'error' | 'outside_image' | None (decide from the array)
    reason: str | None = None
    notes: list[str] = field(default_factory=list)


def _grid_text(img: sitk.Image) -> str:
    size = "x".join(str(v) for v in img.GetSize())
    spacing = "x".join(f"{v:.4g}" for v in img.GetSpacing())
    origin = ",".join(f"{v:.2f}" for v in img.GetOrigin())
    direction = ",".join(f"{v:.3g}" for v in img.GetDirection())
    return f"{size} @ {spacing} mm, origin ({origin}), direction ({direction})"


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when two images share size, spacing, origin and direction within the tolerances of the module."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=1e-3, atol=0):
        return False
    if np.max(np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin()))) > 0.01 * float(min(sa.min(), sb.min())):
        return False
    return bool(np.max(np.abs(np.array(a.GetDirection()) - np.array(b.GetDirection()))) <= 1e-4)


def _physical_to_index(grid: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(M, origin)`` with continuous index = ``M @ (p - origin)`` (index order i, j, k)."""
    direction = np.array(grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(grid.GetSpacing(), dtype=np.float64)
    return np.linalg.inv(direction * spacing), np.array(grid.GetOrigin(), dtype=np.float64)


def _index_to_physical(grid: sitk.Image, idx: np.ndarray) -> np.ndarray:
    """Physical points (n, 3) of continuous indices ``idx`` (n, 3; order i, j, k) of ``grid``."""
    direction = np.array(grid.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(grid.GetSpacing(), dtype=np.float64)
    return np.array(grid.GetOrigin(), dtype=np.float64) + idx @ (direction * spacing).T


def _inside(grid: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Which physical points (n, 3) lie inside ``grid``'s box (its outer voxel faces)."""
    m, origin = _physical_to_index(grid)
    idx = (points - origin) @ m.T
    size = np.array(grid.GetSize(), dtype=np.float64)
    return np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)


def _lattice(grid: sitk.Image, n: int = 12) -> np.ndarray:
    """``n`` x ``n`` x ``n`` physical points evenly filling ``grid``'s box (cell centres)."""
    axes = [(np.arange(n) + 0.5) / n * size - 0.5 for size in grid.GetSize()]
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return _index_to_physical(grid, idx)


def axis_angle_deg(a: sitk.Image, b: sitk.Image) -> float:
    """Largest angle (degrees) between an axis of ``a`` and the nearest axis (either sign) of ``b``."""
    da = np.array(a.GetDirection(), dtype=np.float64).reshape(3, 3)
    db = np.array(b.GetDirection(), dtype=np.float64).reshape(3, 3)
    da, db = da / np.linalg.norm(da, axis=0), db / np.linalg.norm(db, axis=0)
    best = np.abs(da.T @ db).max(axis=1)  # |cos| of each axis of a with its closest axis of b
    return float(np.degrees(np.arccos(np.clip(best.min(), -1.0, 1.0))))


def grid_overlap(a: sitk.Image, b: sitk.Image) -> float:
    """Share of the smaller of the two grid boxes that lies inside the other one (0..1).

    Estimated on a 12 x 12 x 12 lattice of points in each box (works for any orientation): the volume in
    common over the smaller volume is the larger of the two shares of points inside the other box.
    """
    return float(max(_inside(a, _lattice(b)).mean(), _inside(b, _lattice(a)).mean()))


def outside_fraction(image_grid: sitk.Image, mask: sitk.Image, labels: np.ndarray | None = None) -> tuple[float, int]:
    """Share of the mask's non-zero voxels whose centres lie outside ``image_grid``, and their count.

    ``labels`` is the mask's voxel array (k, j, i) when the caller has it already; else it is read from
    ``mask``.
    """
    arr = sitk.GetArrayViewFromImage(mask) if labels is None else labels
    kji = np.argwhere(arr != 0)
    if kji.size == 0:
        return 0.0, 0
    inside = _inside(image_grid, _index_to_physical(mask, kji[:, ::-1].astype(np.float64)))
    return float(1.0 - inside.mean()), int(kji.shape[0])


def mask_geometry_problems(image_grid: sitk.Image, mask: sitk.Image, labels: np.ndarray | None = None) -> list[str]:
    """Why a mask's geometry does not belong to the image's (an empty list when it does).

    The three rules, each with its tolerance (module constants, with the reasons): grid axes within
    :data:`MAX_AXIS_ANGLE_DEG` (up to order and sign); the grids share at least :data:`MIN_GRID_OVERLAP`
    of the smaller box; at most :data:`MAX_OUTSIDE_FRACTION` of the mask's non-zero voxels lie outside
    the image. Spacing and size may differ (a PET mask on its CT is resampled, not refused).
    """
    problems = []
    angle = axis_angle_deg(image_grid, mask)
    if angle > MAX_AXIS_ANGLE_DEG:
        problems.append(f"direction differs by {angle:.1f}° (tolerance {MAX_AXIS_ANGLE_DEG:g}°)")
    overlap = grid_overlap(image_grid, mask)
    if overlap < MIN_GRID_OVERLAP:
        problems.append(f"the grids share {overlap:.0%} of the smaller one's extent (at least "
                        f"{MIN_GRID_OVERLAP:.0%} required)")
    outside, n = outside_fraction(image_grid, mask, labels)
    if n and outside > MAX_OUTSIDE_FRACTION:
        problems.append(f"{outside:.0%} of the mask's {n:,} voxels lie outside the image (at most "
                        f"{MAX_OUTSIDE_FRACTION:.0%} allowed)")
    return problems


def check_mask_geometry(image_grid: sitk.Image, mask: sitk.Image, image_name: str, mask_name: str,
                        labels: np.ndarray | None = None) -> None:
    """Raise :class:`~imaging_assets.features.extract.MaskGeometryError` when the mask does not belong to
    the image (:func:`mask_geometry_problems`); nothing when it is on the image's grid or belongs.

    Parameters
    ----------
    image_grid, mask : SimpleITK.Image
        The image (only its grid is used) and the mask as read from its file.
    image_name, mask_name : str
        How to name them in the message (file or folder paths).
    labels : numpy.ndarray, optional
        The mask's voxels (k, j, i) when already read.

    Raises
    ------
    MaskGeometryError
        ``"mask <mask_name> does not belong to image <image_name>: direction differs by 12.3° (tolerance
        1°); ..."``, with how to opt into resampling.
    """
    if same_grid(image_grid, mask):
        return
    problems = mask_geometry_problems(image_grid, mask, labels)
    if problems:
        raise MaskGeometryError(
            f"mask {mask_name} does not belong to image {image_name}: {'; '.join(problems)} "
            "(resample it onto the image grid anyway with resample_mask=True)"
        )


def series_name(series: dict[str, Any]) -> str:
    """How a series is named in messages: its volume file, or the folder of its DICOM files."""
    files = [str(f) for f in (series.get("files") or [])]
    if not files:
        return f"series {series.get('series_key')!r}"
    if is_volume_file(files[0]):
        return files[0]
    folders = {os.path.dirname(f) for f in files}
    return folders.pop() if len(folders) == 1 else f"{files[0]} (+{len(files) - 1} files)"


def check_volume_mask(segmentation: dict[str, Any], series: dict[str, Any], image_name: str | None = None) -> None:
    """:func:`check_mask_geometry` for a NIfTI / NRRD segmentation row and its series, from the files.

    Reads the series' grid (headers only) and the mask file. DICOM SEG / RTSTRUCT rows are not checked
    here: :func:`~imaging_assets.dicom.segmentations.link_segmentations` links them by their references
    and frame of reference, and refuses a different FrameOfReferenceUID unless all their points lie
    inside the series.

    Raises
    ------
    MaskGeometryError
        The mask does not belong to the image.
    ValueError
        The mask or the series cannot be read (the message names the file).
    """
    if _infer_kind(segmentation) not in ("nifti", "nrrd"):
        return
    path = str(segmentation.get("path") or "")
    try:
        mask = sitk.ReadImage(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a mask volume ({error_text(exc)})") from exc
    if mask.GetDimension() == 4 and mask.GetSize()[3] == 1:
        mask = mask[:, :, :, 0]
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        return  # load_lesions reports what is wrong with it
    check_mask_geometry(series_grid(series), mask, image_name or series_name(series), path)


def _file_sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _seg_identity(segmentation: dict[str, Any], kind: str) -> str:
    path = str(segmentation.get("path") or "")
    if kind in ("seg", "rtstruct"):
        uid = segmentation.get("sop_instance_uid")
        if uid:
            return str(uid)
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            if ds.get("SOPInstanceUID"):
                return str(ds.SOPInstanceUID)
        except Exception:  # unreadable: fall through to the file name
            pass
    else:
        try:
            return "sha1:" + _file_sha1(path)
        except OSError:
            pass
    return "file:" + os.path.basename(path)


def _series_identity(series: dict[str, Any]) -> str:
    uid = series.get("series_instance_uid")
    if uid:
        return str(uid)
    files = [str(f) for f in (series.get("files") or [])]
    if files and is_volume_file(files[0]):
        try:
            return "sha1:" + _file_sha1(files[0])
        except OSError:
            pass
    return str(series.get("series_key") or "")


def _infer_kind(segmentation: dict[str, Any]) -> str:
    kind = (segmentation.get("kind") or "").lower()
    if kind:
        return kind
    path = str(segmentation.get("path") or "").lower()
    if path.endswith(NRRD_SUFFIXES):
        return "nrrd"
    if is_volume_file(path):
        return "nifti"
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        return {"SEG": "seg", "RTSTRUCT": "rtstruct"}.get(str(ds.get("Modality", "")), "unknown")
    except Exception:
        return "unknown"


def _requested(segmentation: dict[str, Any]) -> tuple[list[int] | None, dict[int, str]]:
    numbers = segmentation.get("segment_numbers")
    labels = segmentation.get("segment_labels") or []
    if numbers is None or len(numbers) == 0:
        return None, {}
    nums = [int(n) for n in numbers]
    return nums, {n: str(labels[i]) for i, n in enumerate(nums) if i < len(labels) and labels[i] is not None}


# ------------------------------------------------------------------------------------------ DICOM SEG


def _seg_raw(
    path: str, numbers: list[int] | None, grid: sitk.Image, series: dict[str, Any], threshold: float
) -> list[_Raw]:
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a DICOM SEG ({error_text(exc)})") from exc
    seg_type = str(seg.SegmentationType)
    available = [int(n) for n in seg.get_segment_numbers()]
    labels = {n: str(seg.get_segment_description(n).segment_label) for n in available}
    if numbers is None:
        numbers = available
    out: list[_Raw] = []
    wanted: list[int] = []
    for n in numbers:
        if n == 0 and seg_type == "LABELMAP":
            logger.debug("%s: skipping LABELMAP background segment 0", path)
            continue
        if n not in available:
            out.append(_Raw(n, None, None, "error", f"{path}: segment {n} is not in the SEG (it has {available})"))
        else:
            wanted.append(n)
    if not wanted:
        return out
    fractional = seg_type == "FRACTIONAL"
    dtype = np.float32 if fractional else np.uint8
    nk, nj, ni = grid.GetSize()[2], grid.GetSize()[1], grid.GetSize()[0]

    def binarise(a: np.ndarray) -> np.ndarray:
        return a >= threshold if fractional else a > 0

    arrays: dict[int, np.ndarray] | None = None
    # 1. By the referenced source instances / frames of the series, in slice order.
    planes: list[tuple[str | None, int]] = []
    files = [str(f) for f in (series.get("files") or [])]
    if files and not is_volume_file(files[0]):
        try:
            planes = [(s.sop_instance_uid, s.frame + 1 if s.n_frames > 1 else 0) for s in _read_slices(series, False)]
        except ValueError as exc:
            logger.info("cannot read the series' instance UIDs (%s); placing %s by frame positions", exc, path)
    refs = {str(uid) for (_, _, uid) in seg.get_source_image_uids()}
    why = "the SEG references none of this series' instances"
    if planes and len(planes) != nk:
        why = f"the series has {len(planes)} slices but the grid {nk}"
    if len(planes) == nk and any(uid in refs for uid, _ in planes):
        try:
            multi = {uid for uid, f in planes if f > 0}
            if multi:
                if len(multi) != 1:
                    raise ValueError("series frames span several multi-frame files")
                uid = next(iter(multi))
                got = seg.get_pixels_by_source_frame(
                    source_sop_instance_uid=uid,
                    source_frame_numbers=[f for _, f in planes],
                    segment_numbers=wanted,
                    rescale_fractional=True,
                    dtype=dtype,
                )
                idx = list(range(nk))
            else:
                idx = [k for k, (uid, _) in enumerate(planes) if uid in refs]
                got = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=[planes[k][0] for k in idx],
                    segment_numbers=wanted,
                    rescale_fractional=True,
                    dtype=dtype,
                )
            if got.shape[1:3] != (nj, ni):
                raise ValueError(f"SEG frames are {got.shape[1]}x{got.shape[2]}, series slices {nj}x{ni}")
            arrays = {}
            for c, n in enumerate(wanted):
                full = np.zeros((nk, nj, ni), dtype=bool)
                full[idx] = binarise(got[..., c])
                arrays[n] = full
        except Exception as exc:  # fall back on geometry
            logger.info("%s: source-instance lookup failed (%s); placing frames by position", path, exc)
            text = str(exc)
            if "spatial locations are preserved" in text:
                why = "the SEG does not state that spatial locations are preserved"
            elif "source frames" in text:
                why = "the SEG does not reference source frames"
            else:
                why = f"source-instance lookup failed: {error_text(exc, 120)}"
            arrays = None
    if arrays is not None:
        return out + [_Raw(n, labels.get(n), arrays[n]) for n in wanted]

    # 2. By frame positions: the SEG's own volume resampled (nearest neighbour) onto the grid.
    try:
        vol = seg.get_volume(segment_numbers=wanted, combine_segments=False, rescale_fractional=True, dtype=dtype)
    except Exception as exc:
        raise ValueError(
            f"{path}: SEG frames neither reference this series' instances nor form a regular volume "
            f"({error_text(exc)})"
        ) from exc
    for n in wanted:
        try:
            chan = vol.get_channel(ReferencedSegmentNumber=n) if vol.channel_shape else vol
        except ValueError:
            chan = vol
        src = binarise(np.asarray(chan.array)).astype(np.uint8)
        if src.ndim == 4:
            src = src[..., 0]
        src_img = chan.with_array(src).to_simpleitk()
        moved = sitk.Resample(src_img, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        arr = sitk.GetArrayFromImage(moved).astype(bool)
        n_src, n_dst = int(src.sum()), int(arr.sum())
        raw = _Raw(n, labels.get(n), arr, notes=[f"placed by frame positions ({why})"])
        _outside_note(raw, n_src, n_dst, "SEG")
        out.append(raw)
    return out


def _outside_note(raw: _Raw, n_src: int, n_dst: int, what: str) -> None:
    """Mark a segment whose content fell off the grid in resampling (all: outside_image; some: a note)."""
    if n_src > 0 and n_dst == 0:
        raw.status = "outside_image"
        raw.reason = f"all {n_src} {what} voxels lie outside the series grid"
        raw.array = None
    elif n_src > n_dst:
        raw.notes.append(f"{n_src - n_dst} of {n_src} {what} voxels did not land on the series grid")


# ------------------------------------------------------------------------------------------ RTSTRUCT


def rasterise_contours(
    contours: Sequence[tuple[np.ndarray, str]], grid: sitk.Image
) -> tuple[np.ndarray, dict[str, int]]:
    """Rasterise planar contours (patient coordinates, mm) onto a voxel grid with the even-odd rule.

    Parameters
    ----------
    contours : sequence of (numpy.ndarray, str)
        ``(points (n, 3) in mm, ContourGeometricType)`` pairs.
    grid : SimpleITK.Image
        The target grid (only its geometry is used).

    Returns
    -------
    mask : numpy.ndarray
        ``bool`` array ``(slices, rows, columns)``.
    counts : dict
        ``used``, ``outside`` (off the grid), ``skipped_open``, ``skipped_degenerate``, ``tilted`` (points
        spread over more than half a slice along the normal).
    """
    from matplotlib.path import Path

    ni, nj, nk = grid.GetSize()
    m, origin = _physical_to_index(grid)
    mask = np.zeros((nk, nj, ni), dtype=bool)
    counts = {"used": 0, "outside": 0, "skipped_open": 0, "skipped_degenerate": 0, "tilted": 0}
    for pts, ctype in contours:
        ctype = (ctype or "CLOSED_PLANAR").upper()
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        if ctype.startswith("OPEN"):
            counts["skipped_open"] += 1
            continue
        if len(pts) == 0:
            counts["skipped_degenerate"] += 1
            continue
        idx = (pts - origin) @ m.T
        kc = float(idx[:, 2].mean())
        k = int(np.floor(kc + 0.5))
        if np.ptp(idx[:, 2]) > 0.5:
            counts["tilted"] += 1
        if ctype == "POINT" or len(pts) < 3:
            if ctype != "POINT":
                counts["skipped_degenerate"] += 1
                continue
            ii = np.floor(idx + 0.5).astype(int)
            inside = (ii[:, 0] >= 0) & (ii[:, 0] < ni) & (ii[:, 1] >= 0) & (ii[:, 1] < nj) & (ii[:, 2] >= 0) & (ii[:, 2] < nk)
            if not inside.any():
                counts["outside"] += 1
                continue
            counts["used"] += 1
            mask[ii[inside, 2], ii[inside, 1], ii[inside, 0]] = True
            continue
        if k < 0 or k >= nk:
            counts["outside"] += 1
            continue
        poly = idx[:, :2]
        i0, i1 = max(int(np.ceil(poly[:, 0].min())), 0), min(int(np.floor(poly[:, 0].max())), ni - 1)
        j0, j1 = max(int(np.ceil(poly[:, 1].min())), 0), min(int(np.floor(poly[:, 1].max())), nj - 1)
        if poly[:, 0].max() < -0.5 or poly[:, 0].min() > ni - 0.5 or poly[:, 1].max() < -0.5 or poly[:, 1].min() > nj - 0.5:
            counts["outside"] += 1
            continue
        counts["used"] += 1
        if i1 < i0 or j1 < j0:
            continue  # encloses no voxel centre
        jj, ii = np.mgrid[j0 : j1 + 1, i0 : i1 + 1]
        path = Path(np.vstack([poly, poly[:1]]), closed=True)
        inside = path.contains_points(np.column_stack([ii.ravel(), jj.ravel()]).astype(np.float64))
        mask[k, j0 : j1 + 1, i0 : i1 + 1] ^= inside.reshape(jj.shape)
    return mask, counts


def _rtstruct_raw(path: str, numbers: list[int] | None, grid: sitk.Image) -> list[_Raw]:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as DICOM ({error_text(exc)})") from exc
    if "ROIContourSequence" not in ds and "StructureSetROISequence" not in ds:
        raise ValueError(f"{path}: not an RTSTRUCT (no ROIContourSequence / StructureSetROISequence)")
    names = {int(r.ROINumber): str(r.get("ROIName", "") or "") for r in ds.get("StructureSetROISequence", [])}
    contours: dict[int, list[tuple[np.ndarray, str]]] = {}
    for rc in ds.get("ROIContourSequence", []):
        n = int(rc.ReferencedROINumber)
        items = contours.setdefault(n, [])
        for c in rc.get("ContourSequence", []) or []:
            data = c.get("ContourData")
            if data is None:
                continue
            items.append((np.asarray([float(v) for v in data], dtype=np.float64), str(c.get("ContourGeometricType", ""))))
    if numbers is None:
        numbers = sorted(set(names) | set(contours))
    out: list[_Raw] = []
    for n in numbers:
        if n not in names and n not in contours:
            out.append(_Raw(n, None, None, "error", f"{path}: ROI number {n} is not in the RTSTRUCT"))
            continue
        label = names.get(n)
        items = contours.get(n, [])
        if not items:
            out.append(_Raw(n, label, np.zeros(grid.GetSize()[::-1], dtype=bool), None, "the ROI has no contours"))
            continue
        arr, counts = rasterise_contours(items, grid)
        raw = _Raw(n, label, arr)
        total = len(items)
        if counts["used"] == 0 and counts["outside"] > 0:
            raw.status, raw.array = "outside_image", None
            raw.reason = f"all {counts['outside']} contours of ROI {n} lie outside the series grid"
        else:
            if counts["outside"]:
                raw.notes.append(f"{counts['outside']} of {total} contours lie outside the series grid")
            if not arr.any() and counts["used"]:
                raw.reason = f"the {counts['used']} contours on the grid enclose no voxel centre"
        if counts["skipped_open"]:
            raw.notes.append(f"{counts['skipped_open']} open contours skipped (they enclose no area)")
        if counts["skipped_degenerate"]:
            raw.notes.append(f"{counts['skipped_degenerate']} contours with fewer than 3 points skipped")
        if counts["tilted"]:
            raw.notes.append(
                f"{counts['tilted']} contours are not parallel to the slices (spread > half a slice); "
                "each was assigned to the slice nearest its mean"
            )
        out.append(raw)
    return out


# ------------------------------------------------------------------------------------------ NIfTI/NRRD


def _volume_raw(path: str, numbers: list[int] | None, grid: sitk.Image, threshold: float,
                image_name: str = "", resample_mask: bool = False) -> list[_Raw]:
    try:
        img = sitk.ReadImage(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as a mask volume ({error_text(exc)})") from exc
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; a mask has one")
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise ValueError(f"{path}: a {img.GetDimension()}-D image with size {img.GetSize()}; a mask is 3-D")
    src = sitk.GetArrayFromImage(img)
    notes: list[str] = []
    if np.issubdtype(src.dtype, np.floating):
        frac = (src > 0) & (src < 1)
        if frac.any() and np.nanmax(src) <= 1:
            src = (src >= threshold).astype(np.uint8)
            notes.append(f"fractional mask thresholded at {threshold}")
        else:
            src = np.rint(np.nan_to_num(src)).astype(np.int64)
    if numbers is None:
        found = [int(v) for v in np.unique(src) if v != 0]
        numbers = found or [1]
    if same_grid(img, grid):
        on_grid = src
    else:
        if not resample_mask:
            check_mask_geometry(grid, img, image_name or "the series image", path, labels=src)
        tmp = sitk.GetImageFromArray(src.astype(np.int32))
        tmp.CopyInformation(img)
        moved = sitk.Resample(tmp, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        on_grid = sitk.GetArrayFromImage(moved)
        notes.append(f"resampled mask from {_grid_text(img)} to {_grid_text(grid)}")
        outside, n = outside_fraction(grid, img, src)
        if 0 < outside < 1:
            notes.append(f"{outside:.1%} of the mask's {n:,} voxels lie outside the series grid")
    out: list[_Raw] = []
    for n in numbers:
        arr = on_grid == n
        raw = _Raw(n, None, arr, notes=list(notes))
        n_src = int(np.count_nonzero(src == n))
        if n_src == 0:
            raw.reason = f"{os.path.basename(path)} has no voxel with label {n}"
        else:
            n_dst = int(arr.sum())
            if n_dst == 0:
                raw.status, raw.array = "outside_image", None
                raw.reason = f"all {n_src} voxels of label {n} lie outside the series grid"
        out.append(raw)
    return out


# ------------------------------------------------------------------------------------------ assembly


def _finish(
    raw: _Raw,
    grid: sitk.Image,
    split: bool,
    make_id: Callable[[int, int], str],
    base: dict[str, Any],
) -> list[LesionMask]:
    voxel = float(np.prod(grid.GetSpacing()))

    def row(component: int, arr: np.ndarray | None, status: str, reason: str | None, notes: list[str]) -> LesionMask:
        mask = None
        n = 0
        if arr is not None:
            n = int(np.count_nonzero(arr))
            mask = sitk.GetImageFromArray(arr.astype(np.uint8))
            mask.CopyInformation(grid)
        return LesionMask(
            lesion_id=make_id(raw.number, component),
            segment_number=raw.number,
            component=component,
            mask=mask,
            n_voxels=n,
            volume_mm3=n * voxel,
            status=status,
            reason=reason,
            notes=notes,
            **base,
        )

    if raw.status is not None or raw.array is None:
        return [row(0, None, raw.status or "error", raw.reason, list(raw.notes))]
    arr = raw.array
    n = int(np.count_nonzero(arr))
    if n == 0:
        return [row(0, arr, "empty", raw.reason or "the segment has no voxel on the series grid", list(raw.notes))]
    if not split:
        return [row(0, arr, "single_voxel" if n == 1 else "ok", None if n > 1 else "the mask is one voxel", list(raw.notes))]
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(img, True)).ravel()
    flat = np.flatnonzero(labels)  # ascending: the first entry of each component is its first voxel
    values = labels[flat]
    order = np.argsort(values, kind="stable")
    uniq, starts, counts = np.unique(values[order], return_index=True, return_counts=True)
    members = {int(v): flat[order[s : s + c]] for v, s, c in zip(uniq, starts, counts)}
    comps = sorted(members.items(), key=lambda kv: (-len(kv[1]), int(kv[1][0])))
    out = []
    n_comp = len(comps)
    note = f"split into {n_comp} connected component{'s' if n_comp != 1 else ''} (26-connectivity)"
    for rank, (_value, where) in enumerate(comps, start=1):
        comp = np.zeros(arr.size, dtype=bool)
        comp[where] = True
        single = len(where) == 1
        out.append(
            row(
                rank,
                comp.reshape(arr.shape),
                "single_voxel" if single else "ok",
                "the component is one voxel" if single else None,
                [*raw.notes, note],
            )
        )
    return out


def load_lesions(
    segmentation: dict[str, Any],
    series: dict[str, Any],
    image: sitk.Image | None = None,
    split_components: bool = False,
    fractional_threshold: float = DEFAULT_FRACTIONAL_THRESHOLD,
    roi_mapping: Sequence[tuple[str, str]] | None = None,
    resample_mask: bool = False,
) -> list[LesionMask]:
    """Decode a segmentation into lesion masks on its series' voxel grid.

    Parameters
    ----------
    segmentation : dict
        A :data:`~imaging_assets.dicom.records.SEGMENTATION_FIELDS` row; uses ``path``, ``kind``,
        ``seg_key``, ``sop_instance_uid``, ``segment_numbers`` and ``segment_labels`` (all segments / ROIs /
        non-zero labels of the file when ``segment_numbers`` is empty).
    series : dict
        The linked :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row.
    image : SimpleITK.Image, optional
        The series image (from :func:`~imaging_assets.features.volumes.load_series_image`); only its grid
        is used. Without it the grid is read from the series headers (no pixel decoding).
    split_components : bool
        One row per 26-connected component (numbered 1..n by size) instead of one per segment.
    fractional_threshold : float
        FRACTIONAL SEG / fractional mask threshold as a fraction of the maximum value.
    roi_mapping : sequence of (pattern, canonical), optional
        Passed to :func:`harmonise_roi_name`.
    resample_mask : bool
        NIfTI / NRRD masks on another grid than the series': resample them even when their geometry does
        not belong to the image (:func:`check_mask_geometry`). False (default): such a mask gives
        ``error`` rows whose reason names both files and the mismatch.

    Returns
    -------
    list of LesionMask
        One per requested segment (per component when splitting), in the order of ``segment_numbers``.
        Never raises for bad inputs: see the module docstring for the statuses.
    """
    path = str(segmentation.get("path") or "")
    kind = _infer_kind(segmentation)
    numbers, row_labels = _requested(segmentation)
    series_uid = _series_identity(series)
    identity = _seg_identity(segmentation, kind)

    def make_id(number: int, component: int) -> str:
        return lesion_id(series_uid, identity, number, component)

    def base(label: str | None) -> dict[str, Any]:
        raw_label = label if label is not None else ""
        return {
            "series_key": str(series.get("series_key") or ""),
            "seg_key": str(segmentation.get("seg_key") or ""),
            "raw_label": raw_label,
            "roi_name": harmonise_roi_name(raw_label, roi_mapping),
        }

    def errors(message: str) -> list[LesionMask]:
        logger.warning("%s", message)
        nums = numbers if numbers else [0]
        return [
            LesionMask(
                lesion_id=make_id(n, 0),
                segment_number=n,
                component=0,
                mask=None,
                n_voxels=0,
                volume_mm3=0.0,
                status="error",
                reason=message,
                notes=[],
                **base(row_labels.get(n)),
            )
            for n in nums
        ]

    try:
        grid = image if image is not None else series_grid(series)
    except Exception as exc:
        return errors(f"series {series.get('series_key')!r}: cannot read its grid: {error_text(exc)}")
    if grid.GetDimension() != 3:
        return errors(f"series {series.get('series_key')!r}: image is {grid.GetDimension()}-D, expected 3-D")
    try:
        if not path or not os.path.isfile(path):
            raise ValueError(f"{path or '<no path>'}: segmentation file not found")
        if kind == "seg":
            raws = _seg_raw(path, numbers, grid, series, fractional_threshold)
        elif kind == "rtstruct":
            raws = _rtstruct_raw(path, numbers, grid)
        elif kind in ("nifti", "nrrd"):
            raws = _volume_raw(path, numbers, grid, fractional_threshold, series_name(series), resample_mask)
        else:
            raise ValueError(f"{path}: unknown segmentation kind {kind!r}")
    except Exception as exc:
        msg = str(exc)
        if path and path not in msg:
            msg = f"{path}: {error_text(exc)}"  # a library's message: its quoted values are not kept
        return errors(msg)
    out: list[LesionMask] = []
    for raw in raws:
        label = row_labels.get(raw.number, raw.label)
        if label is None and kind in ("nifti", "nrrd"):
            label = f"label {raw.number}"
        try:
            out.extend(_finish(raw, grid, split_components, make_id, base(label)))
        except Exception as exc:  # defensive: a bug in one segment must not lose the others
            logger.exception("finishing segment %s of %s failed", raw.number, path)
            out.append(
                LesionMask(
                    lesion_id=make_id(raw.number, 0),
                    segment_number=raw.number,
                    component=0,
                    mask=None,
                    n_voxels=0,
                    volume_mm3=0.0,
                    status="error",
                    reason=f"{path}: segment {raw.number}: {error_text(exc)}",
                    notes=list(raw.notes),
                    **base(label),
                )
            )
    return out
