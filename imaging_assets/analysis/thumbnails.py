"""Lesion thumbnails and contact sheets, drawn to PNG bytes (numpy, SimpleITK and Pillow only; pure code).

A thumbnail is three panels side by side (axial, coronal, sagittal) through the lesion centre, each a square
crop of the same physical field of view around the lesion, with the mask outline, a scale bar, orientation
letters, the panel name and the intensity window. Nothing about the patient is drawn (no name, id or date).

Geometry
    The lesion centre is the centre of mass of ``mask > 0`` in voxel index space; a panel's slice is the
    nearest voxel slice to it (or, when that slice holds no mask voxel, as for a non-convex or fragmented
    lesion, the slice of its largest cross-section). The field of view is ``max(3 x the lesion's largest
    extent, 60 mm)`` (extent: the bounding box in index space times the spacing), sampled on a
    ``size x size`` grid of physically square pixels (``fov / size`` mm): the image bilinearly, the mask
    with nearest neighbour. Only the pixels shown are sampled, so the cost does not grow with the volume
    (apart from one pass over the mask to find it).
    Where the field of view leaves the volume the panel is padded in a dark blue-grey.

Orientation
    DICOM patient coordinates (LPS: +x towards the patient's left, +y posterior, +z superior); the direction
    matrix maps index axes (i, j, k; the array from :func:`SimpleITK.GetArrayFromImage` is k, j, i) to patient
    axes. Index axes are matched to the nearest patient axes (:func:`panel_axes`), so a flipped or permuted
    volume is still shown in the radiological convention: axial and coronal with the patient's right on the
    screen's left, axial with anterior at the top, coronal and sagittal with superior at the top, sagittal
    with anterior on the left. The letters at the panel edges come from the direction matrix
    (:func:`orientation_letters`: the dominant patient axis of each screen direction), so a residual
    obliquity is labelled by the nearest axis.

Degenerate inputs
    A 2-D image (or a volume one voxel thick along an axis) has no coronal / sagittal plane worth drawing:
    only the panels whose two in-plane axes have at least 2 voxels are drawn, so a single slice gives a
    one-panel (axial) thumbnail. An empty mask, a mask whose foreground reaches outside the image, a mask of
    another dimension, a non-scalar image and non-finite voxels in the rendered region raise ``ValueError``.
    A mask on another grid than the image is resampled onto it (nearest neighbour, only around the lesion).

Bump :data:`RENDER_VERSION` whenever the look changes: callers hash it into the thumbnail's content hash.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

RENDER_VERSION = "thumbnails-1"

#: CT windows as (low, high) in HU: lung W1500/L-600 and soft tissue W400/L40.
LUNG_WINDOW = (-1350.0, 150.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
WINDOW_LUNG = "lung"
WINDOW_SOFT_TISSUE = "soft tissue"
WINDOW_PERCENTILE = "p1-p99"

MIN_FOV_MM = 60.0
FOV_PER_EXTENT = 3.0
PLANES = ("axial", "coronal", "sagittal")

_OUTLINE = (255, 230, 0)  # yellow: never produced by the greyscale image or the white / grey text
_PAD = (22, 24, 44)  # outside the volume
_GAP = 2  # px between panels
_GAP_COLOUR = (70, 70, 70)
_TEXT = (255, 255, 255)
_LABEL = (210, 210, 210)
_SHADOW = (0, 0, 0)
_LETTERS_POS = ("L", "P", "S")  # letter of +x, +y, +z (LPS)
_LETTERS_NEG = ("R", "A", "I")
_SCALE_BARS_MM = (5, 10, 20, 50, 100, 200, 500)

# Radiological display of each plane in patient axes: through axis, (screen-right axis, sign), (screen-down axis, sign).
_PLANE_PATIENT = {
    "axial": (2, (0, 1), (1, 1)),  # right: +L, down: +P (anterior at the top)
    "coronal": (1, (0, 1), (2, -1)),  # right: +L, down: -S (superior at the top)
    "sagittal": (0, (1, 1), (2, -1)),  # right: +P (anterior on the left), down: -S
}


@dataclass(frozen=True)
class PanelAxes:
    """Which index axes a panel shows, and which way round.

    Attributes
    ----------
    plane
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    through
        Index axis (0 = i / x, 1 = j / y, 2 = k / z) perpendicular to the panel.
    horizontal, h_sign
        Index axis along the screen's rightward direction, and +1 if the index increases to the right.
    vertical, v_sign
        Index axis along the screen's downward direction, and +1 if the index increases downwards.
    """

    plane: str
    through: int
    horizontal: int
    h_sign: int
    vertical: int
    v_sign: int


def _direction_3x3(direction: Sequence[float] | np.ndarray) -> np.ndarray:
    """The direction matrix as a 3x3 array (columns: index axes in patient coordinates); a 2-D one is embedded."""
    d = np.asarray(direction, dtype=float)
    if d.size == 4:
        out = np.eye(3)
        out[:2, :2] = d.reshape(2, 2)
        return out
    if d.size != 9:
        raise ValueError(f"direction must be a 2x2 or 3x3 matrix (row-major), got {d.size} values")
    return d.reshape(3, 3)


def _axis_assignment(d: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """For each patient axis r (x, y, z): the index axis closest to it and the sign of their cosine."""
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(d[r, p[r]]) for r in range(3)))
    signs = tuple(1 if d[r, best[r]] >= 0 else -1 for r in range(3))
    return best, signs


def panel_axes(direction: Sequence[float] | np.ndarray, plane: str, reorient: bool = True) -> PanelAxes:
    """Index axes and signs that show ``plane`` of a volume with this direction matrix.

    Parameters
    ----------
    direction
        The image's direction matrix (``image.GetDirection()``: row-major, 9 values; 4 for a 2-D image).
    plane
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    reorient
        True (what :func:`render_thumbnail` draws): pick the index axes nearest the patient axes of the
        plane and flip them so the panel follows the radiological convention whatever the storage order.
        False: the volume as stored (axial: i right, j down; coronal: i right, k up; sagittal: j right, k up),
        which follows the convention only for an identity direction.

    Returns
    -------
    PanelAxes
    """
    if plane not in _PLANE_PATIENT:
        raise ValueError(f"unknown plane {plane!r}; expected one of {', '.join(PLANES)}")
    through_p, (h_p, h_s), (v_p, v_s) = _PLANE_PATIENT[plane]
    if reorient:
        perm, signs = _axis_assignment(_direction_3x3(direction))
    else:
        perm, signs = (0, 1, 2), (1, 1, 1)
    return PanelAxes(plane, perm[through_p], perm[h_p], h_s * signs[h_p], perm[v_p], v_s * signs[v_p])


def _letter(vec: np.ndarray) -> str:
    r = int(np.argmax(np.abs(vec)))
    return _LETTERS_POS[r] if vec[r] >= 0 else _LETTERS_NEG[r]


def orientation_letters(direction: Sequence[float] | np.ndarray, axes: PanelAxes) -> tuple[str, str, str, str]:
    """Patient-direction letters at the left, right, top and bottom edges of a panel.

    Parameters
    ----------
    direction
        The image's direction matrix (row-major; LPS patient coordinates).
    axes
        What the panel shows (:func:`panel_axes`).

    Returns
    -------
    tuple of str
        ``(left, right, top, bottom)``, each one of R/L, A/P, S/I: the dominant patient axis of that screen
        direction. Identity direction, axial panel: ``("R", "L", "A", "P")``.
    """
    d = _direction_3x3(direction)
    right = axes.h_sign * d[:, axes.horizontal]
    down = axes.v_sign * d[:, axes.vertical]
    return _letter(-right), _letter(right), _letter(-down), _letter(down)


def window_for(modality: str | None, body_part: str | None, values_in_lesion_region: np.ndarray) -> tuple[float, float, str]:
    """Display window for a lesion: ``(low, high, name)``.

    Parameters
    ----------
    modality
        DICOM modality (``"CT"``, ``"MR"``, ``"PT"``, ...); None counts as "other".
    body_part
        DICOM BodyPartExamined (or any text naming the region); may be None.
    values_in_lesion_region
        Intensities around the lesion (the renderer passes every in-volume pixel of its panels, lesion
        included; the lesion covers a small part of a field of view three times its size). Non-finite
        values are ignored.

    Returns
    -------
    tuple
        CT: the lung window (W1500/L-600: -1350..150 HU) when the lesion sits in lung, i.e. the median of the
        values is below -500 HU, or below -300 HU with a body part naming LUNG / CHEST / THORAX; otherwise
        soft tissue (W400/L40: -160..240 HU). Other modalities: the 1st..99th percentile of the values
        (min..max if those coincide; +-0.5 around a constant).
    """
    v = np.asarray(values_in_lesion_region, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if (modality or "").strip().upper() == "CT":
        if v.size == 0:
            return (*SOFT_TISSUE_WINDOW, WINDOW_SOFT_TISSUE)
        median = float(np.median(v))
        part = (body_part or "").upper()
        in_chest = any(word in part for word in ("LUNG", "CHEST", "THORAX"))
        if median < -500.0 or (in_chest and median < -300.0):
            return (*LUNG_WINDOW, WINDOW_LUNG)
        return (*SOFT_TISSUE_WINDOW, WINDOW_SOFT_TISSUE)
    if v.size == 0:
        raise ValueError("no finite intensity in the lesion region: cannot choose a window")
    low, high = (float(x) for x in np.percentile(v, [1.0, 99.0]))
    if not high > low:
        low, high = float(v.min()), float(v.max())
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return low, high, WINDOW_PERCENTILE


def sample_panel(volume: np.ndarray, spacing: Sequence[float], centre: Sequence[float], axes: PanelAxes,
                 fov_mm: float, size: int, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample one panel of a volume on a grid of physically square pixels.

    Parameters
    ----------
    volume
        3-D array in array order (k, j, i), as from :func:`SimpleITK.GetArrayViewFromImage`.
    spacing
        Voxel size in mm in index order (i, j, k).
    centre
        Panel centre in continuous index coordinates (i, j, k); the through-plane coordinate is rounded to
        the slice drawn.
    axes
        What the panel shows (:func:`panel_axes`).
    fov_mm
        Side of the square field of view in mm.
    size
        Side of the panel in pixels (a pixel is ``fov_mm / size`` mm both ways).
    order
        1: bilinear (the image); 0: nearest neighbour (the mask).

    Returns
    -------
    values, inside
        ``(size, size)`` float32 samples (0 outside the volume) and the boolean mask of pixels inside it.
        Row 0 is the top of the screen, column 0 its left.
    """
    n = volume.shape[::-1]  # index order
    values = np.zeros((size, size), dtype=np.float32)
    t = math.floor(centre[axes.through] + 0.5)
    if not 0 <= t < n[axes.through]:
        return values, np.zeros((size, size), dtype=bool)
    offs = (np.arange(size) + 0.5 - size / 2.0) * (fov_mm / size)
    u = centre[axes.horizontal] + axes.h_sign * offs / spacing[axes.horizontal]
    v = centre[axes.vertical] + axes.v_sign * offs / spacing[axes.vertical]
    nu, nv = n[axes.horizontal], n[axes.vertical]
    in_u = (u >= -0.5) & (u <= nu - 0.5)
    in_v = (v >= -0.5) & (v <= nv - 0.5)
    inside = in_v[:, None] & in_u[None, :]
    if not inside.any():
        return values, inside
    index: list[int | slice] = [slice(None)] * 3
    index[2 - axes.through] = t
    plane = volume[tuple(index)]  # a view; its axes are the two in-plane index axes in array order
    if axes.vertical < axes.horizontal:  # array order puts the higher index axis first: want (vertical, horizontal)
        plane = plane.T
    if order == 0:
        ui = np.clip(np.floor(u + 0.5).astype(np.intp), 0, nu - 1)
        vi = np.clip(np.floor(v + 0.5).astype(np.intp), 0, nv - 1)
        values = plane[np.ix_(vi, ui)].astype(np.float32)
    else:
        uc, vc = np.clip(u, 0, nu - 1), np.clip(v, 0, nv - 1)
        u0, v0 = np.floor(uc).astype(np.intp), np.floor(vc).astype(np.intp)
        u1, v1 = np.minimum(u0 + 1, nu - 1), np.minimum(v0 + 1, nv - 1)
        fu, fv = (uc - u0).astype(np.float32), (vc - v0).astype(np.float32)
        c0 = int(u0.min())
        block = plane[:, c0:int(u1.max()) + 1]  # only the columns needed, before any conversion
        rows = block[v0].astype(np.float32) * (1 - fv)[:, None] + block[v1].astype(np.float32) * fv[:, None]
        values = rows[:, u0 - c0] * (1 - fu) + rows[:, u1 - c0] * fu
    values[~inside] = 0
    return values, inside


