"""`imaging-assets scan` / `extract` through ``imaging_assets.cli.main`` on a tiny demo cohort, and the
DAGSTER_HOME that ``make dev`` uses."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imaging_assets.cli import main
from imaging_assets.demo.generator import DemoCohort, generate_cohort, render_patient

REPO = Path(__file__).resolve().parents[1]
SEED = 4
SMALL_PARAMS = """imageType:
  Original: {}
featureClass:
  shape:
  firstorder:
setting:
  binWidth: 25
  label: 1
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    """Patient 0 with a DICOM SEG, patient 1 with RTSTRUCTs (and a test-retest series)."""
    return generate_cohort(tmp_path_factory.mktemp("cli") / "demo", n_patients=2, seed=SEED, workers=1)


@pytest.fixture()
def small_params(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_PARAMS)
    return path


def _truth(cohort: DemoCohort) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    with cohort.ground_truth_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["seg_sop_instance_uid"], []).append(row)
    return out


def _primary(cohort: DemoCohort, case: str = "case_0001") -> tuple[Path, Path]:
    study = next((cohort.dicom_dir / case).glob("study_*"))
    return study / "SE001_CT", next((study / "SE101_SEG").glob("*.dcm"))


# ------------------------------------------------------------------------------------------------ scan
def test_scan_lists_segment_numbers_and_names(cohort: DemoCohort, capsys: pytest.CaptureFixture) -> None:
    truth = _truth(cohort)
    assert main(["scan", str(cohort.dicom_dir), "--workers", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {g["kind"] for g in doc["segmentations"]} == {"seg", "rtstruct"}
    assert len(doc["segmentations"]) == len(truth)
    for g in doc["segmentations"]:
        rows = sorted(truth[g["sop_instance_uid"]], key=lambda r: int(r["segment_number"]))
        assert g["segments"] == [{"number": int(r["segment_number"]), "name": r["segment_label"], "roi_name": "GTV"}
                                 for r in rows]

    assert main(["scan", str(cohort.dicom_dir), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    listed = [line.strip() for line in text.splitlines() if line.strip().startswith("segments:")]
    assert len(listed) == len(truth)
    for rows in truth.values():
        line = next(x for x in listed if all(f'{r["segment_number"]} "{r["segment_label"]}"' in x for r in rows))
        for r in rows:  # a raw name that is not already the harmonised one shows it too
            if r["segment_label"] != "GTV":
                assert f'{r["segment_number"]} "{r["segment_label"]}" (GTV)' in line


# --------------------------------------------------------------------------------------------- extract
def test_extract_json_holds_features_and_provenance(cohort: DemoCohort, capsys: pytest.CaptureFixture,
                                                    small_params: Path) -> None:
    from imaging_assets.features.params import PRESETS_DIR, params_hash, preset_for_modality, resolve_params

    image, seg = _primary(cohort)
    assert main(["extract", "--image", str(image), "--mask", str(seg), "--label", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"features", "provenance"}
    features, prov = doc["features"], doc["provenance"]
    assert features["original_shape_VoxelVolume"] > 0 and any(k.startswith("wavelet-") for k in features)
    assert prov["params_hash"] == params_hash(resolve_params(preset_for_modality("CT")))
    assert (prov["params_source"], prov["preset"], prov["modality"]) == ("preset", "ct.yaml", "CT")
    assert prov["params_file"] == str((PRESETS_DIR / "ct.yaml").resolve())
    assert prov["pyradiomics_version"] and prov["lesion_id"]
    assert all(isinstance(prov[k], str) and len(prov[k]) >= 16 for k in ("image_hash", "mask_hash"))
    assert len(prov["crop_index"]) == len(prov["crop_size"]) == 3 and all(n > 0 for n in prov["crop_size"])
    assert prov["elapsed_s"] > 0 and prov["resample_mask"] is False
    assert (prov["image"], prov["mask"], prov["label"]) == (str(image), str(seg), 1)

    # a user's parameter file is named as such, and the text output keeps features on stdout
    assert main(["extract", "--image", str(image), "--mask", str(seg), "--label", "1", "--params",
                 str(small_params), "--json"]) == 0
    prov = json.loads(capsys.readouterr().out)["provenance"]
    assert (prov["params_source"], prov["params_file"], prov["preset"]) == ("file", str(small_params.resolve()), None)
    assert main(["extract", "--image", str(image), "--mask", str(seg), "--label", "1", "--params",
                 str(small_params)]) == 0
    out = capsys.readouterr()
    assert "original_shape_VoxelVolume\t" in out.out and str(small_params.resolve()) in out.err


def test_extract_resample_mask_is_opt_in(cohort: DemoCohort, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         small_params: Path) -> None:
    """A NIfTI mask of the lesion on a grid rotated by 12 degrees: refused, unless --resample-mask."""
    image, _ = _primary(cohort)
    r = render_patient(SEED, 0)
    g = r.spec.series[0].grid
    spacing = np.array([g.pixel_spacing, g.pixel_spacing, g.slice_spacing])
    origin = np.array([g.origin_x, g.origin_y, g.z_positions[0]])
    t = np.radians(12.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    size = np.array(r.masks[0][0].shape[::-1], float)
    centre = origin + spacing * (size - 1) / 2
    mask = sitk.GetImageFromArray(r.masks[0][0].astype(np.uint8))
    mask.SetSpacing(tuple(spacing))
    mask.SetDirection(tuple(rot.ravel()))
    mask.SetOrigin(tuple(centre - rot @ (spacing * (size - 1) / 2)))
    path = tmp_path / "rotated.nii.gz"
    sitk.WriteImage(mask, str(path))

    args = ["extract", "--image", str(image), "--mask", str(path), "--params", str(small_params), "--json"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"mask {path} does not belong to image {image}" in err and "--resample-mask" in err
    assert main([*args, "--resample-mask"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["provenance"]["resample_mask"] is True and doc["features"]["original_shape_VoxelVolume"] > 0


# -------------------------------------------------------------------------------------- make dev's home
def _make_dev_dry_run(env_home: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MAKEFLAGS", "MFLAGS")}
    if env_home is not None:
        env["DAGSTER_HOME"] = env_home
    out = subprocess.run(["make", "-n", "--no-print-directory", "dev"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_dev_uses_your_dagster_home_and_keeps_its_dagster_yaml(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    out = _make_dev_dry_run(str(mine))
    assert f'echo "DAGSTER_HOME={mine}"' in out and f"cp dagster.yaml {mine}/dagster.yaml" in out
    assert ".dagster_home" not in out

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    out = _make_dev_dry_run(str(kept))
    assert f'echo "DAGSTER_HOME={kept}"' in out and "cp dagster.yaml" not in out

    out = _make_dev_dry_run(None)  # unset (or empty): the repository's own instance
    assert f'echo "DAGSTER_HOME={REPO}/.dagster_home"' in out
    assert f'echo "DAGSTER_HOME={REPO}/.dagster_home"' in _make_dev_dry_run("")


def test_extract_takes_relative_paths(cohort: DemoCohort, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`extract --image series/ --mask seg.dcm` from the folder a user is in (the crawl records absolute paths)."""
    image, seg = _primary(cohort)
    monkeypatch.chdir(image.parent)
    rel_image, rel_seg = os.path.relpath(image), os.path.relpath(seg)
    assert not os.path.isabs(rel_image) and not os.path.isabs(rel_seg)
    assert main(["extract", "--image", rel_image, "--mask", rel_seg, "--label", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["features"]["original_shape_VoxelVolume"] > 0
