"""Lesion-centred crops for the encoder (imaging_assets.features.crops): geometry, orientation, normalisation."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.features.crops import CROP_SIZE, CT_KNOTS_HU, CT_KNOTS_VALUE, lesion_crop

SPACING = (0.8, 0.8, 1.5)
ORIGIN = (-30.0, -40.0, 10.0)
SHAPE_ZYX = (40, 80, 90)
CENTER_MM = (1.3, -5.2, 38.0)
RADIUS_MM = 7.0
LESION_HU, BACKGROUND_HU = 40.0, -800.0


def _image(values: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _phantom(center_mm=CENTER_MM, radius_mm=RADIUS_MM):
    """A sphere of 40 HU in -800 HU lung, plus a gradient so that orientation mistakes show; (image, mask)."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in SHAPE_ZYX], indexing="ij")
    px = ORIGIN[0] + x * SPACING[0]
    py = ORIGIN[1] + y * SPACING[1]
    pz = ORIGIN[2] + z * SPACING[2]
    inside = ((px - center_mm[0]) ** 2 + (py - center_mm[1]) ** 2 + (pz - center_mm[2]) ** 2) <= radius_mm ** 2
    hu = np.where(inside, LESION_HU, BACKGROUND_HU) + 2.0 * px + 1.0 * py - 0.5 * pz  # asymmetric gradient
    return _image(hu.astype(np.int16)), _image(inside.astype(np.uint8))