def _outline(m: np.ndarray) -> np.ndarray:
    """1-px inner contour of a boolean panel: mask XOR its 4-neighbour erosion."""
    p = np.pad(m, 1)
    eroded = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~eroded


def _foreground_box(arr: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Inclusive bounding box ``(lo, hi)`` of ``arr > 0`` in array order, or None when there is none."""
    if arr.dtype.kind == "f":
        arr = arr > 0  # NaN-safe (max() would propagate a NaN)
    first = arr.reshape(arr.shape[0], -1).max(axis=1) > 0
    if not first.any():
        return None
    nz = np.flatnonzero(first)
    block = arr[nz[0]:nz[-1] + 1]
    lo, hi = [int(nz[0])], [int(nz[-1])]
    for a in range(1, arr.ndim):
        prof = np.flatnonzero(block.max(axis=tuple(b for b in range(arr.ndim) if b != a)) > 0)
        lo.append(int(prof[0]))
        hi.append(int(prof[-1]))
    return tuple(lo), tuple(hi)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    if a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    return bool(np.allclose(sa, sb, rtol=1e-4, atol=1e-6)
                and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-3 * float(sa.min()))
                and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-4))


def _mask_on_image(image: sitk.Image, mask: sitk.Image) -> tuple[np.ndarray, tuple[int, ...]]:
    """The mask's foreground on the image grid, cropped: ``(block of mask > 0, offset)``, both in array order."""
    d = image.GetDimension()
    if mask.GetDimension() != d:
        raise ValueError(f"mask is {mask.GetDimension()}-D but the image is {d}-D")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("mask must be a scalar (label) image, not a vector image")
    marr = sitk.GetArrayViewFromImage(mask)
    box = _foreground_box(marr)
    if box is None:
        raise ValueError("mask is empty: no voxel > 0, nothing to outline")
    lo, hi = box
    if _same_grid(image, mask):
        block = marr[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] > 0
        return block, lo
    # Another grid: check the foreground lies in the image, then resample only the lesion's neighbourhood.
    corners = [tuple(int(c) for c in corner[::-1]) for corner in itertools.product(*zip(lo, hi))]
    cidx = np.array([image.TransformPhysicalPointToContinuousIndex(mask.TransformIndexToPhysicalPoint(c))
                     for c in corners])
    size = np.array(image.GetSize())
    if (cidx < -0.5 - 1e-3).any() or (cidx > size - 0.5 + 1e-3).any():
        raise ValueError(
            f"mask is larger than the image: its foreground reaches outside the image (foreground spans image "
            f"index {np.round(cidx.min(axis=0), 1).tolist()}..{np.round(cidx.max(axis=0), 1).tolist()}, image "
            f"size {size.tolist()}); is it the segmentation of another series?")
    ilo = np.clip(np.floor(cidx.min(axis=0)).astype(int) - 1, 0, size - 1)
    ihi = np.clip(np.ceil(cidx.max(axis=0)).astype(int) + 1, 0, size - 1)
    ref = sitk.Image([int(x) for x in ihi - ilo + 1], mask.GetPixelID())
    ref.SetSpacing(image.GetSpacing())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin(image.TransformIndexToPhysicalPoint([int(x) for x in ilo]))
    res = sitk.GetArrayFromImage(sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                                               mask.GetPixelID())) > 0
    sub = _foreground_box(res)
    if sub is None:
        raise ValueError("mask has no voxel on the image grid after nearest-neighbour resampling "
                         "(lesion smaller than an image voxel?)")
    slo, shi = sub
    block = res[tuple(slice(a, b + 1) for a, b in zip(slo, shi))]
    offset = tuple(int(o) + s for o, s in zip(ilo[::-1], slo))
    return block, offset


