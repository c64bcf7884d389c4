"""Image and mask perturbations for the reproducibility analysis (issue 5).

A radiomics feature that changes when the image is re-noised or the contour moves by a voxel is noise.
Following Zwanenburg et al. 2019 (*Sci Rep* 9:614, "Assessing robustness of radiomic features by image
perturbation"), every lesion is extracted ``n_perturbations`` times, each time from a perturbed copy of
its image and mask, through the very code path of ``radiomics_features`` (:class:`PerturbedLoader` wraps
the lesion's own loader inside an :class:`~imaging_assets.features.extract.ExtractionJob`). The ICC over
lesions x perturbations (:mod:`imaging_assets.features.icc`) then says which features survive.

The perturbation chain (applied in this order by :func:`perturb`)
-----------------------------------------------------------------
1. **Rotation + translation** (one rigid transform, image and mask together, the grid kept). Rotation by
   ``theta`` degrees in-plane, i.e. about the slice normal (the third column of the image direction)
   through the lesion centroid; in-plane only because slices are often much thicker than pixels are
   wide. Translation by ``(tx, ty, tz)`` voxels along the image axes. The image is resampled with linear
   interpolation (points that fall outside the image take the nearest edge value); the mask is carried
   along as its signed distance map (below), resampled linearly and thresholded, so its boundary moves
   with sub-voxel accuracy instead of the blockiness of nearest-neighbour resampling.
2. **Additive noise**: i.i.d. Gaussian noise with the image's own noise SD (:func:`estimate_noise_sd`,
   estimated on the unperturbed image) is added after the resampling, so the added noise really has
   that SD (interpolation would smooth it).
3. **Volume adaptation** (growth or shrinkage by a relative volume change ``u``): the mask becomes the
   ``round(N0 * (1 + u))`` voxels with the smallest signed distance ``d`` (``N0`` the original voxel
   count), i.e. the signed distance map thresholded at the level that gives the target volume. Growth
   adds the nearest outside voxels first (a partial Euclidean dilation), shrinkage peels the voxels
   nearest the boundary (a partial erosion); ties in ``d`` are broken towards voxels with more lesion
   around them (a Gaussian-smoothed mask, weight 1e-3 voxel), so the achieved voxel count equals the
   target (up to exact ties).
4. **Contour randomisation** (a lighter stand-in for Zwanenburg's supervoxel-based randomisation): a
   smooth random field ``g`` (white noise smoothed with a Gaussian of :data:`CONTOUR_SMOOTHING_VOXELS`
   voxels, scaled to unit SD and clipped at +-2) times ``contour_amplitude`` in-plane voxels is added
   to ``d`` before the threshold of step 3, which keeps the volume at the target. The boundary then
   moves in and out by about one voxel, in smooth patches.

The signed distance map ``d`` (mm) is symmetric: ``d = edt(outside) - edt(inside)`` with
``scipy.ndimage.distance_transform_edt`` and the voxel spacing, so a lesion voxel next to a background
voxel along an axis of spacing ``h`` has ``-h`` and the background voxel ``+h``: ``d <= 0`` is the
original mask exactly, and after a rigid transform the zero level sits midway between voxel centres.

Settings and randomness
-----------------------
The *settings* of perturbation ``index`` (angle, translation, volume change) are drawn from
``spec.seed`` only and are the same for every lesion: perturbation ``j`` is one fixed "rater" in the
sense of ICC(3,1), and a systematic effect of a setting (e.g. +8 % volume for everyone) is what the
consistency ICC discounts. They are spread over their ranges by Latin hypercube sampling (each range is
split into ``n_perturbations`` equal strata, one value per stratum, strata shuffled per parameter):
``rotation_deg ~ U(-rotation_deg, +rotation_deg)``, each of ``tx, ty, tz ~ U(-translation_fraction,
+translation_fraction)`` voxels, ``u ~ U(-volume_change, +volume_change)``. The *realisations* (noise
field, contour field) are drawn from ``(spec.seed, lesion_seed, index)``. Everything is deterministic for
``(spec, lesion_seed, index)``; :func:`perturbation_settings` lists the settings.

Speed
-----
With ``margin_voxels`` (set by :func:`perturbation_jobs` from the extraction's crop margin, see
:func:`~imaging_assets.features.params.crop_margin_voxels`) only the lesion's neighbourhood (its box
plus that margin plus room for the geometric change) is resampled and re-noised; the rest of the image
is left as it was. The cropped extraction reads nothing outside that region, so features are as if the
whole image had been perturbed, except for whole-image statistics (``normalize``) and a wavelet whose
reach crosses the image border (the extraction then keeps the whole axis). Without a margin (uncroppable
filters, ``crop=False``) the whole image is perturbed.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from imaging_assets.features.extract import ExtractionJob, ExtractionOutcome

logger = logging.getLogger(__name__)

#: Gaussian smoothing (voxels, in-plane; scaled by spacing along z) of the contour randomisation field.
CONTOUR_SMOOTHING_VOXELS = 1.5
#: Separator between a lesion id and the perturbation index in perturbed jobs' ids.
PERTURBATION_SEPARATOR = "#p"
#: Median of ``|N(0, 1)|``: turns the median absolute Laplacian response into an SD.
_MAD_NORMAL = 0.6744897501960817


@dataclass(frozen=True)
class PerturbationSpec:
    """What to perturb, how much, and how many times.

    Attributes
    ----------
    n_perturbations : int
        Perturbed copies per lesion (the "raters" of the ICC). 8 keeps the ICC's CI usable at a cost of
        8 extractions per lesion.
    noise : bool
        Add Gaussian noise with the image's own noise SD (:func:`estimate_noise_sd`).
    rotation_deg : float
        In-plane rotation about the lesion centroid, uniform in ``[-rotation_deg, +rotation_deg]``.
    translation_fraction : float
        Translation along each image axis, uniform in ``[-translation_fraction, +translation_fraction]``
        voxels (0.5: the grid moves by up to half a voxel, the largest shift that is not a voxel shift).
    volume_change : float
        Relative volume change of the mask, uniform in ``[-volume_change, +volume_change]`` (0.10: +-10 %),
        by growing or shrinking along the signed distance map.
    contour_randomisation : bool
        Randomise the boundary by about ``contour_amplitude`` voxel in smooth patches.
    seed : int
        Seed of the settings and of every realisation.
    contour_amplitude : float
        SD of the contour randomisation field in in-plane voxels (clipped at 2 SD).
    """

    n_perturbations: int = 8
    noise: bool = True
    rotation_deg: float = 5.0
    translation_fraction: float = 0.5
    volume_change: float = 0.10
    contour_randomisation: bool = True
    seed: int = 0
    contour_amplitude: float = 1.0

    def __post_init__(self) -> None:
        if self.n_perturbations < 1:
            raise ValueError(f"n_perturbations must be >= 1; got {self.n_perturbations}")
        for name in ("rotation_deg", "translation_fraction", "volume_change", "contour_amplitude"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.volume_change >= 1:
            raise ValueError(f"volume_change must be < 1 (a relative change); got {self.volume_change}")


# ------------------------------------------------------------------------------------------- settings
def _seed_int(value: str | int) -> int:
    """Stable 63-bit integer of a seed-like value (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(str(value).encode("utf-8")).digest()[:8], "little") >> 1


