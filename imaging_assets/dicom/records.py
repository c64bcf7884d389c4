"""The record shapes that flow between crawl, series assembly, segmentation linking and lesion decoding.

Records are plain dicts (easy to move through process pools and into DuckDB via Arrow). The field lists
below are the contract: every producer fills every key (None where unknown), in this order, and every
consumer may rely on them. Their SQL types live with the tables in :mod:`imaging_assets.store.schema`
(a test checks that both name the same columns in the same order).
"""

from __future__ import annotations

#: File name endings of volume files (NIfTI, NRRD, MetaImage), read with SimpleITK instead of pydicom.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The NRRD endings among them (mask kind ``'nrrd'``; the others are ``'nifti'``).
NRRD_SUFFIXES: tuple[str, ...] = (".nrrd", ".nhdr")

#: One row of the file catalog (``dicom_files`` table). Geometry lists are floats in DICOM order.
FILE_FIELDS: tuple[str, ...] = (
    "path",  # absolute, as found under the root (not symlink-resolved)
    "size",
    "mtime_ns",
    "kind",  # 'image' | 'seg' | 'rtstruct' | 'other'
    "sop_instance_uid",
    "sop_class_uid",
    "series_instance_uid",
    "study_instance_uid",
    "frame_of_reference_uid",
    "modality",
    "transfer_syntax_uid",
    "patient_key",  # keyed HMAC of PatientID (dicom.pseudonym.patient_key), never the raw id
    "study_date",  # ISO 'YYYY-MM-DD' string or None
    "series_number",
    "instance_number",
    "series_description",
    "body_part",
    "rows",
    "columns",
    "number_of_frames",  # 1 for single-frame images, 0 for non-image objects
    "image_position",  # (3,) first frame; None for non-images
    "image_orientation",  # (6,)
    "pixel_spacing",  # (2,) row spacing, column spacing
    "slice_thickness",
    "frame_positions",  # multi-frame only: per-frame ImagePositionPatient, else None
    "referenced_series_uids",  # SEG / RTSTRUCT: series they reference (may be empty)
    "samples_per_pixel",  # images / SEG: SamplesPerPixel (1 when absent); None for RTSTRUCT
    "photometric_interpretation",  # images / SEG: e.g. MONOCHROME2, RGB, PALETTE COLOR; None when absent
)

#: One row of the quarantine table.
QUARANTINE_FIELDS: tuple[str, ...] = (
    "path",
    "size",
    "mtime_ns",
    "reason",  # short code, see QUARANTINE_REASONS
    "message",  # a sentence a person understands, naming the problem
)

QUARANTINE_REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM file (no DICM preamble and not parseable as DICOM)",
    "empty_file": "zero-length file",
    "truncated": "file ends before its data does (truncated)",
    "missing_tag": "a tag required for this object is missing or empty",
    "unsupported_sop_class": "SOP class this pipeline does not use",
    "undecodable_pixels": "pixel data in a transfer syntax no installed decoder can read",
    "unreadable": "file cannot be opened or parsed (permissions, corrupt header, invalid values)",
    "invalid_value": "a UID or coded tag violates its value representation (e.g. an identifier in a UID); "
                     "the value is not stored",
}

#: One row of the ``imaging_series`` table.
SERIES_FIELDS: tuple[str, ...] = (
    "series_key",  # stable id: sha1(series uid | frame of reference | split part)[:16]
    "series_instance_uid",
    "frame_of_reference_uid",
    "study_instance_uid",
    "patient_key",
    "modality",
    "study_date",
    "series_description",
    "body_part",
    "is_multiframe",
    "n_files",
    "n_slices",
    "rows",
    "columns",
    "pixel_spacing",
    "slice_spacing",  # median step along the slice normal (mm)
    "origin",  # position of the first slice after sorting along the normal
    "orientation",  # (6,)
    "slice_normal",  # (3,) row x column cosines
    "files",  # paths in slice order (a multi-frame series: its file(s))
    "slice_offsets",  # projection of each slice position on the normal, sorted
    "flags",  # geometry problem codes, empty when none (see GEOMETRY_FLAGS)
    "flag_details",  # one human sentence per flag
    "usable",  # no flags: eligible for extraction
)

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
    "color_pixels": "colour pixels (SamplesPerPixel > 1 or a colour PhotometricInterpretation): no grey values",
}

#: One row of the ``segmentations`` table.
SEGMENTATION_FIELDS: tuple[str, ...] = (
    "seg_key",  # stable id: sha1(path or SOP instance uid)[:16]
    "path",
    "kind",  # 'seg' | 'rtstruct' | 'nifti' | 'nrrd'
    "sop_instance_uid",
    "series_instance_uid",
    "frame_of_reference_uid",
    "patient_key",
    "segmentation_type",  # SEG: BINARY | FRACTIONAL | LABELMAP; else None
    "n_segments",
    "segment_numbers",  # SEG segment numbers / RTSTRUCT ROI numbers / label values
    "segment_labels",  # raw names, same order
    "image_path",  # manifest (NIfTI/NRRD) pairs only: the image file
    "linked_series_key",  # imaging_series.series_key, None when unlinked
    "link_rule",  # 'referenced_series' | 'referenced_instances' | 'frame_of_reference_extent' | 'manifest' | None
    "unlinked_reason",  # why it could not be linked, else None
)

#: One row of the ``lesions`` table.
LESION_FIELDS: tuple[str, ...] = (
    "lesion_id",
    "series_key",
    "seg_key",
    "series_instance_uid",
    "study_instance_uid",
    "patient_key",
    "modality",
    "study_date",
    "body_part",
    "segment_number",
    "raw_label",
    "roi_name",
    "component",
    "n_voxels",
    "volume_mm3",
    "centroid_mm",  # (3,) patient coordinates of the mask's centre of mass
    "status",  # ok | empty | single_voxel | outside_image | error | series_flagged
    "reason",
    "notes",
    "extractable",  # status ok and the series passed geometry QC
    "source_fingerprint",  # files (path, size, mtime) + lesion options
)