@functools.lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def _safe(text: str, font) -> str:
    if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback font is latin-1 only
        return text.encode("latin-1", "replace").decode("latin-1")
    return text


@functools.lru_cache(maxsize=512)
def _sprite(text: str, px: int, fill: tuple[int, int, int]) -> Image.Image:
    """``text`` in ``fill`` with a 1-px black shadow, on a transparent RGBA image cropped to its ink.

    Cached: the letters, labels and scale-bar captions repeat from one thumbnail to the next, and pasting a
    ready sprite is much cheaper than rasterising the glyphs again.
    """
    font = _font(px)
    text = _safe(text, font)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
    img = Image.new("RGBA", (max(1, x1 - x0) + 1, max(1, y1 - y0) + 1), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.text((1 - x0, 1 - y0), text, font=font, fill=(*_SHADOW, 255))
    draw.text((-x0, -y0), text, font=font, fill=(*fill, 255))
    return img


def _text(img: Image.Image, xy: tuple[float, float], text: str, px: int, fill: tuple[int, int, int],
          anchor: str = "lt") -> None:
    """Paste text at ``xy``; ``anchor``: l/m/r horizontally, t/m/b vertically, of the ink box (shadow included)."""
    sprite = _sprite(text, px, fill)
    w, h = sprite.size
    x = xy[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]]
    img.paste(sprite, (round(x), round(y)), sprite)


