"""Lesion masks on the series grid (imaging_assets.features.lesions)."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from imaging_assets.features.lesions import LesionMask, harmonise_roi_name, lesion_id, load_lesions

# ----------------------------------------------------------------------------------------- helpers


def write_ct_series(
    folder: Path,
    shape: tuple[int, int, int],
    *,
    origin=(0.0, 0.0, 0.0),
    row_cos=(1.0, 0.0, 0.0),
    col_cos=(0.0, 1.0, 0.0),
    pixel_spacing=(1.0, 1.0),
    dz: float = 2.0,
) -> tuple[dict, str]:
    """Single-frame CT files of zeros; returns (series row, frame of reference uid)."""
    folder.mkdir(parents=True, exist_ok=True)
    row_cos, col_cos = np.asarray(row_cos, float), np.asarray(col_cos, float)
    normal = np.cross(row_cos, col_cos)
    series_uid, for_uid, study_uid = generate_uid(), generate_uid(), generate_uid()
    nk, rows, cols = shape
    files = []
    for k in range(nk):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality = "CT"
        ds.PatientID = "TEST"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * dz * normal]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.zeros((rows, cols), np.int16).tobytes()
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    series = {
        "series_key": "series-" + folder.name,
        "series_instance_uid": series_uid,
        "frame_of_reference_uid": for_uid,
        "files": files,
        "is_multiframe": False,
    }
    return series, for_uid


def write_rtstruct(path: Path, for_uid: str, rois: list[tuple[int, str, list[np.ndarray]]]) -> dict:
    """Minimal RTSTRUCT: ``rois`` = [(ROI number, name, [contour points (n, 3) mm, ...])]."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StructureSetLabel = "test"
    roi_seq, contour_seq = [], []
    for number, name, contours in rois:
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi_seq.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        items = []
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [f"{v:.6f}" for v in np.asarray(pts, float).ravel()]
            items.append(c)
        rc.ContourSequence = DicomSequence(items)
        contour_seq.append(rc)
    ds.StructureSetROISequence = DicomSequence(roi_seq)
    ds.ROIContourSequence = DicomSequence(contour_seq)
    ds.save_as(path, enforce_file_format=True)
    return {
        "seg_key": "seg-" + path.name,
        "path": str(path),
        "kind": "rtstruct",
        "sop_instance_uid": ds.SOPInstanceUID,
        "segment_numbers": [r[0] for r in rois],
        "segment_labels": [r[1] for r in rois],
    }


def square(cx: float, cy: float, z: float, half: float) -> np.ndarray:
    return np.array([[cx - half, cy - half, z], [cx + half, cy - half, z], [cx + half, cy + half, z], [cx - half, cy + half, z]])


def mask_array(lesion: LesionMask) -> np.ndarray:
    assert lesion.mask is not None, (lesion.status, lesion.reason)
    return sitk.GetArrayFromImage(lesion.mask).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def sorted_series(folder: Path, key: str = "real") -> dict:
    files = [str(p) for p in folder.iterdir() if p.is_file()]
    ds = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    o = np.array(ds[0].ImageOrientationPatient, float)
    n = np.cross(o[:3], o[3:])
    offsets = [float(np.dot(n, np.array(d.ImagePositionPatient, float))) for d in ds]
    return {
        "series_key": key,
        "series_instance_uid": str(ds[0].SeriesInstanceUID),
        "files": [f for _, f in sorted(zip(offsets, files))],
        "is_multiframe": False,
    }


def seg_row(path: Path | str, kind: str, **extra) -> dict:
    return {"seg_key": "s", "path": str(path), "kind": kind, **extra}


# ----------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("GTV 1", "GTV"),
        ("gtv_1", "GTV"),
        ("GTV-2", "GTV"),
        ("Tumor", "GTV"),
        ("tumour 2", "GTV"),
        ("Lesion_3", "GTV"),
        ("GTVp", "GTV"),
        ("Liver", "Liver"),
        ("  GTV_Mass_CT ", "GTV"),
        (" Spinal Cord ", "Spinal Cord"),
    ],
)
def test_harmonise_roi_name(raw: str, expected: str) -> None:
    assert harmonise_roi_name(raw) == expected


