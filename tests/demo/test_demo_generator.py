"""Tests of the synthetic demo cohort generator (imaging_assets.demo)."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, SegmentationStorage
from scipy import ndimage

from imaging_assets.demo.generator import (
    DemoCohort,
    generate_cohort,
    patient_spec,
    render_patient,
)
from imaging_assets.demo.phantom import PHENOTYPES
from imaging_assets.demo.rtstruct import mask_to_contours

SEED = 7
N_PATIENTS = 6


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    out = tmp_path_factory.mktemp("demo_gen") / "cohort"
    return generate_cohort(out, n_patients=N_PATIENTS, seed=SEED, workers=2)


@pytest.fixture(scope="module")
def manifest(cohort: DemoCohort) -> dict:
    return json.loads(cohort.manifest_json.read_text())


@pytest.fixture(scope="module")
def broken_paths(cohort: DemoCohort, manifest: dict) -> dict[Path, dict]:
    return {cohort.out_dir / b["path"]: b for b in manifest["broken"]}


@pytest.fixture(scope="module")
def datasets(cohort: DemoCohort, broken_paths: dict[Path, dict]) -> dict[Path, pydicom.Dataset]:
    """Every file under dicom/ that is not listed as broken, read strictly."""
    return {
        p: pydicom.dcmread(p, force=False)
        for p in sorted(cohort.dicom_dir.rglob("*"))
        if p.is_file() and p not in broken_paths
    }


@pytest.fixture(scope="module")
def renders(cohort: DemoCohort) -> dict[str, object]:
    """Generator's in-memory volumes and masks, keyed by PatientID."""
    out = {}
    for i in range(N_PATIENTS):
        r = render_patient(SEED, i)
        out[r.spec.patient_id] = r
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _series_slices(datasets: dict[Path, pydicom.Dataset], series_uid: str) -> list[pydicom.Dataset]:
    """Image slices of a series sorted along the slice normal."""
    slices = [ds for ds in datasets.values() if ds.SOPClassUID == CTImageStorage
              and ds.SeriesInstanceUID == series_uid]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(slices, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _even_odd_raster(polys_mm: list[np.ndarray], ds: pydicom.Dataset) -> np.ndarray:
    """Even-odd rasterisation of planar polygons (x, y in mm) at the voxel centres of one axial slice."""
    x0, y0 = (float(v) for v in ds.ImagePositionPatient[:2])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    jj, ii = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
    centres = np.column_stack([x0 + ii.ravel() * dc, y0 + jj.ravel() * dr])
    out = np.zeros(ds.Rows * ds.Columns, dtype=bool)
    for poly in polys_mm:
        out ^= MplPath(poly).contains_points(centres)
    return out.reshape(ds.Rows, ds.Columns)


def _rasterise_roi(rt: pydicom.Dataset, roi_number: int, slices: list[pydicom.Dataset]) -> np.ndarray:
    by_uid = {ds.SOPInstanceUID: k for k, ds in enumerate(slices)}
    polys: dict[int, list[np.ndarray]] = defaultdict(list)
    roi = next(r for r in rt.ROIContourSequence if r.ReferencedROINumber == roi_number)
    for c in roi.ContourSequence:
        assert c.ContourGeometricType == "CLOSED_PLANAR"
        pts = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)
        assert len(pts) == c.NumberOfContourPoints
        k = by_uid[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert np.allclose(pts[:, 2], float(slices[k].ImagePositionPatient[2]))  # planar, on its slice
        polys[k].append(pts[:, :2])
    mask = np.zeros((len(slices), slices[0].Rows, slices[0].Columns), dtype=bool)
    for k, p in polys.items():
        mask[k] = _even_odd_raster(p, slices[k])
    return mask


# ------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(
    "shape",
    ["disc", "ring", "two_blobs", "diagonal_pixels", "single_pixel", "edge_touching"],
)
def test_mask_to_contours_round_trips_through_even_odd_rasterisation(shape: str) -> None:
    yy, xx = np.mgrid[0:24, 0:24]
    r = np.hypot(yy - 11.3, xx - 12.1)
    masks = {
        "disc": r <= 7,
        "ring": (r <= 8) & (r > 4),
        "two_blobs": (np.hypot(yy - 5, xx - 5) <= 3) | (np.hypot(yy - 17, xx - 17) <= 4),
        "diagonal_pixels": np.eye(24, dtype=bool) & (xx < 6),
        "single_pixel": (yy == 3) & (xx == 20),
        "edge_touching": (yy < 5) & (xx < 9),
    }
    mask = masks[shape]
    contours = mask_to_contours(mask)
    assert contours and all(c.ndim == 2 and c.shape[1] == 2 and len(c) >= 3 for c in contours)
    jj, ii = np.mgrid[0:24, 0:24]
    centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(float)
    raster = np.zeros(centres.shape[0], dtype=bool)
    for c in contours:
        raster ^= MplPath(c).contains_points(centres)
    np.testing.assert_array_equal(raster.reshape(24, 24), mask)
    if shape == "ring":
        assert len(contours) == 2  # outer + inner (hole)