def _latin(rng: np.random.Generator, n: int, half_width: float) -> np.ndarray:
    """``n`` values in ``[-half_width, half_width]``, one per equal stratum, strata in random order."""
    if half_width == 0:
        return np.zeros(n)
    u = (rng.permutation(n) + rng.random(n)) / n
    return (2.0 * u - 1.0) * half_width


def perturbation_settings(spec: PerturbationSpec) -> list[dict[str, Any]]:
    """The settings of every perturbation index: the same for every lesion (see the module docstring).

    Returns
    -------
    list of dict
        ``{"index", "rotation_deg", "translation_vox": [tx, ty, tz], "volume_change"}`` per index
        (translation in SimpleITK x, y, z order).
    """
    n = spec.n_perturbations
    rng = np.random.default_rng(np.random.SeedSequence([_seed_int(spec.seed), n, 1]))
    angles = _latin(rng, n, spec.rotation_deg)
    shifts = np.stack([_latin(rng, n, spec.translation_fraction) for _ in range(3)], axis=1)
    volumes = _latin(rng, n, spec.volume_change)
    return [
        {"index": i, "rotation_deg": float(angles[i]), "translation_vox": [float(v) for v in shifts[i]],
         "volume_change": float(volumes[i])}
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------- noise
def _laplacian_abs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|Immerkaer kernel response| on the interior of a 2-D slice, and where the 3x3 patch is not flat."""
    s = [[a[i:a.shape[0] - 2 + i, j:a.shape[1] - 2 + j] for j in range(3)] for i in range(3)]
    lap = (s[0][0] - 2 * s[0][1] + s[0][2]
           - 2 * s[1][0] + 4 * s[1][1] - 2 * s[1][2]
           + s[2][0] - 2 * s[2][1] + s[2][2])
    patches = [s[i][j] for i in range(3) for j in range(3)]
    not_flat = np.maximum.reduce(patches) > np.minimum.reduce(patches)
    return np.abs(lap), not_flat


def estimate_noise_sd(image: sitk.Image, mask: sitk.Image | None = None, max_slices: int = 16) -> float:
    """The image's own noise SD, from Immerkaer's Laplacian-difference operator, robustly, per slice.

    Immerkaer (1996, *CVIU* 64:300, "Fast noise variance estimation") convolves each slice with
    ``N = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]`` (the difference of two Laplacians), which cancels
    image structure that is locally linear and leaves white noise of SD ``sigma`` with SD ``6 sigma``
    (``sum N^2 = 36``). Immerkaer averages ``|I * N|``; here the *median* is used,
    ``sigma = median|I * N| / (6 * 0.6745)``, so edges and texture (a minority of pixels) barely bias it.
    Patches whose 3x3 neighbourhood is exactly constant (padding outside the scan field, saturated or
    zero-filled background) are left out: they hold no noise.

    Parameters
    ----------
    image : SimpleITK.Image
        2-D or 3-D scalar image; 3-D images are measured slice by slice (along the third index axis), so
        slice thickness and through-plane correlation do not matter.
    mask : SimpleITK.Image, optional
        Same size as the image: only patches centred on non-zero voxels count (e.g. a homogeneous
        region), and only slices containing some are read.
    max_slices : int
        At most this many slices, evenly spaced, are read (speed on large CT volumes).

    Returns
    -------
    float
        The SD in image units; 0.0 when there is nothing to measure (slices smaller than 3x3, an
        entirely flat image, an empty mask).

    Notes
    -----
    The operator measures the white (high-frequency) part of the noise: reconstruction kernels make CT
    and PET noise spatially correlated, for which this is a lower bound of the voxel SD. The noise added
    by :func:`perturb` is white, so it is the relevant scale for what a re-acquisition changes at the
    voxel level.
    """
    arr = sitk.GetArrayViewFromImage(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"estimate_noise_sd: expected a 2-D or 3-D scalar image; got array shape {arr.shape}")
    marr = None
    if mask is not None:
        marr = sitk.GetArrayViewFromImage(mask)
        if marr.ndim == 2:
            marr = marr[None]
        if marr.shape != arr.shape:
            raise ValueError(f"estimate_noise_sd: mask size {mask.GetSize()} differs from image size {image.GetSize()}")
        zs = np.flatnonzero(marr.reshape(marr.shape[0], -1).any(axis=1))
    else:
        zs = np.arange(arr.shape[0])
    if zs.size == 0 or arr.shape[1] < 3 or arr.shape[2] < 3:
        return 0.0
    if zs.size > max_slices:
        zs = np.unique(zs[np.linspace(0, zs.size - 1, max_slices).round().astype(int)])
    responses = []
    for z in zs:
        lap, ok = _laplacian_abs(np.asarray(arr[z], dtype=np.float64))
        if marr is not None:
            ok &= marr[z][1:-1, 1:-1] != 0
        responses.append(lap[ok])
    vals = np.concatenate(responses) if responses else np.zeros(0)
    if vals.size == 0:
        return 0.0
    return float(np.median(vals) / (6.0 * _MAD_NORMAL))


# ------------------------------------------------------------------------------------------- perturb
def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
            and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6))


def _signed_distance(sel: np.ndarray, spacing_zyx: np.ndarray) -> np.ndarray:
    """Symmetric signed distance (mm): ``edt(outside) - edt(inside)``; ``<= 0`` exactly on ``sel``."""
    if sel.all():
        return np.full(sel.shape, -float(spacing_zyx.min()))
    outside = ndimage.distance_transform_edt(~sel, sampling=spacing_zyx)
    inside = ndimage.distance_transform_edt(sel, sampling=spacing_zyx)
    return outside - inside


def _sub_image(array: np.ndarray, like: sitk.Image, lo_zyx: np.ndarray) -> sitk.Image:
    """``array`` as an image placed at index ``lo_zyx`` of ``like``'s grid."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(like.GetSpacing())
    img.SetDirection(like.GetDirection())
    img.SetOrigin(like.TransformIndexToPhysicalPoint([int(v) for v in lo_zyx[::-1]]))
    return img