def test_harmonise_roi_name_custom_mapping() -> None:
    mapping = [(r"liver.*", "LIVER"), (r"gtv.*", "TUMOUR")]
    assert harmonise_roi_name("Liver_seg", mapping) == "LIVER"
    assert harmonise_roi_name("GTV 1", mapping) == "TUMOUR"
    assert harmonise_roi_name("Heart", mapping) == "Heart"


def test_lesion_id_is_stable_and_distinct() -> None:
    a = lesion_id("1.2.3", "1.2.3.4", 1, 0)
    assert a == lesion_id("1.2.3", "1.2.3.4", 1, 0)
    assert len(a) == 16 and int(a, 16) >= 0
    others = {lesion_id("1.2.3", "1.2.3.4", 2, 0), lesion_id("1.2.3", "1.2.3.4", 1, 1), lesion_id("1.2.3", "9", 1, 0)}
    assert a not in others and len(others) == 3


# ----------------------------------------------------------------------------------------- synthetic RTSTRUCT


def test_rtstruct_inner_contour_makes_a_hole(tmp_path: Path) -> None:
    series, for_uid = write_ct_series(tmp_path / "ct", (5, 40, 40), dz=2.0)
    z = 4.0  # slice 2
    outer, inner = square(20, 20, z, 10.5), square(20, 20, z, 4.5)  # edges half-way between voxel centres
    seg = write_rtstruct(tmp_path / "rs.dcm", for_uid, [(1, "GTV_1", [outer, inner])])
    [lesion] = load_lesions(seg, series)
    assert lesion.status == "ok" and lesion.roi_name == "GTV" and lesion.raw_label == "GTV_1"
    arr = mask_array(lesion)
    assert arr.shape == (5, 40, 40)
    assert not arr[[0, 1, 3, 4]].any()
    expected = np.zeros((40, 40), bool)
    expected[10:31, 10:31] = True  # centres 10..30 lie inside the outer square (9.5..30.5)
    expected[16:25, 16:25] = False  # hole: centres 16..24 inside the inner square (15.5..24.5)
    np.testing.assert_array_equal(arr[2], expected)
    assert lesion.n_voxels == 21 * 21 - 9 * 9
    assert lesion.volume_mm3 == pytest.approx(lesion.n_voxels * 1.0 * 1.0 * 2.0)


def test_rtstruct_oblique_sphere_matches_analytic(tmp_path: Path) -> None:
    a = np.deg2rad(30)
    row_cos = np.array([1.0, 0.0, 0.0])
    col_cos = np.array([0.0, np.cos(a), -np.sin(a)])  # tilted 30 degrees about x
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-20.0, -15.0, 10.0])
    spacing_r, spacing_c, dz, shape = 0.8, 0.9, 1.5, (24, 44, 50)
    series, for_uid = write_ct_series(
        tmp_path / "ct", shape, origin=origin, row_cos=row_cos, col_cos=col_cos,
        pixel_spacing=(spacing_c, spacing_r), dz=dz,
    )
    centre = origin + 20 * spacing_r * row_cos + 22 * spacing_c * col_cos + 11.3 * dz * normal
    radius = 12.0
    contours = []
    t = np.linspace(0, 2 * np.pi, 256, endpoint=False)
    for k in range(shape[0]):
        plane_point = origin + k * dz * normal
        d = float(np.dot(centre - plane_point, normal))
        if abs(d) >= radius:
            continue
        r = np.sqrt(radius**2 - d**2)
        c = centre - d * normal  # circle centre in the slice plane
        contours.append(c + r * np.outer(np.cos(t), row_cos) + r * np.outer(np.sin(t), col_cos))
    seg = write_rtstruct(tmp_path / "rs.dcm", for_uid, [(7, "sphere", contours)])
    [lesion] = load_lesions(seg, series)
    assert lesion.status == "ok", lesion.reason
    arr = mask_array(lesion)
    # analytic sphere at voxel centres
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    pts = (origin + ii[..., None] * spacing_r * row_cos + jj[..., None] * spacing_c * col_cos
           + kk[..., None] * dz * normal)
    dist = np.linalg.norm(pts - centre, axis=-1)
    truth = dist < radius
    wrong = arr != truth
    # every disagreement sits at the border, within one voxel of the analytic surface
    assert np.all(np.abs(dist[wrong] - radius) <= max(spacing_r, spacing_c, dz))
    assert dice(arr, truth) > 0.99
    # and the rasterised mask covers the analytic volume
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.03)


