"""Lesion thumbnails: panels, outline, windows, orientation letters, physical aspect, montage, edge cases."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from imaging_assets.analysis.thumbnails import (
    LUNG_WINDOW,
    RENDER_VERSION,
    SOFT_TISSUE_WINDOW,
    WINDOW_LUNG,
    WINDOW_PERCENTILE,
    WINDOW_SOFT_TISSUE,
    montage,
    orientation_letters,
    panel_axes,
    render_thumbnail,
    sample_panel,
    window_for,
)

GAP = 2  # px between panels (thumbnails._GAP)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(shape_zyx=(30, 64, 64), spacing=(1.0, 1.0, 1.0), background=-800.0, lesion=40.0, radius_mm=6.0,
            centre_zyx=None, noise=0.0, direction=IDENTITY):
    """A synthetic image (float32) with a spherical lesion, and its mask on the same grid."""
    z, y, x = np.indices(shape_zyx, dtype=float)
    c = centre_zyx or tuple(s / 2.0 for s in shape_zyx)
    r2 = ((x - c[2]) * spacing[0]) ** 2 + ((y - c[1]) * spacing[1]) ** 2 + ((z - c[0]) * spacing[2]) ** 2
    inside = r2 <= radius_mm**2
    arr = np.full(shape_zyx, background, dtype=np.float32)
    arr[inside] = lesion
    if noise:
        arr += np.random.default_rng(0).normal(0, noise, shape_zyx).astype(np.float32)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def _panels(rgb: np.ndarray, size: int) -> list[np.ndarray]:
    n = (rgb.shape[1] + GAP) // (size + GAP)
    return [rgb[:, k * (size + GAP):k * (size + GAP) + size] for k in range(n)]


def _yellow(panel: np.ndarray) -> np.ndarray:
    return (panel[..., 0] > 200) & (panel[..., 1] > 200) & (panel[..., 2] < 60)


# --- the picture ------------------------------------------------------------------------------------------------


def test_png_has_three_square_panels_side_by_side():
    image, mask = _volume()
    rgb = _decode(render_thumbnail(image, mask, "CT", "CHEST", size=128))
    assert rgb.shape[:2] == (128, 3 * 128 + 2 * GAP)
    assert rgb.shape[1] / rgb.shape[0] == pytest.approx(3.0, abs=0.05)
    assert isinstance(RENDER_VERSION, str) and RENDER_VERSION


def test_outline_drawn_in_every_panel_around_the_lesion_centre():
    image, mask = _volume(shape_zyx=(40, 80, 80), radius_mm=8.0)
    size = 120
    for panel in _panels(_decode(render_thumbnail(image, mask, "CT", "CHEST", size=size)), size):
        ys, xs = np.nonzero(_yellow(panel))
        assert len(ys) > 20
        # lesion is 16 mm across in a 60 mm field of view: the outline is centred and about 32 px wide
        assert abs(ys.mean() - size / 2) < 3 and abs(xs.mean() - size / 2) < 3
        assert 28 <= xs.max() - xs.min() + 1 <= 36


def test_rendering_is_deterministic_and_carries_no_metadata():
    image, mask = _volume()
    plain = render_thumbnail(image, mask, "CT")
    image.SetMetaData("0010|0010", "DOE^JANE")  # a patient name in the header must not matter
    image.SetMetaData("0010|0020", "PID-123")
    assert render_thumbnail(image, mask, "CT") == plain
    with Image.open(io.BytesIO(plain)) as im:
        assert not getattr(im, "text", {})  # no PNG text chunks


def test_non_convex_lesion_whose_centre_is_outside_still_outlined():
    # two blobs far apart along z: the centre of mass lies between them, in no mask voxel
    image, mask = _volume(shape_zyx=(40, 64, 64), radius_mm=4.0, centre_zyx=(8, 32, 32))
    arr = sitk.GetArrayFromImage(mask)
    arr = arr | arr[::-1]  # mirror to z = 31
    mask2 = sitk.GetImageFromArray(arr)
    mask2.CopyInformation(image)
    for panel in _panels(_decode(render_thumbnail(image, mask2, "CT", size=96)), 96):
        assert _yellow(panel).sum() > 20  # the axial panel shows a blob's largest cross-section, not its pole


# --- windows ----------------------------------------------------------------------------------------------------


def _grey_median(png: bytes, size: int) -> float:
    panel = _panels(_decode(png), size)[0]
    return float(np.median(panel[..., 0]))


def test_lung_nodule_gets_the_lung_window():
    image, mask = _volume(background=-800.0, lesion=30.0, radius_mm=5.0, noise=20.0)
    values = sitk.GetArrayViewFromImage(image)
    assert window_for("CT", "CHEST", values) == (*LUNG_WINDOW, WINDOW_LUNG)
    # -800 HU in the lung window (-1350..150) is mid-dark grey, not black
    grey = _grey_median(render_thumbnail(image, mask, "CT", "CHEST", size=96), 96)
    assert grey == pytest.approx((-800 + 1350) / 1500 * 255, abs=6)


def test_liver_lesion_gets_the_soft_tissue_window():
    image, mask = _volume(background=50.0, lesion=90.0, radius_mm=8.0, noise=10.0)
    assert window_for("CT", "ABDOMEN", sitk.GetArrayViewFromImage(image)) == (*SOFT_TISSUE_WINDOW, WINDOW_SOFT_TISSUE)
    assert window_for("CT", "CHEST", sitk.GetArrayViewFromImage(image))[2] == WINDOW_SOFT_TISSUE  # mediastinum-like
    grey = _grey_median(render_thumbnail(image, mask, "CT", "LIVER", size=96), 96)
    assert grey == pytest.approx((50 + 160) / 400 * 255, abs=6)


def test_ct_window_rule_thresholds():
    v = np.full(1000, -400.0)
    assert window_for("CT", "CHEST", v)[2] == WINDOW_LUNG  # chest and median < -300
    assert window_for("ct", "Thorax", v)[2] == WINDOW_LUNG
    assert window_for("CT", "ABDOMEN", v)[2] == WINDOW_SOFT_TISSUE  # -400 is not < -500 outside the chest
    assert window_for("CT", None, np.full(1000, -600.0))[2] == WINDOW_LUNG  # mostly air whatever the body part
    assert window_for("CT", None, np.array([]))[2] == WINDOW_SOFT_TISSUE


def test_mr_and_pet_use_percentiles_with_a_guard_for_constant_images():
    v = np.linspace(0.0, 1000.0, 10001)
    low, high, name = window_for("MR", "BRAIN", v)
    assert name == WINDOW_PERCENTILE
    assert low == pytest.approx(10.0, abs=0.5) and high == pytest.approx(990.0, abs=0.5)
    assert window_for("PT", None, v)[2] == WINDOW_PERCENTILE
    assert window_for(None, None, v)[2] == WINDOW_PERCENTILE
    low, high, _ = window_for("MR", None, np.full(50, 7.0))
    assert low < 7.0 < high
    low, high, _ = window_for("MR", None, np.r_[np.zeros(995), np.full(5, 5.0), [np.nan]])
    assert (low, high) == (0.0, 5.0)  # p1 == p99: min..max
    with pytest.raises(ValueError, match="no finite intensity"):
        window_for("MR", None, np.array([np.nan]))


def test_mr_render_uses_percentile_window():
    image, mask = _volume(background=300.0, lesion=900.0, noise=30.0)
    rgb = _decode(render_thumbnail(image, mask, "MR", "BRAIN", size=96))
    panel = _panels(rgb, 96)[0]
    # the lesion interior is near the top of the window (bright), the background mid-grey
    assert panel[48, 48, 0] > 200 and 10 < panel[80, 20, 0] < 150


# --- orientation ------------------------------------------------------------------------------------------------


def test_identity_direction_gives_radiological_letters():
    assert orientation_letters(IDENTITY, panel_axes(IDENTITY, "axial")) == ("R", "L", "A", "P")
    assert orientation_letters(IDENTITY, panel_axes(IDENTITY, "coronal")) == ("R", "L", "S", "I")
    assert orientation_letters(IDENTITY, panel_axes(IDENTITY, "sagittal")) == ("A", "P", "S", "I")


def test_flipped_x_swaps_letters_as_stored_and_reorientation_restores_them():
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    as_stored = panel_axes(flipped, "axial", reorient=False)
    assert orientation_letters(flipped, as_stored) == ("L", "R", "A", "P")
    assert orientation_letters(flipped, panel_axes(flipped, "coronal", reorient=False)) == ("L", "R", "S", "I")
    shown = panel_axes(flipped, "axial")
    assert (shown.horizontal, shown.h_sign) == (0, -1)  # the renderer mirrors i back
    assert orientation_letters(flipped, shown) == ("R", "L", "A", "P")


def test_flipped_y_like_many_mr_volumes():
    flipped_y = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert orientation_letters(flipped_y, panel_axes(flipped_y, "axial", reorient=False)) == ("R", "L", "P", "A")
    assert orientation_letters(flipped_y, panel_axes(flipped_y, "sagittal", reorient=False)) == ("P", "A", "S", "I")
    assert orientation_letters(flipped_y, panel_axes(flipped_y, "axial")) == ("R", "L", "A", "P")


def test_permuted_and_oblique_directions():
    # a sagittal acquisition: i -> +P, j -> -S, k -> +L (columns of the direction matrix)
    d = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    axial = panel_axes(d.ravel(), "axial")
    assert (axial.through, axial.horizontal, axial.h_sign, axial.vertical, axial.v_sign) == (1, 2, 1, 0, 1)
    for plane, letters in (("axial", ("R", "L", "A", "P")), ("coronal", ("R", "L", "S", "I")),
                           ("sagittal", ("A", "P", "S", "I"))):
        assert orientation_letters(d.ravel(), panel_axes(d.ravel(), plane)) == letters
    # 25 degrees about z: the dominant axis still names each edge
    a = math.radians(25)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    assert orientation_letters(rot.ravel(), panel_axes(rot.ravel(), "axial")) == ("R", "L", "A", "P")
    # 2-D direction (2x2)
    assert orientation_letters((1.0, 0.0, 0.0, 1.0), panel_axes((1.0, 0.0, 0.0, 1.0), "axial")) == ("R", "L", "A", "P")
    with pytest.raises(ValueError, match="unknown plane"):
        panel_axes(IDENTITY, "oblique")


def test_volume_stored_mirrored_renders_the_same_picture():
    # a lesion off-centre towards patient right-anterior-superior, plus an asymmetric marker nearby
    image, mask = _volume(shape_zyx=(30, 64, 64), centre_zyx=(18, 24, 22), radius_mm=5.0, noise=15.0)
    arr = sitk.GetArrayFromImage(image)
    arr[16:20, 20:24, 30:34] = 500.0  # to the patient's left of the lesion
    image = sitk.GetImageFromArray(arr)
    mirrored_img = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, :, ::-1]))
    mirrored_mask = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(mask)[:, :, ::-1]))
    mirrored_img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    mirrored_img.SetOrigin((63.0, 0.0, 0.0))  # the same voxels at the same physical points
    mirrored_mask.CopyInformation(mirrored_img)
    mask.CopyInformation(image)
    a = _decode(render_thumbnail(image, mask, "CT", size=96))
    b = _decode(render_thumbnail(mirrored_img, mirrored_mask, "CT", size=96))
    assert a.shape == b.shape
    assert (np.abs(a - b).max(axis=2) <= 1).mean() > 0.995
    # the marker (patient left) is on the screen's right of the lesion in the axial panel
    axial = _panels(a, 96)[0]
    assert axial[40:56, 60:90, 0].max() == 255 and axial[40:56, 15:35, 0].max() < 255


# --- geometry ---------------------------------------------------------------------------------------------------


def test_anisotropic_spacing_keeps_the_physical_aspect_in_the_coronal_panel():
    spacing = (0.7, 0.7, 5.0)
    shape = (20, 100, 100)  # z, y, x
    block = np.zeros(shape, dtype=np.uint8)
    block[7:13, 40:60, 40:60] = 1  # 6 slices x 5 mm = 30 mm tall, 20 x 0.7 mm = 14 mm wide
    axes = panel_axes(IDENTITY, "coronal")
    centre = (49.5, 49.5, 10.0)  # i, j, k
    values, inside = sample_panel(block, spacing, centre, axes, fov_mm=60.0, size=120, order=0)  # 0.5 mm / px
    ys, xs = np.nonzero(values > 0)
    assert xs.max() - xs.min() + 1 == pytest.approx(28, abs=1)
    assert ys.max() - ys.min() + 1 == pytest.approx(60, abs=1)
    assert inside.all()  # 60 mm fits inside the 70 x 100 mm coronal plane
    # padding: a field of view larger than the volume has pixels outside it
    _, inside_big = sample_panel(block, spacing, centre, axes, fov_mm=200.0, size=120, order=1)
    assert inside_big.any() and not inside_big.all()
    # and through the renderer: the coronal outline is about 30/14 as tall as it is wide
    image = sitk.GetImageFromArray(block.astype(np.int16) * 100)
    image.SetSpacing(spacing)
    mask = sitk.GetImageFromArray(block)
    mask.CopyInformation(image)
    coronal = _panels(_decode(render_thumbnail(image, mask, "CT", size=160)), 160)[1]
    ys, xs = np.nonzero(_yellow(coronal))
    fov = 3 * 30.0  # three times the largest extent (30 mm)
    assert (xs.max() - xs.min() + 1) * fov / 160 == pytest.approx(14.0, abs=1.2)
    assert (ys.max() - ys.min() + 1) * fov / 160 == pytest.approx(30.0, abs=1.2)


def test_bilinear_sampling_interpolates_between_voxels():
    vol = np.zeros((3, 2, 2), dtype=np.float32)
    vol[:, :, 1] = 100.0  # i = 0 -> 0, i = 1 -> 100
    axes = panel_axes(IDENTITY, "axial")
    values, inside = sample_panel(vol, (1.0, 1.0, 1.0), (0.5, 0.5, 1.0), axes, fov_mm=2.0, size=4)
    assert inside.all()
    np.testing.assert_allclose(values[0], [0.0, 25.0, 75.0, 100.0])  # pixel centres at i = -0.25, 0.25, 0.75, 1.25


def test_two_d_image_gives_the_axial_panel_only():
    arr = np.full((64, 64), -700.0, dtype=np.float32)
    m = np.zeros((64, 64), dtype=np.uint8)
    m[28:36, 28:36] = 1
    arr[m > 0] = 20.0
    image = sitk.GetImageFromArray(arr)
    mask = sitk.GetImageFromArray(m)
    rgb = _decode(render_thumbnail(image, mask, "CT", "CHEST", size=96))
    assert rgb.shape[:2] == (96, 96)
    assert _yellow(rgb).sum() > 10


def test_mask_on_another_grid_is_resampled():
    image, _ = _volume(shape_zyx=(30, 64, 64))
    coarse = np.zeros((15, 32, 32), dtype=np.uint8)
    coarse[6:9, 14:18, 14:18] = 1
    mask = sitk.GetImageFromArray(coarse)
    mask.SetSpacing((2.0, 2.0, 2.0))
    mask.SetOrigin((0.5, 0.5, 0.5))  # voxel centres of the 2 mm grid between pairs of 1 mm voxels
    for panel in _panels(_decode(render_thumbnail(image, mask, "CT", size=96)), 96):
        assert _yellow(panel).sum() > 10


# --- edge cases -------------------------------------------------------------------------------------------------


def test_empty_mask_raises():
    image, mask = _volume()
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    with pytest.raises(ValueError, match="mask is empty"):
        render_thumbnail(image, empty, "CT")


def test_mask_larger_than_image_raises():
    image, _ = _volume(shape_zyx=(30, 64, 64))
    big = np.zeros((30, 64, 100), dtype=np.uint8)
    big[10:20, 20:30, 70:90] = 1  # beyond the image's 64 columns
    mask = sitk.GetImageFromArray(big)
    with pytest.raises(ValueError, match="larger than the image"):
        render_thumbnail(image, mask, "CT")


def test_mask_of_another_dimension_raises():
    image, _ = _volume()
    with pytest.raises(ValueError, match="2-D but the image is 3-D"):
        render_thumbnail(image, sitk.Image(64, 64, sitk.sitkUInt8) + 1, "CT")


def test_non_finite_voxels_raise():
    image, mask = _volume()
    arr = sitk.GetArrayFromImage(image)
    arr[15, 30:34, 30:34] = np.nan  # in the lesion's axial slice
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(image)
    with pytest.raises(ValueError, match="non-finite"):
        render_thumbnail(bad, mask, "CT")


def test_bad_size_and_vector_image_raise():
    image, mask = _volume()
    with pytest.raises(ValueError, match="at least 48"):
        render_thumbnail(image, mask, size=16)
    rgb = sitk.Compose(image, image, image)
    with pytest.raises(ValueError, match="scalar"):
        render_thumbnail(rgb, mask)


# --- montage ----------------------------------------------------------------------------------------------------


def test_montage_grows_with_tiles_and_draws_captions():
    image, mask = _volume()
    tile = render_thumbnail(image, mask, "CT", "CHEST", size=64)
    tw, th = Image.open(io.BytesIO(tile)).size

    def dims(n: int, **kw) -> tuple[int, int]:
        tiles = [(tile, [f"#{i} d=2.31", "lesion 3f2a\u2026", "CT 12.3 cm\u00b3"]) for i in range(n)]
        return Image.open(io.BytesIO(montage(tiles, **kw))).size

    w1, h1 = dims(1)
    w2, h2 = dims(2)
    w5, h5 = dims(5, columns=4)
    assert w1 >= tw and h1 > th  # captions under the tile
    assert w2 > w1 and h2 == h1
    assert w5 > w2 and h5 > h1  # a second row
    assert dims(5, columns=4, title="Nearest lesions")[1] > h5
    assert dims(3, columns=1)[1] > h5 and dims(3, columns=1)[0] == w1
    # a caption far too long for its cell is cut, not overflowing
    long = montage([(tile, ["x" * 500])])
    assert Image.open(io.BytesIO(long)).size == Image.open(io.BytesIO(montage([(tile, ["x"])]))).size


def test_montage_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one tile"):
        montage([])
    with pytest.raises(ValueError, match="not a readable image"):
        montage([(b"not a png", [])])
    image, mask = _volume()
    with pytest.raises(ValueError, match="columns"):
        montage([(render_thumbnail(image, mask, size=64), [])], columns=0)
