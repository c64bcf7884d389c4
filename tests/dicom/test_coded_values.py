"""Issue 18, finding 5: UIDs and coded tags must match their value representation; a file that violates it is
quarantined naming the tag and the kind of problem, and the value is stored nowhere."""

from __future__ import annotations

import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file

from imaging_assets.dicom.headers import read_file_record
from imaging_assets.dicom.values import cs_problem, uid_problem


@pytest.mark.parametrize("value, problem", [
    ("1.2.840.10008.5.1.4.1.1.2", None),
    ("0", None),
    ("1.0.2", None),
    ("2.25." + "1" * 59, None),  # exactly 64 characters
    ("2.25." + "1" * 60, "longer than 64 characters"),
    ("MRN2604192", "holds characters other than digits and dots"),
    ("1.2.840.ACC99120034", "holds characters other than digits and dots"),
    ("1.2 .3", "holds characters other than digits and dots"),
    ("1..2", "has an empty component"),
    ("1.2.", "has an empty component"),
    ("1.02.3", "a component has a leading zero"),
    ("01.2", "a component has a leading zero"),
])
def test_uid_syntax(value, problem):
    assert uid_problem(value) == problem


@pytest.mark.parametrize("value, problem", [
    ("CT", None), ("PT", None), ("MONOCHROME2", None), ("PALETTE COLOR", None), ("CHEST_TO_PELVIS", None),
    ("  MR ", None),
    ("SMITH^JOHN", "holds characters other than upper-case letters, digits, space and underscore"),
    ("ct", "holds characters other than upper-case letters, digits, space and underscore"),
    ("Saint Mary", "holds characters other than upper-case letters, digits, space and underscore"),
    ("ABCDEFGHIJKLMNOPQ", "longer than 16 characters"),
    ("CT\\MR", "holds more than one value"),
])
def test_code_string_syntax(value, problem):
    assert cs_problem(value) == problem


CRAFTED = [
    ("SeriesInstanceUID", "MRN2604192", "Series Instance UID (0020,000E)"),
    ("SOPInstanceUID", "1.2.3.SMITH", "SOP Instance UID (0008,0018)"),
    ("SOPClassUID", "1.2.MRN2604192", "SOP Class UID (0008,0016)"),
    ("StudyInstanceUID", "1.2.019470312", "Study Instance UID (0020,000D)"),
    ("FrameOfReferenceUID", "1.2." + "9" * 70, "Frame of Reference UID (0020,0052)"),
    ("Modality", "SMITH^JOHN", "Modality (0008,0060)"),
    ("BodyPartExamined", "John Smith", "Body Part Examined (0018,0015)"),
    ("PhotometricInterpretation", "SMITH^JOHN", "Photometric Interpretation (0028,0004)"),
]


@pytest.mark.parametrize("tag, value, named", CRAFTED)
@pytest.mark.parametrize("preamble", [True, False])
def test_a_file_with_an_invalid_uid_or_code_is_quarantined_without_the_value(tmp_path, tag, value, named, preamble):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, tag, value)
        path = tmp_path / "crafted.dcm"
        # with the preamble the fast scanner reads it; without, pydicom's fallback does: both must check
        ds.save_as(path, enforce_file_format=preamble)
    rec, q = read_file_record(str(path), path.stat().st_size, path.stat().st_mtime_ns, "k")
    assert rec is None and q["reason"] == "invalid_value", (rec, q)
    assert named in q["message"] and "value not shown" in q["message"]
    assert value.lower() not in repr(q).lower()


def test_a_valid_file_is_catalogued_with_its_values(tmp_path):
    path = get_testdata_file("CT_small.dcm")
    import os

    st = os.stat(path)
    rec, q = read_file_record(path, st.st_size, st.st_mtime_ns, "k")
    assert q is None and rec["modality"] == "CT" and rec["series_instance_uid"].startswith("1.3.6.1.4.1.5962")


@pytest.mark.parametrize("for_uid, ref_series, named", [
    ("1.2.3.4", "MRN2604192", "a referenced Series Instance UID"),
    ("SMITH.1.2", "1.2.3.5", "Frame of Reference UID (0020,0052)"),
])
def test_an_rtstruct_referencing_an_invalid_uid_is_quarantined(tmp_path, for_uid, ref_series, named):
    """The UIDs an RTSTRUCT carries in its sequences (referenced series, frame of reference) are stored too."""
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the RTSTRUCT writer of the segmentation tests
    from test_segmentations import write_rtstruct

    square = np.array([[0, 0, 0], [5, 0, 0], [5, 5, 0], [0, 5, 0]], float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_rtstruct(tmp_path / "rs.dcm", [(1, "GTV", [square])], for_uid=for_uid, ref_series=ref_series)
    rec, q = read_file_record(str(path), path.stat().st_size, path.stat().st_mtime_ns, "k")
    assert rec is None and q["reason"] == "invalid_value" and named in q["message"], (rec, q)
    assert "MRN2604192" not in q["message"] and "SMITH" not in q["message"]