def test_at_least_four_phenotypes_in_20_patients_and_cohort_rules() -> None:
    specs = [patient_spec(0, i) for i in range(20)]
    phenotypes = {p for s in specs for p in s.phenotypes}
    assert len(phenotypes) >= 4 and phenotypes <= set(PHENOTYPES)
    assert all(1 <= len(s.lesions) <= 3 for s in specs)
    assert sum(len(s.series) > 1 for s in specs) >= 2  # >= 10 % test-retest
    n_rt = sum(s.seg_kind == "rtstruct" for s in specs)
    assert 3 <= n_rt <= 7  # ~25 % RTSTRUCT
    assert len({s.patient_id for s in specs}) == 20
    assert all(re.fullmatch(r"MRN\d{7}", s.patient_id) for s in specs)
    # outcome phenotype is the phenotype of the largest lesion
    for s in specs:
        assert s.outcome_phenotype == s.lesions[int(np.argmax(s.lesion_volumes_mm3))].phenotype
    # lesions never overlap (bounding spheres apart)
    for s in specs:
        for a in range(len(s.lesions)):
            for b in range(a + 1, len(s.lesions)):
                la, lb = s.lesions[a], s.lesions[b]
                assert np.linalg.norm(la.center - lb.center) > la.r_max + lb.r_max


def test_rendered_volume_is_hu_realistic() -> None:
    r = render_patient(SEED, 0)
    vol, grid = r.volumes[0], r.spec.series[0].grid
    assert vol.dtype == np.int16
    assert 40 <= vol.shape[0] <= 60 and vol.shape[1:] == (128, 128)
    assert 0.7 <= grid.pixel_spacing <= 0.9 and 2.0 <= grid.slice_spacing <= 3.0
    an = r.spec.anatomy
    mid = vol.shape[0] // 2
    xs, ys = grid.xs(), grid.ys()
    # lung centre patch about -850 HU, spine dense bone, air corner with realistic noise
    j = int(np.argmin(np.abs(ys - an.lung_cy)))
    i = int(np.argmin(np.abs(xs - an.lung_cx)))
    lung_patch = vol[mid, j - 2 : j + 3, i - 2 : i + 3].astype(float)
    soft = vol.astype(float)
    assert -900 <= np.median(lung_patch) <= -780
    js = int(np.argmin(np.abs(ys - an.spine_cy)))
    i0 = int(np.argmin(np.abs(xs)))
    assert vol[:, js - 1 : js + 2, i0 - 1 : i0 + 2].max() >= 700
    corner = soft[:, :8, :8]
    assert 8.0 <= corner.std() <= 25.0 and -1030 <= corner.mean() <= -970
    assert all(m.dtype == bool and m.shape == vol.shape and m.any() for m in r.masks[0])
    assert not np.any(np.sum(r.masks[0], axis=0) > 1)  # lesion masks do not overlap


