"""read_file_record: catalog records and quarantine reasons, on pydicom's corpus, synthetic files and
the real data in ../shared/data/dicom."""

from __future__ import annotations

import os
import types
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from imaging_assets.dicom import headers
from imaging_assets.dicom.crawl import crawl, iter_files
from imaging_assets.dicom.headers import classify_sop_class, read_file_record
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.dicom.records import FILE_FIELDS, QUARANTINE_FIELDS, QUARANTINE_REASONS

SECRET = "test-secret"


def _corpus() -> list[str]:
    """Every local pydicom / pydicom-data test file (directories in the list are walked)."""
    out: list[str] = []
    for p in get_testdata_files():
        if os.path.isdir(p):
            out.extend(path for path, _, _ in iter_files([p]))
        elif os.path.isfile(p):
            out.append(p)
    return sorted(set(out))


CORPUS = _corpus()


def _read(path: str | Path, secret: str | None = SECRET) -> tuple[dict | None, dict | None]:
    st = os.lstat(path)
    return read_file_record(str(path), st.st_size, st.st_mtime_ns, secret)


def _check_shape(rec: dict | None, q: dict | None) -> None:
    assert (rec is None) != (q is None)
    if rec is not None:
        assert list(rec) == list(FILE_FIELDS)
        assert rec["kind"] in ("image", "seg", "rtstruct")
    else:
        assert list(q) == list(QUARANTINE_FIELDS)
        assert q["reason"] in QUARANTINE_REASONS
        assert isinstance(q["message"], str) and len(q["message"]) > 10


def _walk_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk_strings(v)


