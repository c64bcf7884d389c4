"""The mixed demo cohort (``generate_cohort(..., modalities=("CT", "MR", "PT"))``): MR and PET series of the
same lesions, each with its segmentation, through discovery and lesion decoding."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage, PositronEmissionTomographyImageStorage

from imaging_assets.demo.generator import DemoCohort, generate_cohort, modality_plans, patient_spec, render_modality
from imaging_assets.demo.modalities import bq_per_ml_per_suv, normalise_modalities

SEED = 5
N_PATIENTS = 4  # broken files (n >= 4), one RTSTRUCT patient (1), one test-retest patient (1)
MIXED = ("CT", "MR", "PT")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    return generate_cohort(tmp_path_factory.mktemp("mixed") / "cohort", n_patients=N_PATIENTS, seed=SEED,
                           workers=2, modalities=MIXED)


@pytest.fixture(scope="module")
def slices(mixed: DemoCohort) -> dict[str, list[pydicom.Dataset]]:
    """Image slices by SeriesInstanceUID (readable files only), sorted by InstanceNumber."""
    out: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for p in sorted(mixed.dicom_dir.rglob("IM*.dcm")):
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001 - the deliberately broken CT files
            continue
        if "PixelData" in ds:
            out[ds.SeriesInstanceUID].append(ds)
    return {uid: sorted(v, key=lambda d: int(d.InstanceNumber)) for uid, v in out.items()}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("given, expected", [
    ("CT,MR,PT", ("CT", "MR", "PT")),
    (("pet", "ct"), ("CT", "PT")),
    (["MRI", "CT", "MR"], ("CT", "MR")),
    (("CT",), ("CT",)),
])
def test_normalise_modalities(given, expected):
    assert normalise_modalities(given) == expected


@pytest.mark.parametrize("given, message", [(("MR", "PT"), "always holds CT"), ("CT,US", "unknown modality US")])
def test_normalise_modalities_refuses(given, message):
    with pytest.raises(ValueError, match=message):
        normalise_modalities(given)


@pytest.mark.slow
def test_ct_part_of_a_mixed_cohort_is_the_default_cohort(tmp_path: Path) -> None:
    default = generate_cohort(tmp_path / "ct", n_patients=2, seed=3, workers=1)
    mixed = generate_cohort(tmp_path / "mixed", n_patients=2, seed=3, workers=1, modalities="CT,PT,MR")

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(default.out_dir), files(mixed.out_dir)
    tables = {"ground_truth.csv", "manifest.json"}
    assert {k: v for k, v in a.items() if k not in tables} == {k: b[k] for k in a if k not in tables}
    extra = sorted({Path(k).parts[3] for k in set(b) - set(a)})
    assert extra == ["SE003_MR", "SE004_PT", "SE103_RTSTRUCT", "SE103_SEG", "SE104_RTSTRUCT", "SE104_SEG"]

    ct_rows = _rows(default.ground_truth_csv)
    assert "modality" not in ct_rows[0]  # the CT-only tables are unchanged
    rows = _rows(mixed.ground_truth_csv)
    assert list(rows[0])[:-1] == list(ct_rows[0]) and list(rows[0])[-1] == "modality"
    assert [{k: v for k, v in r.items() if k != "modality"} for r in rows if r["modality"] == "CT"] == ct_rows
    assert Counter(r["modality"] for r in rows) == {m: len(ct_rows) - sum(r["is_retest"] == "True" for r in ct_rows)
                                                    for m in ("MR", "PT")} | {"CT": len(ct_rows)}
    m_default, m_mixed = json.loads(default.manifest_json.read_text()), json.loads(mixed.manifest_json.read_text())
    assert "modalities" not in m_default and m_mixed["modalities"] == ["CT", "MR", "PT"]
    assert m_mixed["n_series_by_modality"] == {"CT": default.n_series, "MR": 2, "PT": 2}
    assert mixed.n_lesions == default.n_lesions and mixed.n_series == default.n_series + 4


def test_mr_series_headers_and_pixels(mixed: DemoCohort, slices: dict) -> None:
    for i in range(N_PATIENTS):
        spec = patient_spec(SEED, i)
        plan = next(p for p in modality_plans(spec, MIXED) if p.modality == "MR")
        series = slices[plan.series_instance_uid]
        ct = slices[spec.series[0].series_instance_uid][0]
        expected, masks = render_modality(spec, plan)
        assert len(series) == expected.shape[0] and all(m.any() for m in masks)
        for k, ds in enumerate(series):
            assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
            assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
            assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 12, 0)
            assert ds.PatientID == ct.PatientID and ds.StudyInstanceUID == ct.StudyInstanceUID
            assert ds.FrameOfReferenceUID != ct.FrameOfReferenceUID  # repositioned: its own frame
            np.testing.assert_array_equal(ds.pixel_array, expected[k])
        ds = series[0]
        assert 0.9 <= float(ds.PixelSpacing[0]) <= 1.1 and float(ds.SpacingBetweenSlices) in (3.0, 4.0)
        assert float(ds.RepetitionTime) > 0 and float(ds.EchoTime) > 0 and float(ds.MagneticFieldStrength) == 1.5
        vol = expected.astype(float)
        air = vol[:, :6, :6]
        sigma = plan.acquisition["noise_sigma"]
        assert air.min() >= 0 and 0.8 < air.mean() / (sigma * np.sqrt(np.pi / 2)) < 1.25  # Rician floor
        assert 0 < vol.max() <= 2500


def test_pet_series_headers_and_suv(mixed: DemoCohort, slices: dict) -> None:
    for i in range(N_PATIENTS):
        spec = patient_spec(SEED, i)
        plan = next(p for p in modality_plans(spec, MIXED) if p.modality == "PT")
        series = slices[plan.series_instance_uid]
        ct = slices[spec.series[0].series_instance_uid][0]
        activity, masks = render_modality(spec, plan)
        slopes = set()
        suv = np.empty(activity.shape)
        for k, ds in enumerate(series):
            assert ds.SOPClassUID == PositronEmissionTomographyImageStorage and ds.Modality == "PT"
            assert ds.Units == "BQML" and ds.DecayCorrection == "START" and ds.PixelRepresentation == 0
            assert ds.FrameOfReferenceUID == ct.FrameOfReferenceUID  # PET/CT: one frame of reference
            assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.pixel_array.dtype == np.uint16
            slope = float(ds.RescaleSlope)
            slopes.add(ds.RescaleSlope)
            values = ds.pixel_array * slope + float(ds.RescaleIntercept)
            assert np.abs(values - activity[k]).max() <= slope / 2 + 1e-3 * slope
            # SUV from the header alone, as a reader would compute it
            radio = ds.RadiopharmaceuticalInformationSequence[0]
            hms = [(int(t[:2]), int(t[2:4]), int(t[4:6])) for t in (ds.SeriesTime, radio.RadiopharmaceuticalStartTime)]
            elapsed = (hms[0][0] - hms[1][0]) * 3600 + (hms[0][1] - hms[1][1]) * 60 + hms[0][2] - hms[1][2]
            dose = float(radio.RadionuclideTotalDose) * 2 ** (-elapsed / float(radio.RadionuclideHalfLife))
            suv[k] = values * float(ds.PatientWeight) * 1000 / dose
        assert len(slopes) > len(series) // 2  # one slope per slice, as scanners write
        np.testing.assert_allclose(suv, activity / bq_per_ml_per_suv(plan.acquisition), atol=0.02)
        ds = series[0]
        assert 3.6 <= float(ds.PixelSpacing[0]) <= 4.2 and 3.2 <= float(ds.SpacingBetweenSlices) <= 4.0
        body = suv[suv > 0.2]
        assert 0.3 < np.median(body) < 1.5
        for les, mask in zip(spec.lesions, masks, strict=True):
            assert mask.sum() >= 4  # a 42 % threshold contour is never a single voxel
            if les.phenotype != "ground_glass":
                assert suv[mask].max() > 2.0 * np.median(body)


@pytest.mark.slow
def test_mixed_cohort_passes_discovery_with_lesions_in_every_modality(mixed: DemoCohort, tmp_path: Path) -> None:
    from imaging_assets.features.params import params_hash, preset_for_modality, resolve_params
    from imaging_assets.features.pipeline import extract_one
    from imaging_assets.stages import discovery
    from imaging_assets.stages.radiomics import rebuild_lesions
    from imaging_assets.store.warehouse import Warehouse, table_rows

    wh = Warehouse(tmp_path / "wh")
    discovery.refresh_catalog(wh, [mixed.dicom_dir], workers=2)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    lesions_result = rebuild_lesions(wh, workers=2)
    with wh.connect() as con:
        series = table_rows(con, "imaging_series")
        segs = table_rows(con, "segmentations")
        lesions = table_rows(con, "lesions")
    manifest = json.loads(mixed.manifest_json.read_text())
    gap = next(b for b in manifest["broken"] if b["kind"] == "missing_slice")["series_instance_uid"]

    assert Counter(s["modality"] for s in series) == manifest["n_series_by_modality"]
    assert [s["series_instance_uid"] for s in series if not s["usable"]] == [gap]  # the planted gap, nothing else
    uid_of = {s["series_key"]: s["series_instance_uid"] for s in series}
    gt = _rows(mixed.ground_truth_csv)
    seg_series = {r["seg_sop_instance_uid"]: r["series_instance_uid"] for r in gt}
    assert len(segs) == len(seg_series)
    for g in segs:
        if seg_series[g["sop_instance_uid"]] == gap:
            assert g["linked_series_key"] is None  # references the deleted slice
        else:
            assert g["link_rule"] == "referenced_series"
            assert uid_of[g["linked_series_key"]] == seg_series[g["sop_instance_uid"]]

    by_modality = defaultdict(list)
    for row in lesions:
        by_modality[row["modality"]].append(row)
    assert set(by_modality) == set(MIXED)
    truth = {(r["series_instance_uid"], int(r["segment_number"])): r for r in gt}
    for modality in ("MR", "PT"):
        rows = by_modality[modality]
        assert len(rows) == sum(r["modality"] == modality for r in gt) == mixed.n_lesions
        for row in rows:
            t = truth[(row["series_instance_uid"], row["segment_number"])]
            assert row["status"] == "ok" and row["extractable"]
            assert row["n_voxels"] == int(t["volume_voxels"]) and row["raw_label"] == t["segment_label"]
    assert lesions_result.by_status == {"ok": len(lesions)}

    # one lesion per modality through the extraction path: each modality's preset, so its own feature space
    hashes = set()
    for modality in ("MR", "PT"):
        s = next(s for s in series if s["modality"] == modality)
        seg = next(g for g in segs if g["linked_series_key"] == s["series_key"])
        out = extract_one(Path(s["files"][0]).parent, seg["path"], label=1)
        assert out.ok, out.error
        assert out.params_hash == params_hash(resolve_params(preset_for_modality(modality)))
        assert out.features["original_shape_VoxelVolume"] > 0
        hashes.add(out.params_hash)
    assert len(hashes) == 2


def test_demo_data_command_writes_a_mixed_cohort(tmp_path: Path, capsys) -> None:
    from imaging_assets.cli import main

    out = tmp_path / "demo"
    assert main(["demo-data", "--out", str(out), "--patients", "1", "--seed", "2", "--workers", "1",
                 "--modalities", "CT,MR,PT"]) == 0
    assert "modalities CT, MR, PT" in capsys.readouterr().out
    kinds = Counter(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in out.rglob("IM*.dcm"))
    assert set(kinds) == {"CT", "MR", "PT"}
    assert json.loads((out / "manifest.json").read_text())["modalities"] == ["CT", "MR", "PT"]
    assert main(["demo-data", "--out", str(tmp_path / "x"), "--patients", "1", "--modalities", "MR"]) == 2
    assert "always holds CT" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
