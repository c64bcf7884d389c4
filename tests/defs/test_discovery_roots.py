"""The dicom_files asset and its dicom_roots_present check with missing roots (in-process materialize)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import pydicom
from pydicom.data import get_testdata_file

from imaging_assets.defs.resources import DicomSourcesResource, WarehouseResource


def _archive(root: Path, n: int = 3) -> Path:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = src.copy()
        ds.SOPInstanceUID = f"{src.SOPInstanceUID}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        ds.save_as(root / f"ct_{i}.dcm", enforce_file_format=True)
    return root


def _materialize(tmp_path: Path, roots: list[str]) -> dg.ExecuteInProcessResult:
    from imaging_assets.defs.discovery import dicom_files, dicom_roots_present

    resources = {"warehouse": WarehouseResource(root=str(tmp_path / "wh")),
                 "dicom_sources": DicomSourcesResource(roots=roots, workers=1)}
    with dg.instance_for_test() as instance:
        return dg.materialize([dicom_files, dicom_roots_present], instance=instance, resources=resources,
                              raise_on_error=False)


def _rows(tmp_path: Path) -> list[tuple]:
    con = duckdb.connect(str(tmp_path / "wh" / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute("SELECT path, status, updated_at, removed_at FROM dicom_files ORDER BY path").fetchall()
    finally:
        con.close()


def test_a_missing_root_fails_the_roots_check(tmp_path):
    archive = _archive(tmp_path / "archive")
    missing = str(tmp_path / "not_mounted")
    result = _materialize(tmp_path, [str(archive), missing])
    assert result.success
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "dicom_roots_present"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["missing_roots"].value == [missing]
    assert check.metadata["observed_missing"].value == 1
    mat = result.asset_materializations_for_node("dicom_files")[0].metadata
    assert mat["missing_roots"].value == [missing] and mat["dagster/row_count"].value == 3

    # all roots present: the check passes
    result = _materialize(tmp_path, [str(archive)])
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "dicom_roots_present"]
    assert check.passed and check.metadata["observed_missing"].value == 0


def test_all_roots_missing_fails_the_asset_and_leaves_the_catalog(tmp_path):
    archive = _archive(tmp_path / "archive")
    assert _materialize(tmp_path, [str(archive)]).success
    before = _rows(tmp_path)
    assert [r[1] for r in before] == ["active"] * 3

    typo = str(tmp_path / "archiv")
    result = _materialize(tmp_path, [typo])
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failures
    message = failures[0].step_failure_data.error.to_string()
    assert "none of the configured DICOM roots exists" in message and typo in message
    assert not result.asset_materializations_for_node("dicom_files")
    assert _rows(tmp_path) == before  # nothing marked removed, nothing rewritten
