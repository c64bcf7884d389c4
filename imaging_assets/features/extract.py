"""Fast per-lesion pyradiomics extraction that returns the stock values.

Stock ``RadiomicsFeatureExtractor.execute(image, mask)`` filters the *whole* image (LoG, wavelet) even
when the lesion is a few millimetres wide. :func:`extract_lesion` crops image and mask to the lesion's
bounding box plus the margin the enabled filters need, runs the same pyradiomics code on the crop, and
returns the same numbers (max relative difference < 1e-4 on the pyradiomics reference cases; see
``tests/features/test_extract.py`` and ``benchmarks/extraction.py``) as stock pyradiomics on the float32
image every extraction starts from (see "One pixel type for every source").

The crop rule (why the values do not change)
--------------------------------------------
With ``b`` the bounding box of ``mask == label`` in index space and ``m`` the per-axis margin of
:func:`imaging_assets.features.params.crop_margin_voxels`, the crop is ``[b_lo - m, b_hi + m]`` clamped to
the image, taken with SimpleITK ``RegionOfInterest`` (physical origin, spacing and direction kept), and:

* ``normalize``: applied to the **whole** image first (``imageoperations.normalizeImage``, the very call
  pyradiomics makes, it uses whole-image mean and SD), then cropped; pyradiomics runs with it off.
* resampling (``interpolator`` + ``resampledPixelSpacing``): pyradiomics anchors the new grid at the whole
  image's corner and sizes it from the whole mask's bounding box plus ``padDistance``. The crop is
  resampled by ``imageoperations.resampleImage(cropped_image, whole_mask)``, which derives that same grid
  from the whole mask and reads intensities only from the crop; the margin covers the padded box plus
  the interpolator's support (B-spline prefilter included). pyradiomics then runs on the resampled box
  with resampling off: exactly the arrays stock pyradiomics filters.
* filters on the whole image (no resampling, no preCrop): the margin covers 12 LoG sigmas (the Deriche
  IIR filter's boundary effect is then below float32 rounding) and the wavelet's reach; where the
  wavelet reach crosses the image border the whole axis is kept, because the stationary wavelet
  transform wraps around (periodic) and stock values there read the opposite side of the image.
  The LoG at a true image border sees the same border in the crop.
* image types that depend on whole-image statistics (Square, SquareRoot, Logarithm, Exponential, LBP3D)
  and image/mask pairs whose geometry differs are extracted from the whole image (logged).

Shape features use the unpadded bounding box and are identical; the only differences left are the IIR
filters' tails (and the B-spline prefilter's), far below the features' precision.

One pixel type for every source
-------------------------------
pyradiomics resamples and filters an image *in its stored pixel type*: a DICOM CT (``int16`` after the
rescale) is B-spline interpolated into ``int16`` (every value cut to a whole HU), its NIfTI copy
(``float32``) is not, and identical voxels gave features differing by up to 107x their value (362 of
1,106 by more than 1 %; STS_001 CT, CT preset). So every image enters extraction through
:func:`extraction_image`, the first step of :func:`extract_lesion_detailed` (hence of every loader,
batch, perturbation and the CLI), which gives it

* **float32 voxels**: the rescaled values (``stored x RescaleSlope + RescaleIntercept`` for DICOM, the
  stored values for NIfTI / NRRD / MHA) cast to ``float32``. Exact for every integer image up to 2^24
  (all CT, MR and 16-bit PET data), and the type NIfTI / NRRD radiomics images are usually stored in;
  ``float64`` volumes are rounded to float32 (relative 6e-8, far below any scanner's precision).
* **float32 geometry**: origin, spacing and direction rounded to float32, the precision a NIfTI header
  holds (DICOM's decimal strings and NRRD's text carry more). A NIfTI conversion moves the origin by up to
  1e-5 mm, which alone changed unstable features (ClusterShade) by 7.5 % through the resampling grid; with
  the rounding the DICOM series and its NIfTI copy are the same image to the last bit.

The mask keeps its pixel type (labels) and gets the same geometry rounding, so an image and a mask that
shared a grid still do. Content hashes (:func:`content_hash`) are of this float32 region, so the DICOM and
NIfTI copies of a scan have the same ``image_hash``. :func:`stock_extract` hands stock pyradiomics the same
:func:`extraction_image`, so the equality with stock values holds for like inputs (pass
``as_extracted=False`` for pyradiomics on the stored type). DICOM rescale slopes and intercepts are taken at
float32 precision as well (:mod:`imaging_assets.features.volumes`).

The features of each image type are computed in one fused pass (:mod:`imaging_assets.features.fastclasses`):
pyradiomics' own C texture matrices, every feature of a class from shared sums with the angles as an axis,
one discretisation per image type; values equal pyradiomics' classes to 1e-10 relative (measured: below
1e-11). Only the crop is cast to float32 (:func:`extraction_crop`), not the whole image.

Batches
-------
:func:`extract_many` runs :class:`ExtractionJob` s in a process pool sized to the machine. A job carries a
picklable *loader* (e.g. :class:`FileLesionLoader`) so images are read inside the worker: nothing
cohort-sized travels between processes or sits in memory, and at most ``2 * workers`` jobs are in
flight. A lesion that fails (empty mask, one voxel, unreadable file, even a worker crash) becomes an
:class:`ExtractionOutcome` with an error message; the others go on.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import hashlib
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from imaging_assets.errors import LesionError
from imaging_assets.features.params import (
    crop_margin_voxels,
    params_hash,
    resampling_enabled,
    resolve_params,
    wavelet_reach_voxels,
)

logger = logging.getLogger(__name__)

ParamsLike = Mapping[str, Any] | str | Path | None
LesionLoader = Callable[[], tuple[sitk.Image, sitk.Image, int]]

_INTEGER_PIXEL_IDS = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}


#: The pixel type of every image handed to pyradiomics (see "One pixel type for every source").
EXTRACTION_PIXEL_TYPE = sitk.sitkFloat32


def _float32(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(tuple(values), dtype=np.float64).astype(np.float32))


def float32_geometry(image: sitk.Image, copy: bool = True) -> sitk.Image:
    """``image`` with origin, spacing and direction rounded to float32 precision (the NIfTI header's).

    With ``copy=True`` (default) the input is never modified: it is returned as is when its geometry is
    float32-exact already (a NIfTI image, most NRRDs), else a copy with the rounded geometry. ``copy=False``
    rounds ``image`` in place (for an image the caller has just made).
    """
    geometry = (image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    rounded = tuple(_float32(g) for g in geometry)
    if rounded == geometry:
        return image
    out = sitk.Image(image) if copy else image
    out.SetOrigin(rounded[0])
    out.SetSpacing(rounded[1])
    out.SetDirection(rounded[2])
    return out


def extraction_image(image: sitk.Image) -> sitk.Image:
    """The image as every extraction sees it: float32 voxels and float32 geometry, whatever its source.

    Parameters
    ----------
    image : SimpleITK.Image
        A scalar image of any pixel type: a DICOM series (``int16`` or ``float32`` rescaled values), a
        NIfTI / NRRD / MHA file as read (``int16``, ``uint16``, ``float32``, ``float64``, ...).

    Returns
    -------
    SimpleITK.Image
        :data:`EXTRACTION_PIXEL_TYPE` (``float32``) with the values cast, origin / spacing / direction
        rounded by :func:`float32_geometry`. The input is not modified; a float32 image with float32
        geometry is returned as is. Vector images are returned unchanged (pyradiomics rejects them).

    Notes
    -----
    pyradiomics resamples and filters in the input's pixel type, so without this step an ``int16`` DICOM
    series and its ``float32`` NIfTI copy give different features (see the module docstring).
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        return image
    if image.GetPixelID() != EXTRACTION_PIXEL_TYPE:
        return float32_geometry(sitk.Cast(image, EXTRACTION_PIXEL_TYPE), copy=False)
    return float32_geometry(image)


def extraction_crop(image: sitk.Image, size: Iterable[int], index: Iterable[int], cast: bool = True) -> sitk.Image:
    """``RegionOfInterest(extraction_image(image), size, index)``, casting and copying only the region.

    The same voxels and the same geometry to the last bit: the origin is the rounded image's
    ``TransformIndexToPhysicalPoint(index)``, the very computation ``RegionOfInterest`` makes. On a
    512x512x48 CT the whole-image cast was 40 ms of a 250 ms lesion. ``cast=False`` keeps the pixel type
    (``RegionOfInterest(float32_geometry(mask), ...)`` for a mask, without copying the whole mask).
    """
    size, index = [int(v) for v in size], [int(v) for v in index]
    if image.GetNumberOfComponentsPerPixel() != 1:
        whole = extraction_image(image) if cast else float32_geometry(image)
        return sitk.RegionOfInterest(whole, size, index)
    crop = sitk.RegionOfInterest(image, size, index)
    if cast and crop.GetPixelID() != EXTRACTION_PIXEL_TYPE:
        crop = sitk.Cast(crop, EXTRACTION_PIXEL_TYPE)
    origin, spacing, direction = (_float32(g) for g in (image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
    grid = sitk.Image([1] * image.GetDimension(), sitk.sitkUInt8)
    grid.SetOrigin(origin)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction)
    crop.SetOrigin(grid.TransformIndexToPhysicalPoint(index))
    crop.SetSpacing(spacing)
    crop.SetDirection(direction)
    return crop


def pyradiomics_version() -> str:
    """Version string of the installed pyradiomics."""
    import radiomics

    return str(radiomics.__version__)


def _quiet_pyradiomics() -> None:
    """pyradiomics logs every step at INFO: keep WARNING and above."""
    logging.getLogger("radiomics").setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------- helpers
_EXTRACTORS: dict[str, Any] = {}


def _extractor(params: Mapping[str, Any], phash: str) -> Any:
    """A :class:`~imaging_assets.features.fastclasses.FastFeatureExtractor` for ``params``.

    Cached per params hash; never mutated by callers.
    """
    ex = _EXTRACTORS.get(phash)
    if ex is None:
        from imaging_assets.features.fastclasses import FastFeatureExtractor

        ex = FastFeatureExtractor(copy.deepcopy(dict(params)))
        # pyradiomics' diagnostics (hashes and statistics of the crop) cost ~3 % and nothing reads them:
        # provenance is content_hash() of the region, the params hash and the versions.
        ex.settings["additionalInfo"] = False
        if len(_EXTRACTORS) >= 16:
            _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
        _EXTRACTORS[phash] = ex
    return ex


def _execute(extractor: Any, image: sitk.Image, mask: sitk.Image, label: int) -> Mapping[str, Any]:
    """``extractor.execute`` without numpy's RuntimeWarnings (empty means on uniform images: NaN features)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return extractor.execute(image, mask, label=int(label))


def _features(result: Mapping[str, Any]) -> dict[str, float]:
    """pyradiomics' ordered result -> features as float (``diagnostics_*`` entries dropped)."""
    return {key: float(value) for key, value in result.items() if not key.startswith("diagnostics_")}


def _label_map(mask: sitk.Image, settings: Mapping[str, Any]) -> sitk.Image:
    """The mask as pyradiomics selects voxels from it: one channel of a vector mask; floats cast to UInt32."""
    if "vector" in mask.GetPixelIDTypeAsString().lower():
        channel = int(settings.get("label_channel", 0))
        if channel >= mask.GetNumberOfComponentsPerPixel():
            raise LesionError(
                f"label_channel {channel} requested but the mask has {mask.GetNumberOfComponentsPerPixel()} channels"
            )
        mask = sitk.VectorIndexSelectionCast(mask, channel)
    if mask.GetPixelID() not in _INTEGER_PIXEL_IDS:
        # pyradiomics casts to UInt32 (truncating floats); integer masks select the same voxels uncast
        mask = sitk.Cast(mask, sitk.sitkUInt32)
    return mask


def _same_geometry(image: sitk.Image, mask: sitk.Image, tolerance: float) -> bool:
    """Same size and, after the float32 rounding both get (:func:`float32_geometry`), the same grid."""
    if image.GetSize() != mask.GetSize() or image.GetDimension() != mask.GetDimension():
        return False
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        if not np.allclose(_float32(get(image)), _float32(get(mask)), rtol=0.0, atol=tolerance):
            return False
    return True


def lesion_bbox(mask: sitk.Image, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bounding box of ``mask == label`` in index space (SimpleITK x, y, z order) and its voxel count.

    Raises
    ------
    LesionError
        When the mask is empty or the label is absent (the message lists the labels present).
    """
    arr = sitk.GetArrayViewFromImage(mask)
    sel = arr == label
    # the first axis on the whole array, the others only on the slab the lesion occupies
    first = np.flatnonzero(sel.reshape(sel.shape[0], -1).any(axis=1))
    if first.size == 0:
        present = np.unique(arr)
        present = present[present != 0]
        if present.size == 0:
            raise LesionError(f"the mask is empty (no non-zero voxel): nothing to extract for label {label}")
        raise LesionError(f"label {label} is not present in the mask (labels present: {present.tolist()})")
    slab = sel[first[0]:first[-1] + 1]
    count = int(np.count_nonzero(slab))
    lo, hi = [int(first[0])], [int(first[-1])]
    for axis in range(1, sel.ndim):  # numpy axes are z, y, x
        other = tuple(a for a in range(sel.ndim) if a != axis)
        idx = np.flatnonzero(slab.any(axis=other))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return np.array(lo[::-1]), np.array(hi[::-1]), count


def _crop_region(
    lo: np.ndarray, hi: np.ndarray, margin: tuple[int, ...], size: tuple[int, ...], wavelet_reach: int
) -> tuple[list[int], list[int]]:
    """(index, size) of the crop: bbox +- margin, clamped; whole axis where the wavelet would wrap."""
    index, extent = [], []
    for lo_i, hi_i, m, n in zip(lo.tolist(), hi.tolist(), margin, size, strict=True):
        if wavelet_reach and (lo_i - wavelet_reach < 0 or hi_i + wavelet_reach > n - 1):
            a, b = 0, n - 1  # periodic transform: stock values here read the other side of the image
        else:
            a, b = max(0, lo_i - m), min(n - 1, hi_i + m)
        index.append(a)
        extent.append(b - a + 1)
    return index, extent


def content_hash(image: sitk.Image) -> str:
    """SHA-1 of an image's voxel bytes, pixel type, size, spacing, origin and direction."""
    h = hashlib.sha1()
    arr = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    h.update(arr.tobytes())
    meta = (
        image.GetPixelIDTypeAsString(), image.GetSize(),
        tuple(round(v, 6) for v in image.GetSpacing()),
        tuple(round(v, 6) for v in image.GetOrigin()),
        tuple(round(v, 8) for v in image.GetDirection()),
    )
    h.update(repr(meta).encode("ascii"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ one lesion
@dataclass(frozen=True)
class LesionExtraction:
    """Everything :func:`extract_lesion_detailed` learned about one lesion.

    Attributes
    ----------
    features : dict of str to float
        pyradiomics features keyed by pyradiomics' names (``original_firstorder_Mean``, ...).
    params_hash : str
        :func:`~imaging_assets.features.params.params_hash` of the parameters used.
    image_hash, mask_hash : str
        :func:`content_hash` of the image and mask region handed to pyradiomics (the float32
        :func:`extraction_image`, before normalisation).
    crop_index, crop_size : tuple of int
        The region (SimpleITK x, y, z order); the whole image when not cropped.
    cropped : bool
        False when the whole image was used (``crop=False``, uncroppable filters, geometry mismatch).
    """

    features: dict[str, float]
    params_hash: str
    image_hash: str
    mask_hash: str
    crop_index: tuple[int, ...]
    crop_size: tuple[int, ...]
    cropped: bool


def extract_lesion_detailed(
    image: sitk.Image,
    mask: sitk.Image,
    label: int = 1,
    params: ParamsLike = None,
    crop: bool = True,
) -> LesionExtraction:
    """:func:`extract_lesion` with the params hash, content hashes and the crop region.

    Parameters and exceptions as for :func:`extract_lesion`.
    """
    _quiet_pyradiomics()
    from radiomics import imageoperations

    p = resolve_params(params)
    phash = params_hash(p)
    base = _extractor(p, phash)
    settings = dict(base.settings)
    settings["label"] = int(label)

    # One pixel type and one geometry precision for every source (module docstring); the image is cast
    # whole only when it is extracted whole or normalised, else only the crop (extraction_crop).
    # The mask likewise: its float32 geometry is set on the crop, and on the whole mask (a copy) only where
    # the whole mask is read as an image (no crop, resampling).
    source = image
    mask = _label_map(mask, settings)
    lo, hi, count = lesion_bbox(mask, label)
    if count == 1:
        raise LesionError(
            f"label {label} marks a single voxel (index {lo.tolist()}): pyradiomics needs at least 2 voxels "
            "spanning the minimum number of dimensions"
        )
    size = tuple(image.GetSize())
    if count == math.prod(mask.GetSize()):
        raise LesionError(
            f"label {label} covers every voxel of the mask: pyradiomics needs background voxels around a lesion"
        )
    margin = crop_margin_voxels(p, _float32(source.GetSpacing())) if crop else None
    tolerance = settings.get("geometryTolerance") or 1e-6
    if margin is not None and not _same_geometry(source, mask, tolerance):
        logger.warning("image and mask geometries differ: extracting from the whole image (no crop)")
        margin = None
    if margin is None:
        image, mask = extraction_image(source), float32_geometry(mask)
        if crop:
            logger.info("enabled filters need the whole image: extracting without crop")
        features = _features(_execute(base, image, mask, label))
        return LesionExtraction(features, phash, content_hash(image), content_hash(mask), (0,) * len(size), size,
                                False)

    index, extent = _crop_region(lo, hi, margin, size, wavelet_reach_voxels(p))
    whole = tuple(extent) == size
    run_settings = dict(settings)
    if whole or run_settings.get("normalize", False):
        image = extraction_image(source)
        image_c = image if whole else sitk.RegionOfInterest(image, extent, index)
    else:
        image_c = extraction_crop(source, extent, index)
    if whole or resampling_enabled(run_settings):
        mask = float32_geometry(mask)
        mask_c = mask if whole else sitk.RegionOfInterest(mask, extent, index)
    else:
        mask_c = extraction_crop(mask, extent, index, cast=False)
    image_hash, mask_hash = content_hash(image_c), content_hash(mask_c)

    if run_settings.get("normalize", False):
        normalized = imageoperations.normalizeImage(image, **run_settings)  # whole-image mean / SD
        image_c = normalized if whole else sitk.RegionOfInterest(normalized, extent, index)
        run_settings["normalize"] = False
    if resampling_enabled(run_settings):
        # Same grid as stock (derived from the whole mask), intensities read from the crop.
        image_c, mask_c = imageoperations.resampleImage(image_c, mask, **run_settings)
        run_settings["resampledPixelSpacing"] = None
    runner = copy.copy(base)
    runner.settings = run_settings
    features = _features(_execute(runner, image_c, mask_c, label))
    return LesionExtraction(features, phash, image_hash, mask_hash, tuple(index), tuple(extent), not whole)


def extract_lesion(
    image: sitk.Image,
    mask: sitk.Image,
    label: int = 1,
    params: ParamsLike = None,
    crop: bool = True,
) -> dict[str, float]:
    """pyradiomics features of one lesion, from its neighbourhood only.

    Parameters
    ----------
    image : SimpleITK.Image
        The whole image, any scalar pixel type: it is extracted as :func:`extraction_image` makes it
        (float32 voxels and geometry), so every source of the same scan gives the same features.
    mask : SimpleITK.Image
        Label map on the image's grid (any integer type; a vector image selects ``label_channel``).
    label : int
        Label value of the lesion in ``mask``.
    params : dict, str, pathlib.Path or None
        pyradiomics parameters: a dict, a YAML path, a preset name (``"ct"``, ``"mr"``, ``"pet"``) or
        ``None`` for ``data/params/default.yaml``.
    crop : bool
        Crop to the bounding box plus the filters' margin first (see the module docstring for why this
        gives the stock values). ``False`` runs pyradiomics on the whole image (with the
        :mod:`~imaging_assets.features.fastclasses` fused pass, as the crop does).

    Returns
    -------
    dict of str to float
        Features keyed by pyradiomics' own names (``original_shape_Elongation``,
        ``log-sigma-1-0-mm-3D_glcm_Idm``, ``wavelet-LLH_firstorder_Mean``, ...); no ``diagnostics_*`` entries
        (provenance: :func:`extract_lesion_detailed`).

    Raises
    ------
    LesionError
        The label is absent, the mask is empty, the lesion is a single voxel or covers the whole mask.
    ValueError
        pyradiomics rejected the ROI (e.g. fewer dimensions than ``minimumROIDimensions``) or the params.
    """
    return extract_lesion_detailed(image, mask, label=label, params=params, crop=crop).features


def stock_extract(image: sitk.Image, mask: sitk.Image, label: int = 1, params: ParamsLike = None,
                  as_extracted: bool = True) -> dict[str, float]:
    """Stock ``RadiomicsFeatureExtractor(params).execute(image, mask, label)`` on the whole image.

    The reference for tests and benchmarks; ``diagnostics_*`` dropped, values as float.

    Parameters
    ----------
    as_extracted : bool
        True (default): stock pyradiomics gets the image and mask as :func:`extract_lesion` hands them to
        pyradiomics (:func:`extraction_image`: float32 voxels, float32 geometry), so a comparison holds
        like inputs. False: the image exactly as given (pyradiomics then resamples in its stored type).
    """
    _quiet_pyradiomics()
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    if as_extracted:
        image, mask = extraction_image(image), float32_geometry(mask)
    extractor = RadiomicsFeatureExtractor(resolve_params(params))
    return _features(_execute(extractor, image, mask, label))


def max_relative_difference(
    reference: Mapping[str, float], other: Mapping[str, float], abs_floor: float = 1e-6
) -> tuple[float, str | None]:
    """Largest ``|a - b| / max(|a|, abs_floor * scale)`` over the keys of ``reference``.

    ``scale`` is the largest ``|value|`` of features of the same image type and feature class (e.g. all
    ``wavelet-LLH_glcm_*``), so a feature that should be 0 but comes out as 1e-12 is not a failure, while a
    feature missing from ``other`` or NaN in only one of them counts as ``inf``.

    Returns
    -------
    (float, str or None)
        The difference and the feature it occurred at.
    """
    scale: dict[str, float] = {}
    for key, value in reference.items():
        group = key.rsplit("_", 1)[0]
        if math.isfinite(value):
            scale[group] = max(scale.get(group, 0.0), abs(value))
    worst, where = 0.0, None
    for key, a in reference.items():
        b = other.get(key)
        if b is None:
            return math.inf, key
        if math.isnan(a) and math.isnan(b):
            continue
        if math.isnan(a) != math.isnan(b):
            return math.inf, key
        denom = max(abs(a), abs_floor * max(scale.get(key.rsplit("_", 1)[0], 0.0), 1.0))
        d = abs(a - b) / denom if denom > 0 else (0.0 if a == b else math.inf)
        if d > worst:
            worst, where = d, key
    return worst, where


# ----------------------------------------------------------------------------------------------- batches
def _read_image(path: str) -> sitk.Image:
    p = Path(path)
    if p.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(p))
        if len(series) != 1:
            raise ValueError(f"{p}: expected one DICOM series in the folder, found {len(series)}")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), series[0]))
        return reader.Execute()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file")
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"{p}: SimpleITK could not read it: {str(exc).strip().splitlines()[-1]}") from exc


