"""The features stage end to end on the demo cohort and on real data: lesions, extraction, provenance,
incremental reruns, the `extract` command, and the DICOM round trip of an NRRD case."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaging_assets.features.extract import max_relative_difference
from imaging_assets.stages import discovery
from imaging_assets.stages.radiomics import extract_features, rebuild_lesions
from imaging_assets.store.warehouse import Warehouse, connect


def _pipeline(dicom_dir: Path, wh: Path) -> Path:
    wh = Warehouse(wh)
    db = wh.duckdb_path
    discovery.refresh_catalog(wh, [dicom_dir], workers=2)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    rebuild_lesions(wh, workers=2)
    summary = extract_features(wh, workers=2)
    assert summary.failed == 0, summary.errors
    return db


@pytest.fixture(scope="module")
def demo_warehouse(small_cohort, tmp_path_factory):
    return _pipeline(small_cohort.dicom_dir, tmp_path_factory.mktemp("wh"))


def _q(db: Path, sql: str, params=()):
    with connect(db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


@pytest.mark.slow
def test_every_lesion_of_every_valid_series_gets_features(small_cohort, demo_warehouse):
    db = demo_warehouse
    with open(small_cohort.ground_truth_csv) as fh:
        truth = list(csv.DictReader(fh))
    manifest = json.loads((small_cohort.out_dir / "manifest.json").read_text())
    gapped = {b["series_instance_uid"] for b in manifest["broken"] if b["kind"] == "missing_slice"}
    expected = [t for t in truth if t["series_instance_uid"] not in gapped]
    assert len(expected) < len(truth)  # the demo does drop a slice from a segmented series
    rows = _q(db, "SELECT series_instance_uid, segment_number, raw_label, n_voxels FROM lesions WHERE extractable")
    got = sorted((r[0], int(r[1]), r[2]) for r in rows)
    assert got == sorted((t["series_instance_uid"], int(t["segment_number"]), t["segment_label"]) for t in expected)
    # voxel counts on the series grid equal the generator's
    by_key = {(r[0], int(r[1])): int(r[3]) for r in rows}
    for t in expected:
        assert by_key[(t["series_instance_uid"], int(t["segment_number"]))] == int(t["volume_voxels"])
    # every extractable lesion has one full feature vector and provenance
    n_ext = len(rows)
    assert _q(db, "SELECT count(*) FROM radiomics_provenance")[0][0] == n_ext
    per_lesion = _q(db, "SELECT count(*) FROM radiomics_features GROUP BY lesion_id")
    assert len(per_lesion) == n_ext and len({c for (c,) in per_lesion}) == 1 and per_lesion[0][0] > 1000
    assert _q(db, "SELECT count(*) FROM radiomics_features WHERE NOT isfinite(value)")[0][0] == 0
    assert _q(db, "SELECT count(*) FROM radiomics_features_wide")[0][0] == n_ext
    prov = _q(db, "SELECT DISTINCT pyradiomics_version, params_hash FROM radiomics_provenance")
    assert len(prov) == 1 and prov[0][0].startswith("v3.0.1")
    assert _q(db, "SELECT count(*) FROM radiomics_provenance WHERE image_hash IS NULL OR mask_hash IS NULL")[0][0] == 0
    # harmonised names: all the demo's spellings are GTV
    assert {r[0] for r in _q(db, "SELECT DISTINCT roi_name FROM lesions")} == {"GTV"}


@pytest.mark.slow
def test_rerun_is_incremental_and_ids_are_stable(small_cohort, demo_warehouse, tmp_path):
    db = demo_warehouse
    wh = Warehouse(db.parent)
    before = _q(db, "SELECT lesion_id, image_type, feature_class, feature, value FROM radiomics_features ORDER BY ALL")
    again = rebuild_lesions(wh, workers=2)
    assert again.decoded_segmentations == 0 and again.removed == 0
    summary = extract_features(wh, workers=2)
    assert summary.extracted == 0 and summary.skipped_current == summary.extractable
    assert _q(db, "SELECT lesion_id, image_type, feature_class, feature, value FROM radiomics_features ORDER BY ALL") == before
    # a second, independent warehouse gives the same lesion ids and values
    other = _pipeline(small_cohort.dicom_dir, tmp_path / "wh2")
    assert _q(other, "SELECT lesion_id FROM lesions ORDER BY 1") == _q(db, "SELECT lesion_id FROM lesions ORDER BY 1")
    vals = dict(((r[0], r[1], r[2], r[3]), r[4]) for r in _q(other, "SELECT * FROM radiomics_features"))
    for lid, it, fc, f, v in before:
        assert vals[(lid, it, fc, f)] == pytest.approx(v, rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_changed_segmentation_is_reextracted_and_removed_one_is_dropped(small_cohort, tmp_path):
    import shutil

    dicom = tmp_path / "dicom"
    shutil.copytree(small_cohort.dicom_dir, dicom)
    db = _pipeline(dicom, tmp_path / "wh")
    wh = Warehouse(db.parent)
    n0 = _q(db, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    seg = sorted(dicom.rglob("SEG0001.dcm"))[0]
    removed_ids = {r[0] for r in _q(db, "SELECT lesion_id FROM lesions l JOIN segmentations s USING (seg_key) "
                                        "WHERE s.path = ?", [str(seg)])}
    assert removed_ids
    seg.unlink()
    discovery.refresh_catalog(wh, [dicom], workers=2)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    summary = rebuild_lesions(wh, workers=2)
    assert summary.removed == len(removed_ids) and summary.decoded_segmentations == 0
    assert extract_features(wh, workers=2).extracted == 0
    left = {r[0] for r in _q(db, "SELECT DISTINCT lesion_id FROM radiomics_features")}
    assert not (left & removed_ids)
    assert len(left) == n0 - len(removed_ids)
    assert _q(db, "SELECT count(*) FROM radiomics_provenance")[0][0] == len(left)


def test_failed_lesion_goes_to_errors_table_and_others_survive(tmp_path):
    from types import SimpleNamespace

    from imaging_assets.features.extract import ExtractionOutcome
    from imaging_assets.stages.batches import BatchPlan, batch_files, commit_batch, load_batch
    from imaging_assets.store.schema import ensure_schema
    from imaging_assets.store.warehouse import insert_rows
    wh = Warehouse(tmp_path)
    good = ExtractionOutcome("a", {"original_firstorder_Mean": 1.0, "original_shape_VoxelVolume": 2.0}, None,
                             0.1, "v3.0.1", "h", "ih", "mh", (0, 0, 0), (5, 5, 5))
    bad = ExtractionOutcome("b", None, "ValueError: mask is empty", 0.1, "v3.0.1", "h")
    jobs = [(SimpleNamespace(lesion_id=lid), None) for lid in ("a", "b")]
    with connect(wh.duckdb_path) as con:
        ensure_schema(con)
        insert_rows(con, "lesions", [{"lesion_id": lid, "series_key": "s", "extractable": True} for lid in "ab"])
        for _ in range(2):  # rewriting is idempotent: no duplicates
            plan = BatchPlan("batch-00001", "d", "s", jobs, [], {"a": "fa", "b": "fb"}, {}, {},
                             {"features": {}, "provenance": {}, "errors": {}}, outcomes=[good, bad])
            load_batch(con, commit_batch(batch_files(wh), plan))
        assert con.execute("SELECT count(*) FROM radiomics_features").fetchone()[0] == 2
        assert con.execute("SELECT lesion_id, message FROM radiomics_errors").fetchall() == [("b", "ValueError: mask is empty")]
        assert con.execute("SELECT lesion_id, source_fingerprint FROM radiomics_provenance").fetchall() == [("a", "fa")]
        assert con.execute("SELECT batch_id, lesion_ids FROM batch_loads").fetchall() == [("batch-00001", ["a", "b"])]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imaging_assets.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_extract_command_names_the_bad_file(tmp_path):
    missing = _cli("extract", "--image", str(tmp_path / "nope.nrrd"), "--mask", str(tmp_path / "m.nrrd"))
    assert missing.returncode == 2 and "nope.nrrd" in missing.stderr and "no such file" in missing.stderr
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "a.dcm").write_text("not dicom")
    (tmp_path / "mask.dcm").write_text("not dicom either")
    bad = _cli("extract", "--image", str(folder), "--mask", str(tmp_path / "mask.dcm"))
    assert bad.returncode == 2 and str(folder) in bad.stderr and "no DICOM image series" in bad.stderr


@pytest.mark.slow
def test_extract_command_matches_the_asset_values(small_cohort, demo_warehouse):
    db = demo_warehouse
    path, lid, label = _q(db, "SELECT s.path, l.lesion_id, l.raw_label FROM lesions l JOIN segmentations s "
                              "USING (seg_key) WHERE s.kind = 'rtstruct' ORDER BY 2 LIMIT 1")[0]
    series_dir = Path(_q(db, "SELECT files[1] FROM imaging_series i JOIN lesions l USING (series_key) "
                             "WHERE l.lesion_id = ?", [lid])[0][0]).parent
    out = _cli("extract", "--image", str(series_dir), "--mask", path, "--segment", label, "--json")
    assert out.returncode == 0, out.stderr
    features = json.loads(out.stdout)["features"]
    stored = {f"{a}_{b}_{c}": v for a, b, c, v in _q(
        db, "SELECT image_type, feature_class, feature, value FROM radiomics_features WHERE lesion_id = ?", [lid])}
    assert set(features) == set(stored)
    assert max_relative_difference(stored, features)[0] <= 1e-9


@pytest.mark.realdata
@pytest.mark.slow
def test_nrrd_case_written_as_dicom_ct_and_seg_gives_the_same_features(shared_data, tmp_path):
    """Round trip: breast1 (NRRD) -> DICOM CT series + highdicom SEG -> DICOM path == NRRD path."""
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from imaging_assets.features.pipeline import extract_one

    case = shared_data / "pyradiomics-cases"
    image = sitk.ReadImage(str(case / "breast1_image.nrrd"))
    mask = sitk.ReadImage(str(case / "breast1_label.nrrd"))
    arr = sitk.GetArrayFromImage(image).astype(np.int16)  # (z, y, x)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = tmp_path / "ct"
    out.mkdir()
    slices = []
    for k in range(arr.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "CT", "RT1", "RT^ONE", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20200101", "000000", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "1", 1, k + 1, "test"
        ds.ImagePositionPatient = [float(x) for x in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(x) for x in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = arr[k].tobytes()
        ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
        slices.append(ds)
    m = sitk.GetArrayFromImage(mask).astype(bool)
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=m.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)

    via_dicom = extract_one(out, seg_path, modality="CT")
    via_nrrd = extract_one(case / "breast1_image.nrrd", case / "breast1_label.nrrd", modality="CT")
    assert via_dicom.ok and via_nrrd.ok, (via_dicom.error, via_nrrd.error)
    assert set(via_dicom.features) == set(via_nrrd.features)
    worst, where = max_relative_difference(via_nrrd.features, via_dicom.features)
    assert worst <= 1e-4, where
    assert not any(math.isnan(v) for v in via_dicom.features.values())