def test_rtstruct_contours_off_the_grid_are_outside_image(tmp_path: Path) -> None:
    series, for_uid = write_ct_series(tmp_path / "ct", (3, 20, 20), dz=2.0)
    far_z = square(10, 10, 50.0, 3)  # 25 slices beyond the last one
    far_xy = square(200, 200, 2.0, 3)  # in-plane beyond the grid
    seg = write_rtstruct(tmp_path / "rs.dcm", for_uid, [(1, "far", [far_z, far_xy]), (2, "near", [square(10, 10, 2.0, 3.5)])])
    far, near = load_lesions(seg, series)
    assert far.status == "outside_image" and far.mask is None and "outside" in far.reason
    assert near.status == "ok" and near.n_voxels == 49
    # a contour half a slice or less from the last slice still counts; tiny contours enclose nothing
    seg2 = write_rtstruct(tmp_path / "rs2.dcm", for_uid,
                          [(1, "edge", [square(10, 10, 4.9, 2.5)]), (2, "tiny", [square(10.5, 10.5, 2, 0.2)])])
    edge, tiny = load_lesions(seg2, series)
    assert edge.status == "ok" and mask_array(edge)[2].sum() == 25
    assert tiny.status == "empty" and "enclose no voxel" in tiny.reason


def test_lesion_ids_stable_across_calls_and_distinct(tmp_path: Path) -> None:
    series, for_uid = write_ct_series(tmp_path / "ct", (3, 30, 30), dz=2.0)
    two_blobs = [square(6, 6, 2.0, 2.5), square(20, 20, 2.0, 4.5)]
    seg = write_rtstruct(tmp_path / "rs.dcm", for_uid, [(1, "GTV", two_blobs), (2, "Liver", [square(15, 15, 0.0, 3.5)])])
    first = load_lesions(seg, series)
    second = load_lesions(dict(seg), dict(series))
    assert [l.lesion_id for l in first] == [l.lesion_id for l in second]
    assert len({l.lesion_id for l in first}) == 2
    assert [l.roi_name for l in first] == ["GTV", "Liver"]
    split = load_lesions(seg, series, split_components=True)
    gtv = [l for l in split if l.segment_number == 1]
    assert [l.component for l in gtv] == [1, 2]
    assert [l.n_voxels for l in gtv] == [81, 25]  # largest first
    ids = {l.lesion_id for l in split} | {l.lesion_id for l in first}
    assert len(ids) == 5  # whole segments and components never share an id
    # the id does not depend on where the file lives (SOP instance UID identity)
    moved = tmp_path / "elsewhere.dcm"
    moved.write_bytes(Path(seg["path"]).read_bytes())
    again = load_lesions({**seg, "path": str(moved), "sop_instance_uid": None}, series)
    assert [l.lesion_id for l in again] == [l.lesion_id for l in first]