@dataclass(frozen=True)
class FileLesionLoader:
    """Loads an image and a label map from files (NRRD, NIfTI, MHA, ... or a folder of one DICOM series).

    Picklable, so it travels to a worker process instead of the pixels.
    """

    image_path: str
    mask_path: str
    label: int = 1

    def __call__(self) -> tuple[sitk.Image, sitk.Image, int]:
        return _read_image(self.image_path), _read_image(self.mask_path), int(self.label)


@dataclass(frozen=True)
class ExtractionJob:
    """One lesion to extract.

    Attributes
    ----------
    lesion_id : str
        Caller's identifier, echoed in the outcome.
    loader : callable
        Picklable zero-argument callable returning ``(image, mask, label)``; called inside the worker
        (e.g. :class:`FileLesionLoader`, or a dataclass of the caller's own that reads a DICOM series).
    params : dict, str, pathlib.Path or None
        As for :func:`extract_lesion`.
    crop : bool
        As for :func:`extract_lesion`.
    """

    lesion_id: str
    loader: LesionLoader
    params: ParamsLike = None
    crop: bool = True


@dataclass(frozen=True)
class ExtractionOutcome:
    """Result of one :class:`ExtractionJob`: features, or the error that prevented them.

    Attributes
    ----------
    lesion_id : str
    features : dict of str to float or None
        None on failure.
    error : str or None
        ``"<ExceptionType>: <message>"`` on failure.
    elapsed_s : float
        Wall time of load + extraction in the worker.
    pyradiomics_version : str
    params_hash : str or None
        None only when the parameters themselves could not be read.
    image_hash, mask_hash : str or None
        Content hashes of the (cropped) arrays handed to pyradiomics, see :func:`content_hash`.
    crop_index, crop_size : tuple of int or None
        The region used (SimpleITK x, y, z order).
    """

    lesion_id: str
    features: dict[str, float] | None
    error: str | None
    elapsed_s: float
    pyradiomics_version: str
    params_hash: str | None
    image_hash: str | None = None
    mask_hash: str | None = None
    crop_index: tuple[int, ...] | None = None
    crop_size: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when features were extracted."""
        return self.error is None


def run_job(job: ExtractionJob) -> ExtractionOutcome:
    """Run one job in this process; every exception becomes an outcome with its message."""
    t0 = time.perf_counter()
    version = pyradiomics_version()
    phash: str | None = None
    try:
        params = resolve_params(job.params)
        phash = params_hash(params)
        image, mask, label = job.loader()
        res = extract_lesion_detailed(image, mask, label=label, params=params, crop=job.crop)
        return ExtractionOutcome(
            job.lesion_id, res.features, None, time.perf_counter() - t0, version, res.params_hash,
            res.image_hash, res.mask_hash, res.crop_index, res.crop_size,
        )
    except Exception as exc:  # noqa: BLE001 - one lesion's failure must not stop the batch
        msg = f"{type(exc).__name__}: {str(exc).strip()}"
        logger.warning("lesion %s failed: %s", job.lesion_id, msg)
        return ExtractionOutcome(job.lesion_id, None, msg, time.perf_counter() - t0, version, phash)


def _init_worker(itk_threads: int) -> None:
    _quiet_pyradiomics()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, itk_threads))


def default_workers() -> int:
    """Worker processes for this machine: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn: workers never inherit the parent's threads (ITK's pool, Dagster's) or its memory.
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(max(1, default_workers() // workers),),
    )


#: Isolated re-runs that may crash in a row before the remaining lesions are given up.
MAX_CRASHES_IN_A_ROW = 3


def _crashed(job: ExtractionJob, abandoned: bool = False) -> ExtractionOutcome:
    msg = ("WorkerCrashed: the worker process died while extracting this lesion (crash in native code or out "
           "of memory)")
    if abandoned:
        msg = (f"WorkerCrashed: not attempted, {MAX_CRASHES_IN_A_ROW} worker processes in a row died (workers "
               "cannot start, or the lesions exhaust memory)")
    return ExtractionOutcome(job.lesion_id, None, msg, 0.0, pyradiomics_version(), None)


def _run_isolated(job: ExtractionJob) -> ExtractionOutcome:
    """Re-run a job that was in flight when a worker died, alone in a fresh process."""
    with _pool(1) as pool:
        try:
            return pool.submit(run_job, job).result()
        except BrokenProcessPool:
            return _crashed(job)


def extract_many(
    jobs: Iterable[ExtractionJob],
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    itk_threads: int | None = None,
) -> Iterator[ExtractionOutcome]:
    """Extract many lesions in a process pool; yield outcomes as they complete.

    Parameters
    ----------
    jobs : iterable of ExtractionJob
        Small descriptions (ids, loaders, params); images are loaded inside the workers.
    workers : int, optional
        Worker processes; default :func:`default_workers` (the machine's CPUs). ``1`` runs in this
        process, in order.
    progress : callable, optional
        Called as ``progress(done, total)`` after each outcome.
    itk_threads : int, optional
        With ``workers=1``: SimpleITK's threads for this process (default: SimpleITK's own, all cores).
        A process that is one of many on the machine (a Celery worker per core) wants 1: several processes
        with a thread per core each oversubscribe the cores (measured: 1.6x slower per lesion on 2 cores).

    Yields
    ------
    ExtractionOutcome
        One per job, in completion order. A failing lesion yields an outcome with ``error`` set; a worker
        that dies (segfault, out of memory) is replaced, the lesions it may have held are re-run one by
        one in fresh processes and only the culprit is reported as failed.

    Notes
    -----
    At most ``2 * workers`` jobs are submitted at a time, so memory stays bounded by the lesions being
    extracted, whatever the cohort size. Workers are started with ``spawn`` (they never inherit the
    caller's threads or memory; a script calling this needs the ``if __name__ == "__main__":`` guard) and
    use ``cpu_count // workers`` ITK threads each. Worker start-up (~0.5 s: imports) is paid once per call.
    If :data:`MAX_CRASHES_IN_A_ROW` isolated re-runs die in a row, the remaining jobs are reported as not
    attempted instead of spawning a process for each.
    """
    todo = deque(jobs)
    total = len(todo)
    n = default_workers() if workers is None else int(workers)
    n = max(1, min(n, total or 1))
    done = 0

    def tick() -> None:
        if progress is not None:
            progress(done, total)

    if n == 1:
        _quiet_pyradiomics()
        if itk_threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(itk_threads))
        while todo:
            outcome = run_job(todo.popleft())
            done += 1
            tick()
            yield outcome
        return

    pool = _pool(n)
    crashes_in_a_row = 0
    in_flight: dict[cf.Future[ExtractionOutcome], ExtractionJob] = {}
    try:
        while todo or in_flight:
            while todo and len(in_flight) < 2 * n:
                job = todo.popleft()
                try:
                    in_flight[pool.submit(run_job, job)] = job
                except BrokenProcessPool:  # a worker died while idle: the futures in flight will tell
                    todo.appendleft(job)
                    if not in_flight:
                        pool.shutdown(wait=True, cancel_futures=True)
                        crashes_in_a_row += 1
                        if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                            break
                        pool = _pool(n)
                        continue
                    break
            if not in_flight:  # only when the pool could not be restarted
                while todo:
                    outcome = _crashed(todo.popleft(), abandoned=True)
                    done += 1
                    tick()
                    yield outcome
                break
            finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in finished:
                job = in_flight[fut]
                try:
                    outcome = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable loader
                    outcome = ExtractionOutcome(job.lesion_id, None, f"{type(exc).__name__}: {exc}", 0.0,
                                                pyradiomics_version(), None)
                del in_flight[fut]
                done += 1
                tick()
                yield outcome
            if broken:
                suspects = list(in_flight.values())
                in_flight.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                logger.warning("a worker died: re-running %d lesion(s) one at a time", len(suspects))
                for job in suspects:
                    if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                        outcome = _crashed(job, abandoned=True)
                    else:
                        outcome = _run_isolated(job)
                        crashes_in_a_row = crashes_in_a_row + 1 if outcome.error == _crashed(job).error else 0
                    done += 1
                    tick()
                    yield outcome
                if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                    # workers cannot even start (or every lesion kills them): do not spawn one per job
                    while todo:
                        outcome = _crashed(todo.popleft(), abandoned=True)
                        done += 1
                        tick()
                        yield outcome
                    break
                pool = _pool(n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
