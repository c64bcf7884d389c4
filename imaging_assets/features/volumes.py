"""Image volumes in patient space from series rows.

:func:`load_series_image` turns one :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row into a 3-D
``SimpleITK.Image`` whose origin, direction and spacing come from the DICOM headers, so that physical
points (mm, DICOM patient coordinates, LPS) map to voxels exactly as the scanner meant.
:func:`series_grid` gives the same geometry without decoding any pixel data (a zero ``uint8`` image), for
code that only needs the voxel grid (rasterising contours, placing SEG frames).

Conventions
    * Index ``(i, j, k)``: ``i`` runs along a row (the first three ImageOrientationPatient cosines,
      spacing ``PixelSpacing[1]``), ``j`` down a column (the last three cosines, spacing
      ``PixelSpacing[0]``), ``k`` through the slices. The direction matrix has these three unit vectors as
      its columns; the third is the slice normal (row x column cosines), negated when the row lists its
      slices in descending order along the normal.
    * Single-frame series: slices in the row's ``files`` order (series assembly sorts them ascending
      along the normal); the origin is the first file's ImagePositionPatient; the slice spacing is the
      median absolute step along the normal (``slice_spacing`` of the row, then SpacingBetweenSlices,
      SliceThickness, 1 mm for a single slice).
    * Multi-frame series (enhanced / legacy converted enhanced images): every frame of every file,
      positioned by its per-frame (or shared) Plane Position / Plane Orientation / Pixel Measures
      functional groups, sorted ascending along the normal (ties by file order, then frame number).
    * Pixel values: stored values x RescaleSlope + RescaleIntercept (per slice or per frame; Pixel Value
      Transformation functional group for enhanced objects). The result is ``int16`` when every slope and
      intercept is an integer and the values fit, else ``float32``. Slope and intercept are taken at
      float32 precision (the precision of a NIfTI header's ``scl_slope`` / ``scl_inter`` and of a float32
      volume), multiplied in float64 and rounded once to float32: a PET series and its NIfTI conversion
      then hold bit-identical voxels (full-precision slopes differed from it in 1 ulp on a quarter of
      STS_001's PET voxels). Extraction casts every image to float32 anyway
      (:func:`imaging_assets.features.extract.extraction_image`).
    * NIfTI / NRRD / MHA series rows (``files[0]`` is a volume file): read as is with
      ``SimpleITK.ReadImage``.

Compressed transfer syntaxes are decoded by pydicom with the pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000,
RLE). Errors raise ``ValueError`` naming the file and what was wrong with it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from imaging_assets.dicom.records import VOLUME_SUFFIXES

logger = logging.getLogger(__name__)



def is_volume_file(path: str) -> bool:
    """True when ``path`` names a NIfTI / NRRD / MetaImage volume (by its ending, case-insensitive)."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


@dataclass
class _Slice:
    """One image plane: where it is and (optionally) its pixels."""

    path: str
    frame: int  # 0-based frame index within its file (0 for single-frame files)
    sop_instance_uid: str | None
    position: np.ndarray  # (3,)
    orientation: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing
    slope: float
    intercept: float
    rows: int
    columns: int
    thickness: float | None
    n_frames: int = 1
    pixels: np.ndarray | None = None