def test_problems_become_error_rows_naming_the_file(tmp_path: Path) -> None:
    series, for_uid = write_ct_series(tmp_path / "ct", (3, 10, 10))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    for kind in ("rtstruct", "seg", "nifti"):
        rows = load_lesions(seg_row(junk, kind, segment_numbers=[1, 2]), series)
        assert [r.status for r in rows] == ["error", "error"], kind
        assert all("junk.dcm" in r.reason and r.mask is None for r in rows)
    [missing] = load_lesions(seg_row(tmp_path / "gone.dcm", "rtstruct"), series)
    assert missing.status == "error" and "gone.dcm" in missing.reason
    seg = write_rtstruct(tmp_path / "rs.dcm", for_uid, [(1, "GTV", [square(5, 5, 0, 2)])])
    rows = load_lesions({**seg, "segment_numbers": [1, 9], "segment_labels": ["GTV", "x"]}, series)
    assert [r.status for r in rows] == ["ok", "error"] and "ROI number 9" in rows[1].reason
    broken_series = {**series, "files": [str(tmp_path / "no-such-slice.dcm")]}
    [bad] = load_lesions(seg, broken_series)
    assert bad.status == "error" and "no-such-slice.dcm" in bad.reason


# ----------------------------------------------------------------------------------------- synthetic NIfTI


def _nifti(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> str:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return str(path)


def test_nifti_labels_components_and_resampling(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "image.nii.gz", np.zeros((10, 12, 14), np.int16), spacing=(1.0, 1.0, 2.0))
    series = {"series_key": "n", "series_instance_uid": None, "files": [image]}
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    labels[6:9, 6:9, 6:9] = 1  # label 1: two components, the later one larger
    labels[0, 0, 13] = 2  # label 2: one voxel
    mask = _nifti(tmp_path / "mask.nii.gz", labels, spacing=(1.0, 1.0, 2.0))
    rows = load_lesions(seg_row(mask, "nifti", segment_numbers=[1, 2, 3]), series)
    assert [(r.segment_number, r.status, r.n_voxels) for r in rows] == [(1, "ok", 35), (2, "single_voxel", 1), (3, "empty", 0)]
    assert all(not r.notes for r in rows)
    split = load_lesions(seg_row(mask, "nifti", segment_numbers=[1]), series, split_components=True)
    assert [(r.component, r.n_voxels) for r in split] == [(1, 27), (2, 8)]
    # id identity is the file content: a renamed copy gives the same ids
    copy = tmp_path / "renamed.nii.gz"
    copy.write_bytes(Path(mask).read_bytes())
    moved_series = {**series, "series_key": "key-of-another-path"}  # NIfTI series keys hash the path
    assert [r.lesion_id for r in load_lesions(seg_row(copy, "nifti", segment_numbers=[1, 2, 3]), moved_series)] == [
        r.lesion_id for r in rows
    ]
    # a mask on a finer grid is resampled by nearest neighbour, with a note
    fine = np.zeros((20, 12, 14), np.uint8)
    fine[4:8, 2:4, 2:4] = 1
    fine_path = _nifti(tmp_path / "fine.nii.gz", fine, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, -0.5))
    [res] = load_lesions(seg_row(fine_path, "nifti", segment_numbers=[1]), series)
    assert res.status == "ok" and res.notes and res.notes[0].startswith("resampled mask from 14x12x20")
    assert res.mask.GetSize() == (14, 12, 10)
    # a mask that lies entirely beside the image does not belong to it: an error naming both files ...
    away = _nifti(tmp_path / "away.nii.gz", labels, spacing=(1.0, 1.0, 2.0), origin=(500.0, 0.0, 0.0))
    [out] = load_lesions(seg_row(away, "nifti", segment_numbers=[2]), series)
    assert out.status == "error" and out.mask is None
    assert out.reason.startswith(f"mask {away} does not belong to image {image}: the grids share 0%")
    # ... and, resampled on request, nothing of it is on the grid
    [out] = load_lesions(seg_row(away, "nifti", segment_numbers=[2]), series, resample_mask=True)
    assert out.status == "outside_image" and out.mask is None


# ----------------------------------------------------------------------------------------- real data


