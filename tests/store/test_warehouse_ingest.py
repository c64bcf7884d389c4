"""Warehouse writes: incremental catalog refresh, atomicity, and no PHI in any table."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb
import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging_assets.stages import discovery
from imaging_assets.store.catalog import apply_crawl, known_files
from imaging_assets.store.warehouse import Warehouse, connect


def _copy_ct(dst: Path, n: int, uid_tag: str = "") -> list[Path]:
    """n copies of pydicom's CT_small with distinct SOP instance UIDs in one series (``uid_tag`` makes the
    UIDs differ from another call's; without it two calls write byte-identical files, i.e. copies)."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = src.copy()
        ds.SOPInstanceUID = f"{src.SOPInstanceUID}.{uid_tag}{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        p = dst / f"ct_{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def _table(db: Path, sql: str, params=()):
    with connect(db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_incremental_refresh_add_modify_delete(tmp_path):
    root = tmp_path / "archive"
    files = _copy_ct(root / "series1", 6)
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path

    first = discovery.refresh_catalog(wh, [root], workers=1)
    assert first.read == 6 and first.catalogued == 6 and first.quarantined == 0

    again = discovery.refresh_catalog(wh, [root], workers=1)
    assert again.read == 0 and again.unchanged == 6 and again.removed == 0

    # add one, modify one (now truncated -> quarantined), delete one
    _copy_ct(root / "series2", 1, uid_tag="2")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    os.utime(files[1], ns=(1, 1))
    files[2].unlink()

    third = discovery.refresh_catalog(wh, [root], workers=1)
    assert third.read == 2
    assert third.removed == 1
    assert third.catalogued == 5  # 6 - modified - deleted + added
    assert third.quarantined == 1

    # no duplicate rows; the deleted file is kept as 'removed'; the modified file left the catalog
    assert _table(db, "SELECT count(*), count(DISTINCT path) FROM dicom_files")[0] == (6, 6)
    assert _table(db, "SELECT status FROM dicom_files WHERE path = ?", [str(files[2])]) == [("removed",)]
    assert _table(db, "SELECT count(*) FROM dicom_files WHERE path = ?", [str(files[1])]) == [(0,)]
    assert _table(db, "SELECT reason FROM dicom_quarantine WHERE path = ?", [str(files[1])]) == [("truncated",)]

    # the file comes back intact: it leaves the quarantine and is catalogued again
    files[1].write_bytes(data)
    fourth = discovery.refresh_catalog(wh, [root], workers=1)
    assert fourth.read == 1 and fourth.quarantined == 0 and fourth.catalogued == 6


def test_missing_root_is_reported_not_fatal(tmp_path):
    root = tmp_path / "archive"
    _copy_ct(root, 2)
    wh = Warehouse(tmp_path / "wh")
    summary = discovery.refresh_catalog(wh, [root, tmp_path / "nope"], workers=1)
    assert summary.missing_roots == [str(tmp_path / "nope")]
    assert summary.catalogued == 2


def test_no_existing_root_is_an_error_that_writes_nothing(tmp_path):
    from imaging_assets.errors import DicomRootsMissingError

    wh = Warehouse(tmp_path / "wh")
    with pytest.raises(DicomRootsMissingError, match="nope"):
        discovery.refresh_catalog(wh, [tmp_path / "nope"], workers=1)
    assert not wh.duckdb_path.exists()


def test_catalog_of_an_older_schema_gains_the_new_columns_and_reads_images_once(tmp_path):
    root = tmp_path / "archive"
    _copy_ct(root, 3)
    wh = Warehouse(tmp_path / "wh")
    discovery.refresh_catalog(wh, [root], workers=1)
    with connect(wh.duckdb_path) as con:  # as a warehouse made before these columns existed
        for column in ("samples_per_pixel", "photometric_interpretation", "duplicate_of", "copy_checked"):
            con.execute(f"ALTER TABLE dicom_files DROP COLUMN {column}")
        for column in ("duplicate_of", "copy_checked"):
            con.execute(f"ALTER TABLE dicom_quarantine DROP COLUMN {column}")
    again = discovery.refresh_catalog(wh, [root], workers=1)
    assert again.read == 3 and again.catalogued == 3 and again.removed == 0
    assert _table(wh.duckdb_path, "SELECT DISTINCT samples_per_pixel, photometric_interpretation, duplicate_of "
                                  "FROM dicom_files") == [(1, "MONOCHROME2", None)]
    assert discovery.refresh_catalog(wh, [root], workers=1).read == 0
    # an outdated row whose file is gone is removed, not forgotten
    with connect(wh.duckdb_path) as con:
        con.execute("UPDATE dicom_files SET samples_per_pixel = NULL")
    gone = sorted(root.iterdir())[0]
    gone.unlink()
    third = discovery.refresh_catalog(wh, [root], workers=1)
    assert third.read == 2 and third.removed == 1
    assert _table(wh.duckdb_path, "SELECT status FROM dicom_files WHERE path = ?", [str(gone)]) == [("removed",)]


def test_apply_crawl_marks_out_of_roots_and_unlinks_copies_of_a_reread_file(tmp_path):
    from imaging_assets.store.catalog import active_files, paths_outside, set_duplicates

    root = tmp_path / "archive"
    files = [str(p) for p in _copy_ct(root, 3)]
    wh = Warehouse(tmp_path / "wh")
    discovery.refresh_catalog(wh, [root], workers=1)
    with connect(wh.duckdb_path) as con:
        record = active_files(con)[0]
        assert set_duplicates(con, "dicom_files", {files[1]: files[0], files[2]: files[0]}) == 2
        assert [r["path"] for r in active_files(con)] == [files[0]]
        assert paths_outside(con, [str(root / "sub")]) == files and paths_outside(con, [str(root)]) == []
        counts = apply_crawl(con, [record], [], removed=[], out_of_roots=[files[2]])
        assert counts["out_of_roots"] == 1
        rows = con.execute("SELECT path, status, duplicate_of, removed_at IS NOT NULL FROM dicom_files "
                           "ORDER BY path").fetchall()
    # the re-read file's copies are unlinked (compared again by the next refresh); the retired row is kept
    assert rows == [(files[0], "active", None, False), (files[1], "active", None, False),
                    (files[2], "out_of_roots", None, True)]


def test_failed_write_keeps_previous_state(tmp_path):
    root = tmp_path / "archive"
    _copy_ct(root, 3)
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    discovery.refresh_catalog(wh, [root], workers=1)
    before = _table(db, "SELECT * FROM dicom_files ORDER BY path")
    bad = [{"path": "/x/new.dcm", "size": "not-a-number"}]  # fails inside the transaction
    with connect(db) as con:
        with pytest.raises(Exception):  # noqa: B017 - whatever fails inside the transaction must roll it back
            apply_crawl(con, bad, [], removed=[str(p) for p in sorted(root.iterdir())])
        assert len(known_files(con)) == 3
    assert _table(db, "SELECT * FROM dicom_files ORDER BY path") == before


def _phi_values(dicom_dir: Path) -> set[str]:
    values: set[str] = set()
    for p in dicom_dir.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        for tag in ("PatientID", "PatientName", "PatientBirthDate"):
            v = str(ds.get(tag, "") or "").strip()
            if len(v) >= 4:
                values.add(v)
        name = str(ds.get("PatientName", "") or "")
        values.update(part for part in name.split("^") if len(part) >= 4)
    return values


def find_phi(db: Path, needles: set[str]) -> list[tuple[str, str, str]]:
    """Every (table, column, needle) where a needle occurs in any text or list column."""
    hits = []
    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'"
        ).fetchall()
        for table, column in cols:
            for needle in sorted(needles):
                n = con.execute(
                    f'SELECT count(*) FROM "{table}" WHERE contains(CAST("{column}" AS VARCHAR), ?)', [needle]
                ).fetchone()[0]
                if n:
                    hits.append((table, column, needle))
    finally:
        con.close()
    return hits


@pytest.mark.slow
def test_no_phi_in_any_table_after_demo_ingest(small_cohort, tmp_path):
    # copy so that planting a leak cannot touch the shared cohort
    dicom = tmp_path / "dicom"
    shutil.copytree(small_cohort.dicom_dir, dicom)
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    discovery.refresh_catalog(wh, [dicom], workers=2)
    discovery.rebuild_series(wh)
    discovery.rebuild_segmentations(wh)
    needles = _phi_values(dicom)
    assert len(needles) >= small_cohort.n_patients * 2
    assert find_phi(db, needles) == []

    # the scanner itself finds a planted leak
    leak = sorted(needles)[0]
    with connect(db) as con:
        con.execute("UPDATE dicom_files SET series_description = ? WHERE rowid = (SELECT min(rowid) FROM dicom_files)",
                    [f"x {leak} y"])
    assert ("dicom_files", "series_description", leak) in find_phi(db, needles)