def _float_list(value: Any, n: int, what: str, path: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{path}: {what} is missing")
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{path}: {what} has {arr.size} values, expected {n} finite numbers")
    return arr


def _opt_float(value: Any, default: float | None) -> float | None:
    try:
        if value is None or value == "":
            return default
        out = float(value)
        return out if np.isfinite(out) else default
    except (TypeError, ValueError):
        return default


def _item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _functional(ds: Any, frame: int, macro: str) -> Any:
    """The first item of functional-group ``macro`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        found = _item(per_frame[frame], macro)
        if found is not None:
            return found
    return _item(_item(ds, "SharedFunctionalGroupsSequence"), macro)


def _check_monochrome(ds: Any, path: str) -> None:
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise ValueError(
            f"{path}: {spp} samples per pixel ({ds.get('PhotometricInterpretation')}); "
            "only single-channel (monochrome) images make a volume"
        )


def _frames_of(ds: Any, path: str, with_pixels: bool) -> list[_Slice]:
    """The planes of one dataset: one for a single-frame image, one per frame for a multi-frame one."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.Rows), int(ds.Columns)
    sop = str(ds.get("SOPInstanceUID", "")) or None
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    pixels = None
    if with_pixels:
        _check_monochrome(ds, path)
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # decoder missing, truncated pixel data, ...
            raise ValueError(f"{path}: pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
        pixels = np.asarray(pixels)
        if n_frames == 1 and pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.shape != (n_frames, rows, columns):
            raise ValueError(f"{path}: decoded pixels have shape {pixels.shape}, expected {(n_frames, rows, columns)}")
    out: list[_Slice] = []
    for f in range(n_frames):
        if enhanced:
            pos = getattr(_functional(ds, f, "PlanePositionSequence"), "ImagePositionPatient", None)
            ori = getattr(_functional(ds, f, "PlaneOrientationSequence"), "ImageOrientationPatient", None)
            measures = _functional(ds, f, "PixelMeasuresSequence")
            spacing = getattr(measures, "PixelSpacing", None)
            thickness = _opt_float(getattr(measures, "SliceThickness", None), None)
            transform = _functional(ds, f, "PixelValueTransformationSequence")
            slope = _opt_float(getattr(transform, "RescaleSlope", None), None)
            intercept = _opt_float(getattr(transform, "RescaleIntercept", None), None)
            # Some legacy objects keep the classic top-level attributes as well.
            pos = pos if pos is not None else ds.get("ImagePositionPatient")
            ori = ori if ori is not None else ds.get("ImageOrientationPatient")
            spacing = spacing if spacing is not None else ds.get("PixelSpacing")
            slope = slope if slope is not None else _opt_float(ds.get("RescaleSlope"), 1.0)
            intercept = intercept if intercept is not None else _opt_float(ds.get("RescaleIntercept"), 0.0)
            thickness = thickness if thickness is not None else _opt_float(ds.get("SliceThickness"), None)
        else:
            pos = ds.get("ImagePositionPatient")
            ori = ds.get("ImageOrientationPatient")
            spacing = ds.get("PixelSpacing")
            slope = _opt_float(ds.get("RescaleSlope"), 1.0)
            intercept = _opt_float(ds.get("RescaleIntercept"), 0.0)
            thickness = _opt_float(ds.get("SliceThickness"), None)
        where = f"{path}" + (f" frame {f + 1}" if n_frames > 1 else "")
        out.append(
            _Slice(
                path=path,
                frame=f,
                sop_instance_uid=sop,
                position=_float_list(pos, 3, "ImagePositionPatient", where),
                orientation=_float_list(ori, 6, "ImageOrientationPatient", where),
                pixel_spacing=_float_list(spacing, 2, "PixelSpacing", where),
                slope=float(slope if slope is not None else 1.0),
                intercept=float(intercept if intercept is not None else 0.0),
                rows=rows,
                columns=columns,
                thickness=thickness,
                n_frames=n_frames,
                pixels=None if pixels is None else pixels[f],
            )
        )
    return out


def _read_slices(series: dict[str, Any], with_pixels: bool) -> list[_Slice]:
    import pydicom

    files = [str(f) for f in (series.get("files") or [])]
    if not files:
        raise ValueError(f"series {series.get('series_key')!r} lists no files")
    slices: list[_Slice] = []
    multiframe = bool(series.get("is_multiframe"))
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not with_pixels)
        except Exception as exc:
            raise ValueError(f"{path}: cannot be read as DICOM ({type(exc).__name__}: {exc})") from exc
        if "Rows" not in ds or "Columns" not in ds:
            raise ValueError(f"{path}: not an image (no Rows/Columns)")
        frames = _frames_of(ds, path, with_pixels)
        multiframe = multiframe or len(frames) > 1
        slices.extend(frames)
    if multiframe:
        normal = _normal(slices[0].orientation)
        order = sorted(range(len(slices)), key=lambda n: (float(slices[n].position @ normal), n))
        slices = [slices[n] for n in order]
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise ValueError(
                f"{s.path}: {s.rows}x{s.columns} pixels, but {first.path} has {first.rows}x{first.columns}; "
                "slices of different sizes do not make a volume"
            )
    return slices


def _normal(orientation: np.ndarray) -> np.ndarray:
    r = orientation[:3] / np.linalg.norm(orientation[:3])
    c = orientation[3:] / np.linalg.norm(orientation[3:])
    n = np.cross(r, c)
    return n / np.linalg.norm(n)


def _geometry(
    slices: Sequence[_Slice], series: dict[str, Any]
) -> tuple[tuple[float, float, float], tuple[float, ...], tuple[float, float, float]]:
    """origin, direction (row-major 3x3, flattened) and spacing of the stacked slices."""
    first = slices[0]
    r = first.orientation[:3] / np.linalg.norm(first.orientation[:3])
    c = first.orientation[3:] / np.linalg.norm(first.orientation[3:])
    n = _normal(first.orientation)
    offsets = np.array([float(s.position @ n) for s in slices])
    sign = 1.0
    dz = None
    if len(slices) > 1:
        steps = np.diff(offsets)
        nonzero = np.abs(steps)[np.abs(steps) > 1e-6]
        if nonzero.size:
            dz = float(np.median(nonzero))
        if offsets[-1] < offsets[0]:
            sign = -1.0
    if dz is None:
        dz = _opt_float(series.get("slice_spacing"), None)
    if dz is None or dz <= 0:
        dz = first.thickness if first.thickness and first.thickness > 0 else 1.0
    direction = np.column_stack([r, c, sign * n])
    spacing = (float(first.pixel_spacing[1]), float(first.pixel_spacing[0]), float(dz))
    return tuple(float(v) for v in first.position), tuple(float(v) for v in direction.ravel()), spacing


def _apply(img: sitk.Image, origin, direction, spacing) -> sitk.Image:
    img.SetOrigin(origin)
    img.SetDirection(direction)
    img.SetSpacing(spacing)
    return img


def load_series_image(series: dict[str, Any]) -> sitk.Image:
    """Load a series row as a 3-D image in patient space.

    Parameters
    ----------
    series : dict
        A :data:`~imaging_assets.dicom.records.SERIES_FIELDS` row; only ``files`` (in slice order),
        ``is_multiframe`` and, as a fallback for the slice spacing of one-slice series, ``slice_spacing``
        are used. ``files[0]`` ending in ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or
        ``.mhd`` is read with ``SimpleITK.ReadImage``.

    Returns
    -------
    SimpleITK.Image
        ``int16`` or ``float32`` (see the module docstring) with origin, direction and spacing from the
        headers. NIfTI/NRRD volumes keep their stored pixel type.

    Raises
    ------
    ValueError
        A file is unreadable, not an image, lacks geometry, cannot be decoded, is not monochrome, or the
        slices disagree on their size; the message names the file.
    """
    files = [str(f) for f in (series.get("files") or [])]
    if files and is_volume_file(files[0]):
        try:
            return sitk.ReadImage(files[0])
        except Exception as exc:
            raise ValueError(f"{files[0]}: cannot be read as an image volume ({exc})") from exc
    slices = _read_slices(series, with_pixels=True)
    origin, direction, spacing = _geometry(slices, series)
    slopes = [s.slope for s in slices]
    intercepts = [s.intercept for s in slices]
    integral = all(float(v).is_integer() for v in (*slopes, *intercepts))
    vol = np.empty((len(slices), slices[0].rows, slices[0].columns), dtype=np.float32)
    for k, s in enumerate(slices):
        assert s.pixels is not None
        if s.slope == 1.0 and s.intercept == 0.0:
            vol[k] = s.pixels
        else:  # float32 slope / intercept (module docstring), one rounding to float32
            vol[k] = s.pixels.astype(np.float64) * float(np.float32(s.slope)) + float(np.float32(s.intercept))
    if integral and vol.size and vol.min() >= -32768 and vol.max() <= 32767:
        vol = vol.astype(np.int16)
    img = sitk.GetImageFromArray(vol)
    return _apply(img, origin, direction, spacing)


def series_grid(series: dict[str, Any]) -> sitk.Image:
    """The voxel grid :func:`load_series_image` would return, without decoding pixels.

    Parameters
    ----------
    series : dict
        A series row (see :func:`load_series_image`).

    Returns
    -------
    SimpleITK.Image
        A ``uint8`` image of zeros with the series' size, origin, direction and spacing.
    """
    files = [str(f) for f in (series.get("files") or [])]
    if files and is_volume_file(files[0]):
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except Exception as exc:
            raise ValueError(f"{files[0]}: cannot be read as an image volume ({exc})") from exc
        size = reader.GetSize()
        if len(size) != 3:
            raise ValueError(f"{files[0]}: a {len(size)}-D image, expected 3-D")
        img = sitk.Image(size, sitk.sitkUInt8)
        return _apply(img, reader.GetOrigin(), reader.GetDirection(), reader.GetSpacing())
    slices = _read_slices(series, with_pixels=False)
    origin, direction, spacing = _geometry(slices, series)
    img = sitk.Image((slices[0].columns, slices[0].rows, len(slices)), sitk.sitkUInt8)
    return _apply(img, origin, direction, spacing)


def series_sop_instance_uids(series: dict[str, Any]) -> list[tuple[str | None, int]]:
    """``(SOPInstanceUID, frame number)`` of each slice of a DICOM series, in slice order.

    Frame numbers are 1-based for multi-frame files and 0 for single-frame files.
    """
    slices = _read_slices(series, with_pixels=False)
    return [(s.sop_instance_uid, s.frame + 1 if s.n_frames > 1 else 0) for s in slices]