# ------------------------------------------------------------------------------------ written cohort
def test_layout_and_manifest(cohort: DemoCohort, manifest: dict) -> None:
    out = cohort.out_dir
    assert cohort.dicom_dir == out / "dicom"
    assert {p.name for p in out.iterdir()} == {"dicom", "outcomes.csv", "ground_truth.csv", "manifest.json"}
    files = [p for p in cohort.dicom_dir.rglob("*") if p.is_file()]
    assert all(p.suffix == ".dcm" for p in files)
    assert all(len(p.relative_to(cohort.dicom_dir).parts) == 4 for p in files)  # PID/study/series/file
    assert manifest["seed"] == SEED and manifest["n_patients"] == N_PATIENTS
    assert manifest["generator_version"]
    assert manifest["n_files"] == len(files) == cohort.n_files
    assert manifest["n_lesions"] == cohort.n_lesions
    assert cohort.n_patients == N_PATIENTS
    assert {b["kind"] for b in manifest["broken"]} == {"truncated", "not_dicom", "no_pixel_data", "missing_slice"}


def test_valid_files_read_strictly_and_broken_are_exactly_the_manifest(
    cohort: DemoCohort, broken_paths: dict[Path, dict]
) -> None:
    found_broken: set[Path] = set()
    for p in sorted(cohort.dicom_dir.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, force=False)
        except InvalidDicomError:
            found_broken.add(p)
            continue
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        if ds.SOPClassUID == CTImageStorage:
            if "PixelData" not in ds:
                found_broken.add(p)
                continue
            try:
                assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
            except ValueError:
                found_broken.add(p)
    listed_existing = {p for p, b in broken_paths.items() if b["kind"] != "missing_slice"}
    assert found_broken == listed_existing
    kinds = {b["kind"]: p for p, b in broken_paths.items()}
    assert not kinds["missing_slice"].exists()
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(kinds["not_dicom"], force=False)
    assert "PixelData" not in pydicom.dcmread(kinds["no_pixel_data"])
    assert pydicom.dcmread(kinds["no_pixel_data"]).SOPClassUID == CTImageStorage


def test_ct_headers(datasets: dict[Path, pydicom.Dataset]) -> None:
    cts = [ds for ds in datasets.values() if ds.SOPClassUID == CTImageStorage]
    assert cts
    for ds in cts:
        assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST" and ds.Manufacturer
        assert re.fullmatch(r"MRN\d{7}", ds.PatientID)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", str(ds.PatientName))
        assert 1940 <= int(ds.PatientBirthDate[:4]) <= 1990
        assert ds.PatientSex in ("M", "F") and ds.StudyDate and ds.StudyTime and ds.AccessionNumber
        assert ds.Rows == ds.Columns == 128 and ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == -1024
        assert 0.7 <= float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) <= 0.9
        assert 2.0 <= float(ds.SpacingBetweenSlices) <= 3.0 and float(ds.SliceThickness) > 0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.FrameOfReferenceUID and ds.SeriesNumber and ds.InstanceNumber
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert all(len(uid) <= 64 for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID))


def test_series_geometry_and_missing_slice(
    datasets: dict[Path, pydicom.Dataset], manifest: dict
) -> None:
    missing = next(b for b in manifest["broken"] if b["kind"] == "missing_slice")
    series_uids = {ds.SeriesInstanceUID for ds in datasets.values()
                   if ds.SOPClassUID == CTImageStorage and ds.SeriesNumber < 900}
    gaps_seen = 0
    for uid in series_uids:
        slices = _series_slices(datasets, uid)
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
        dz = float(slices[0].SpacingBetweenSlices)
        steps = np.diff(z)
        assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
        if uid == missing["series_instance_uid"]:
            assert np.sum(np.isclose(steps, 2 * dz, atol=1e-3)) == 1
            assert missing["sop_instance_uid"] not in {ds.SOPInstanceUID for ds in slices}
            gaps_seen += 1
            n = len(slices) + 1
        else:
            assert np.allclose(steps, dz, atol=1e-3)
            n = len(slices)
        assert 40 <= n <= 60
    assert gaps_seen == 1