def _flip_x(img: sitk.Image) -> sitk.Image:
    """The same volume stored with direction diag(-1, 1, 1): array reversed along i, origin at the far end."""
    arr = sitk.GetArrayFromImage(img)[:, :, ::-1].copy()
    origin = list(img.GetOrigin())
    origin[0] += (img.GetSize()[0] - 1) * img.GetSpacing()[0]
    return _image(arr, img.GetSpacing(), origin, (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _swap_xy_flip_z(img: sitk.Image) -> sitk.Image:
    """The same volume stored with i along +y, j along +x and k along -z."""
    arr = sitk.GetArrayFromImage(img)
    arr = np.transpose(arr, (0, 2, 1))[::-1].copy()  # (k, j, i) -> (k', j' = x, i' = y), k reversed
    sx, sy, sz = img.GetSpacing()
    origin = list(img.GetOrigin())
    origin[2] += (img.GetSize()[2] - 1) * sz
    return _image(arr, (sy, sx, sz), origin, (0, 1.0, 0, 1.0, 0, 0, 0, 0, -1.0))


def _centroid(channel: np.ndarray) -> np.ndarray:
    w = channel.astype(np.float64)
    grids = np.meshgrid(*[np.arange(n) for n in w.shape], indexing="ij")
    return np.array([(g * w).sum() / w.sum() for g in grids])


@pytest.fixture(scope="module")
def phantom():
    return _phantom()


def test_shape_dtype_range_and_the_lesion_is_centred(phantom):
    image, mask = phantom
    crop = lesion_crop(image, mask, "CT")
    assert crop.shape == (2, CROP_SIZE, CROP_SIZE, CROP_SIZE) and crop.dtype == np.float16
    assert 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0
    assert np.allclose(_centroid(crop[1]), (CROP_SIZE - 1) / 2.0, atol=0.6)
    volume = float(crop[1].astype(np.float64).sum())  # 1 mm^3 voxels
    assert volume == pytest.approx(4 / 3 * np.pi * RADIUS_MM ** 3, rel=0.1)
    small = lesion_crop(image, mask, "CT", size=16, spacing_mm=2.0)
    assert small.shape == (2, 16, 16, 16)


@pytest.mark.parametrize("reorient", [_flip_x, _swap_xy_flip_z])
def test_flipped_or_permuted_direction_cosines_give_the_same_crop(phantom, reorient):
    image, mask = phantom
    ref = lesion_crop(image, mask, "CT").astype(np.float32)
    other = lesion_crop(reorient(image), reorient(mask), "CT").astype(np.float32)
    assert np.allclose(other, ref, atol=2e-3)
    # and the crop is not symmetric, so a missed flip would show
    assert not np.allclose(ref[0], ref[0][:, :, ::-1], atol=2e-3)


def test_a_mask_on_another_grid_is_resampled_into_the_crop(phantom):
    image, mask = phantom
    ref = lesion_crop(image, mask, "CT").astype(np.float32)
    fine = sitk.Image(70, 70, 60, sitk.sitkUInt8)
    fine.SetSpacing((0.5, 0.5, 0.5))
    fine.SetOrigin((CENTER_MM[0] - 17.0, CENTER_MM[1] - 16.0, CENTER_MM[2] - 14.0))
    other_grid = sitk.Resample(mask, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    crop = lesion_crop(image, other_grid * 7, "CT").astype(np.float32)  # label 7, not 1
    assert float(crop[1].max()) <= 1.0
    assert np.allclose(_centroid(crop[1]), (CROP_SIZE - 1) / 2.0, atol=0.6)
    a, b = ref[1] >= 0.5, crop[1] >= 0.5
    assert (a & b).sum() / (a | b).sum() > 0.85
    assert np.abs(crop[0] - ref[0]).mean() < 0.01


def test_ct_window_and_mr_percentile_scaling(phantom):
    image, mask = phantom
    crop = lesion_crop(image, mask, "CT").astype(np.float32)
    c = CROP_SIZE // 2
    hu_centre = LESION_HU + 2.0 * CENTER_MM[0] + CENTER_MM[1] - 0.5 * CENTER_MM[2]
    assert crop[0, c, c, c] == pytest.approx(0.3 + 0.7 * (hu_centre + 160.0) / 400.0, abs=0.01)  # soft tissue
    assert float(np.median(crop[0][crop[1] == 0])) == pytest.approx(0.3 * 200.0 / 840.0, abs=0.03)  # lung
    assert np.interp([-1000.0, -160.0, 240.0], CT_KNOTS_HU, CT_KNOTS_VALUE).tolist() == [0.0, 0.3, 1.0]
    # -2000 / +3000 HU clip to the window's ends
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    extreme = _image(np.where(sitk.GetArrayFromImage(mask) > 0, 3000.0, -2000.0).astype(np.float32))
    extreme.CopyInformation(image)
    e = lesion_crop(extreme, mask, "CT").astype(np.float32)
    assert e[0, c, c, c] == 1.0 and e[0, 0, 0, 0] == 0.0
    # MR (and unknown): percentile scaling, invariant to a gain and offset of the intensities
    mr = _image((3.0 * arr + 5000.0).astype(np.float32))
    mr.CopyInformation(image)
    m = lesion_crop(mr, mask, "MR").astype(np.float32)
    assert float(m[0].min()) == 0.0 and float(m[0].max()) == 1.0
    assert float(np.percentile(m[0], 50)) > 0.0
    plain = _image(arr)
    plain.CopyInformation(image)
    assert np.allclose(lesion_crop(plain, mask, None).astype(np.float32), m, atol=2e-3)
    assert not np.allclose(m[0], crop[0], atol=0.05)  # not the CT window


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_lesion_at_the_image_border_is_padded(modality):
    edge = (ORIGIN[0] + 2.0, CENTER_MM[1], CENTER_MM[2])  # 2 mm inside the image's x = min face
    image, mask = _phantom(center_mm=edge, radius_mm=5.0)
    crop = lesion_crop(image, mask, modality).astype(np.float32)
    assert crop.shape == (2, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    assert np.isfinite(crop).all()
    c = CROP_SIZE // 2
    outside = crop[0, :, :, : c - 4]  # x < image origin: outside the volume
    assert np.all(outside == 0.0)  # -1024 HU (CT) / the image minimum (MR): the low end of the scale
    assert np.all(crop[1, :, :, : c - 4] == 0.0)
    inside_bg = crop[0, c, c, c + 12]
    assert inside_bg > 0.05  # lung inside the image is not padding


def test_empty_mask_and_2d_input_are_refused(phantom):
    image, mask = phantom
    with pytest.raises(ValueError, match="empty"):
        lesion_crop(image, mask * 0, "CT")
    with pytest.raises(ValueError, match="3-D"):
        lesion_crop(image[:, :, 5], mask[:, :, 5], "CT")


def test_crop_of_a_full_size_ct_is_fast():
    image = sitk.Image(512, 512, 120, sitk.sitkInt16)
    image.SetSpacing((0.7, 0.7, 2.5))
    mask = sitk.Image(512, 512, 120, sitk.sitkUInt8)
    mask[250:262, 240:250, 60:64] = 1
    lesion_crop(image, mask, "CT")
    t0 = time.perf_counter()
    for _ in range(3):
        crop = lesion_crop(image, mask, "CT")
    per = (time.perf_counter() - t0) / 3
    assert crop.shape == (2, CROP_SIZE, CROP_SIZE, CROP_SIZE)
    assert per < 0.25, f"{per * 1000:.0f} ms per crop"  # ~20-30 ms measured on 2 busy cores; generous bound
