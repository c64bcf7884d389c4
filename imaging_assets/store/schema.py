"""Every DuckDB table and view of the warehouse, declared in one place, and :func:`ensure_schema`.

Storage only: no domain package is imported here. The record field names that producers fill
(``imaging_assets.dicom.records``) must equal the columns declared here, in order; a test checks it.
A table is ``Table(columns, primary_key, extra)``: ``columns`` are filled from records, ``extra`` are
bookkeeping columns the store sets itself (status, timestamps). Tables whose name depends on user input
(``cohort_<name>``) and derived views (``radiomics_features_wide``) are created by their stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    """One table: typed columns (in order), primary key, bookkeeping columns the store fills itself."""

    columns: Mapping[str, str]
    primary_key: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)
    #: Recomputed from other tables on every run: when a stored copy lacks a key column (its primary key
    #: changed in a later release), :func:`ensure_schema` drops and recreates it instead of failing.
    derived: bool = False

    @property
    def all_columns(self) -> dict[str, str]:
        """Record columns followed by bookkeeping columns."""
        return {**self.columns, **self.extra}


# --------------------------------------------------------------------------------------------- ingest
#: One row of the file catalog (``dicom_files`` table). Geometry lists are floats in DICOM order.
FILE_COLUMNS: dict[str, str] = {
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
    # added after the first release (a warehouse made before gets them as NULL; those image / SEG rows are
    # read again once by the next crawl, see store.catalog.known_files)
    "samples_per_pixel": "INTEGER",  # images / SEG: SamplesPerPixel (1 when absent); None for RTSTRUCT
    "photometric_interpretation": "VARCHAR",  # images / SEG: MONOCHROME2, RGB, PALETTE COLOR, ...
}

#: One row of the quarantine table.
QUARANTINE_COLUMNS: dict[str, str] = {
    "path": "VARCHAR",
    "size": "BIGINT",
    "mtime_ns": "BIGINT",
    "reason": "VARCHAR",  # short code, see QUARANTINE_REASONS
    "message": "VARCHAR",  # a sentence a person understands, naming the problem
}

#: One row of the ``imaging_series`` table.
SERIES_COLUMNS: dict[str, str] = {
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

#: One row of the ``segmentations`` table.
SEGMENTATION_COLUMNS: dict[str, str] = {
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

# ------------------------------------------------------------------------------------------- features
#: One row of the ``lesions`` table.
LESION_COLUMNS: dict[str, str] = {
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
PROVENANCE_COLUMNS: dict[str, str] = {
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
    "space": "VARCHAR",  # feature space: modality + params hash (imaging_assets.features.params.space_name)
    # image types the lesion lacks against its space (pyradiomics skipped a filter, e.g. LoG on a thin box)
    "missing_image_types": "VARCHAR[]",
}

#: One feature value (``radiomics_features``, long format).
FEATURE_COLUMNS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "image_type": "VARCHAR",  # original | log-sigma-1-0-mm-3D | wavelet-LLH | ...
    "feature_class": "VARCHAR",  # firstorder | shape | glcm | glrlm | glszm | gldm | ngtdm
    "feature": "VARCHAR",
    "value": "DOUBLE",
}

#: One failed extraction (``radiomics_errors``).
EXTRACTION_ERROR_COLUMNS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "params_hash": "VARCHAR",
    "source_fingerprint": "VARCHAR",
    "message": "VARCHAR",
    "space": "VARCHAR",
}

#: The settings of every feature space (so a new lesion can be extracted exactly like the space's lesions).
FEATURE_SPACE_COLUMNS: dict[str, str] = {
    "space": "VARCHAR", "modality": "VARCHAR", "params_hash": "VARCHAR",
    "source": "VARCHAR",  # the preset or the user's parameter file
    "params_json": "VARCHAR",  # the resolved pyradiomics parameters (canonical JSON)
    "first_seen": "TIMESTAMP",
}

# ------------------------------------------------------------------------------------- reproducibility
PERTURBATION_FEATURE_COLUMNS: dict[str, str] = {
    "lesion_id": "VARCHAR", "perturbation": "INTEGER", "spec_hash": "VARCHAR", "params_hash": "VARCHAR",
    "source_fingerprint": "VARCHAR", "feature": "VARCHAR", "value": "DOUBLE",
}
PERTURBATION_ERROR_COLUMNS: dict[str, str] = {
    "lesion_id": "VARCHAR", "perturbation": "INTEGER", "spec_hash": "VARCHAR", "params_hash": "VARCHAR",
    "source_fingerprint": "VARCHAR", "message": "VARCHAR",
}
ROBUSTNESS_COLUMNS: dict[str, str] = {
    "space": "VARCHAR",
    "feature": "VARCHAR", "image_type": "VARCHAR", "feature_class": "VARCHAR",
    "analysis": "VARCHAR",  # 'perturbation' | 'test_retest'
    "icc": "DOUBLE", "ci_low": "DOUBLE", "ci_high": "DOUBLE", "n_targets": "INTEGER", "k_raters": "INTEGER",
}

# ---------------------------------------------------------------------------------------------- vectors
SCALER_COLUMNS: dict[str, str] = {
    "feature_set_version": "VARCHAR", "feature_names": "VARCHAR[]", "mean": "DOUBLE[]", "std": "DOUBLE[]",
    "n_lesions": "INTEGER", "fitted_at": "TIMESTAMP",
    # added after the first release: a warehouse made before gets them as NULL (refit on the next run)
    "center": "DOUBLE[]", "scale": "DOUBLE[]", "lambdas": "DOUBLE[]",
    # 0th..100th percentiles of each scaled feature over the space's lesions (101 lists of n_features),
    # for the percentiles of similar-case explanations; NULL in scalers fitted before (refit on next run)
    "quantiles": "DOUBLE[][]",
}

# --------------------------------------------------------------------------------------------- outcomes
OUTCOME_COLUMNS: dict[str, str] = {
    "patient_key": "VARCHAR", "time_months": "DOUBLE", "event": "INTEGER", "age": "DOUBLE", "sex": "VARCHAR",
    "stage": "VARCHAR", "source_file": "VARCHAR", "loaded_at": "TIMESTAMP",
    # added after the first release (NULL in rows loaded before): 'time_months' (given) or 'dates' (computed)
    "time_from": "VARCHAR",
}
#: One row per problem of a data row (or one per unreadable file); see stages.outcomes.
OUTCOME_REJECT_COLUMNS: dict[str, str] = {
    "source_file": "VARCHAR", "row_number": "BIGINT", "reason": "VARCHAR", "loaded_at": "TIMESTAMP",
    # added after the first release (NULL in rejects recorded before)
    "field": "VARCHAR", "problem": "VARCHAR", "row_kept": "BOOLEAN",
}
OUTCOME_FILE_COLUMNS: dict[str, str] = {
    "source_file": "VARCHAR", "size": "BIGINT", "mtime_ns": "BIGINT", "sha256": "VARCHAR",
    "loaded_at": "TIMESTAMP", "status": "VARCHAR", "n_rows": "BIGINT", "n_rejected": "BIGINT",
    # added after the first release: fields set to NULL in kept rows; when the file left the source
    # (status 'gone')
    "n_fields_rejected": "BIGINT", "gone_at": "TIMESTAMP",
}

#: Phenotype clusters and their link to outcomes (replaced as a whole on each run).
CLUSTER_TABLES: dict[str, dict[str, str]] = {
    "phenotype_clusters": {"space": "VARCHAR", "lesion_id": "VARCHAR", "patient_key": "VARCHAR",
                           "cluster": "INTEGER",
                           "feature_set_version": "VARCHAR", "k": "INTEGER", "method": "VARCHAR",
                           "computed_at": "TIMESTAMP"},
    # Cohen's d of each robust feature in vs out of the cluster
    "cluster_profiles": {"space": "VARCHAR", "cluster": "INTEGER", "rank": "INTEGER", "feature": "VARCHAR",
                         "effect_size": "DOUBLE",
                         "mean_in": "DOUBLE", "mean_out": "DOUBLE", "size": "INTEGER"},
    "cluster_survival": {"space": "VARCHAR", "cluster": "INTEGER", "patients": "INTEGER", "lesions": "INTEGER",
                         "events": "INTEGER",
                         "median_months": "DOUBLE", "median_ci_low": "DOUBLE", "median_ci_high": "DOUBLE"},
    "cluster_cox": {"space": "VARCHAR", "term": "VARCHAR", "hr": "DOUBLE", "ci_low": "DOUBLE", "ci_high": "DOUBLE",
                    "p_value": "DOUBLE",
                    "reference_cluster": "INTEGER", "n_patients": "INTEGER", "penalizer": "DOUBLE"},
    "cluster_logrank": {"space": "VARCHAR", "statistic": "DOUBLE", "p_value": "DOUBLE", "df": "INTEGER",
                        "n_patients": "INTEGER",
                        "n_clusters": "INTEGER", "note": "VARCHAR"},
    # the lesion that represents each patient (the largest) and the patient's outcome
    "cluster_patients": {"space": "VARCHAR", "patient_key": "VARCHAR", "cluster": "INTEGER", "lesion_id": "VARCHAR",
                         "lesions": "INTEGER", "time_months": "DOUBLE", "event": "INTEGER", "age": "DOUBLE",
                         "stage": "VARCHAR"},
}

#: One picture per lesion (``<warehouse>/thumbnails/<lesion_id>.png``; see stages.thumbnails).
THUMBNAIL_COLUMNS: dict[str, str] = {
    "lesion_id": "VARCHAR",
    "path": "VARCHAR",  # relative to the warehouse folder: thumbnails/<lesion_id>.png (the warehouse can move)
    "content_hash": "VARCHAR",  # what the picture was drawn from (source fingerprint, modality, renderer)
    "status": "VARCHAR",  # ok | error
    "error": "VARCHAR", "rendered_at": "TIMESTAMP",
}

#: One crop per lesion, the encoder's input (``<warehouse>/crops/<lesion_id>.npy``; see stages.embeddings): the
#: same layout as the pictures (``rendered_at``: when the crop was made).
CROP_COLUMNS: dict[str, str] = dict(THUMBNAIL_COLUMNS)

#: Embedding models (stages.embeddings): each trained or registered model, one active at a time.
EMBEDDING_MODEL_COLUMNS: dict[str, str] = {
    # ssl-<12 hex of the weights' sha256> (trained here) | ext-<12 hex of the file's sha256> (a model file of yours)
    "model_version": "VARCHAR",
    "source": "VARCHAR",  # trained | external
    "path": "VARCHAR",  # trained: relative to the warehouse (models/...); external: the file as configured
    # the file's sha256, checked before every use (a TorchScript file's bytes also carry per-process class names)
    "file_sha256": "VARCHAR", "dim": "INTEGER", "input_size": "INTEGER", "channels": "INTEGER", "intensity": "VARCHAR",
    "config_json": "VARCHAR",  # the training config (trained) or the loader settings (external)
    "data_version": "VARCHAR",  # sha1 of the crops (lesion ids + content hashes) it was trained on
    "n_lesions": "INTEGER", "epochs": "INTEGER", "train_s": "DOUBLE", "stopped_early": "BOOLEAN",
    "loss_curve": "DOUBLE[]", "active": "BOOLEAN",
}
#: Which crop (content hash) and model each stored embedding came from: an unchanged crop under the same model
#: is not embedded again.
EMBEDDING_STATE_COLUMNS: dict[str, str] = {"lesion_id": "VARCHAR", "content_hash": "VARCHAR",
                                           "model_version": "VARCHAR"}
#: Robustness of an embedding model under the radiomics perturbations: ICC(3,1) per dimension.
EMBEDDING_ROBUSTNESS_COLUMNS: dict[str, str] = {
    "model_version": "VARCHAR", "dimension": "INTEGER", "icc": "DOUBLE", "ci_low": "DOUBLE", "ci_high": "DOUBLE",
    "n_lesions": "INTEGER", "n_perturbations": "INTEGER",
}
#: Retrieval stability per sampled lesion: overlap of its top-10 neighbours, original vs each perturbed copy.
EMBEDDING_STABILITY_COLUMNS: dict[str, str] = {
    "model_version": "VARCHAR", "lesion_id": "VARCHAR", "perturbation": "INTEGER", "overlap_at_10": "DOUBLE",
}

# ----------------------------------------------------------------------------------- cohorts and audit
COHORT_REGISTRY_COLUMNS: dict[str, str] = {
    "name": "VARCHAR", "table_name": "VARCHAR", "created_at": "TIMESTAMP", "user": "VARCHAR", "query": "VARCHAR",
    "lance_version": "INTEGER", "feature_set_version": "VARCHAR", "n_rows": "INTEGER", "audit_id": "VARCHAR",
    # added after the first release (NULL in cohorts made before)
    "space": "VARCHAR", "reference_lesion_id": "VARCHAR", "reference_patient_key": "VARCHAR", "patients": "INTEGER",
}
AUDIT_COLUMNS: dict[str, str] = {
    "id": "VARCHAR", "logged_at": "TIMESTAMP", "user": "VARCHAR", "action": "VARCHAR", "query": "VARCHAR",
    "params": "VARCHAR", "table_versions": "VARCHAR", "n_rows": "INTEGER", "status": "VARCHAR",
}

#: Columns the catalog tables add to the record fields. ``status``: 'active' (in the catalog),
#: 'removed' (gone from disk under a crawled root) or 'out_of_roots' (its root is no longer configured);
#: ``removed_at``: when it left the active catalog. ``duplicate_of``: the canonical path of a byte-identical
#: copy (same SOP instance in dicom_files; same reason and content in dicom_quarantine), NULL for a
#: canonical or unique file; ``copy_checked``: the row was compared with its possible copies since it was
#: last read (see store.catalog and stages.discovery.refresh_catalog).
_CATALOG_EXTRA = {"status": "VARCHAR", "updated_at": "TIMESTAMP", "removed_at": "TIMESTAMP",
                  "duplicate_of": "VARCHAR", "copy_checked": "BOOLEAN"}
_STAMPED = {"created_at": "TIMESTAMP"}

#: Which batch (partition of the partitioned extraction) each image series belongs to
#: (``series_batches``): assigned once, when the series first has an extractable lesion, so a batch's
#: membership never changes and its partition's result files stay valid.
SERIES_BATCH_COLUMNS: dict[str, str] = {
    "series_key": "VARCHAR",
    "batch_id": "VARCHAR",
}
#: The version (manifest token) of each batch's result files loaded into the feature tables
#: (``batch_loads``), so the load step reads only batches that changed.
BATCH_LOAD_COLUMNS: dict[str, str] = {
    "batch_id": "VARCHAR",
    "token": "VARCHAR",
    "lesion_ids": "VARCHAR[]",
}

#: Every table of the warehouse, in creation order.
TABLES: dict[str, Table] = {
    "dicom_files": Table(FILE_COLUMNS, ("path",), _CATALOG_EXTRA),
    "dicom_quarantine": Table(QUARANTINE_COLUMNS, ("path",), _CATALOG_EXTRA),
    "imaging_series": Table(SERIES_COLUMNS, ("series_key",)),
    "segmentations": Table(SEGMENTATION_COLUMNS, ("seg_key",)),
    "lesions": Table(LESION_COLUMNS, ("lesion_id",)),
    "series_batches": Table(SERIES_BATCH_COLUMNS, ("series_key",), _STAMPED),
    "batch_loads": Table(BATCH_LOAD_COLUMNS, ("batch_id",), {"loaded_at": "TIMESTAMP"}),
    "radiomics_features": Table(FEATURE_COLUMNS, ("lesion_id", "image_type", "feature_class", "feature")),
    "radiomics_provenance": Table(PROVENANCE_COLUMNS, ("lesion_id",), _STAMPED),
    "radiomics_errors": Table(EXTRACTION_ERROR_COLUMNS, ("lesion_id",), _STAMPED),
    "perturbation_features": Table(PERTURBATION_FEATURE_COLUMNS, ("lesion_id", "perturbation", "feature")),
    "perturbation_errors": Table(PERTURBATION_ERROR_COLUMNS, ("lesion_id", "perturbation")),
    "feature_spaces": Table(FEATURE_SPACE_COLUMNS, ("space",)),
    "feature_robustness": Table(ROBUSTNESS_COLUMNS, ("space", "feature", "analysis"),
                                {"computed_at": "TIMESTAMP"}, derived=True),
    "test_retest_pairs": Table({"space": "VARCHAR", "lesion_a": "VARCHAR", "lesion_b": "VARCHAR",
                                "distance_mm": "DOUBLE"}),
    "robust_feature_sets": Table({"version": "VARCHAR", "features": "VARCHAR[]", "n_features": "INTEGER",
                                  "threshold": "DOUBLE", "rho": "DOUBLE", "n_candidates": "INTEGER",
                                  "space": "VARCHAR"}, ("version",), _STAMPED),
    "robust_feature_set_history": Table({"version": "VARCHAR", "activated_at": "TIMESTAMP", "space": "VARCHAR"}),
    "robust_feature_pruned": Table({"space": "VARCHAR", "feature": "VARCHAR", "correlated_with": "VARCHAR",
                                    "rho": "DOUBLE"}),
    "vector_scalers": Table(SCALER_COLUMNS, ("feature_set_version",)),
    "clinical_outcomes": Table(OUTCOME_COLUMNS, ("patient_key", "source_file")),
    "outcome_rejects": Table(OUTCOME_REJECT_COLUMNS),
    "outcome_files": Table(OUTCOME_FILE_COLUMNS, ("source_file",)),
    **{name: Table(columns, derived=True) for name, columns in CLUSTER_TABLES.items()},
    "lesion_thumbnails": Table(THUMBNAIL_COLUMNS, ("lesion_id",)),
    "lesion_crops": Table(CROP_COLUMNS, ("lesion_id",)),
    "embedding_models": Table(EMBEDDING_MODEL_COLUMNS, ("model_version",), _STAMPED),
    "embedding_state": Table(EMBEDDING_STATE_COLUMNS, ("lesion_id",)),
    "embedding_robustness": Table(EMBEDDING_ROBUSTNESS_COLUMNS, ("model_version", "dimension"),
                                  {"computed_at": "TIMESTAMP"}, derived=True),
    "embedding_stability": Table(EMBEDDING_STABILITY_COLUMNS, ("model_version", "lesion_id", "perturbation"),
                                 derived=True),
    "cohorts": Table(COHORT_REGISTRY_COLUMNS, ("name",)),
    "audit_log": Table(AUDIT_COLUMNS, ("id",)),
    # fingerprints (never the keys) of the pseudonymisation keys this warehouse's patient keys were made
    # with: the row with retired_at NULL is the current one (stages.keys); a rekey retires it
    "pseudonym_keys": Table({"fingerprint": "VARCHAR", "recorded_at": "TIMESTAMP", "retired_at": "TIMESTAMP",
                             "patients": "INTEGER"}, ("fingerprint",)),
}

#: Views over the tables (name -> SELECT); created after the tables.
VIEWS: dict[str, str] = {
    # one row per patient across outcome files: the most recently loaded row (ties: greatest source_file)
    "patient_outcomes": "SELECT * EXCLUDE (_rn) FROM (SELECT *, row_number() OVER (PARTITION BY patient_key "
                        "ORDER BY loaded_at DESC, source_file DESC) AS _rn FROM clinical_outcomes) WHERE _rn = 1",
    # the active robust set of every feature space, one row per feature (what the vectors are made of)
    "active_robust_features": "SELECT h.space, s.version, unnest(s.features) AS feature FROM (SELECT space, "
                              "version FROM robust_feature_set_history QUALIFY row_number() OVER (PARTITION BY "
                              "space ORDER BY activated_at DESC) = 1) h JOIN robust_feature_sets s USING (version)",
}

ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "DATE": pa.string(),  # ISO strings; cast to DATE by DuckDB on insert
    "DOUBLE[]": pa.list_(pa.float64()),
    "DOUBLE[][]": pa.list_(pa.list_(pa.float64())),
    "VARCHAR[]": pa.list_(pa.string()),
    "INTEGER[]": pa.list_(pa.int32()),
    "TIMESTAMP": pa.timestamp("us"),
}


def create_sql(name: str, table: Table) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one declared table (identifiers only: no values)."""
    cols = [f'"{c}" {t}' for c, t in table.all_columns.items()]
    if table.primary_key:
        cols.append("PRIMARY KEY (" + ", ".join(f'"{k}"' for k in table.primary_key) + ")")
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})"


def ensure_schema(con: Any) -> None:
    """Create missing tables and views and add columns declared after a table was made (idempotent)."""
    present: dict[str, set[str]] = {}
    for table_name, column in con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'").fetchall():
        present.setdefault(table_name, set()).add(column)
    for name, table in TABLES.items():
        if name in present and table.derived and not set(table.primary_key) <= present[name]:
            con.execute(f"DROP TABLE {name}")  # a derived table whose key changed: recomputed on the next run
            del present[name]
        if name not in present:
            con.execute(create_sql(name, table))
            continue
        for column, typ in table.all_columns.items():
            if column not in present[name]:
                con.execute(f'ALTER TABLE {name} ADD COLUMN IF NOT EXISTS "{column}" {typ}')
    for name, select in VIEWS.items():
        if name not in present:
            con.execute(f"CREATE VIEW IF NOT EXISTS {name} AS {select}")


def arrow_table(rows: Any, columns: Mapping[str, str]) -> pa.Table:
    """Build an Arrow table with the declared column types from record dicts."""
    schema = pa.schema([(c, ARROW_TYPES[t]) for c, t in columns.items()])
    return pa.table({c: [r.get(c) for r in rows] for c in columns}, schema=schema)
