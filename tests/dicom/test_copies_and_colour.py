"""Copies of one file at several paths (resolve_duplicates, under_roots) and colour images in series QC."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from imaging_assets.dicom.crawl import crawl, resolve_duplicates, same_bytes, under_roots
from imaging_assets.dicom.records import GEOMETRY_FLAGS
from imaging_assets.dicom.series import assemble_series

SECRET = "copies-test-secret"


# --------------------------------------------------------------------------------------------------
# which paths are copies of which
# --------------------------------------------------------------------------------------------------
def _row(path: str, size: int = 10, rank: int = 0, duplicate_of: str | None = None) -> dict:
    return {"path": path, "size": size, "rank": rank, "duplicate_of": duplicate_of}


def _same_name(a: str, b: str) -> bool:
    """Content test for the pure tests: files are 'identical' when their base names are."""
    return Path(a).name == Path(b).name


def test_copies_found_together_choose_the_smallest_path():
    rows = [_row("/b/x.dcm"), _row("/a/x.dcm"), _row("/c/x.dcm")]
    assert resolve_duplicates(rows, _same_name) == {"/a/x.dcm": None, "/b/x.dcm": "/a/x.dcm", "/c/x.dcm": "/a/x.dcm"}


def test_existing_canonical_stays_when_a_copy_appears_at_a_smaller_path():
    rows = [_row("/m/x.dcm", rank=1), _row("/a/x.dcm", rank=2)]  # /a/ is new (read later)
    assert resolve_duplicates(rows, _same_name) == {"/m/x.dcm": None, "/a/x.dcm": "/m/x.dcm"}


def test_same_uid_different_content_is_not_a_copy():
    # rt-utils writes different RTSTRUCTs with one SOP instance UID: same size, other bytes / other size
    rows = [_row("/a/rs1.dcm"), _row("/a/rs2.dcm"), _row("/a/rs3.dcm", size=11)]
    calls: list[tuple[str, str]] = []

    def same(a: str, b: str) -> bool:
        calls.append((a, b))
        return False

    assert resolve_duplicates(rows, same) == {"/a/rs1.dcm": None, "/a/rs2.dcm": None, "/a/rs3.dcm": None}
    assert calls == [("/a/rs1.dcm", "/a/rs2.dcm")]  # sizes differ: never read
    # once both were compared (checked), they are not read again; a newcomer is compared with each
    checked = [{**r, "checked": True} for r in rows]
    assert resolve_duplicates(checked, same) == {"/a/rs1.dcm": None, "/a/rs2.dcm": None, "/a/rs3.dcm": None}
    assert len(calls) == 1
    resolve_duplicates([*checked, _row("/b/rs9.dcm", rank=1)], same)
    assert calls[1:] == [("/a/rs1.dcm", "/b/rs9.dcm"), ("/a/rs2.dcm", "/b/rs9.dcm")]


def test_stored_links_are_trusted_and_survive_their_canonical():
    def never(a: str, b: str) -> bool:
        raise AssertionError("stored links must not be compared again")

    # the canonical /a/x.dcm left the catalog: its two copies are still copies of each other
    rows = [_row("/b/x.dcm", rank=1, duplicate_of="/a/x.dcm"), _row("/c/x.dcm", rank=1, duplicate_of="/a/x.dcm")]
    assert resolve_duplicates(rows, never) == {"/b/x.dcm": None, "/c/x.dcm": "/b/x.dcm"}
    # a lone copy whose canonical left becomes unique
    assert resolve_duplicates([_row("/b/x.dcm", duplicate_of="/a/x.dcm")], never) == {"/b/x.dcm": None}


def test_same_bytes_and_under_roots(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 100)
    c.write_bytes(b"x" * 99 + b"y")
    assert same_bytes(str(a), str(b)) and not same_bytes(str(a), str(c))
    assert not same_bytes(str(a), str(tmp_path / "gone"))
    root = str(tmp_path / "root")
    assert under_roots(root + "/p/x.dcm", [root]) and under_roots(root, [root])
    assert not under_roots(root + "2/x.dcm", [root])  # a sibling folder with a longer name is not inside
    assert under_roots(root + "/x.dcm", [root + "/"])


# --------------------------------------------------------------------------------------------------
# colour images
# --------------------------------------------------------------------------------------------------
def _geometry(ds: pydicom.Dataset, series_uid: str, for_uid: str, i: int) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.InstanceNumber = i + 1
    ds.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 2.0


def _series(src: str, folder: Path, n: int = 4) -> list[Path]:
    series_uid, for_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(src)
        _geometry(ds, series_uid, for_uid, i)
        p = folder / f"im{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def test_rgb_file_records_its_photometric(testdata):
    from imaging_assets.dicom.headers import read_file_record

    path = testdata("SC_rgb.dcm")
    st = Path(path).stat()
    rec, q = read_file_record(path, st.st_size, st.st_mtime_ns, SECRET)
    assert q is None and rec["kind"] == "image"
    assert rec["samples_per_pixel"] == 3 and rec["photometric_interpretation"] == "RGB"
    ct = testdata("CT_small.dcm")
    st = Path(ct).stat()
    rec, _ = read_file_record(ct, st.st_size, st.st_mtime_ns, SECRET)
    assert rec["samples_per_pixel"] == 1 and rec["photometric_interpretation"] == "MONOCHROME2"


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm"])
def test_rgb_series_is_flagged_not_usable(testdata, tmp_path, name):
    assert "color_pixels" in GEOMETRY_FLAGS
    _series(testdata(name), tmp_path / "rgb")
    _series(testdata("CT_small.dcm"), tmp_path / "ct")
    result = crawl([tmp_path], secret=SECRET, workers=1)
    assert not result.quarantined, result.quarantined
    rows = {r["files"][0].split("/")[-2]: r for r in assemble_series(result.records)}
    rgb, ct = rows["rgb"], rows["ct"]
    assert rgb["flags"] == ["color_pixels"], rgb["flag_details"]  # geometry is fine: only the colour
    assert rgb["usable"] is False
    assert "4 of 4 files hold colour pixels" in rgb["flag_details"][0]
    assert "SamplesPerPixel 3" in rgb["flag_details"][0]
    assert ct["flags"] == [] and ct["usable"] is True


def test_palette_colour_is_flagged_and_old_records_are_not(testdata, tmp_path):
    _series(testdata("CT_small.dcm"), tmp_path / "ct", n=3)
    records = crawl([tmp_path], secret=SECRET, workers=1).records
    records[1] = {**records[1], "photometric_interpretation": "PALETTE COLOR"}
    (row,) = assemble_series(records)
    assert row["flags"] == ["color_pixels"] and "PALETTE COLOR" in row["flag_details"][0]
    # records catalogued before the fields existed (None) are not flagged
    old = [{**r, "samples_per_pixel": None, "photometric_interpretation": None} for r in records]
    (row,) = assemble_series(old)
    assert row["flags"] == []