STS_CASES = [(p, m) for p in ("STS_001", "STS_002") for m in ("CT", "MR_T1", "PET")]


@pytest.mark.realdata
@pytest.mark.parametrize(("patient", "modality"), STS_CASES)
def test_sts_rtstruct_matches_nifti_mask(shared_data: Path, patient: str, modality: str) -> None:
    base = shared_data / "dicom" / "sts-sarcoma" / patient / modality
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    # the RTSTRUCT references an absent (uncropped) series: rasterise on this folder's images
    series = sorted_series(base / "dicom" / "image")
    [rs] = list((base / "dicom" / "mask").iterdir())
    [lesion] = load_lesions(seg_row(rs, "rtstruct"), series)
    assert lesion.status == "ok" and lesion.roi_name == "GTV"
    truth_img = sitk.ReadImage(str(base / "nifti" / "mask" / "mask.nii.gz"))
    truth = sitk.GetArrayFromImage(truth_img) > 0
    got = mask_array(lesion)
    d = dice(got, truth)
    print(f"{patient} {modality}: Dice {d:.5f} ({got.sum()} vs {truth.sum()} voxels)")
    assert d >= 0.98
    # the NIfTI mask on the DICOM grid is used as is (same grid within tolerance)
    [from_nifti] = load_lesions(seg_row(base / "nifti" / "mask" / "mask.nii.gz", "nifti", segment_numbers=[1]), series)
    assert from_nifti.notes == []
    np.testing.assert_array_equal(mask_array(from_nifti), truth)


@pytest.mark.realdata
def test_sts_ct_mask_resampled_onto_pet_grid(shared_data: Path) -> None:
    base = shared_data / "dicom" / "sts-sarcoma" / "STS_002"
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    pet = sorted_series(base / "PET" / "dicom" / "image")
    [lesion] = load_lesions(seg_row(base / "CT" / "nifti" / "mask" / "mask.nii.gz", "nifti", segment_numbers=[1]), pet)
    assert lesion.notes and lesion.notes[0].startswith("resampled mask from")
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(base / "PET" / "nifti" / "mask" / "mask.nii.gz"))) > 0
    assert dice(mask_array(lesion), truth) > 0.8  # same contour, rasterised at a 4.7 mm vs 1 mm grid


def _dcmqi(shared_data: Path) -> Path:
    folder = shared_data / "dicom" / "dcmqi" / "segmentations"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    return folder


@pytest.mark.realdata
def test_dcmqi_segs_equal_nrrd_label_maps(shared_data: Path) -> None:
    folder = _dcmqi(shared_data)
    ct = sorted_series(folder / "ct-3slice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [liver] = load_lesions(seg_row(folder / "liver.dcm", "seg"), ct)
        overlaps = load_lesions(seg_row(folder / "partial_overlaps.dcm", "seg"), ct)
    liver_ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "liver_seg.nrrd")))
    assert liver.raw_label == "Liver" and liver.status == "ok"
    np.testing.assert_array_equal(mask_array(liver), liver_ref == 1)
    refs: dict[int, np.ndarray] = {}
    for k in (1, 2, 3):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"partial_overlaps-{k}.nrrd")))
        refs.update({int(v): arr == v for v in np.unique(arr) if v})
    assert [l.segment_number for l in overlaps] == [1, 2, 3, 4, 5]
    masks = {l.segment_number: mask_array(l) for l in overlaps}
    for n, ref in refs.items():
        np.testing.assert_array_equal(masks[n], ref, err_msg=f"segment {n}")
    assert sum(m.astype(int) for m in masks.values()).max() > 1  # they do overlap


