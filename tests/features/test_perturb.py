"""Perturbation chain: determinism, noise level, volume adaptation, identity, small lesions, pickling, and
an end-to-end ICC over a synthetic cohort run through the real extraction path."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.features.extract import ExtractionJob, extract_many
from imaging_assets.features.icc import icc, icc_table
from imaging_assets.features.perturb import (
    PerturbationSpec,
    PerturbedLoader,
    estimate_noise_sd,
    perturb,
    perturbation_array,
    perturbation_jobs,
    perturbation_settings,
    split_perturbation_id,
    stratified_sample,
)
from imaging_assets.features.robust import select_robust

STILL = dict(noise=False, rotation_deg=0.0, translation_fraction=0.0, volume_change=0.0, contour_randomisation=False)


def _sphere_case(radius: float = 8.0, noise_sd: float = 10.0, spacing=(1.0, 1.0, 1.0), seed: int = 0,
                 shape=(32, 64, 64)) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = np.array(shape) / 2.0
    phys = [(z - c[0]) * spacing[2], (y - c[1]) * spacing[1], (x - c[2]) * spacing[0]]
    sel = phys[0] ** 2 + phys[1] ** 2 + phys[2] ** 2 <= radius**2
    arr = 100.0 * sel + rng.normal(0.0, noise_sd, shape) if noise_sd else 100.0 * sel
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, 30.0, 5.0))
    mask = sitk.GetImageFromArray(sel.astype(np.uint8))
    mask.CopyInformation(img)
    return img, mask


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


# ------------------------------------------------------------------------------------------------ spec
def test_settings_cover_ranges_and_are_shared_by_lesions() -> None:
    spec = PerturbationSpec()
    settings = perturbation_settings(spec)
    assert len(settings) == 8
    angles = np.array([s["rotation_deg"] for s in settings])
    volumes = np.array([s["volume_change"] for s in settings])
    shifts = np.array([s["translation_vox"] for s in settings])
    assert np.all(np.abs(angles) <= 5.0) and np.all(np.abs(volumes) <= 0.10) and np.all(np.abs(shifts) <= 0.5)
    # Latin hypercube: one value in each of the 8 equal strata of every range
    assert sorted(np.floor((volumes + 0.10) / 0.025).astype(int).tolist()) == list(range(8))
    assert sorted(np.floor((angles + 5.0) / 1.25).astype(int).tolist()) == list(range(8))
    assert perturbation_settings(PerturbationSpec()) == settings
    assert perturbation_settings(PerturbationSpec(seed=1)) != settings
    with pytest.raises(ValueError):
        PerturbationSpec(n_perturbations=0)
    with pytest.raises(ValueError):
        PerturbationSpec(volume_change=-0.1)


def test_deterministic_for_seed_lesion_and_index() -> None:
    img, mask = _sphere_case()
    spec = PerturbationSpec()
    a_img, a_mask, a_info = perturb(img, mask, 3, spec, "lesion-1")
    b_img, b_mask, b_info = perturb(img, mask, 3, spec, "lesion-1")
    np.testing.assert_array_equal(_arr(a_img), _arr(b_img))
    np.testing.assert_array_equal(_arr(a_mask), _arr(b_mask))
    assert a_info == b_info
    # another lesion: same settings (same "rater"), other noise and contour realisation
    c_img, c_mask, c_info = perturb(img, mask, 3, spec, "lesion-2")
    assert c_info["rotation_deg"] == a_info["rotation_deg"]
    assert c_info["volume_change_target"] == a_info["volume_change_target"]
    assert not np.array_equal(_arr(a_img), _arr(c_img))
    # another seed or index: other settings
    assert perturb(img, mask, 3, PerturbationSpec(seed=5), "lesion-1")[2]["rotation_deg"] != a_info["rotation_deg"]
    assert perturb(img, mask, 4, spec, "lesion-1")[2]["rotation_deg"] != a_info["rotation_deg"]
    assert a_img.GetPixelID() == sitk.sitkFloat32 and a_mask.GetPixelID() == sitk.sitkUInt8
    assert a_img.GetOrigin() == img.GetOrigin() and a_mask.GetSize() == img.GetSize()


def test_identity_returns_original_arrays() -> None:
    img, mask = _sphere_case()
    out_img, out_mask, info = perturb(img, mask, 0, PerturbationSpec(**STILL), "x")
    np.testing.assert_array_equal(_arr(out_img), _arr(img))
    np.testing.assert_array_equal(_arr(out_mask), _arr(mask))
    assert info["noise_sd"] == 0.0 and info["volume_change"] == 0.0 and info["rotation_deg"] == 0.0


def test_index_out_of_range_and_empty_mask() -> None:
    img, mask = _sphere_case()
    with pytest.raises(ValueError, match="index"):
        perturb(img, mask, 8, PerturbationSpec(), "x")
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    with pytest.raises(ValueError, match="empty"):
        perturb(img, empty, 0, PerturbationSpec(), "x")


# ----------------------------------------------------------------------------------------------- noise
@pytest.mark.parametrize("true_sd", [4.0, 25.0])
def test_noise_estimate_and_added_noise(true_sd: float) -> None:
    img, mask = _sphere_case(noise_sd=true_sd, spacing=(0.8, 0.8, 2.5))
    est = estimate_noise_sd(img)
    assert est == pytest.approx(true_sd, rel=0.10)
    spec = PerturbationSpec(**{**STILL, "noise": True})
    out_img, out_mask, info = perturb(img, mask, 2, spec, "n")
    added = _arr(out_img).astype(np.float64) - _arr(img)
    assert info["noise_sd"] == pytest.approx(est)
    assert float(added.std()) == pytest.approx(est, rel=0.10)
    assert abs(float(added.mean())) < 0.05 * est
    np.testing.assert_array_equal(_arr(out_mask), _arr(mask))


def test_noise_estimate_ignores_flat_padding_and_edges() -> None:
    img, _ = _sphere_case(noise_sd=8.0)
    arr = _arr(img)
    arr[:, :, :20] = -3024.0  # outside the scan field: exactly constant
    arr[:, 40:, :] += 500.0  # a strong edge
    padded = sitk.GetImageFromArray(arr)
    assert estimate_noise_sd(padded) == pytest.approx(8.0, rel=0.10)
    region = sitk.GetImageFromArray((np.arange(arr.shape[2])[None, None, :] > 30).repeat(64, 1).repeat(32, 0).astype(np.uint8))
    assert estimate_noise_sd(padded, region) == pytest.approx(8.0, rel=0.10)
    flat = sitk.GetImageFromArray(np.zeros((4, 10, 10), np.float32))
    assert estimate_noise_sd(flat) == 0.0


# --------------------------------------------------------------------------------------------- volume
@pytest.mark.parametrize("others", [False, True])
def test_volume_change_hits_target_on_sphere(others: bool) -> None:
    img, mask = _sphere_case(noise_sd=5.0)
    n0 = int(_arr(mask).sum())
    kw = dict(STILL, volume_change=0.10)
    if others:
        kw.update(rotation_deg=5.0, translation_fraction=0.5, contour_randomisation=True, noise=True)
    spec = PerturbationSpec(**kw)
    targets = []
    for i in range(spec.n_perturbations):
        _, out_mask, info = perturb(img, mask, i, spec, "v")
        n1 = int(_arr(out_mask).sum())
        target = info["volume_change_target"]
        targets.append(target)
        assert abs(n1 / n0 - 1.0 - target) <= 0.03, (i, n1, n0, target)
        assert info["n_voxels_after"] == n1
        if not others:  # pure growth is a superset, pure shrinkage a subset, of the original mask
            new, old = _arr(out_mask).astype(bool), _arr(mask).astype(bool)
            assert (new >= old).all() if target > 0 else (new <= old).all()
    assert min(targets) < -0.05 and max(targets) > 0.05  # both directions, up to +-10 %


def test_plus_minus_ten_percent_explicitly() -> None:
    img, mask = _sphere_case(radius=6.0, noise_sd=0.0)
    n0 = int(_arr(mask).sum())
    spec = PerturbationSpec(**dict(STILL, volume_change=0.10), n_perturbations=2, seed=0)
    for i, s in enumerate(perturbation_settings(spec)):
        _, out_mask, _ = perturb(img, mask, i, spec, "v")
        assert abs(int(_arr(out_mask).sum()) / n0 - 1 - s["volume_change"]) <= 0.03


# ------------------------------------------------------------------------------------------ geometry
def test_rotation_moves_image_and_mask_together() -> None:
    z, y, x = np.mgrid[:16, :64, :64]
    box = (np.abs(x - 32) <= 14) & (np.abs(y - 32) <= 3) & (np.abs(z - 8) <= 3)  # elongated along x
    img = sitk.GetImageFromArray((200.0 * box).astype(np.float32))
    img.SetSpacing((0.7, 0.7, 3.0))
    mask = sitk.GetImageFromArray(box.astype(np.uint8))
    mask.CopyInformation(img)
    spec = PerturbationSpec(**dict(STILL, rotation_deg=30.0), n_perturbations=4)
    for i in range(4):
        out_img, out_mask, info = perturb(img, mask, i, spec, "r")
        im, mk = _arr(out_img), _arr(out_mask).astype(bool)
        bright = im > 100.0
        dice = 2 * (bright & mk).sum() / (bright.sum() + mk.sum())
        assert dice > 0.95, (info["rotation_deg"], dice)
        # in-plane rotation: the slices covered do not change, the in-plane footprint does
        assert set(np.flatnonzero(mk.any(axis=(1, 2)))) == set(np.flatnonzero(box.any(axis=(1, 2))))
        if abs(info["rotation_deg"]) > 10:
            assert (mk != box).sum() > 0.2 * box.sum()
        assert abs(mk.sum() / box.sum() - 1) < 0.1


def test_region_limited_perturbation_matches_whole_image_inside() -> None:
    img, mask = _sphere_case(radius=5.0, noise_sd=6.0)
    spec = PerturbationSpec(**dict(STILL, rotation_deg=5.0, translation_fraction=0.5, volume_change=0.1))
    whole_img, whole_mask, _ = perturb(img, mask, 1, spec, "g")
    part_img, part_mask, info = perturb(img, mask, 1, spec, "g", margin_voxels=(2, 2, 1))
    np.testing.assert_array_equal(_arr(whole_mask), _arr(part_mask))
    ix, iy, iz = info["region_index"]
    sx, sy, sz = info["region_size"]
    inside = (slice(iz, iz + sz), slice(iy, iy + sy), slice(ix, ix + sx))
    assert sx < 64 and sy < 64
    np.testing.assert_allclose(_arr(part_img)[inside], _arr(whole_img)[inside], atol=1e-4)
    outside = np.ones(_arr(img).shape, bool)
    outside[inside] = False
    np.testing.assert_array_equal(_arr(part_img)[outside], _arr(img)[outside])


def test_small_lesion_mask_stays_nonempty() -> None:
    img, _ = _sphere_case(noise_sd=10.0, spacing=(0.9, 0.9, 2.0))
    sel = np.zeros((32, 64, 64), bool)
    sel[16, 30:36, 30:35] = True  # 30 voxels in one slice
    mask = sitk.GetImageFromArray(sel.astype(np.uint8))
    mask.CopyInformation(img)
    spec = PerturbationSpec()
    for i in range(spec.n_perturbations):
        _, out_mask, info = perturb(img, mask, i, spec, "tiny")
        n1 = int(_arr(out_mask).sum())
        assert n1 >= 25 and info["n_voxels_after"] == n1


def test_label_selects_the_lesion() -> None:
    img, mask = _sphere_case(radius=5.0, noise_sd=0.0)
    labels = _arr(mask).astype(np.uint8) * 3
    labels[0:3, 0:3, 0:3] = 7  # another lesion
    lm = sitk.GetImageFromArray(labels)
    lm.CopyInformation(img)
    _, out_mask, info = perturb(img, lm, 0, PerturbationSpec(**STILL), "l", label=3)
    np.testing.assert_array_equal(_arr(out_mask), _arr(mask))


# ----------------------------------------------------------------------------------- loaders and jobs
RADII = (4.0, 5.0, 6.0, 7.0, 5.5, 6.5)
CONTRAST = (100.0, 220.0, 340.0, 460.0, 580.0, 700.0)
INNER_SD = (5.0, 15.0, 25.0, 35.0, 45.0, 55.0)
CENTRES = ((12, 18, 16), (32, 18, 16), (52, 18, 16), (12, 46, 16), (32, 46, 16), (52, 46, 16))  # x, y, z


@dataclass(frozen=True)
class SpheresLoader:
    """Picklable loader: a 64x64x32 volume with six spheres of different size, contrast and inner noise;
    returns the mask of sphere ``lesion``."""

    lesion: int
    seed: int = 3
    noise_sd: float = 10.0

    def __call__(self) -> tuple[sitk.Image, sitk.Image, int]:
        rng = np.random.default_rng(self.seed)
        z, y, x = np.mgrid[:32, :64, :64]
        arr = rng.normal(0.0, self.noise_sd, (32, 64, 64))
        label = np.zeros((32, 64, 64), np.uint8)
        for i, ((cx, cy, cz), r) in enumerate(zip(CENTRES, RADII, strict=True)):
            inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r * r
            arr[inside] += CONTRAST[i] + rng.normal(0.0, INNER_SD[i], int(inside.sum()))
            label[inside] = i + 1
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        mask = sitk.GetImageFromArray(label)
        mask.CopyInformation(img)
        return img, mask, self.lesion + 1


FAST_PARAMS = {"imageType": {"Original": {}}, "featureClass": {"firstorder": [], "shape": []},
               "setting": {"binWidth": 25, "label": 1}}


def test_perturbed_loader_pickles_and_reproduces() -> None:
    loader = PerturbedLoader(SpheresLoader(2), 5, PerturbationSpec(), "L2", params=FAST_PARAMS, crop=True)
    clone = pickle.loads(pickle.dumps(loader))
    assert clone == loader
    a_img, a_mask, a_label = loader()
    b_img, b_mask, b_label = clone()
    assert a_label == b_label == 1
    np.testing.assert_array_equal(_arr(a_img), _arr(b_img))
    np.testing.assert_array_equal(_arr(a_mask), _arr(b_mask))
    assert set(np.unique(_arr(a_mask))) == {0, 1}
    # the label was honoured: the mask sits on sphere 2 (x = 52, y = 18)
    zyx = np.argwhere(_arr(a_mask)).mean(axis=0)
    assert np.allclose(zyx[::-1], CENTRES[2], atol=1.0)


def test_perturbation_jobs_ids_and_params() -> None:
    jobs = [ExtractionJob(f"les{i}", SpheresLoader(i), params=FAST_PARAMS, crop=False) for i in range(2)]
    spec = PerturbationSpec(n_perturbations=3)
    pjobs = perturbation_jobs(jobs, spec)
    assert [j.lesion_id for j in pjobs] == ["les0#p0", "les0#p1", "les0#p2", "les1#p0", "les1#p1", "les1#p2"]
    assert all(j.params is FAST_PARAMS and j.crop is False for j in pjobs)
    assert pjobs[4].loader == PerturbedLoader(jobs[1].loader, 1, spec, "les1", params=FAST_PARAMS, crop=False)
    assert split_perturbation_id("les1#p2") == ("les1", 2)
    with pytest.raises(ValueError):
        split_perturbation_id("les1")


def test_icc_over_synthetic_cohort_through_extraction() -> None:
    """Six spheres x eight perturbations through the real extraction path: intensity and size features are
    reproducible, features driven by noise and by the sphere's (identical) shape are not."""
    jobs = [ExtractionJob(f"L{i}", SpheresLoader(i), params=FAST_PARAMS) for i in range(6)]
    spec = PerturbationSpec()
    outcomes = list(extract_many(perturbation_jobs(jobs, spec), workers=1))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    x, ids, names, left_out = perturbation_array(outcomes, spec.n_perturbations)
    assert x.shape == (6, 8, len(names)) and ids == [f"L{i}" for i in range(6)] and not left_out
    # the perturbations really changed something
    vol = x[:, :, names.index("original_shape_VoxelVolume")]
    assert np.all(vol.std(axis=1) > 0)
    value, low, _ = icc(x)
    v = dict(zip(names, value, strict=True))
    lo = dict(zip(names, low, strict=True))
    for robust in ("original_firstorder_Mean", "original_firstorder_Median", "original_shape_VoxelVolume",
                   "original_shape_MeshVolume"):
        assert v[robust] > 0.95 and lo[robust] > 0.85, (robust, v[robust], lo[robust])
    for fragile in ("original_firstorder_Minimum", "original_shape_Elongation", "original_shape_Sphericity"):
        assert v[fragile] < 0.6, (fragile, v[fragile])
        assert v[fragile] < v["original_firstorder_Mean"] - 0.3
    assert v["original_firstorder_Kurtosis"] < v["original_firstorder_Mean"]
    rows = icc_table((x, names))
    robust_set = select_robust(rows, None, 0.75)
    # the planted unstable feature (Minimum: set by the noise of a few voxels) is excluded, a stable shape
    # feature is kept
    assert "original_firstorder_Mean" in robust_set and "original_firstorder_Minimum" not in robust_set
    assert "original_shape_VoxelVolume" in robust_set