def _scale_bar_mm(fov_mm: float) -> int:
    fitting = [b for b in _SCALE_BARS_MM if b <= fov_mm / 4.0]
    return fitting[-1] if fitting else _SCALE_BARS_MM[0]


def _annotate(img: Image.Image, x0: int, size: int, plane: str, letters: tuple[str, str, str, str],
              window_name: str, fov_mm: float) -> None:
    small, big = max(8, round(size / 16)), max(9, round(size / 12))
    left, right, top, bottom = letters
    mid = size / 2.0
    _text(img, (x0 + 3, mid), left, big, _TEXT, "lm")
    _text(img, (x0 + size - 3, mid), right, big, _TEXT, "rm")
    _text(img, (x0 + mid, 3), top, big, _TEXT, "mt")
    _text(img, (x0 + mid, size - 3), bottom, big, _TEXT, "mb")
    _text(img, (x0 + 3, 3), plane, small, _LABEL, "lt")
    _text(img, (x0 + 3, 5 + small), window_name, small, _LABEL, "lt")
    bar_mm = _scale_bar_mm(fov_mm)
    bar_px = max(2, round(bar_mm * size / fov_mm))
    xe, y = x0 + size - 6, size - 6
    xs = xe - bar_px
    draw = ImageDraw.Draw(img)
    for dx, colour in ((1, _SHADOW), (0, _TEXT)):
        draw.line([(xs + dx, y + dx), (xe + dx, y + dx)], fill=colour, width=2)
        draw.line([(xs + dx, y - 3 + dx), (xs + dx, y + dx)], fill=colour, width=1)
        draw.line([(xe + dx, y - 3 + dx), (xe + dx, y + dx)], fill=colour, width=1)
    _text(img, ((xs + xe) / 2.0, y - 4), f"{bar_mm} mm", small, _TEXT, "mb")