@pytest.mark.realdata
@pytest.mark.parametrize("size", ["23x38x3", "24x38x3"])
def test_dcmqi_bitpacked_seg_on_single_and_multiframe_series(shared_data: Path, size: str) -> None:
    folder = _dcmqi(shared_data) / size
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "nrrd" / "label.nrrd"))) == 1
    single = sorted_series(folder / "image")
    multi = {"series_key": "mf", "files": [str(folder / "multiframe" / "mf.dcm")], "is_multiframe": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for series in (single, multi):
            [lesion] = load_lesions(seg_row(folder / "seg" / "label.seg", "seg"), series)
            np.testing.assert_array_equal(mask_array(lesion), ref)


@pytest.mark.realdata
def test_dcmqi_labelmap_seg(shared_data: Path) -> None:
    folder = _dcmqi(shared_data)
    series = sorted_series(folder / "24x38x3" / "image")
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "sparse_labelmap_noppv_seg.nrrd"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = load_lesions(seg_row(folder / "sparse-labelmap-noppv.dcm", "seg"), series)
    assert [r.segment_number for r in rows] == [1]  # background segment 0 is not a lesion
    np.testing.assert_array_equal(mask_array(rows[0]), ref)


def _highdicom(shared_data: Path) -> tuple[Path, dict]:
    folder = shared_data / "dicom" / "highdicom-seg"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    return folder, sorted_series(folder / "ct_series")


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_fractional.dcm", "seg_image_ct_true_fractional.dcm"]
)
def test_highdicom_binary_and_fractional_segs(shared_data: Path, name: str) -> None:
    folder, series = _highdicom(shared_data)
    [lesion] = load_lesions(seg_row(folder / "seg" / name, "seg"), series)
    assert lesion.status == "ok" and lesion.notes == []  # placed by referenced source instances
    per_slice = mask_array(lesion).sum(axis=(1, 2))
    assert per_slice.tolist() == [0, 127, 256, 255]  # the SEG covers 3 of the 4 slices


@pytest.mark.realdata
def test_fractional_threshold_is_applied(shared_data: Path) -> None:
    folder, series = _highdicom(shared_data)
    path = folder / "seg" / "seg_image_ct_true_fractional.dcm"
    counts = [load_lesions(seg_row(path, "seg"), series, fractional_threshold=t)[0].n_voxels for t in (0.1, 0.5, 0.9)]
    assert counts[0] > counts[1] > counts[2]


@pytest.mark.realdata
def test_highdicom_overlapping_segments(shared_data: Path) -> None:
    folder, series = _highdicom(shared_data)
    rows = load_lesions(seg_row(folder / "seg" / "seg_image_ct_binary_overlap.dcm", "seg"), series)
    assert [(r.segment_number, r.raw_label, r.n_voxels) for r in rows] == [(1, "first segment", 64), (2, "second segment", 16)]
    assert (mask_array(rows[0]) & mask_array(rows[1])).any()


@pytest.mark.realdata
def test_ibsi_phantom_seg_on_multiframe_grid(shared_data: Path) -> None:
    from imaging_assets.features.volumes import load_series_image

    base = shared_data / "dicom" / "ibsi-digital-phantom"
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    series = {"series_key": "ibsi", "files": [str(base / "dicom" / "image" / "phantom.dcm")], "is_multiframe": True}
    image = load_series_image(series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [lesion] = load_lesions(seg_row(base / "dicom" / "mask" / "mask.dcm", "seg"), series, image=image)
    assert lesion.status == "ok" and lesion.mask.GetSize() == image.GetSize()
    assert lesion.mask.GetOrigin() == image.GetOrigin() and lesion.mask.GetDirection() == image.GetDirection()
    # the NIfTI copy uses another orientation/spacing: compare the grey levels under the mask
    nifti_img = sitk.GetArrayFromImage(sitk.ReadImage(str(base / "nifti" / "image" / "phantom.nii.gz")))
    nifti_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(base / "nifti" / "mask" / "mask.nii.gz"))) > 0
    values = sitk.GetArrayFromImage(image)[mask_array(lesion)]
    np.testing.assert_array_equal(np.sort(values), np.sort(nifti_img[nifti_mask]))