# ------------------------------------------------------------------------------------------- sampling
def _rows(n_per: dict[tuple[str, str], int]) -> list[dict]:
    rows = []
    for (mod, roi), n in n_per.items():
        for i in range(n):
            rows.append({"lesion_id": f"{mod}-{roi}-{i:03d}", "modality": mod, "roi_name": roi,
                         "volume_mm3": float((i * 37) % n + 1) * 10.0})
    return rows


def test_stratified_sample_proportional_spread_deterministic() -> None:
    rows = _rows({("CT", "GTV"): 60, ("MR", "GTV"): 30, ("PT", "node"): 10})
    sample = stratified_sample(rows, 20, seed=1)
    assert len(sample) == 20
    counts = {}
    for r in sample:
        counts[r["modality"]] = counts.get(r["modality"], 0) + 1
    assert counts == {"CT": 12, "MR": 6, "PT": 2}
    ct_vols = sorted(r["volume_mm3"] for r in sample if r["modality"] == "CT")
    all_ct = sorted(r["volume_mm3"] for r in rows if r["modality"] == "CT")
    assert ct_vols[0] <= np.quantile(all_ct, 0.1) and ct_vols[-1] >= np.quantile(all_ct, 0.9)
    assert stratified_sample(rows, 20, seed=1) == sample
    assert stratified_sample(rows, 20, seed=2) != sample
    assert len({r["lesion_id"] for r in sample}) == 20
    # input order kept
    pos = {r["lesion_id"]: i for i, r in enumerate(rows)}
    assert [pos[r["lesion_id"]] for r in sample] == sorted(pos[r["lesion_id"]] for r in sample)


def test_stratified_sample_small_inputs() -> None:
    rows = _rows({("CT", "GTV"): 3, ("MR", "GTV"): 2})
    assert stratified_sample(rows, 10) == rows
    assert stratified_sample(rows, 0) == []
    few = stratified_sample(rows, 1)
    assert len(few) == 1 and few[0]["modality"] == "CT"
    no_volume = [{k: v for k, v in r.items() if k != "volume_mm3"} for r in _rows({("CT", "GTV"): 9})]
    assert len(stratified_sample(no_volume, 4)) == 4
