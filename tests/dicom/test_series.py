"""Series assembly and geometry QC: synthetic broken series (one per flag) and the real test data."""

from __future__ import annotations

import hashlib
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imaging_assets.dicom.records import FILE_FIELDS, GEOMETRY_FLAGS, SERIES_FIELDS
from imaging_assets.dicom.series import assemble_series, series_key, slice_normal

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SERIES_UID = "1.2.826.0.1.3680043.8.498.100"
FOR_UID = "1.2.826.0.1.3680043.8.498.200"


# --------------------------------------------------------------------------------------------------
# helpers: FILE_FIELDS records built by hand
# --------------------------------------------------------------------------------------------------
def make_record(
    path: str,
    position: Any,
    *,
    orientation: Any = AXIAL,
    pixel_spacing: Any = (0.7, 0.7),
    rows: int = 64,
    columns: int = 64,
    series_uid: str = SERIES_UID,
    for_uid: str = FOR_UID,
    instance_number: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A complete FILE_FIELDS record of a single-frame image."""
    rec: dict[str, Any] = {k: None for k in FILE_FIELDS}
    rec.update(
        path=path,
        size=1000,
        mtime_ns=1,
        kind="image",
        sop_instance_uid=f"{series_uid}.{int(hashlib.sha1(path.encode()).hexdigest()[:12], 16)}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid=series_uid,
        study_instance_uid="1.2.826.0.1.3680043.8.498.300",
        frame_of_reference_uid=for_uid,
        modality="CT",
        patient_key="pk_test",
        study_date="2020-01-02",
        series_number=1,
        instance_number=instance_number,
        series_description="synthetic",
        body_part="CHEST",
        rows=rows,
        columns=columns,
        number_of_frames=1,
        image_position=None if position is None else [float(x) for x in position],
        image_orientation=None if orientation is None else [float(x) for x in orientation],
        pixel_spacing=None if pixel_spacing is None else [float(x) for x in pixel_spacing],
        slice_thickness=3.0,
        frame_positions=None,
        referenced_series_uids=[],
    )
    rec.update(extra)
    return rec


def stack(
    n: int = 10,
    step: float = 3.0,
    *,
    folder: str = "/data/p1/ct",
    orientation: Any = AXIAL,
    origin: Any = (-100.0, -120.0, -50.0),
    **kw: Any,
) -> list[dict[str, Any]]:
    """n slices along the normal of ``orientation``, InstanceNumber 1..n, files s000.dcm..."""
    normal = slice_normal(orientation)
    o = np.asarray(origin, dtype=float)
    return [
        make_record(f"{folder}/s{i:03d}.dcm", o + i * step * normal, orientation=orientation, instance_number=i + 1, **kw)
        for i in range(n)
    ]


def only(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, [r["series_key"] for r in rows]
    return rows[0]


def rotation_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


# --------------------------------------------------------------------------------------------------
# slice_normal
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("orientation", "normal"),
    [
        (AXIAL, (0, 0, 1)),
        ((0, 1, 0, 0, 0, -1), (-1, 0, 0)),  # sagittal
        ((1, 0, 0, 0, 0, -1), (0, 1, 0)),  # coronal
        ((2, 0, 0, 0, 2, 0), (0, 0, 1)),  # not unit length: normalised
    ],
)
def test_slice_normal(orientation, normal):
    assert np.allclose(slice_normal(orientation), normal)


@pytest.mark.parametrize("bad", [None, (1, 0, 0), (1, 0, 0, 1, 0, 0), (float("nan"),) * 6, ("a",) * 6])
def test_slice_normal_rejects_bad_orientation(bad):
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        slice_normal(bad)


# --------------------------------------------------------------------------------------------------
# clean series
# --------------------------------------------------------------------------------------------------
def test_clean_axial_series_row():
    recs = stack(10, 3.0)
    row = only(assemble_series(recs))
    assert list(row) == list(SERIES_FIELDS)
    assert row["flags"] == [] and row["flag_details"] == [] and row["usable"] is True
    assert row["n_files"] == 10 and row["n_slices"] == 10 and row["is_multiframe"] is False
    assert row["slice_spacing"] == pytest.approx(3.0)
    assert row["origin"] == pytest.approx([-100.0, -120.0, -50.0])
    assert row["slice_offsets"] == pytest.approx([-50.0 + 3 * i for i in range(10)])
    assert row["slice_normal"] == pytest.approx([0, 0, 1])
    assert row["orientation"] == list(AXIAL)
    assert row["pixel_spacing"] == [0.7, 0.7] and (row["rows"], row["columns"]) == (64, 64)
    assert row["files"] == [r["path"] for r in recs]
    assert row["series_key"] == hashlib.sha1(f"{SERIES_UID}|{FOR_UID}|".encode()).hexdigest()[:16]
    assert row["series_key"] == series_key(SERIES_UID, FOR_UID)
    for k in ("patient_key", "modality", "study_date", "series_description", "body_part", "study_instance_uid"):
        assert row[k] == recs[0][k]
    # plain Python values (Arrow / DuckDB friendly)
    assert all(type(x) is float for x in row["slice_offsets"] + row["origin"] + row["slice_normal"])


def test_shuffled_files_and_reversed_instance_numbers_sort_by_position():
    recs = stack(12, 2.5)
    for i, r in enumerate(recs):
        r["instance_number"] = 12 - i  # InstanceNumber runs against the position
    expected = [r["path"] for r in recs]
    shuffled = recs[:]
    random.Random(7).shuffle(shuffled)
    row = only(assemble_series(shuffled))
    assert row["files"] == expected
    assert row["usable"], row["flag_details"]
    assert row["series_key"] == only(assemble_series(recs))["series_key"]  # stable whatever the order


def test_oblique_series_sorted_along_normal_not_z():
    """Axial rotated 30 degrees about x, feet-first (row direction -x): the normal points to -z, so the
    slice order along the normal is the reverse of the z order. Sorting by z would be wrong."""
    r = rotation_x(30)
    row_dir = np.array([-1.0, 0.0, 0.0])
    col_dir = r @ np.array([0.0, 1.0, 0.0])
    orientation = tuple(np.concatenate([row_dir, col_dir]))
    normal = slice_normal(orientation)
    assert normal[2] < 0
    recs = stack(8, 2.0, orientation=orientation, origin=(10.0, 20.0, 30.0))
    shuffled = [recs[i] for i in (5, 0, 7, 2, 6, 1, 4, 3)]
    row = only(assemble_series(shuffled))
    assert row["usable"], row["flag_details"]
    assert row["files"] == [r["path"] for r in recs]
    assert row["slice_spacing"] == pytest.approx(2.0)
    assert row["slice_normal"] == pytest.approx(list(normal))
    by_z = [r["path"] for r in sorted(recs, key=lambda r: r["image_position"][2])]
    assert by_z == row["files"][::-1]  # z order is the reverse of the order along the normal
    assert row["origin"] == pytest.approx([10.0, 20.0, 30.0])


def test_sagittal_series_with_constant_z():
    orientation = (0, 1, 0, 0, 0, -1)  # normal -x; z is the same for every slice
    recs = stack(6, 1.5, orientation=orientation, origin=(40.0, -10.0, 5.0))
    row = only(assemble_series([recs[i] for i in (3, 5, 0, 4, 1, 2)]))
    assert row["usable"], row["flag_details"]
    assert row["files"] == [r["path"] for r in recs]
    assert row["slice_normal"] == pytest.approx([-1, 0, 0])


def test_non_image_records_are_ignored():
    recs = stack(4)
    recs.append(make_record("/data/p1/seg.dcm", None, kind="seg"))
    recs.append(make_record("/data/p1/rs.dcm", None, kind="rtstruct"))
    row = only(assemble_series(recs))
    assert row["n_files"] == 4


def test_two_series_and_two_frames_of_reference_are_separate():
    a = stack(5, folder="/d/a")
    b = stack(5, folder="/d/b", series_uid="1.2.3.999")
    c = stack(5, folder="/d/c", for_uid="1.2.3.888")  # same series UID, other frame of reference
    rows = assemble_series(a + b + c)
    assert len(rows) == 3
    assert len({r["series_key"] for r in rows}) == 3
    assert all(r["usable"] for r in rows)


# --------------------------------------------------------------------------------------------------
# broken series: one flag each
# --------------------------------------------------------------------------------------------------
def _duplicate():
    recs = stack(10)
    recs.append(make_record("/data/p1/ct/copy_of_s004.dcm", recs[4]["image_position"], instance_number=99))
    return recs


def _gap():
    recs = stack(10)
    del recs[5]  # slice at offset -35 is missing
    return recs


def _nonuniform():
    recs = stack(10)
    recs[6]["image_position"][2] += 0.6  # steps 3.6 and 2.4 around slice 7
    return recs


def _tilt():
    recs = stack(10)
    for i, r in enumerate(recs):
        r["image_position"][1] += 0.5 * i  # shifted in y per slice: 0.5 mm per 3 mm step
    return recs


def _mixed_orientation():
    recs = stack(10)
    r = rotation_x(2.0)
    recs[3]["image_orientation"] = list(np.concatenate([r @ [1, 0, 0], r @ [0, 1, 0]]))
    return recs


def _two_slices():
    return stack(2)


def _pixel_spacing():
    recs = stack(10)
    recs[2]["pixel_spacing"] = [0.8, 0.8]
    return recs


def _size():
    recs = stack(10)
    recs[8]["rows"] = 128
    recs[8]["columns"] = 128
    return recs


def _missing_geometry():
    recs = stack(10)
    recs[4]["image_position"] = None
    return recs


def _colour():
    recs = stack(10)
    recs[3].update(samples_per_pixel=3, photometric_interpretation="RGB")
    return recs


BROKEN = {
    "duplicate_positions": (_duplicate, ["slices 5-6 at -38.00 mm", "s004.dcm", "copy_of_s004.dcm"]),
    "missing_slices": (_gap, ["gap of 6.0 mm between slices 5 and 6 (median step 3.0 mm"]),
    "nonuniform_spacing": (_nonuniform, ["step of 3.6 mm between slices 6 and 7", "median step 3.0 mm"]),
    "gantry_tilt": (_tilt, ["0.5 mm in-plane per 3.0 mm step", "9.5 degrees"]),
    "mixed_orientation": (_mixed_orientation, ["1 of 10 slices", "slice 4 (s003.dcm)"]),
    "too_few_slices": (_two_slices, ["only 2 slices", "at least 3"]),
    "inconsistent_pixel_spacing": (_pixel_spacing, ["[0.8, 0.8] mm (1 slice)", "[0.7, 0.7] mm (9 slices)"]),
    "inconsistent_size": (_size, ["64x64 (9 slices)", "128x128 (1 slice)"]),
    "missing_geometry": (_missing_geometry, ["1 of 10 slices lack ImagePositionPatient", "InstanceNumber"]),
    "color_pixels": (_colour, ["1 of 10 files hold colour pixels", "s003.dcm", "PhotometricInterpretation RGB"]),
}


def test_every_geometry_flag_has_a_synthetic_case():
    assert set(BROKEN) == set(GEOMETRY_FLAGS)


@pytest.mark.parametrize("flag", sorted(BROKEN))
def test_broken_series_gets_exactly_its_flag(flag):
    build, phrases = BROKEN[flag]
    row = only(assemble_series(build()))
    assert row["flags"] == [flag], row["flag_details"]
    assert row["usable"] is False
    assert len(row["flag_details"]) == 1
    for phrase in phrases:
        assert phrase in row["flag_details"][0]


def test_duplicate_series_still_sorted_and_spaced():
    row = only(assemble_series(_duplicate()))
    assert row["n_slices"] == 11
    assert row["slice_spacing"] == pytest.approx(3.0)  # duplicates do not count as steps


def test_missing_geometry_falls_back_to_instance_order():
    recs = _missing_geometry()
    row = only(assemble_series(recs[::-1]))
    assert row["files"] == [r["path"] for r in recs]
    assert row["slice_offsets"] is None and row["slice_spacing"] is None


def test_gap_tolerance_is_a_keyword():
    recs = _gap()
    assert only(assemble_series(recs, gap_factor=2.5))["flags"] == ["nonuniform_spacing"]
    assert only(assemble_series(recs, gap_factor=2.5, spacing_rtol=1.5))["flags"] == []


def test_min_slices_is_a_keyword():
    assert only(assemble_series(stack(2), min_slices=2))["usable"] is True
    assert only(assemble_series(stack(4), min_slices=5))["flags"] == ["too_few_slices"]


def test_small_tilt_and_float_noise_are_not_flagged():
    recs = stack(20, 1.25)
    rng = np.random.default_rng(3)
    for r in recs:  # positions rounded / jittered at the 1e-4 mm level, as headers do
        r["image_position"] = list(np.asarray(r["image_position"]) + rng.uniform(-1e-4, 1e-4, 3))
    assert only(assemble_series(recs))["usable"]


def test_several_gaps_are_listed_with_a_count():
    recs = stack(20)
    for i in (15, 11, 7, 3):
        del recs[i]
    row = only(assemble_series(recs))
    assert row["flags"] == ["missing_slices"]
    assert "and 1 more" in row["flag_details"][0]


# --------------------------------------------------------------------------------------------------
# folders: split on conflict, merge when compatible
# --------------------------------------------------------------------------------------------------
def test_split_by_folder_when_geometry_conflicts():
    a = stack(5, folder="/archive/copy1")
    b = stack(5, folder="/archive/copy2", pixel_spacing=(0.9, 0.9), origin=(-100.0, -120.0, 100.0))
    rows = assemble_series(a + b)
    assert len(rows) == 2
    keys = {r["series_key"] for r in rows}
    assert keys == {series_key(SERIES_UID, FOR_UID, "/archive/copy1"), series_key(SERIES_UID, FOR_UID, "/archive/copy2")}
    for r in rows:
        assert r["usable"], r["flag_details"]
        assert r["n_slices"] == 5
        assert len({os.path.dirname(f) for f in r["files"]}) == 1
    assert assemble_series(b + a) == rows  # stable


def test_split_by_folder_when_positions_repeat_between_folders():
    a = stack(6, folder="/archive/a")
    b = stack(6, folder="/archive/b")  # the same positions again: a copy
    rows = assemble_series(a + b)
    assert len(rows) == 2 and all(r["usable"] for r in rows)


def test_compatible_folders_are_merged():
    recs = stack(10)
    for r in recs[5:]:
        r["path"] = r["path"].replace("/data/p1/ct/", "/data/p1/ct_part2/")
    row = only(assemble_series(recs))
    assert row["usable"] and row["n_files"] == 10
    assert row["series_key"] == series_key(SERIES_UID, FOR_UID, "")


def test_duplicates_inside_one_folder_are_flagged_not_split():
    row = only(assemble_series(_duplicate()))
    assert row["flags"] == ["duplicate_positions"]


# --------------------------------------------------------------------------------------------------
# multi-frame
# --------------------------------------------------------------------------------------------------
def _multiframe(positions, path="/data/p2/enhanced.dcm", **kw):
    return make_record(
        path,
        positions[0] if positions else None,
        number_of_frames=len(positions) if positions else kw.pop("number_of_frames", 1),
        frame_positions=[list(map(float, p)) for p in positions] if positions else None,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2.1",
        **kw,
    )


def test_multiframe_record_frames_are_slices():
    positions = [(0.0, 0.0, 10.0 - 2.0 * i) for i in range(6)]  # frames stored head to feet
    row = only(assemble_series([_multiframe(positions)]))
    assert row["is_multiframe"] is True
    assert row["n_files"] == 1 and row["n_slices"] == 6
    assert row["files"] == ["/data/p2/enhanced.dcm"]
    assert row["slice_offsets"] == pytest.approx([0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    assert row["origin"] == pytest.approx([0.0, 0.0, 0.0])
    assert row["slice_spacing"] == pytest.approx(2.0)
    assert row["usable"], row["flag_details"]


def test_multiframe_gap_is_reported_in_frames():
    positions = [(0.0, 0.0, 2.0 * i) for i in (0, 1, 2, 5, 6, 7)]
    row = only(assemble_series([_multiframe(positions)]))
    assert row["flags"] == ["missing_slices"]
    assert "gap of 6.0 mm between frames 3 and 4" in row["flag_details"][0]


def test_multiframe_series_of_several_files():
    a = _multiframe([(0.0, 0.0, 2.0 * i) for i in range(3)], path="/data/p3/part1.dcm")
    b = _multiframe([(0.0, 0.0, 2.0 * i) for i in range(3, 6)], path="/data/p3/part2.dcm")
    row = only(assemble_series([b, a]))
    assert row["n_files"] == 2 and row["n_slices"] == 6 and row["usable"]
    assert row["files"] == ["/data/p3/part1.dcm", "/data/p3/part2.dcm"]


def test_multiframe_without_frame_positions_is_missing_geometry():
    rec = make_record("/data/p2/mf.dcm", (0.0, 0.0, 0.0), number_of_frames=5, frame_positions=None)
    row = only(assemble_series([rec]))
    assert row["flags"] == ["missing_geometry"]
    assert "5 frames but no per-frame positions" in row["flag_details"][0]
    assert row["n_slices"] == 5


# --------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_catalog(shared_data: Path) -> dict[str, Any]:
    """Crawl ../shared/data/dicom with the project's crawler and assemble its series."""
    crawl_mod = pytest.importorskip("imaging_assets.dicom.crawl", reason="imaging_assets.dicom.crawl not available")
    root = shared_data / "dicom"
    result = crawl_mod.crawl([root], workers=1)
    series = assemble_series(result.records)
    by_folder: dict[str, list[dict[str, Any]]] = {}
    for s in series:
        rel = os.path.relpath(os.path.dirname(s["files"][0]), root)
        by_folder.setdefault(rel, []).append(s)
    return {"root": root, "records": result.records, "series": series, "by_folder": by_folder}


# folder of the series' first file -> (n_files, n_slices, slice_spacing or None, flags). Counted by hand:
# files per folder (ls), NumberOfFrames of multi-frame files, and the positions of every slice.
REAL_SERIES = {
    "sts-sarcoma/STS_001/CT/dicom/image": (59, 59, 3.27, []),
    "sts-sarcoma/STS_001/MR_T1/dicom/image": (59, 59, 3.27, []),
    "sts-sarcoma/STS_001/PET/dicom/image": (59, 59, 3.27, []),
    "sts-sarcoma/STS_002/CT/dicom/image": (48, 48, 3.27, []),
    "sts-sarcoma/STS_002/MR_T1/dicom/image": (35, 35, 3.27, []),
    "sts-sarcoma/STS_002/PET/dicom/image": (48, 48, 3.27, []),
    "dcmqi/segmentations/ct-3slice": (3, 3, 1.0, []),
    "dcmqi/segmentations/23x38x3/image": (3, 3, 2.5, []),
    "dcmqi/segmentations/24x38x3/image": (3, 3, 2.5, []),
    # enhanced CT copies: one file, three frames
    "dcmqi/segmentations/23x38x3/multiframe": (1, 3, 2.5, []),
    "dcmqi/segmentations/24x38x3/multiframe": (1, 3, 2.5, []),
    # the 4 pydicom CT slices: z = -99.48, 103.02, 104.27, 105.52 -> a 202.5 mm gap (slices removed upstream).
    # Expected and correct: missing_slices.
    "highdicom-seg/ct_series": (4, 4, 1.25, ["missing_slices"]),
    "highdicom-seg/ct_single": (1, 1, None, ["too_few_slices"]),
    "rt-utils/mock_data": (2, 2, 5.0, ["too_few_slices"]),
    # oblique (normal ~ (-0.11, 0.43, 0.90)), 4.5 mm apart along the normal
    "rt-utils/oriented_data": (3, 3, 4.5, []),
    # one_slice_data/0.dcm is oriented_data/0.dcm again (same SOP instance, series UID, position):
    # a position repeated between folders -> the series is split by folder.
    "rt-utils/one_slice_data": (1, 1, None, ["too_few_slices"]),
    # Philips enhanced MR field map: 64 frames = 2 images at each of 32 positions, 4 mm apart
    "dcm_qa/enh/Philips": (1, 64, 4.0, ["duplicate_positions"]),
    # Siemens XA10 enhanced MR: 4 files x 6 frames at the same 6 positions (4 time points), 2.4 mm apart
    "dcm_qa/enh/Siemens/XA10": (4, 24, 2.4, ["duplicate_positions"]),
    # one MR image saved in 9 transfer syntaxes: 9 slices at a single position
    "dcm_qa/ts": (9, 9, None, ["duplicate_positions", "too_few_slices"]),
    # IBSI digital phantom: legacy converted enhanced MR, 4 coronal frames 1 mm apart
    "ibsi-digital-phantom/dicom/image": (1, 4, 1.0, []),
}


@pytest.mark.realdata
def test_real_series_inventory(real_catalog):
    assert sorted(real_catalog["by_folder"]) == sorted(REAL_SERIES)
    assert len(real_catalog["series"]) == len(REAL_SERIES) == 20


@pytest.mark.realdata
@pytest.mark.parametrize("folder", sorted(REAL_SERIES))
def test_real_series_counts_and_geometry(real_catalog, folder):
    n_files, n_slices, spacing, flags = REAL_SERIES[folder]
    (row,) = real_catalog["by_folder"][folder]
    assert row["n_files"] == n_files
    assert row["n_slices"] == n_slices
    assert row["flags"] == flags, row["flag_details"]
    assert row["usable"] is (not flags)
    if spacing is None:
        assert row["slice_spacing"] is None
    else:
        assert row["slice_spacing"] == pytest.approx(spacing, abs=1e-3)
    assert len(row["slice_offsets"]) == n_slices
    assert row["slice_offsets"] == sorted(row["slice_offsets"])
    assert np.linalg.norm(row["slice_normal"]) == pytest.approx(1.0)
    assert row["is_multiframe"] is (n_slices > n_files)
    assert row["patient_key"] is None or row["patient_key"].startswith("pk_")


@pytest.mark.realdata
def test_real_sts_ct_geometry_matches_the_files(real_catalog):
    (row,) = real_catalog["by_folder"]["sts-sarcoma/STS_001/CT/dicom/image"]
    assert row["modality"] == "CT"
    assert (row["rows"], row["columns"]) == (202, 198)
    assert row["pixel_spacing"] == pytest.approx([0.976562, 0.976562])
    assert row["origin"] == pytest.approx([-23.437616, -86.914146, -881.32])
    assert row["slice_offsets"][-1] - row["slice_offsets"][0] == pytest.approx(58 * 3.27)
    names = [os.path.basename(f) for f in row["files"]]
    assert names == [f"{i:06d}.dcm" for i in range(59)]  # files run feet to head


@pytest.mark.realdata
def test_real_oblique_and_split_series(real_catalog):
    (oriented,) = real_catalog["by_folder"]["rt-utils/oriented_data"]
    (single,) = real_catalog["by_folder"]["rt-utils/one_slice_data"]
    assert oriented["series_instance_uid"] == single["series_instance_uid"]
    assert oriented["series_key"] != single["series_key"]
    assert [os.path.basename(f) for f in oriented["files"]] == ["0.dcm", "1.dcm", "2.dcm"]
    assert oriented["slice_normal"] == pytest.approx([-0.1093, 0.4267, 0.8978], abs=1e-3)


@pytest.mark.realdata
@pytest.mark.parametrize("case", ["23x38x3", "24x38x3"])
def test_real_dcmqi_multiframe_copy_has_the_geometry_of_its_single_frame_series(real_catalog, case):
    (mf,) = real_catalog["by_folder"][f"dcmqi/segmentations/{case}/multiframe"]
    (sf,) = real_catalog["by_folder"][f"dcmqi/segmentations/{case}/image"]
    assert mf["series_key"] != sf["series_key"]
    assert mf["frame_of_reference_uid"] == sf["frame_of_reference_uid"]
    for k in ("slice_offsets", "origin", "orientation", "pixel_spacing", "slice_normal"):
        assert mf[k] == pytest.approx(sf[k]), k
    assert (mf["rows"], mf["columns"]) == (sf["rows"], sf["columns"]) == (38, int(case[:2]))


@pytest.mark.realdata
def test_real_ibsi_phantom_coronal_frames_sorted_along_normal(real_catalog):
    (row,) = real_catalog["by_folder"]["ibsi-digital-phantom/dicom/image"]
    assert row["slice_normal"] == pytest.approx([0, 1, 0])
    # frames are stored at y = 3, 2, 1, 0; sorted along +y the first slice is the last frame
    assert row["origin"] == pytest.approx([0, 0, 0])
    assert row["slice_offsets"] == pytest.approx([0, 1, 2, 3])


@pytest.mark.realdata
def test_real_assembly_is_stable(real_catalog):
    again = assemble_series(list(reversed(real_catalog["records"])))
    assert again == real_catalog["series"]