def test_volumes_reassembled_from_files_match_the_generator(
    datasets: dict[Path, pydicom.Dataset], renders: dict, manifest: dict
) -> None:
    missing = next(b for b in manifest["broken"] if b["kind"] == "missing_slice")
    compared = 0
    for pid, r in renders.items():
        for plan, vol in zip(r.spec.series, r.volumes, strict=True):
            slices = _series_slices(datasets, plan.series_instance_uid)
            assert all(ds.PatientID == pid for ds in slices)
            got = {
                round(float(ds.ImagePositionPatient[2]), 3): ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope)
                + int(ds.RescaleIntercept)
                for ds in slices
            }
            expected_z = [round(z, 3) for z in plan.grid.z_positions]
            for k, z in enumerate(expected_z):
                if plan.sop_instance_uids[k] == missing["sop_instance_uid"]:
                    assert z not in got
                    continue
                np.testing.assert_array_equal(got[z], vol[k])
                compared += 1
            x0, y0 = (float(v) for v in slices[0].ImagePositionPatient[:2])
            assert (x0, y0) == (plan.grid.origin_x, plan.grid.origin_y)
    assert compared > 200


def _gt_by_seg(cohort: DemoCohort) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _read_csv(cohort.ground_truth_csv):
        rows[row["seg_sop_instance_uid"]].append(row)
    return rows


def test_seg_references_and_masks_match(
    cohort: DemoCohort, datasets: dict[Path, pydicom.Dataset], renders: dict
) -> None:
    gt = _gt_by_seg(cohort)
    seg_paths = [p for p, ds in datasets.items() if ds.SOPClassUID == SegmentationStorage]
    assert seg_paths
    for p in seg_paths:
        seg = hd.seg.segread(p)
        rows = sorted(gt[seg.SOPInstanceUID], key=lambda r: int(r["segment_number"]))
        assert rows and all(r["seg_kind"] == "seg" for r in rows)
        image_series = rows[0]["series_instance_uid"]
        assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [image_series]
        assert seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == rows[0]["study_instance_uid"]
        r = renders[seg.PatientID]
        s = next(i for i, pl in enumerate(r.spec.series) if pl.series_instance_uid == image_series)
        plan = r.spec.series[s]
        refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refs == set(plan.sop_instance_uids)
        numbers = [int(row["segment_number"]) for row in rows]
        assert list(seg.get_segment_numbers()) == numbers
        for row in rows:
            assert seg.get_segment_description(int(row["segment_number"])).SegmentLabel == row["segment_label"]
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(plan.sop_instance_uids), segment_numbers=numbers
        )
        for li, row in enumerate(rows):
            expected = r.masks[s][int(row["lesion_index"])]
            np.testing.assert_array_equal(pixels[..., li].astype(bool), expected)
            assert int(row["volume_voxels"]) == int(expected.sum())


