"""The configured roots define the catalog, and a copy of a file is one instance (issue 15, point 7).

On the 6-patient demo cohort, through the stage functions: switching roots retires the old files (kept as
history) and their series, segmentations, lesions and features; a second copy of the archive under
another root changes no count, no id and extracts nothing; missing roots never empty the catalog.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging_assets.errors import DicomRootsMissingError
from imaging_assets.stages import discovery
from imaging_assets.stages.radiomics import extract_features, rebuild_lesions
from imaging_assets.store.warehouse import Warehouse

pytestmark = pytest.mark.slow


def _q(wh: Warehouse, sql: str, params=()):
    with wh.connect(read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _downstream(wh: Warehouse):
    series = discovery.rebuild_series(wh)
    segs = discovery.rebuild_segmentations(wh)
    lesions = rebuild_lesions(wh, workers=1)
    return series, segs, lesions


def _ct_series(dst: Path, n: int = 4) -> None:
    """A small CT series of its own (pydicom's CT_small with distinct UIDs and positions)."""
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = src.copy()
        ds.SOPInstanceUID = f"{src.SOPInstanceUID}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        ds.save_as(dst / f"ct_{i}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def extracted(small_cohort, tmp_path_factory):
    """The demo cohort copied under ``<tmp>/m_archive`` and taken through extraction once; each test works
    on its own copy of the warehouse."""
    base = tmp_path_factory.mktemp("roots")
    archive = base / "m_archive"
    shutil.copytree(small_cohort.dicom_dir, archive)
    wh = Warehouse(base / "wh")
    first = discovery.refresh_catalog(wh, [archive], workers=1)
    series, segs, lesions = _downstream(wh)
    features = extract_features(wh, workers=1)
    assert features.failed == 0 and features.extracted == lesions.extractable > 0
    return {"base": base, "archive": archive, "wh": wh, "catalog": first, "series": series, "segs": segs,
            "lesions": lesions}


@pytest.fixture()
def wh(extracted, tmp_path) -> Warehouse:
    shutil.copytree(extracted["wh"].root, tmp_path / "wh")
    return Warehouse(tmp_path / "wh")


def test_switching_roots_retires_the_old_files_and_everything_made_from_them(extracted, wh, tmp_path):
    archive = extracted["archive"]
    n_files = _q(wh, "SELECT count(*) FROM dicom_files")[0][0]
    n_quarantine = _q(wh, "SELECT count(*) FROM dicom_quarantine")[0][0]
    n_features = _q(wh, "SELECT count(DISTINCT lesion_id) FROM radiomics_features")[0][0]
    assert n_features == extracted["lesions"].extractable
    other = tmp_path / "other_archive"
    _ct_series(other)

    result = discovery.refresh_catalog(wh, [other], workers=1)
    assert result.out_of_roots == n_files + n_quarantine and result.catalogued == 4 and result.quarantined == 0
    # history is kept: every old row is still there, out of the active catalog, with the time it left
    assert _q(wh, "SELECT count(*) FROM dicom_files WHERE starts_with(path, ?)", [str(archive)])[0][0] == n_files
    assert _q(wh, "SELECT DISTINCT status, removed_at IS NOT NULL FROM dicom_files WHERE starts_with(path, ?)",
              [str(archive)]) == [("out_of_roots", True)]
    assert _q(wh, "SELECT DISTINCT status FROM dicom_quarantine") == [("out_of_roots",)]

    series, segs, lesions = _downstream(wh)
    assert series.series == 1 and segs.segmentations == 0
    assert lesions.lesions == 0 and lesions.removed == n_features
    assert _q(wh, "SELECT count(*) FROM lesions")[0][0] == 0
    assert _q(wh, "SELECT count(*) FROM radiomics_features")[0][0] == 0
    assert _q(wh, "SELECT count(*) FROM radiomics_provenance")[0][0] == 0

    # the old root configured again: its files are read again and come back
    back = discovery.refresh_catalog(wh, [archive], workers=1)
    assert back.catalogued == extracted["catalog"].catalogued and back.out_of_roots == 4
    assert back.quarantine_by_reason == extracted["catalog"].quarantine_by_reason
    assert _downstream(wh)[2].lesions == extracted["lesions"].lesions


def test_a_second_copy_of_the_archive_is_one_instance_and_extracts_nothing(extracted, wh):
    archive = extracted["archive"]
    before_features = _q(wh, "SELECT lesion_id, image_type, feature_class, feature, value FROM radiomics_features "
                             "ORDER BY ALL")
    before_lesions = _q(wh, "SELECT lesion_id, series_key, seg_key, source_fingerprint FROM lesions ORDER BY ALL")
    before_series = _q(wh, "SELECT series_key, files, flags FROM imaging_series ORDER BY ALL")
    # the copy sorts before the archive: the canonical must stay the path known first anyway
    copy = extracted["base"] / "a_copy"
    if not copy.exists():
        shutil.copytree(archive, copy)
    n_copies = sum(1 for p in copy.rglob("*") if p.is_file())

    result = discovery.refresh_catalog(wh, [archive, copy], workers=1)
    first = extracted["catalog"]
    assert result.read == n_copies and result.duplicates == n_copies
    assert (result.catalogued, result.catalogued_by_kind) == (first.catalogued, first.catalogued_by_kind)
    assert (result.quarantined, result.quarantine_by_reason) == (first.quarantined, first.quarantine_by_reason)
    # every copy points to the file at the same place in the archive
    links = _q(wh, "SELECT path, duplicate_of FROM dicom_files WHERE status = 'active' AND starts_with(path, ?) "
                   "UNION ALL SELECT path, duplicate_of FROM dicom_quarantine WHERE starts_with(path, ?)",
               [str(copy), str(copy)])
    assert len(links) == n_copies
    assert all(d == str(archive / Path(p).relative_to(copy)) for p, d in links)
    assert _q(wh, "SELECT count(*) FROM dicom_files WHERE starts_with(path, ?) AND duplicate_of IS NOT NULL",
              [str(archive)])[0][0] == 0

    series, segs, lesions = _downstream(wh)
    assert (series.series, series.flag_counts) == (extracted["series"].series, extracted["series"].flag_counts)
    assert segs.segmentations == extracted["segs"].segmentations and segs.by_rule == extracted["segs"].by_rule
    assert lesions.lesions == extracted["lesions"].lesions and lesions.decoded_segmentations == 0
    assert _q(wh, "SELECT series_key, files, flags FROM imaging_series ORDER BY ALL") == before_series
    assert _q(wh, "SELECT lesion_id, series_key, seg_key, source_fingerprint FROM lesions ORDER BY ALL") == before_lesions
    summary = extract_features(wh, workers=1)
    assert summary.extracted == 0 and summary.skipped_current == summary.extractable
    assert _q(wh, "SELECT lesion_id, image_type, feature_class, feature, value FROM radiomics_features "
                  "ORDER BY ALL") == before_features

    # a rerun reads nothing and decides nothing again
    again = discovery.refresh_catalog(wh, [archive, copy], workers=1)
    assert again.read == 0 and again.duplicates == n_copies and again.catalogued == first.catalogued

    # the archive root dropped: the copy takes over (same instances, same lesion ids)
    moved = discovery.refresh_catalog(wh, [copy], workers=1)
    assert moved.out_of_roots == n_copies and moved.duplicates == 0 and moved.catalogued == first.catalogued
    assert _q(wh, "SELECT count(*) FROM dicom_files WHERE status = 'active' AND NOT starts_with(path, ?)",
              [str(copy)])[0][0] == 0
    _downstream(wh)
    assert _q(wh, "SELECT lesion_id FROM lesions ORDER BY 1") == [(r[0],) for r in before_lesions]


def test_a_copy_read_again_is_compared_again(extracted, wh, tmp_path, monkeypatch):
    archive = extracted["archive"]
    copy = tmp_path / "copy"
    seg = sorted(archive.rglob("SEG0001.dcm"))[0]
    dst = copy / seg.relative_to(archive)
    dst.parent.mkdir(parents=True)
    shutil.copy2(seg, dst)
    r = discovery.refresh_catalog(wh, [archive, copy], workers=1)
    assert r.duplicates == 1
    assert _q(wh, "SELECT duplicate_of FROM dicom_files WHERE path = ?", [str(dst)]) == [(str(seg),)]
    # same SOP instance UID, other bytes: no longer a copy, both are catalogued
    data = bytearray(dst.read_bytes())
    data[-1] ^= 0xFF
    dst.write_bytes(bytes(data))
    r = discovery.refresh_catalog(wh, [archive, copy], workers=1)
    assert r.duplicates == 0 and r.catalogued == extracted["catalog"].catalogued + 1
    assert _q(wh, "SELECT duplicate_of FROM dicom_files WHERE path = ?", [str(dst)]) == [(None,)]

    # found to differ once: not compared (read) again while neither file changes
    def no_decision(rows):
        raise AssertionError(f"compared again: {rows}")

    monkeypatch.setattr(discovery, "resolve_duplicates", no_decision)
    assert discovery.refresh_catalog(wh, [archive, copy], workers=1).read == 0


def test_missing_roots_never_empty_the_catalog(extracted, wh, tmp_path):
    archive = extracted["archive"]
    active = "SELECT count(*) FROM dicom_files WHERE status = 'active'"
    n_active = _q(wh, active)[0][0]
    snapshot = _q(wh, "SELECT path, status, updated_at, removed_at FROM dicom_files ORDER BY path")
    # every root missing (a typo): refused, nothing written
    typo = tmp_path / "m_archiv"
    with pytest.raises(DicomRootsMissingError, match="m_archiv"):
        discovery.refresh_catalog(wh, [typo], workers=1)
    with pytest.raises(DicomRootsMissingError, match="no DICOM roots"):
        discovery.refresh_catalog(wh, [], workers=1)
    assert _q(wh, "SELECT path, status, updated_at, removed_at FROM dicom_files ORDER BY path") == snapshot

    # one root present, the other mistyped: reported; the files the typo was meant to name stay active
    other = tmp_path / "other"
    _ct_series(other)
    r = discovery.refresh_catalog(wh, [other, typo], workers=1)
    assert r.missing_roots == [str(typo)] and r.out_of_roots == 0
    assert r.kept_outside_roots == n_active + extracted["catalog"].quarantined
    assert _q(wh, active)[0][0] == n_active + 4
    report = discovery.roots_report(wh, [other, typo])
    assert report.missing == [str(typo)] and report.active_under_missing == {str(typo): 0}
    assert report.outside_roots == r.kept_outside_roots
    # a missing root that holds catalogued files: its files stay, and the report counts them
    report = discovery.roots_report(wh, [other, archive / "nope", tmp_path / "gone"])
    assert report.missing == [str(archive / "nope"), str(tmp_path / "gone")]
    moved = tmp_path / "unmounted"
    archive.rename(moved)
    try:
        r = discovery.refresh_catalog(wh, [other, archive], workers=1)
        assert r.missing_roots == [str(archive)] and r.removed == 0 and r.out_of_roots == 0
        assert _q(wh, active)[0][0] == n_active + 4
        report = discovery.roots_report(wh, [other, archive])
        assert report.active_under_missing == {str(archive): n_active + extracted["catalog"].quarantined}
    finally:
        moved.rename(archive)