# --------------------------------------------------------------------------------------------------
# pydicom's corpus
# --------------------------------------------------------------------------------------------------
def test_corpus_is_local_and_large():
    assert len(CORPUS) > 200


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: os.path.relpath(p, os.path.dirname(os.path.dirname(p))))
def test_corpus_file_catalogued_or_quarantined(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reader silences pydicom; nothing should leak out
        rec, q = _read(path)
    _check_shape(rec, q)


@pytest.mark.parametrize(
    "name, kind, rows, cols",
    [
        ("CT_small.dcm", "image", 128, 128),
        ("MR_small.dcm", "image", 64, 64),
        ("MR_small_implicit.dcm", "image", 64, 64),
        ("MR_small_bigendian.dcm", "image", 64, 64),
        ("MR_small_RLE.dcm", "image", 64, 64),
        ("MR_small_jp2klossless.dcm", "image", 64, 64),
        ("MR_small_jpeg_ls_lossless.dcm", "image", 64, 64),
        ("JPEG-LL.dcm", "image", 1024, 256),
        ("JPEG2000.dcm", "image", 1024, 256),
        ("SC_rgb_jpeg_dcmtk.dcm", "image", 100, 100),
        ("emri_small_jpeg_2k_lossless.dcm", "image", 64, 64),
        ("emri_small_jpeg_ls_lossless.dcm", "image", 64, 64),
        ("emri_small_RLE.dcm", "image", 64, 64),
        ("image_dfl.dcm", "image", 512, 512),  # deflated transfer syntax: pydicom path
        ("OT-PAL-8-face.dcm", "image", 480, 640),  # no preamble, raw data set
        ("liver.dcm", "seg", 512, 512),
        ("liver_expb.dcm", "seg", 512, 512),
        ("rtstruct.dcm", "rtstruct", None, None),  # no preamble
    ],
)
def test_known_files_are_catalogued(testdata, name, kind, rows, cols):
    rec, q = _read(testdata(name))
    assert q is None, q
    assert rec["kind"] == kind
    assert rec["rows"] == rows and rec["columns"] == cols
    assert rec["sop_instance_uid"] and rec["series_instance_uid"]
    assert rec["path"] == testdata(name)


def test_ct_small_record(testdata):
    path = testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    rec, q = _read(path)
    assert q is None
    assert rec["kind"] == "image"
    assert rec["modality"] == "CT"
    assert rec["rows"] == 128 and rec["columns"] == 128
    assert rec["pixel_spacing"] == pytest.approx([0.661468, 0.661468])
    assert rec["image_position"] == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert rec["image_orientation"] == pytest.approx([float(v) for v in ds.ImageOrientationPatient])
    assert rec["slice_thickness"] == pytest.approx(float(ds.SliceThickness))
    assert rec["number_of_frames"] == 1
    assert rec["frame_positions"] is None
    assert rec["referenced_series_uids"] is None
    assert rec["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert rec["sop_class_uid"] == ds.SOPClassUID
    assert rec["study_instance_uid"] == ds.StudyInstanceUID
    assert rec["frame_of_reference_uid"] == ds.FrameOfReferenceUID
    assert rec["instance_number"] == int(ds.InstanceNumber)
    assert rec["series_number"] == int(ds.SeriesNumber)
    assert rec["study_date"] == "2004-01-19"
    assert rec["patient_key"] == patient_key(ds.PatientID, SECRET)
    assert rec["size"] == os.path.getsize(path)


def test_mr_small_same_record_in_every_encoding(testdata):
    """Big endian, implicit VR and compressed copies give the same geometry and UIDs."""
    ref, _ = _read(testdata("MR_small.dcm"))
    keys = ["sop_instance_uid", "series_instance_uid", "rows", "columns", "image_position",
            "image_orientation", "pixel_spacing", "slice_thickness", "patient_key", "study_date"]  # fmt: skip
    for name in ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
                 "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]:  # fmt: skip
        rec, q = _read(testdata(name))
        assert q is None, (name, q)
        for k in keys:
            assert rec[k] == pytest.approx(ref[k]) if isinstance(ref[k], list) else rec[k] == ref[k], (name, k)


def test_enhanced_ct_frame_positions(testdata):
    path = testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    rec, q = _read(path)
    assert q is None
    assert rec["number_of_frames"] == 2
    expected = [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    np.testing.assert_allclose(rec["frame_positions"], expected)
    assert rec["image_position"] == pytest.approx(expected[0])
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert rec["pixel_spacing"] == pytest.approx([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing])
    assert rec["image_orientation"] == pytest.approx(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    )


def test_seg_record(testdata):
    path = testdata("liver.dcm")
    ds = pydicom.dcmread(path)
    rec, q = _read(path)
    assert q is None
    assert rec["kind"] == "seg"
    assert rec["number_of_frames"] == 3
    assert len(rec["frame_positions"]) == 3
    assert rec["referenced_series_uids"] == [ds.ReferencedSeriesSequence[0].SeriesInstanceUID]


def test_rtstruct_record(testdata):
    path = testdata("rtstruct.dcm")
    ds = pydicom.dcmread(path, force=True)
    rec, q = _read(path)
    assert q is None
    assert rec["kind"] == "rtstruct"
    assert rec["number_of_frames"] == 0
    assert rec["rows"] is None and rec["image_position"] is None
    expected = [
        s.SeriesInstanceUID
        for f in ds.ReferencedFrameOfReferenceSequence
        for st in f.RTReferencedStudySequence
        for s in st.RTReferencedSeriesSequence
    ]
    assert rec["referenced_series_uids"] == expected
    assert rec["frame_of_reference_uid"] == ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID


@pytest.mark.parametrize(
    "name, reason, words",
    [
        ("rtplan.dcm", "unsupported_sop_class", "RT Plan Storage"),
        ("rtdose.dcm", "unsupported_sop_class", "RT Dose Storage"),
        ("test-SR.dcm", "unsupported_sop_class", "Comprehensive SR Storage"),
        ("reportsi.dcm", "unsupported_sop_class", "Basic Text SR Storage"),
        ("waveform_ecg.dcm", "unsupported_sop_class", "Waveform"),
        ("DICOMDIR", "unsupported_sop_class", "Media Storage Directory Storage"),
        ("ExplVR_LitEndNoMeta.dcm", "unsupported_sop_class", "RT Ion Plan Storage"),
        ("MR_truncated.dcm", "truncated", "Pixel Data"),
        ("rtplan_truncated.dcm", "truncated", "Beam Sequence"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated", "Pixel Data"),
        ("README.txt", "not_dicom", "DICM"),
        ("crayons.icc", "not_dicom", "DICM"),
        ("zipMR.gz", "not_dicom", "DICM"),
        ("rtplan.dump", "not_dicom", "DICM"),
        ("test1.json", "not_dicom", "DICM"),
        ("nested_priv_SQ.dcm", "missing_tag", "SOP Class UID"),
        ("JPEGLSNearLossless_08.dcm", "missing_tag", "Series Instance UID"),
    ],
)
def test_known_files_are_quarantined(testdata, name, reason, words):
    rec, q = _read(testdata(name))
    assert rec is None
    assert q["reason"] == reason, q
    assert words in q["message"]


def test_tiny_alpha_images_without_pixel_data(testdata):
    path = next(p for p in CORPUS if p.endswith(os.path.join("SE000000", "IM000000")))
    rec, q = _read(path)
    assert q["reason"] == "missing_tag" and "Pixel Data" in q["message"]


def test_scanner_values_equal_pydicom_values():
    """The fast scanner and pydicom agree on every header value of every file the scanner reads."""
    compared = 0
    for path in CORPUS:
        with open(path, "rb") as fp:
            first = fp.read(headers._CHUNK)
            if first[128:132] != b"DICM":
                continue
            rd = headers._Reader(fp, os.fstat(fp.fileno()).st_size, first)
            try:
                off, meta = headers._scan_meta(rd)
                ts = meta.get("TransferSyntaxUID")
                if ts in (None, headers._TS_DEFLATED):
                    continue
                implicit = ts == headers._TS_IMPLICIT_LE
                little = ts != headers._TS_EXPLICIT_BE
                if not implicit and little and headers._looks_implicit(rd, off):
                    implicit = True
                scan = headers._scan_dataset(rd, off, implicit, little)
            except (headers._ScanError, headers._Quarantine):
                continue
            fast = headers._decode_raw(scan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slow = headers._values_from_ds(pydicom.dcmread(path, stop_before_pixels=True, force=True))
        assert fast == slow, path
        compared += 1
    assert compared > 150


def test_no_phi_in_corpus_records():
    for path in CORPUS:
        rec, _ = _read(path)
        if rec is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        raw = [str(ds.get(k, "") or "").strip() for k in ("PatientName", "PatientID", "PatientBirthDate")]
        raw = [r for r in raw if len(r) >= 4]
        values = {k: v for k, v in rec.items() if k != "path"}  # the path is the user's own naming
        for s in _walk_strings(values):
            for r in raw:
                assert r not in s, (path, r, s)


# --------------------------------------------------------------------------------------------------
# Synthetic files, one per quarantine reason
# --------------------------------------------------------------------------------------------------
def test_empty_file(tmp_path):
    p = tmp_path / "empty.dcm"
    p.write_bytes(b"")
    rec, q = _read(p)
    assert rec is None and q["reason"] == "empty_file"
    assert q["size"] == 0 and q["path"] == str(p)


def test_text_file_named_dcm(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_text("patient,outcome\nP001,1\n" * 50)
    rec, q = _read(p)
    assert q["reason"] == "not_dicom"


def test_binary_junk_with_dicom_like_start(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"\x08\x00\x05\x00" + os.urandom(2000))
    rec, q = _read(p)
    assert rec is None and q["reason"] in ("not_dicom", "truncated", "unreadable")


@pytest.mark.parametrize("cut", [20_000, 38_000, 1_000, 500, 140])
def test_truncated_copy_of_ct_small(tmp_path, testdata, cut):
    data = Path(testdata("CT_small.dcm")).read_bytes()
    p = tmp_path / f"cut_{cut}.dcm"
    p.write_bytes(data[:cut])
    rec, q = _read(p)
    assert rec is None and q["reason"] == "truncated", q
    assert f"{cut:,}" in q["message"] or "ends" in q["message"]
    if cut > 10_000:
        assert "Pixel Data" in q["message"]


def test_truncated_right_after_file_meta(tmp_path, testdata):
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    data = Path(testdata("CT_small.dcm")).read_bytes()
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    p = tmp_path / "meta_only.dcm"
    p.write_bytes(data[:meta_end])
    rec, q = _read(p)
    assert q["reason"] == "truncated" and "no data set" in q["message"]


def test_pixel_data_shorter_than_rows_columns(tmp_path, write_ct):
    def halve(ds):
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    rec, q = _read(write_ct(tmp_path / "short.dcm", halve))
    assert q["reason"] == "truncated"
    assert "16,384" in q["message"] and "32,768" in q["message"]


def test_missing_pixel_data(tmp_path, write_ct):
    rec, q = _read(write_ct(tmp_path / "nopix.dcm", lambda ds: ds.__delattr__("PixelData")))
    assert q["reason"] == "missing_tag" and "Pixel Data (7FE0,0010)" in q["message"]


@pytest.mark.parametrize(
    "keyword, words",
    [
        ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
        ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
        ("SOPClassUID", "SOP Class UID (0008,0016)"),
        ("Rows", "Rows (0028,0010)"),
        ("Columns", "Columns (0028,0011)"),
    ],
)
def test_missing_required_tag(tmp_path, write_ct, keyword, words):
    rec, q = _read(write_ct(tmp_path / f"no_{keyword}.dcm", lambda ds: ds.__delattr__(keyword)))
    assert q["reason"] == "missing_tag", q
    assert words in q["message"]


def test_empty_series_uid_is_missing(tmp_path, write_ct):
    rec, q = _read(write_ct(tmp_path / "empty_uid.dcm", SeriesInstanceUID=""))
    assert q["reason"] == "missing_tag"


@pytest.mark.parametrize(
    "sop_class, name",
    [
        ("1.2.840.10008.5.1.4.1.1.481.5", "RT Plan Storage"),
        ("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR Storage"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "Grayscale Softcopy Presentation State Storage"),
        ("1.2.840.10008.5.1.4.1.1.66", "Raw Data Storage"),
    ],
)
def test_unsupported_sop_class(tmp_path, write_ct, sop_class, name):
    rec, q = _read(write_ct(tmp_path / "other.dcm", SOPClassUID=sop_class))
    assert q["reason"] == "unsupported_sop_class"
    assert name in q["message"]


def test_undecodable_made_up_transfer_syntax(tmp_path, testdata):
    ds = pydicom.dcmread(testdata("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.7777.1"  # no decoder exists for this
    p = tmp_path / "odd_ts.dcm"
    ds.save_as(p, implicit_vr=False, little_endian=True)
    rec, q = _read(p)
    assert q["reason"] == "undecodable_pixels", q
    assert "1.2.826.0.1.3680043.9.7777.1" in q["message"]


def test_undecodable_when_plugin_missing(tmp_path, testdata, monkeypatch, copy_testfile):
    import pydicom.pixels

    real = pydicom.pixels.get_decoder

    def fake(uid):
        if uid == JPEG2000Lossless:
            return types.SimpleNamespace(is_available=False, missing_dependencies=["openjpeg - not installed"])
        return real(uid)

    headers._decoder_problem.cache_clear()
    monkeypatch.setattr(pydicom.pixels, "get_decoder", fake)
    try:
        rec, q = _read(copy_testfile("MR_small_jp2klossless.dcm", tmp_path / "j2k.dcm"))
    finally:
        monkeypatch.undo()
        headers._decoder_problem.cache_clear()
    assert q["reason"] == "undecodable_pixels"
    assert "openjpeg" in q["message"]
    rec, q = _read(tmp_path / "j2k.dcm")  # with the real decoders it is fine again
    assert q is None


def test_compressed_pixels_are_not_decoded(testdata, monkeypatch):
    """The crawl never decodes pixel data (only asks whether a decoder exists)."""
    import pydicom.pixels.decoders.base as base

    def boom(*a, **k):
        raise AssertionError("pixel data decoded during the crawl")

    monkeypatch.setattr(base.Decoder, "as_array", boom)
    monkeypatch.setattr(base.Decoder, "iter_array", boom)
    rec, q = _read(testdata("MR_small_jp2klossless.dcm"))
    assert q is None


def test_unreadable_permission(tmp_path, copy_testfile, monkeypatch):
    p = copy_testfile("CT_small.dcm", tmp_path / "locked.dcm")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root reads anything: simulate the denial at open()

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(p))

        monkeypatch.setattr(headers, "open", denied, raising=False)
    else:
        p.chmod(0)
    try:
        rec, q = _read(p)
    finally:
        p.chmod(0o644)
    assert q["reason"] == "unreadable" and "permission denied" in q["message"].lower()


def test_symlink_loop_and_broken_symlink(tmp_path):
    loop = tmp_path / "loop.dcm"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.dcm"
    broken.symlink_to(tmp_path / "gone.dcm")
    _, q = _read(loop)
    assert q["reason"] == "unreadable" and "symlink loop" in q["message"]
    _, q = _read(broken)
    assert q["reason"] == "unreadable" and "broken symlink" in q["message"]


def test_directory_is_unreadable_not_a_crash(tmp_path):
    d = tmp_path / "a.dcm"
    d.mkdir()
    rec, q = read_file_record(str(d), 4096, 0, SECRET)
    assert q["reason"] == "unreadable"


@pytest.mark.parametrize("exc", [RecursionError("maximum recursion depth exceeded"), MemoryError(), ValueError("x")])
def test_internal_errors_become_unreadable(tmp_path, copy_testfile, monkeypatch, exc):
    p = copy_testfile("CT_small.dcm", tmp_path / "ct.dcm")

    def explode(*a, **k):
        raise exc

    monkeypatch.setattr(headers, "_scan_dataset", explode)
    rec, q = _read(p)
    assert q["reason"] == "unreadable"
    assert type(exc).__name__ in q["message"]


def test_deeply_nested_sequences_do_not_crash(tmp_path, write_ct):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def nest(ds):
        inner = Dataset()
        inner.CodeValue = "1"
        for _ in range(200):
            outer = Dataset()
            outer.ContentSequence = Sequence([inner])
            inner = outer
        ds.ContentSequence = Sequence([inner])

    p = write_ct(tmp_path / "nested.dcm", nest)
    rec, q = _read(p)
    _check_shape(rec, q)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------
def test_phi_never_in_record(tmp_path, write_ct):
    p = write_ct(
        tmp_path / "phi.dcm",
        PatientName="Doe^Jane^Middle",
        PatientID="PHI-ID-123456",
        PatientBirthDate="19700101",
        OtherPatientIDs="OTHER-987654",
    )
    rec, q = _read(p)
    assert q is None
    for s in _walk_strings(rec):
        for raw in ("Doe", "Jane", "PHI-ID-123456", "19700101", "OTHER-987654"):
            assert raw not in s
    assert rec["patient_key"] == patient_key("PHI-ID-123456", SECRET)
    assert rec["patient_key"] != patient_key("PHI-ID-123456", "another-secret")


def test_patient_key_uses_given_secret_and_none_without_id(tmp_path, write_ct):
    p = write_ct(tmp_path / "a.dcm", PatientID="P001")
    assert _read(p, "s1")[0]["patient_key"] == patient_key("P001", "s1")
    p2 = write_ct(tmp_path / "b.dcm", lambda ds: ds.__delattr__("PatientID"))
    assert _read(p2)[0]["patient_key"] is None


@pytest.mark.parametrize(
    "raw, iso", [("20240229", "2024-02-29"), ("20230229", None), ("2024", None), ("", None), ("1999.12.31", "1999-12-31")]
)
def test_study_date(tmp_path, write_ct, raw, iso):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when writing the invalid ones
        p = write_ct(tmp_path / "d.dcm", StudyDate=raw)
    rec, q = _read(p)
    assert rec["study_date"] == iso


def test_non_ascii_description(tmp_path, write_ct):
    p = write_ct(tmp_path / "utf8.dcm", SpecificCharacterSet="ISO_IR 192", SeriesDescription="Thorax ärztlich 胸部")
    rec, q = _read(p)
    assert rec["series_description"] == "Thorax ärztlich 胸部"


def test_invalid_numbers_become_none(tmp_path, write_ct):
    from pydicom.dataelem import RawDataElement

    def bad(ds):
        for tag, vr, value in [(0x00200013, "IS", b"abc "), (0x00280030, "DS", b"x\\1 ")]:
            ds._dict[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)

    p = write_ct(tmp_path / "bad.dcm", bad)
    rec, q = _read(p)
    assert q is None
    assert rec["instance_number"] is None and rec["pixel_spacing"] is None


@pytest.mark.parametrize(
    "uid, kind",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "image"),
        ("1.2.840.10008.5.1.4.1.1.4.1", "image"),
        ("1.2.840.10008.5.1.4.1.1.2.2", "image"),
        ("1.2.840.10008.5.1.4.1.1.128", "image"),
        ("1.2.840.10008.5.1.4.1.1.130", "image"),
        ("1.2.840.10008.5.1.4.1.1.7", "image"),
        ("1.2.840.10008.5.1.4.1.1.1.2", "image"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "seg"),
        ("1.2.840.10008.5.1.4.1.1.66.7", "seg"),
        ("1.2.840.10008.5.1.4.1.1.481.3", "rtstruct"),
        ("1.2.840.10008.5.1.4.1.1.481.1", None),  # RT Image
        ("1.2.840.10008.5.1.4.1.1.481.2", None),  # RT Dose
        ("1.2.840.10008.5.1.4.1.1.481.5", None),  # RT Plan
        ("1.2.840.10008.5.1.4.1.1.88.22", None),  # Enhanced SR
        ("1.2.840.10008.1.3.10", None),  # DICOMDIR
        ("1.2.3.4", None),
        (None, None),
    ],
)
def test_classify_sop_class(uid, kind):
    assert classify_sop_class(uid) == kind


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data/dicom)
# --------------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_dcm_qa_transfer_syntaxes(shared_data):
    folder = shared_data / "dicom" / "dcm_qa" / "ts"
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 9
    arrays = []
    syntaxes = set()
    for f in files:
        rec, q = _read(f)
        assert q is None, q
        assert rec["kind"] == "image" and rec["rows"] == 384
        syntaxes.add(rec["transfer_syntax_uid"])
        arrays.append(pydicom.dcmread(f).pixel_array)  # a test may decode; the crawl never does
    assert len(syntaxes) == 7  # 9 files, 7 UIDs (JPEG lossless and JPEG-LS each by two encoders)
    for a in arrays[1:]:
        np.testing.assert_array_equal(a, arrays[0])


@pytest.mark.realdata
def test_dcm_qa_enhanced_frame_positions(shared_data):
    files = sorted((shared_data / "dicom" / "dcm_qa" / "enh").rglob("*.dcm"))
    assert files
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rec, q = _read(f)
        assert q is None, q
        n = int(ds.NumberOfFrames)
        assert rec["number_of_frames"] == n
        assert rec["frame_positions"] is not None and len(rec["frame_positions"]) == n
        assert all(p is not None and len(p) == 3 for p in rec["frame_positions"])
        assert rec["image_position"] == rec["frame_positions"][0]
        assert rec["pixel_spacing"] is not None and rec["image_orientation"] is not None


def _expected_references(ds) -> list[str]:
    out: list[str] = []
    if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3":
        uids = [
            s.SeriesInstanceUID
            for f in ds.get("ReferencedFrameOfReferenceSequence", [])
            for st in f.get("RTReferencedStudySequence", [])
            for s in st.get("RTReferencedSeriesSequence", [])
        ]
    else:
        uids = [s.SeriesInstanceUID for s in ds.get("ReferencedSeriesSequence", [])]
    for u in uids:
        if u not in out:
            out.append(u)
    return out


@pytest.mark.realdata
@pytest.mark.parametrize("folder", ["dcmqi", "rt-utils", "highdicom-seg", "sts-sarcoma", "ibsi-digital-phantom"])
def test_real_segmentations_and_structure_sets(shared_data, folder):
    root = shared_data / "dicom" / folder
    result = crawl([root], secret=SECRET, workers=1)
    by_path = {r["path"]: r for r in result.records}
    n_checked = 0
    for path, _, _ in iter_files([root]):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM (nifti, nrrd, licences)
            continue
        kind = {"1.2.840.10008.5.1.4.1.1.481.3": "rtstruct"}.get(ds.SOPClassUID)
        if ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"):
            kind = "seg"
        if kind is None:
            continue
        rec = by_path[path]
        assert rec["kind"] == kind
        assert rec["referenced_series_uids"] == _expected_references(ds), path
        assert rec["frame_of_reference_uid"]
        n_checked += 1
        if path.endswith("non_existent_reference_rt.dcm"):
            assert rec["referenced_series_uids"] == []
    assert n_checked >= 1


@pytest.mark.realdata
def test_real_tree_every_file_accounted_for(shared_data):
    root = shared_data / "dicom"
    files = [p for p, _, _ in iter_files([root])]
    result = crawl([root], secret=SECRET, workers=2, chunk_size=64)
    assert result.seen == len(files) == result.read
    paths = [r["path"] for r in result.records] + [q["path"] for q in result.quarantined]
    assert sorted(paths) == sorted(files)
    dicom_ok = [r for r in result.records if r["path"].endswith(".dcm")]
    assert len(dicom_ok) > 300
    # the only non-DICOM quarantine reasons in the real tree are licences, readmes, nifti and nrrd
    for q in result.quarantined:
        assert q["reason"] in ("not_dicom", "unsupported_sop_class"), q