def test_rtstruct_references_and_contours_match_masks(
    cohort: DemoCohort, datasets: dict[Path, pydicom.Dataset], renders: dict
) -> None:
    gt = _gt_by_seg(cohort)
    rt_paths = [p for p, ds in datasets.items() if ds.SOPClassUID == RTStructureSetStorage]
    assert rt_paths
    structure = np.ones((1, 3, 3), dtype=bool)  # in-plane 8-neighbourhood
    for p in rt_paths:
        rt = datasets[p]
        rows = sorted(gt[rt.SOPInstanceUID], key=lambda r: int(r["segment_number"]))
        assert rows and all(r["seg_kind"] == "rtstruct" for r in rows)
        image_series = rows[0]["series_instance_uid"]
        r = renders[rt.PatientID]
        s = next(i for i, pl in enumerate(r.spec.series) if pl.series_instance_uid == image_series)
        plan = r.spec.series[s]
        ref_for = rt.ReferencedFrameOfReferenceSequence[0]
        assert ref_for.FrameOfReferenceUID == plan.frame_of_reference_uid
        study = ref_for.RTReferencedStudySequence[0]
        assert study.ReferencedSOPInstanceUID == rt.StudyInstanceUID == rows[0]["study_instance_uid"]
        ref_series = study.RTReferencedSeriesSequence[0]
        assert ref_series.SeriesInstanceUID == image_series
        assert {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence} == set(plan.sop_instance_uids)
        assert [int(x.ROINumber) for x in rt.StructureSetROISequence] == [int(r["segment_number"]) for r in rows]
        assert [x.ROIName for x in rt.StructureSetROISequence] == [r["segment_label"] for r in rows]
        assert len(rt.RTROIObservationsSequence) == len(rows)

        slices = _series_slices(datasets, image_series)
        assert len(slices) == len(plan.sop_instance_uids)  # the missing-slice series is a SEG series
        for row in rows:
            expected = r.masks[s][int(row["lesion_index"])]
            got = _rasterise_roi(rt, int(row["segment_number"]), slices)
            diff = got ^ expected
            band = ndimage.binary_dilation(expected, structure) & ~ndimage.binary_erosion(expected, structure)
            assert not np.any(diff & ~band), "contour error beyond one voxel of the boundary"
            assert diff.sum() <= 0.02 * expected.sum()


def test_hole_lesion_has_inner_contour_and_empty_hole(
    cohort: DemoCohort, datasets: dict[Path, pydicom.Dataset], renders: dict
) -> None:
    rows = [r for r in _read_csv(cohort.ground_truth_csv) if r["has_hole"] == "True" and r["seg_kind"] == "rtstruct"]
    assert rows
    row = rows[0]
    rt = next(ds for ds in datasets.values() if ds.SOPInstanceUID == row["seg_sop_instance_uid"])
    roi = next(x for x in rt.ROIContourSequence if x.ReferencedROINumber == int(row["segment_number"]))
    per_slice: dict[str, list[np.ndarray]] = defaultdict(list)
    for c in roi.ContourSequence:
        per_slice[c.ContourImageSequence[0].ReferencedSOPInstanceUID].append(
            np.asarray(c.ContourData, dtype=float).reshape(-1, 3)[:, :2]
        )
    nested = 0
    for polys in per_slice.values():
        for a in polys:
            for b in polys:
                if a is not b and MplPath(a).contains_points(b).all():
                    nested += 1
    assert nested >= 1

    r = renders[row["patient_id"]]
    s = next(i for i, pl in enumerate(r.spec.series) if pl.series_instance_uid == row["series_instance_uid"])
    plan, lesion = r.spec.series[s], r.spec.lesions[int(row["lesion_index"])]
    slices = _series_slices(datasets, row["series_instance_uid"])
    got = _rasterise_roi(rt, int(row["segment_number"]), slices)
    centre = lesion.center + np.asarray(plan.shift)
    k = int(np.argmin(np.abs(plan.grid.zs() - centre[2])))
    j = int(np.argmin(np.abs(plan.grid.ys() - centre[1])))
    i = int(np.argmin(np.abs(plan.grid.xs() - centre[0])))
    assert not got[k, j, i] and not r.masks[s][int(row["lesion_index"])][k, j, i]  # the hole is empty
    assert got[k].sum() > 0  # ... inside a ring


