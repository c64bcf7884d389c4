"""The record shapes that flow between crawl, series assembly, segmentation linking and the store.

Records are plain dicts (easy to move through process pools and into DuckDB via Arrow). The field lists
below are the contract: every producer fills every key (None where unknown), every consumer may rely
on them.
"""

from __future__ import annotations

#: One row of the file catalog (``dicom_files`` table). Geometry lists are floats in DICOM order.
FILE_FIELDS: dict[str, str] = {
    "path": "VARCHAR",  # absolute, as found under the root (not symlink-resolved)
    "size": "BIGINT",
    "mtime_ns": "BIGINT",
    "kind": "VARCHAR",  # 'image' | 'seg' | 'rtstruct' | 'other'
    "sop_instance_uid": "VARCHAR",
    "sop_class_uid": "VARCHAR",
    "series_instance_uid": "VARCHAR",
    "study_instance_uid": "VARCHAR",
    "frame_of_reference_uid": "VARCHAR",
    "modality": "VARCHAR",
    "transfer_syntax_uid": "VARCHAR",
    "patient_key": "VARCHAR",  # keyed HMAC of PatientID (dicom.pseudonym.patient_key), never the raw id
    "study_date": "DATE",  # ISO 'YYYY-MM-DD' string or None
    "series_number": "INTEGER",
    "instance_number": "INTEGER",
    "series_description": "VARCHAR",
    "body_part": "VARCHAR",
    "rows": "INTEGER",
    "columns": "INTEGER",
    "number_of_frames": "INTEGER",  # 1 for single-frame images, 0 for non-image objects
    "image_position": "DOUBLE[]",  # (3,) first frame; None for non-images
    "image_orientation": "DOUBLE[]",  # (6,)
    "pixel_spacing": "DOUBLE[]",  # (2,) row spacing, column spacing
    "slice_thickness": "DOUBLE",
    "frame_positions": "DOUBLE[][]",  # multi-frame only: per-frame ImagePositionPatient, else None
    "referenced_series_uids": "VARCHAR[]",  # SEG / RTSTRUCT: series they reference (may be empty)
}

#: One row of the quarantine table.
QUARANTINE_FIELDS: dict[str, str] = {
    "path": "VARCHAR",
    "size": "BIGINT",
    "mtime_ns": "BIGINT",
    "reason": "VARCHAR",  # short code, see QUARANTINE_REASONS
    "message": "VARCHAR",  # a sentence a person understands, naming the problem
}

QUARANTINE_REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM file (no DICM preamble and not parseable as DICOM)",
    "empty_file": "zero-length file",
    "truncated": "file ends before its data does (truncated)",
    "missing_tag": "a tag required for this object is missing or empty",
    "unsupported_sop_class": "SOP class this pipeline does not use",
    "undecodable_pixels": "pixel data in a transfer syntax no installed decoder can read",
    "unreadable": "file cannot be opened or parsed (permissions, corrupt header, invalid values)",
}

#: One row of the ``imaging_series`` table.
SERIES_FIELDS: dict[str, str] = {
    "series_key": "VARCHAR",  # stable id: sha1(series uid | frame of reference | split part)[:16]
    "series_instance_uid": "VARCHAR",
    "frame_of_reference_uid": "VARCHAR",
    "study_instance_uid": "VARCHAR",
    "patient_key": "VARCHAR",
    "modality": "VARCHAR",
    "study_date": "DATE",
    "series_description": "VARCHAR",
    "body_part": "VARCHAR",
    "is_multiframe": "BOOLEAN",
    "n_files": "INTEGER",
    "n_slices": "INTEGER",
    "rows": "INTEGER",
    "columns": "INTEGER",
    "pixel_spacing": "DOUBLE[]",
    "slice_spacing": "DOUBLE",  # median step along the slice normal (mm)
    "origin": "DOUBLE[]",  # position of the first slice after sorting along the normal
    "orientation": "DOUBLE[]",  # (6,)
    "slice_normal": "DOUBLE[]",  # (3,) row x column cosines
    "files": "VARCHAR[]",  # paths in slice order (a multi-frame series: its file(s))
    "slice_offsets": "DOUBLE[]",  # projection of each slice position on the normal, sorted
    "flags": "VARCHAR[]",  # geometry problem codes, empty when none (see GEOMETRY_FLAGS)
    "flag_details": "VARCHAR[]",  # one human sentence per flag
    "usable": "BOOLEAN",  # no flags: eligible for extraction
}

