"""crawl / iter_files: walking, symlinks, unreadable directories, incremental re-crawls, parallel reads."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from imaging_assets.dicom import crawl as crawl_mod
from imaging_assets.dicom.crawl import CrawlResult, crawl, iter_files
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.dicom.records import FILE_FIELDS, QUARANTINE_FIELDS

SECRET = "crawl-test-secret"


def _known(result: CrawlResult) -> dict[str, tuple[int, int]]:
    rows = result.records + result.quarantined
    return {r["path"]: (r["size"], r["mtime_ns"]) for r in rows}


@pytest.fixture()
def ct_ds(testdata):
    return pydicom.dcmread(testdata("CT_small.dcm"))


def _write(ds: pydicom.Dataset, path: Path, **attrs) -> Path:
    ds = ds.copy()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


@pytest.fixture()
def small_tree(tmp_path, ct_ds, testdata) -> Path:
    """A mixed tree: images in nested and hidden folders, an extensionless file, a CSV, a folder named
    a.dcm, a broken link, a link loop, a symlinked folder (not followed) and a symlinked file."""
    root = tmp_path / "archive"
    series = generate_uid()
    for i in range(3):
        _write(ct_ds, root / "pat1" / "study" / f"im{i}.dcm", SeriesInstanceUID=series, InstanceNumber=i + 1)
    _write(ct_ds, root / "pat2" / "IM0001", SeriesInstanceUID=generate_uid())  # no extension
    _write(ct_ds, root / ".hidden" / "im.dcm", SeriesInstanceUID=generate_uid())
    _write(ct_ds, root / "a.dcm" / "inside.dcm", SeriesInstanceUID=generate_uid())  # a directory
    (root / "outcomes.csv").write_text("patient,event\nP1,1\n")
    (root / "empty.dcm").write_bytes(b"")
    (root / "broken.dcm").symlink_to(root / "nowhere.dcm")
    (root / "loop.dcm").symlink_to(root / "loop.dcm")
    outside = tmp_path / "outside"
    _write(ct_ds, outside / "ext.dcm", SeriesInstanceUID=generate_uid())
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / "linked_file.dcm").symlink_to(outside / "ext.dcm")
    return root


def test_iter_files_walks_everything_but_symlinked_dirs(small_tree):
    found = {os.path.relpath(p, small_tree): (size, mtime) for p, size, mtime in iter_files([small_tree])}
    assert set(found) == {
        "pat1/study/im0.dcm",
        "pat1/study/im1.dcm",
        "pat1/study/im2.dcm",
        "pat2/IM0001",
        ".hidden/im.dcm",
        "a.dcm/inside.dcm",
        "outcomes.csv",
        "empty.dcm",
        "broken.dcm",
        "loop.dcm",
        "linked_file.dcm",
    }
    st = os.stat(small_tree / "pat2" / "IM0001")
    assert found["pat2/IM0001"] == (st.st_size, st.st_mtime_ns)
    # a symlinked file reports its target's size
    assert found["linked_file.dcm"][0] == os.path.getsize(small_tree / "linked_file.dcm")


def test_iter_files_paths_are_absolute_not_resolved(small_tree, monkeypatch):
    monkeypatch.chdir(small_tree.parent)
    paths = [p for p, _, _ in iter_files(["archive"])]
    assert all(os.path.isabs(p) for p in paths)
    assert str(small_tree / "linked_file.dcm") in paths


def test_iter_files_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_files([tmp_path / "absent"]))


def test_iter_files_single_file_root(small_tree):
    f = small_tree / "pat2" / "IM0001"
    assert [p for p, _, _ in iter_files([f])] == [str(f)]


def test_crawl_classifies_the_tree(small_tree):
    result = crawl([small_tree], secret=SECRET)
    recs = {os.path.relpath(r["path"], small_tree): r for r in result.records}
    quar = {os.path.relpath(q["path"], small_tree): q for q in result.quarantined}
    assert set(recs) == {
        "pat1/study/im0.dcm",
        "pat1/study/im1.dcm",
        "pat1/study/im2.dcm",
        "pat2/IM0001",
        ".hidden/im.dcm",
        "a.dcm/inside.dcm",
        "linked_file.dcm",
    }
    assert {k: q["reason"] for k, q in quar.items()} == {
        "outcomes.csv": "not_dicom",
        "empty.dcm": "empty_file",
        "broken.dcm": "unreadable",
        "loop.dcm": "unreadable",
    }
    assert "symlink loop" in quar["loop.dcm"]["message"]
    assert "broken symlink" in quar["broken.dcm"]["message"]
    assert result.seen == 11 and result.read == 11
    assert result.unchanged == [] and result.removed == []
    for r in result.records:
        assert list(r) == list(FILE_FIELDS)
    for q in result.quarantined:
        assert list(q) == list(QUARANTINE_FIELDS)
    assert [r["path"] for r in result.records] == sorted(r["path"] for r in result.records)
    assert result.elapsed_s > 0


def test_crawl_unreadable_directory_is_quarantined(small_tree, monkeypatch):
    locked = small_tree / "pat1" / "study"
    before = crawl([small_tree], secret=SECRET)
    real_scandir, real_open = os.scandir, os.open

    def scandir(path):
        if not isinstance(path, int) and os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def os_open(path, *args, **kwargs):
        if not isinstance(path, int) and os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root lists anything: simulate the denial
        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(os, "open", os_open)
    else:
        locked.chmod(0)
    try:
        result = crawl([small_tree], known=_known(before), secret=SECRET)
    finally:
        locked.chmod(0o755)
    q = {q["path"]: q for q in result.quarantined}
    assert q[str(locked)]["reason"] == "unreadable"
    assert "cannot list directory" in q[str(locked)]["message"]
    # the files under it are in an unknown state, not removed
    assert result.removed == []


def test_crawl_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        crawl([tmp_path / "unmounted"], known={str(tmp_path / "unmounted" / "a.dcm"): (1, 1)})


def test_incremental_crawl(small_tree, ct_ds):
    first = crawl([small_tree], secret=SECRET)
    known = _known(first)
    assert len(known) == 11

    added = _write(ct_ds, small_tree / "pat3" / "new.dcm", SeriesInstanceUID=generate_uid())
    modified = small_tree / "pat1" / "study" / "im1.dcm"
    _write(ct_ds, modified, SeriesDescription="changed and longer than before")
    st = os.stat(modified)
    os.utime(modified, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    deleted = small_tree / "pat1" / "study" / "im2.dcm"
    deleted.unlink()
    touched_quarantine = small_tree / "outcomes.csv"
    touched_quarantine.write_text("patient,event\nP1,1\nP2,0\n")

    second = crawl([small_tree], known=known, secret=SECRET)
    assert sorted(r["path"] for r in second.records) == sorted([str(added), str(modified)])
    assert [q["path"] for q in second.quarantined] == [str(touched_quarantine)]
    assert second.removed == [str(deleted)]
    expected_unchanged = set(known) - {str(modified), str(deleted), str(touched_quarantine)}
    assert set(second.unchanged) == expected_unchanged
    assert second.read == 3 and second.seen == 11
    rec = next(r for r in second.records if r["path"] == str(modified))
    assert rec["series_description"] == "changed and longer than before"

    third = crawl([small_tree], known={**known, **_known(second)}, secret=SECRET)
    assert third.read == 0 and third.records == [] and third.quarantined == []
    assert str(deleted) in third.removed  # still listed until the catalog drops it


def test_removed_only_under_crawled_roots(tmp_path, ct_ds):
    a = tmp_path / "a"
    b = tmp_path / "ab"  # shares a string prefix with a
    _write(ct_ds, a / "x.dcm")
    _write(ct_ds, b / "y.dcm")
    known = {
        str(a / "gone.dcm"): (1, 1),
        str(b / "gone.dcm"): (1, 1),
        str(tmp_path / "elsewhere" / "z.dcm"): (1, 1),
    }
    result = crawl([a], known=known, secret=SECRET)
    assert result.removed == [str(a / "gone.dcm")]


def test_secret_reaches_records(small_tree, ct_ds):
    result = crawl([small_tree / "pat2"], secret="explicit-secret", workers=1)
    (rec,) = result.records
    assert rec["patient_key"] == patient_key(str(ct_ds.PatientID), "explicit-secret")


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory, testdata) -> Path:
    """~300 files: copies of CT_small with distinct UIDs plus some quarantine cases."""
    root = tmp_path_factory.mktemp("big") / "tree"
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    raw = Path(testdata("CT_small.dcm")).read_bytes()
    for s in range(6):
        series = generate_uid()
        for i in range(48):
            _write(ds, root / f"p{s // 2}" / f"s{s}" / f"{i:03d}", SeriesInstanceUID=series, InstanceNumber=i,
                   PatientID=f"P{s // 2:03d}")  # fmt: skip
    for name in ("rtplan.dcm", "MR_small_jp2klossless.dcm", "liver.dcm", "rtstruct.dcm", "README.txt"):
        shutil.copyfile(testdata(name), root / f"extra_{name}")
    (root / "cut.dcm").write_bytes(raw[:20_000])
    (root / "zero").write_bytes(b"")
    return root


def test_parallel_equals_serial(big_tree):
    serial = crawl([big_tree], secret=SECRET, workers=1)
    parallel = crawl([big_tree], secret=SECRET, workers=2, chunk_size=32)
    assert serial.seen == parallel.seen == 6 * 48 + 7
    assert serial.records == parallel.records
    assert serial.quarantined == parallel.quarantined
    assert len(serial.records) == 6 * 48 + 3
    assert {q["reason"] for q in serial.quarantined} == {"unsupported_sop_class", "not_dicom", "truncated", "empty_file"}


def test_parallel_uses_processes(big_tree, monkeypatch):
    """Above the in-process threshold and with workers > 1 the reads go through a process pool."""
    created = []
    real = crawl_mod.ProcessPoolExecutor

    def spy(*args, **kwargs):
        created.append(kwargs.get("max_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(crawl_mod, "ProcessPoolExecutor", spy)
    crawl([big_tree], secret=SECRET, workers=2)
    assert created == [2]
    created.clear()
    crawl([big_tree / "p0" / "s0"], secret=SECRET, workers=2)  # 48 files: read in-process
    assert created == []


def test_recrawl_is_fast(big_tree):
    first = crawl([big_tree], secret=SECRET, workers=1)
    t = time.perf_counter()
    again = crawl([big_tree], known=_known(first), secret=SECRET, workers=2)
    assert again.read == 0 and len(again.unchanged) == first.seen
    assert time.perf_counter() - t < max(first.elapsed_s, 0.5)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_reported_not_opened(tmp_path, ct_ds):
    root = tmp_path / "r"
    _write(ct_ds, root / "ok.dcm")
    os.mkfifo(root / "pipe.dcm")  # opening it would block the crawl forever
    result = crawl([root], secret=SECRET)
    assert [os.path.basename(r["path"]) for r in result.records] == ["ok.dcm"]
    (q,) = result.quarantined
    assert q["path"] == str(root / "pipe.dcm") and q["reason"] == "unreadable" and "FIFO" in q["message"]