def test_test_retest_series(cohort: DemoCohort) -> None:
    rows = _read_csv(cohort.ground_truth_csv)
    retest = [r for r in rows if r["is_retest"] == "True"]
    patients = {r["patient_id"] for r in rows}
    assert len({r["patient_id"] for r in retest}) >= max(1, len(patients) // 10)
    for rr in retest:
        base = next(r for r in rows if r["patient_id"] == rr["patient_id"] and r["is_retest"] == "False"
                    and r["lesion_index"] == rr["lesion_index"])
        assert base["study_instance_uid"] == rr["study_instance_uid"]
        assert base["series_instance_uid"] != rr["series_instance_uid"]
        assert base["seg_sop_instance_uid"] != rr["seg_sop_instance_uid"]
        shift = np.array([float(rr[c]) - float(base[c]) for c in ("center_x", "center_y", "center_z")])
        assert 0 < np.linalg.norm(shift) < 6.0
        assert abs(int(rr["volume_voxels"]) / int(base["volume_voxels"]) - 1) < 0.35


def test_outcomes_and_ground_truth_tables(
    cohort: DemoCohort, datasets: dict[Path, pydicom.Dataset]
) -> None:
    outcomes = _read_csv(cohort.outcomes_csv)
    assert list(outcomes[0]) == ["patient_id", "time_months", "event", "age", "sex", "stage"]
    assert len(outcomes) == N_PATIENTS
    dicom_ids = {ds.PatientID for ds in datasets.values()}
    assert {o["patient_id"] for o in outcomes} == dicom_ids
    for o in outcomes:
        assert float(o["time_months"]) > 0 and o["event"] in ("0", "1")
        assert 20 <= int(o["age"]) <= 90 and o["sex"] in ("M", "F") and o["stage"] in ("I", "II", "III", "IV")

    gt = _read_csv(cohort.ground_truth_csv)
    n_written = 0
    labels: dict[tuple[str, int], str] = {}
    for ds in datasets.values():
        if ds.SOPClassUID == SegmentationStorage:
            for item in ds.SegmentSequence:
                labels[(ds.SOPInstanceUID, int(item.SegmentNumber))] = item.SegmentLabel
                n_written += 1
        elif ds.SOPClassUID == RTStructureSetStorage:
            for item in ds.StructureSetROISequence:
                labels[(ds.SOPInstanceUID, int(item.ROINumber))] = item.ROIName
                n_written += 1
    assert len(gt) == n_written
    assert {(r["seg_sop_instance_uid"], int(r["segment_number"])): r["segment_label"] for r in gt} == labels
    assert {r["seg_kind"] for r in gt} == {"seg", "rtstruct"}
    assert sum(r["is_retest"] == "False" for r in gt) == cohort.n_lesions
    assert all(r["phenotype"] in PHENOTYPES and int(r["volume_voxels"]) > 0 for r in gt)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_cohort(tmp_path / "a", n_patients=2, seed=3, workers=1)
    b = generate_cohort(tmp_path / "b", n_patients=2, seed=3, workers=2)
    c = generate_cohort(tmp_path / "c", n_patients=2, seed=4, workers=1)

    def snapshot(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    sa, sb, sc = snapshot(a.out_dir), snapshot(b.out_dir), snapshot(c.out_dir)
    kinds = {pydicom.dcmread(a.out_dir / k).SOPClassUID for k in sa if k.endswith(".dcm")}
    assert {SegmentationStorage, RTStructureSetStorage, CTImageStorage} <= kinds
    assert sa == sb
    assert set(sa) != set(sc) or any(sa[k] != sc[k] for k in sa)
    assert sa["outcomes.csv"] != sc["outcomes.csv"]


def test_regenerating_replaces_a_previous_cohort_but_not_foreign_data(tmp_path: Path) -> None:
    first = generate_cohort(tmp_path / "x", n_patients=1, seed=1, workers=1)
    second = generate_cohort(tmp_path / "x", n_patients=1, seed=2, workers=1)
    files = [p for p in second.dicom_dir.rglob("*") if p.is_file()]
    assert len(files) == second.n_files
    assert not any(first.dicom_dir.glob(f"{patient_spec(1, 0).patient_id}*"))
    foreign = tmp_path / "y" / "dicom"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        generate_cohort(tmp_path / "y", n_patients=1, seed=1, workers=1)
    assert (foreign / "keep.txt").exists()