def _box(lo: np.ndarray, hi: np.ndarray, pad: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(lo - pad, 0), np.minimum(hi + pad, np.asarray(shape) - 1)


def _slices(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))


def perturb(
    image: sitk.Image,
    mask: sitk.Image,
    index: int,
    spec: PerturbationSpec,
    lesion_seed: str | int,
    label: int | None = None,
    margin_voxels: Sequence[int] | None = None,
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """Perturbed copy number ``index`` of an image and its lesion mask (see the module docstring).

    Parameters
    ----------
    image : SimpleITK.Image
        3-D scalar image.
    mask : SimpleITK.Image
        Lesion mask; on another grid than the image it is first resampled onto it (nearest neighbour).
    index : int
        ``0 <= index < spec.n_perturbations``.
    spec : PerturbationSpec
    lesion_seed : str or int
        Identifies the lesion's random realisations (the lesion id).
    label : int, optional
        Lesion label in ``mask``; default every non-zero voxel.
    margin_voxels : sequence of int, optional
        Per-axis (x, y, z) margin the extraction reads around the lesion's box: only that neighbourhood
        of the image is perturbed. ``None`` perturbs the whole image.

    Returns
    -------
    image, mask, info
        The perturbed image (Float32, the input's grid), the perturbed mask (UInt8 0/1 on the same grid),
        and what was applied: ``index``, ``rotation_deg``, ``translation_vox``, ``translation_mm``,
        ``volume_change_target``, ``volume_change`` (achieved, in voxels), ``noise_sd``,
        ``contour_randomisation``, ``n_voxels_before``, ``n_voxels_after``, ``region_index``,
        ``region_size``.

    Raises
    ------
    ValueError
        Not a 3-D scalar image, index out of range, empty mask.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"perturb: expected a 3-D scalar image; got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    if not 0 <= int(index) < spec.n_perturbations:
        raise ValueError(f"perturb: index {index} outside 0..{spec.n_perturbations - 1}")
    setting = perturbation_settings(spec)[int(index)]
    rng_noise, rng_contour = (np.random.default_rng(s) for s in np.random.SeedSequence(
        [_seed_int(spec.seed), _seed_int(lesion_seed), int(index), 2]).spawn(2))

    if not _same_grid(image, mask):
        mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    marr = sitk.GetArrayViewFromImage(mask)
    sel = marr == label if label is not None else marr != 0
    n0 = int(np.count_nonzero(sel))
    if n0 == 0:
        raise ValueError("perturb: the mask is empty" + (f" for label {label}" if label is not None else ""))
    shape = np.asarray(sel.shape)
    spacing_zyx = np.asarray(image.GetSpacing(), dtype=float)[::-1]
    inplane = float(min(spacing_zyx[1], spacing_zyx[2]))

    nz = np.argwhere(sel)
    lo, hi = nz.min(axis=0), nz.max(axis=0)
    centre_zyx = nz.mean(axis=0)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_zyx[::-1]]))

    angle = float(setting["rotation_deg"]) if spec.rotation_deg else 0.0
    shift_xyz = np.asarray(setting["translation_vox"], dtype=float) if spec.translation_fraction else np.zeros(3)
    u = float(setting["volume_change"]) if spec.volume_change else 0.0
    geometric = angle != 0.0 or bool(np.any(shift_xyz != 0.0))
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    shift_mm = direction @ (shift_xyz * np.asarray(image.GetSpacing()))

    # The neighbourhood where the mask can change, and the image region to perturb.
    extent = hi - lo + 1
    radius_mm = float(np.linalg.norm(extent * spacing_zyx)) / 2.0 + float(np.linalg.norm(spacing_zyx))
    rot_vox = np.ceil(radius_mm * abs(math.sin(math.radians(angle))) / spacing_zyx)
    contour_vox = np.ceil(2.0 * spec.contour_amplitude * inplane / spacing_zyx) if spec.contour_randomisation else 0
    slack = (3 + np.ceil(0.3 * extent) + rot_vox + np.ceil(np.abs(shift_xyz[::-1])) + contour_vox).astype(int)
    wlo, whi = _box(lo, hi, slack, shape)
    if margin_voxels is None:
        rlo, rhi = np.zeros(3, dtype=int), shape - 1
    else:
        rlo, rhi = _box(lo, hi, slack + np.asarray(margin_voxels, dtype=int)[::-1], shape)
        rlo, rhi = np.minimum(rlo, wlo), np.maximum(rhi, whi)
    rs = _slices(rlo, rhi)

    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter([float(v) for v in centre])
    transform.SetRotation([float(v) for v in direction[:, 2]], math.radians(angle))
    transform.SetTranslation([float(v) for v in shift_mm])

    # ---- image: rigid transform, then noise (region only).
    fimg = sitk.Cast(image, sitk.sitkFloat32)
    out = sitk.GetArrayFromImage(fimg)
    if geometric:
        reference = _sub_image(np.zeros(tuple(rhi - rlo + 1), dtype=np.float32), image, rlo)
        moved = sitk.Resample(fimg, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
        out[rs] = sitk.GetArrayViewFromImage(moved)
    noise_sd = 0.0
    if spec.noise:
        noise_sd = estimate_noise_sd(image)
        if noise_sd > 0:
            out[rs] += (rng_noise.standard_normal(out[rs].shape, dtype=np.float32) * np.float32(noise_sd))
    new_image = sitk.GetImageFromArray(out)
    new_image.CopyInformation(image)

    # ---- mask: signed distance -> rigid transform -> volume adaptation + contour randomisation.
    ws = _slices(wlo, whi)
    wsel = np.ascontiguousarray(sel[ws])
    new_sel = sel.copy()
    if geometric or u != 0.0 or spec.contour_randomisation:
        d = _signed_distance(wsel, spacing_zyx)
        if geometric:
            d_img = _sub_image(d, image, wlo)
            d = sitk.GetArrayFromImage(
                sitk.Resample(d_img, d_img, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64, True))
        n_target = int(round(n0 * (1.0 + u)))
        n_target = int(min(max(n_target, min(2, n0)), d.size - 1 if d.size > 1 else 1))
        if u == 0.0 and not spec.contour_randomisation and np.count_nonzero(d <= 0) >= min(2, n0):
            chosen = d <= 0  # a pure rigid transform: the moved mask as it is
        else:
            inside = (d <= 0).astype(np.float64)
            key = d - 1e-3 * float(spacing_zyx.min()) * ndimage.gaussian_filter(inside, sigma=1.0, mode="nearest")
            if spec.contour_randomisation and spec.contour_amplitude > 0:
                sigma = CONTOUR_SMOOTHING_VOXELS * inplane / spacing_zyx
                g = ndimage.gaussian_filter(rng_contour.standard_normal(d.shape), sigma=sigma, mode="wrap")
                sd = float(g.std())
                if sd > 0:
                    key = key + spec.contour_amplitude * inplane * np.clip(g / sd, -2.0, 2.0)
            flat = np.zeros(d.size, dtype=bool)
            flat[np.argpartition(key.ravel(), n_target - 1)[:n_target]] = True
            chosen = flat.reshape(d.shape)
        new_sel[...] = False
        new_sel[ws] = chosen
    n1 = int(np.count_nonzero(new_sel))
    new_mask = sitk.GetImageFromArray(new_sel.astype(np.uint8))
    new_mask.CopyInformation(image)

    info = {
        "index": int(index),
        "rotation_deg": angle,
        "translation_vox": [float(v) for v in shift_xyz],
        "translation_mm": [float(v) for v in shift_mm],
        "volume_change_target": u,
        "volume_change": n1 / n0 - 1.0,
        "noise_sd": float(noise_sd),
        "contour_randomisation": bool(spec.contour_randomisation),
        "n_voxels_before": n0,
        "n_voxels_after": n1,
        "region_index": [int(v) for v in rlo[::-1]],
        "region_size": [int(v) for v in (rhi - rlo + 1)[::-1]],
    }
    return new_image, new_mask, info


# ------------------------------------------------------------------------------------- jobs and loaders
@dataclass(frozen=True)
class PerturbedLoader:
    """Picklable loader: the inner loader's lesion, perturbed (copy ``index`` of ``spec``).

    ``params`` and ``crop`` are the extraction's: with ``crop`` the perturbation is limited to the
    neighbourhood the cropped extraction reads (:func:`~imaging_assets.features.params.crop_margin_voxels`);
    ``params=None`` or ``crop=False`` perturbs the whole image.
    """

    inner: Callable[[], tuple[sitk.Image, sitk.Image, int]]
    index: int
    spec: PerturbationSpec
    lesion_seed: str
    params: Any = None
    crop: bool = False

    def __call__(self) -> tuple[sitk.Image, sitk.Image, int]:
        image, mask, label = self.inner()
        margin = None
        if self.crop and self.params is not None:
            from imaging_assets.features.params import crop_margin_voxels, resolve_params

            margin = crop_margin_voxels(resolve_params(self.params), image.GetSpacing())
        new_image, new_mask, info = perturb(image, mask, self.index, self.spec, self.lesion_seed,
                                            label=label, margin_voxels=margin)
        logger.debug("perturbed %s #%d: %s", self.lesion_seed, self.index, info)
        return new_image, new_mask, 1


def perturbation_jobs(jobs: Sequence[ExtractionJob], spec: PerturbationSpec) -> list[ExtractionJob]:
    """``spec.n_perturbations`` perturbed jobs per job: ids ``f"{lesion_id}#p{index}"``, same params/crop.

    Jobs of one lesion are consecutive, so a worker reuses a loader's cached series image.
    """
    out = []
    for job in jobs:
        for i in range(spec.n_perturbations):
            loader = PerturbedLoader(job.loader, i, spec, str(job.lesion_id), params=job.params, crop=job.crop)
            out.append(replace(job, lesion_id=f"{job.lesion_id}{PERTURBATION_SEPARATOR}{i}", loader=loader))
    return out


def split_perturbation_id(job_id: str) -> tuple[str, int]:
    """``"abc#p3"`` -> ``("abc", 3)``.

    Raises
    ------
    ValueError
        When ``job_id`` is not a perturbed job's id.
    """
    base, sep, idx = str(job_id).rpartition(PERTURBATION_SEPARATOR)
    if not sep or not idx.isdigit():
        raise ValueError(f"{job_id!r} is not a perturbed lesion id (<lesion_id>{PERTURBATION_SEPARATOR}<index>)")
    return base, int(idx)


def perturbation_array(
    outcomes: Iterable[ExtractionOutcome | Mapping[str, Any]],
    n_perturbations: int,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str], list[str], dict[str, str]]:
    """The ``(n_lesions, n_perturbations, n_features)`` array of perturbed extractions.

    Parameters
    ----------
    outcomes : iterable of ExtractionOutcome or dict
        Outcomes of :func:`perturbation_jobs` (or rows with ``lesion_id``, ``features``, ``error``).
    n_perturbations : int
        ``spec.n_perturbations``.
    names : sequence of str, optional
        Features to keep; default those every complete lesion has.

    Returns
    -------
    x, lesion_ids, names, left_out
        The array (lesions sorted by id), the base lesion ids, the feature names, and
        ``{lesion_id: reason}`` for lesions left out because a perturbed copy failed or is missing.
    """
    from imaging_assets.features.icc import stack_features

    by_lesion: dict[str, dict[int, Any]] = {}
    errors: dict[str, str] = {}
    for o in outcomes:
        lid = o.lesion_id if isinstance(o, ExtractionOutcome) else o["lesion_id"]
        feats = o.features if isinstance(o, ExtractionOutcome) else o.get("features")
        err = o.error if isinstance(o, ExtractionOutcome) else o.get("error")
        base, idx = split_perturbation_id(lid)
        by_lesion.setdefault(base, {})[idx] = feats
        if err and base not in errors:
            errors[base] = f"perturbation {idx}: {err}"
    ids = sorted(by_lesion)
    groups, left_out = [], {}
    complete_ids = []
    for lid in ids:
        got = by_lesion[lid]
        row = [got.get(i) for i in range(n_perturbations)]
        if any(r is None for r in row):
            missing = [i for i in range(n_perturbations) if got.get(i) is None]
            left_out[lid] = errors.get(lid, f"perturbations {missing} missing")
            continue
        complete_ids.append(lid)
        groups.append(row)
    x, feat_names, kept = stack_features(groups, names)
    return x, [complete_ids[i] for i in kept], feat_names, left_out


# -------------------------------------------------------------------------------------------- sampling
def _allocate(sizes: list[int], max_n: int) -> list[int]:
    """Proportional quotas (largest remainder), each at most its stratum size, summing to max_n."""
    total = sum(sizes)
    raw = [max_n * s / total for s in sizes]
    quota = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes, strict=True)]
    left = max_n - sum(quota)
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    while left > 0:
        progressed = False
        for i in order:
            if left == 0:
                break
            if quota[i] < sizes[i]:
                quota[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return quota


def stratified_sample(
    rows: Sequence[Mapping[str, Any]],
    max_n: int,
    strata: Sequence[str] = ("modality", "roi_name"),
    seed: int = 0,
    volume_key: str = "volume_mm3",
) -> list[dict[str, Any]]:
    """At most ``max_n`` rows, proportional per stratum and spread over volumes within each stratum.

    Rule: rows are grouped by the values of ``strata`` (missing keys group as ``None``); stratum quotas
    are ``max_n * stratum_size / total`` rounded by the largest-remainder method (ties to the stratum
    that sorts first), so with fewer slots than strata the small strata may get none. Within a stratum
    the rows are sorted by ``(volume, lesion_id)`` (missing volumes last), cut into ``quota`` contiguous
    bins of (nearly) equal size -- volume quantile bins -- and one row is taken from each bin at a
    position drawn from ``seed``. The result keeps the input order. Deterministic for (rows, seed).

    Parameters
    ----------
    rows : sequence of dict
        Lesion rows.
    max_n : int
        Largest sample size; all rows are returned when there are no more than ``max_n``.
    strata : sequence of str
        Keys that define strata.
    seed : int
        Position within each volume bin.
    volume_key : str
        Key of the volume used to spread the sample.
    """
    if max_n <= 0:
        return []
    if len(rows) <= max_n:
        return [dict(r) for r in rows]
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(str(r.get(k)) for k in strata), []).append(i)
    keys = sorted(groups)
    quota = _allocate([len(groups[k]) for k in keys], max_n)
    rng = np.random.default_rng(np.random.SeedSequence([_seed_int(seed), 3]))

    def vol(i: int) -> tuple[int, float, str]:
        v = rows[i].get(volume_key)
        try:
            fv = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            fv = math.nan
        return (1, 0.0, str(rows[i].get("lesion_id", i))) if math.isnan(fv) else (0, fv, str(rows[i].get("lesion_id", i)))

    chosen: list[int] = []
    for key, q in zip(keys, quota, strict=True):
        members = sorted(groups[key], key=vol)
        if q <= 0:
            continue
        edges = np.linspace(0, len(members), q + 1)
        for b in range(q):
            a, z = int(math.floor(edges[b])), max(int(math.floor(edges[b + 1])), int(math.floor(edges[b])) + 1)
            chosen.append(members[a + int(rng.integers(0, z - a))])
    return [dict(rows[i]) for i in sorted(set(chosen))]