GEOMETRY_FLAGS: dict[str, str] = {
    "duplicate_positions": "two or more slices share a position",
    "missing_slices": "a gap larger than the median step (missing slice)",
    "nonuniform_spacing": "slice steps differ by more than the tolerance",
    "mixed_orientation": "slices disagree on ImageOrientationPatient",
    "gantry_tilt": "slice positions are not along the slice normal",
    "too_few_slices": "fewer slices than needed for a volume",
    "inconsistent_pixel_spacing": "slices disagree on PixelSpacing",
    "inconsistent_size": "slices disagree on Rows/Columns",
    "missing_geometry": "position/orientation/spacing missing",
}

#: One row of the ``segmentations`` table.
SEGMENTATION_FIELDS: dict[str, str] = {
    "seg_key": "VARCHAR",  # stable id: sha1(path or SOP instance uid)[:16]
    "path": "VARCHAR",
    "kind": "VARCHAR",  # 'seg' | 'rtstruct' | 'nifti' | 'nrrd'
    "sop_instance_uid": "VARCHAR",
    "series_instance_uid": "VARCHAR",
    "frame_of_reference_uid": "VARCHAR",
    "patient_key": "VARCHAR",
    "segmentation_type": "VARCHAR",  # SEG: BINARY | FRACTIONAL | LABELMAP; else None
    "n_segments": "INTEGER",
    "segment_numbers": "INTEGER[]",  # SEG segment numbers / RTSTRUCT ROI numbers / label values
    "segment_labels": "VARCHAR[]",  # raw names, same order
    "image_path": "VARCHAR",  # manifest (NIfTI/NRRD) pairs only: the image file
    "linked_series_key": "VARCHAR",  # imaging_series.series_key, None when unlinked
    "link_rule": "VARCHAR",  # 'referenced_series' | 'referenced_instances' | 'frame_of_reference_extent' | 'manifest' | None
    "unlinked_reason": "VARCHAR",  # why it could not be linked, else None
}

#: One row of the ``lesions`` table.
LESION_FIELDS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "series_key": "VARCHAR",
    "seg_key": "VARCHAR",
    "series_instance_uid": "VARCHAR",
    "study_instance_uid": "VARCHAR",
    "patient_key": "VARCHAR",
    "modality": "VARCHAR",
    "study_date": "DATE",
    "body_part": "VARCHAR",
    "segment_number": "INTEGER",
    "raw_label": "VARCHAR",
    "roi_name": "VARCHAR",
    "component": "INTEGER",
    "n_voxels": "BIGINT",
    "volume_mm3": "DOUBLE",
    "centroid_mm": "DOUBLE[]",  # (3,) patient coordinates of the mask's centre of mass
    "status": "VARCHAR",  # ok | empty | single_voxel | outside_image | error | series_flagged
    "reason": "VARCHAR",
    "notes": "VARCHAR[]",
    "extractable": "BOOLEAN",  # status ok and the series passed geometry QC
    "source_fingerprint": "VARCHAR",  # files (path, size, mtime) + lesion options
}

#: Provenance of one lesion's features (``radiomics_provenance``).
PROVENANCE_FIELDS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "pyradiomics_version": "VARCHAR",
    "params_hash": "VARCHAR",
    "image_hash": "VARCHAR",  # content hash of the (cropped) image handed to pyradiomics
    "mask_hash": "VARCHAR",
    "source_fingerprint": "VARCHAR",  # lesions.source_fingerprint at extraction time
    "crop_index": "INTEGER[]",
    "crop_size": "INTEGER[]",
    "n_features": "INTEGER",
    "elapsed_s": "DOUBLE",
}

#: One feature value (``radiomics_features``, long format).
FEATURE_FIELDS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "image_type": "VARCHAR",  # original | log-sigma-1-0-mm-3D | wavelet-LLH | ...
    "feature_class": "VARCHAR",  # firstorder | shape | glcm | glrlm | glszm | gldm | ngtdm
    "feature": "VARCHAR",
    "value": "DOUBLE",
}

#: One failed extraction (``radiomics_errors``).
EXTRACTION_ERROR_FIELDS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "params_hash": "VARCHAR",
    "source_fingerprint": "VARCHAR",
    "message": "VARCHAR",
}