@pytest.mark.realdata
def test_seg_of_another_series_is_outside_image(shared_data: Path) -> None:
    folder = _dcmqi(shared_data)
    ct = sorted_series(folder / "ct-3slice")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        [lesion] = load_lesions(seg_row(shared_data / "dicom" / "dcmqi" / "sr-example" / "seg.dcm", "seg"), ct)
    assert lesion.status == "outside_image" and lesion.mask is None


@pytest.mark.realdata
@pytest.mark.parametrize("case", ["uninformative", "uninformative_slice"])
def test_mirp_edge_masks(shared_data: Path, case: str) -> None:
    base = shared_data / "dicom" / "mirp-edge-masks" / case
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    [image] = glob.glob(str(base / "image" / "*.nii.gz"))
    series = {"series_key": case, "files": [image]}
    expected = {"empty_mask": "empty", "one_voxel_mask": "single_voxel", "full_mask": "ok", "disconnected_mask": "ok"}
    for stem, status in expected.items():
        [lesion] = load_lesions(seg_row(base / "mask" / f"{stem}.nii.gz", "nifti"), series)
        assert lesion.status == status, (stem, lesion.reason)
        assert lesion.reason is None or isinstance(lesion.reason, str)
    parts = load_lesions(seg_row(base / "mask" / "disconnected_mask.nii.gz", "nifti"), series, split_components=True)
    assert len(parts) >= 2 and [p.component for p in parts] == list(range(1, len(parts) + 1))
    [empty] = load_lesions(seg_row(base / "mask" / "empty_mask.nii.gz", "nifti"), series, split_components=True)
    assert empty.status == "empty" and empty.component == 0


@pytest.mark.realdata
def test_mirp_orientation_mask(shared_data: Path) -> None:
    base = shared_data / "dicom" / "mirp-edge-masks" / "orientation"
    if not base.is_dir():
        pytest.skip(f"{base} absent")
    series = {"series_key": "o", "files": [str(base / "image" / "orientation.nii.gz")]}
    [lesion] = load_lesions(seg_row(base / "mask" / "mask.nii.gz", "nifti"), series)
    assert lesion.status == "ok" and lesion.n_voxels > 0


@pytest.mark.realdata
def test_rt_utils_mock_rtstruct(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "rt-utils" / "mock_data"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    series = {"series_key": "mock", "files": [str(folder / "ct_1.dcm"), str(folder / "ct_2.dcm")]}
    rows = load_lesions(seg_row(folder / "rt.dcm", "rtstruct"), series)
    assert [r.status for r in rows] == ["ok"] and rows[0].n_voxels > 100


@pytest.mark.realdata
def test_rt_utils_oblique_series_rasterises(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dicom" / "rt-utils" / "oriented_data"
    if not folder.is_dir():
        pytest.skip(f"{folder} absent")
    files = sorted(glob.glob(str(folder / "*.dcm")))
    series = {"series_key": "oblique", "files": files, "is_multiframe": False}
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    # the folder has no RTSTRUCT: draw a 15 mm circle in the plane of the middle (oblique) slice
    o = np.array(ds.ImageOrientationPatient, float)
    r_cos, c_cos = o[:3], o[3:]
    centre = np.array(ds.ImagePositionPatient, float) + 50 * 2.5 * r_cos + 25 * 3.5 * c_cos
    t = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    circle = centre + 15 * np.outer(np.cos(t), r_cos) + 15 * np.outer(np.sin(t), c_cos)
    seg = write_rtstruct(tmp_path / "rs.dcm", str(ds.get("FrameOfReferenceUID", "")), [(1, "GTV", [circle])])
    [lesion] = load_lesions(seg, series)
    arr = mask_array(lesion)
    assert lesion.status == "ok" and arr[1].any() and not arr[[0, 2]].any()
    pixel_area = 2.5 * 3.5
    assert arr.sum() * pixel_area == pytest.approx(np.pi * 15**2, rel=0.1)