def _to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # level 1: ~5 ms, barely larger than 6 (~14 ms)
    return buf.getvalue()


def render_thumbnail(image: sitk.Image, mask: sitk.Image, modality: str | None = None, body_part: str | None = None,
                     size: int = 160) -> bytes:
    """Render a lesion as a PNG: axial, coronal and sagittal panels through its centre, outlined.

    Parameters
    ----------
    image
        Scalar 3-D (or 2-D) image; CT in HU.
    mask
        The lesion: voxels > 0. Normally on the image grid; otherwise resampled onto it (nearest neighbour).
    modality, body_part
        For the window (:func:`window_for`).
    size
        Side of each square panel in pixels (at least 48).

    Returns
    -------
    bytes
        PNG, ``size`` high and ``panels * size + (panels - 1) * 2`` wide (3 panels for a volume; planes less
        than 2 voxels thick are left out, so a single slice gives the axial panel only). Each panel carries
        orientation letters, a labelled scale bar, its plane and the window name; never patient data.

    Raises
    ------
    ValueError
        Empty mask; mask of another dimension than the image, or whose foreground reaches outside it
        ("mask is larger than the image"); image that is not 2-D / 3-D scalar, or that has no 2x2-voxel plane;
        non-finite voxels (NaN / inf) in the region drawn.
    """
    if size < 48:
        raise ValueError(f"thumbnail size must be at least 48 px, got {size}")
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D, got {dim}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("image must be scalar (one value per voxel), not a vector / RGB image")
    block, offset = _mask_on_image(image, mask)
    volume = sitk.GetArrayViewFromImage(image)
    spacing = tuple(float(s) for s in image.GetSpacing())
    if dim == 2:
        volume, block, offset, spacing = volume[None], block[None], (0, *offset), (*spacing, 1.0)
    direction = _direction_3x3(image.GetDirection())
    n = volume.shape[::-1]

    # Centre of mass, per-axis voxel counts and extent, all in index order (i, j, k).
    counts = [block.sum(axis=tuple(b for b in range(3) if b != 2 - a)) for a in range(3)]
    total = float(counts[0].sum())
    off_idx = offset[::-1]
    centre = [off_idx[a] + float(np.dot(np.arange(len(counts[a])), counts[a])) / total for a in range(3)]
    extent_mm = max(len(counts[a]) * spacing[a] for a in range(3))
    fov = max(FOV_PER_EXTENT * extent_mm, MIN_FOV_MM)

    panels = []
    for plane in PLANES:
        axes = panel_axes(direction, plane)
        if n[axes.horizontal] < 2 or n[axes.vertical] < 2:
            continue
        c = list(centre)
        t = math.floor(c[axes.through] + 0.5)
        per_slice = counts[axes.through]
        local = t - off_idx[axes.through]
        if not (0 <= local < len(per_slice) and per_slice[local] > 0):
            # the centre of mass of a non-convex lesion can fall outside it: take its largest cross-section
            # (ties: the one nearest the centre of mass)
            cand = np.flatnonzero(per_slice == per_slice.max())
            t = int(cand[np.argmin(np.abs(cand + off_idx[axes.through] - c[axes.through]))]) + off_idx[axes.through]
        c[axes.through] = float(t)
        values, inside = sample_panel(volume, spacing, c, axes, fov, size, order=1)
        if not np.isfinite(values[inside]).all():
            raise ValueError(f"image has non-finite voxels (NaN or inf) in the {plane} slice drawn around the lesion")
        cm = [c[a] - off_idx[a] for a in range(3)]
        m, m_inside = sample_panel(block, spacing, cm, axes, fov, size, order=0)
        panels.append((axes, values, inside, (m > 0) & m_inside))
    if not panels:
        raise ValueError(f"image of size {list(n)} has no plane of at least 2x2 voxels to draw")

    low, high, window_name = window_for(modality, body_part, np.concatenate([p[1][p[2]] for p in panels]))
    width = len(panels) * size + (len(panels) - 1) * _GAP
    canvas = np.empty((size, width, 3), dtype=np.uint8)
    canvas[:] = _GAP_COLOUR
    scale = 255.0 / (high - low)
    for idx, (_axes, values, inside, m) in enumerate(panels):
        grey = np.clip((values - low) * scale, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        rgb[~inside] = _PAD
        rgb[_outline(m)] = _OUTLINE
        x0 = idx * (size + _GAP)
        canvas[:, x0:x0 + size] = rgb
    img = Image.fromarray(canvas)
    for idx, (axes, *_rest) in enumerate(panels):
        _annotate(img, idx * (size + _GAP), size, axes.plane, orientation_letters(direction, axes), window_name, fov)
    return _to_png(img)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    text = _safe(text, font)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


_CAPTION_ASCII = str.maketrans({"σ": "sigma", "²": "^2", "≥": ">=", "≤": "<="})


def montage(tiles: list[tuple[bytes | None, list[str]]], columns: int = 4, title: str | None = None) -> bytes:
    """Arrange PNG tiles, each with caption lines under it, in a grid: one PNG.

    Parameters
    ----------
    tiles
        ``(png_bytes, caption_lines)`` per tile, e.g. ``(thumb, ["reference", "CT 12.3 cm3"])``; ``None``
        instead of bytes draws an empty tile saying "no picture". Tiles of
        different sizes are centred in cells of the largest tile's size; a caption line too long for its cell
        is cut with "...".
    columns
        Tiles per row (fewer when there are fewer tiles).
    title
        Optional line drawn above the grid.

    Returns
    -------
    bytes
        PNG on a dark background.

    Raises
    ------
    ValueError
        No tiles, ``columns < 1``, or a tile that is not a readable image.
    """
    if not tiles:
        raise ValueError("montage needs at least one tile")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    images: list[Image.Image | None] = []
    for i, (data, _caption) in enumerate(tiles):
        if data is None:  # no picture for this lesion: an empty tile that says so
            images.append(None)
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                images.append(im.convert("RGB"))
        except Exception as exc:  # PIL raises several types for bad data
            raise ValueError(f"tile {i} is not a readable image: {exc}") from exc
    real = [im for im in images if im is not None]
    empty_size = (max((im.width for im in real), default=3 * 160 + 4), max((im.height for im in real), default=160))
    for i, im in enumerate(images):
        if im is None:
            blank = Image.new("RGB", empty_size, (40, 40, 46))
            _text(blank, (empty_size[0] // 2, empty_size[1] // 2), "no picture", 12, _LABEL, "mm")
            images[i] = blank
    font = _font(11)
    line_h = 14
    margin = 8
    cell_w = max(im.width for im in images)
    tile_h = max(im.height for im in images)
    n_lines = max(len(c) for _, c in tiles)
    cell_h = tile_h + (4 + n_lines * line_h if n_lines else 0)
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    title_h = 22 if title else 0
    width = cols * cell_w + (cols + 1) * margin
    height = title_h + rows * cell_h + (rows + 1) * margin
    sheet = Image.new("RGB", (width, height), (18, 18, 18))
    draw = ImageDraw.Draw(sheet)
    if title:
        _text(sheet, (margin, margin), _fit(draw, title, _font(14), width - 2 * margin), 14, _TEXT, "lt")
    for i, (im, (_data, caption)) in enumerate(zip(images, tiles)):
        r, c = divmod(i, cols)
        x = margin + c * (cell_w + margin)
        y = title_h + margin + r * (cell_h + margin)
        sheet.paste(im, (x + (cell_w - im.width) // 2, y + (tile_h - im.height) // 2))
        for j, line in enumerate(caption):
            line = str(line).translate(_CAPTION_ASCII)  # glyphs the bundled font lacks
            draw.text((x + 2, y + tile_h + 4 + j * line_h), _fit(draw, line, font, cell_w - 4), font=font,
                      fill=_LABEL)
    return _to_png(sheet)
