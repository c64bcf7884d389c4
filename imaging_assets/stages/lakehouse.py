"""Lakehouse stage: Delta Lake copies of the governed warehouse tables (``<files>/delta/<table>``).

:func:`export_delta_tables` reads the DuckDB tables (one short read-only connection) and the Lance vector
tables (at their current versions) and merges each into its Delta table with
:func:`imaging_assets.store.delta.merge_table`: one ``MERGE`` on the natural key per table per run, so an
unchanged run rewrites no data file and the history grows by one version per run, each naming its run.
No Dagster here.

What leaves the warehouse (no PHI beyond what the pseudonymised tables already hold):

* only pseudonymised keys: ``patient_key`` (keyed HMAC), ``lesion_id`` / ``series_key`` / ``seg_key``
  (hashes); never a file path, a raw DICOM UID, a raw PatientID or free text typed into the source files;
* dropped on the way (:data:`DROPPED`): ``lesions.series_instance_uid``, ``study_instance_uid`` (raw DICOM
  UIDs that lead back to the PACS), ``raw_label`` (the segment name as typed in the SEG/RTSTRUCT; the
  harmonised ``roi_name`` stays), ``reason`` (its messages can name source files; ``status`` stays),
  ``source_fingerprint`` (bookkeeping); ``series_instance_uid`` of the Lance tables; the cohorts' ``query``
  (the JSON of a new lesion's query names its image and mask files), and in each cohort table the lesion
  columns above and ``thumbnail`` (a local path); ``cluster_patients`` (per-patient outcomes) is not exported;
* kept: ``study_date`` (the day of the study, as in DuckDB and the vector tables: needed for time-to-event
  work; drop it here too if your data-sharing agreement requires a safe-harbour copy).

Properties of every table: ``imaging_assets.project_version``, ``imaging_assets.params_hash.<space>`` for
each feature space and ``imaging_assets.robust_set.<space>`` (the active robust-set version); lineage of
every commit: asset key, Dagster run id, project version, source table (and Lance version).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from imaging_assets.store import delta
from imaging_assets.store import objects as objstore
from imaging_assets.store.warehouse import Warehouse

logger = logging.getLogger(__name__)

#: Bookkeeping columns set anew whenever a table is recomputed: a row equal but for them is not a change (the
#: Delta copy keeps the time its values were first computed), so an upstream re-run rewrites nothing.
VOLATILE = ("computed_at",)

#: Columns never exported, per source table (PHI or local paths; see the module docstring).
DROPPED: dict[str, tuple[str, ...]] = {
    "lesions": ("series_instance_uid", "study_instance_uid", "raw_label", "reason", "source_fingerprint"),
    "lesion_vectors": ("series_instance_uid",),
    "lesion_embeddings": ("series_instance_uid",),
    "cohorts": ("query",),
    # a cohort row carries the lesion's columns: the same ones go, and the picture's local path
    "cohort_*": ("series_instance_uid", "study_instance_uid", "raw_label", "reason", "source_fingerprint",
                 "thumbnail"),
}

_COMMON = {
    "lesion_id": "pseudonymous lesion id (hash of series, segmentation, segment and component)",
    "patient_key": "pseudonymised patient key (keyed HMAC of the PatientID; never the raw id)",
    "space": "feature space: modality + hash of the pyradiomics parameters (lesions are compared within one)",
    "modality": "DICOM modality of the image series (CT, MR, PT)",
    "study_date": "date of the imaging study",
    "feature_set_version": "version of the robust feature set the vector was built from",
    "cluster": "phenotype cluster of the lesion within its feature space",
}

#: Column comments (Delta field metadata ``comment``), per table; :data:`_COMMON` fills the shared columns.
COMMENTS: dict[str, dict[str, str]] = {
    "lesions": {
        "series_key": "pseudonymous id of the image series (hash of its UIDs)",
        "seg_key": "pseudonymous id of the segmentation object",
        "body_part": "DICOM body part examined",
        "segment_number": "segment / ROI number within the segmentation",
        "roi_name": "harmonised ROI name (GTV, ...)",
        "component": "connected component of the segment (0 = largest)",
        "n_voxels": "voxels of the lesion mask on the image grid",
        "volume_mm3": "lesion volume in cubic millimetres",
        "centroid_mm": "centre of mass in patient coordinates (mm)",
        "status": "ok | empty | single_voxel | outside_image | error | series_flagged",
        "notes": "remarks of the mask decoding (voxels off the grid, skipped contours)",
        "extractable": "status ok and the series passed geometry QC",
    },
    "radiomics_features": {
        "image_type": "pyradiomics image type: original, log-sigma-..., wavelet-...",
        "feature_class": "firstorder | shape | glcm | glrlm | glszm | gldm | ngtdm",
        "feature": "feature name",
        "value": "feature value",
    },
    "feature_robustness": {
        "feature": "feature (image_type_class_name)",
        "analysis": "perturbation | test_retest",
        "icc": "intraclass correlation ICC(3,1) under the perturbations / repeat scans",
        "ci_low": "lower bound of the 95 % confidence interval of the ICC",
        "ci_high": "upper bound of the 95 % confidence interval of the ICC",
        "n_targets": "lesions in the analysis", "k_raters": "perturbations (raters) per lesion",
    },
    "robust_feature_sets": {
        "version": "robust-set version (hash of the features and settings)",
        "features": "the robust, non-redundant features of the set",
        "threshold": "ICC lower-bound threshold a feature had to pass",
        "rho": "Spearman correlation above which a feature counted as redundant",
        "active": "the set currently used for the vectors of its space",
    },
    "phenotype_clusters": {"k": "number of clusters", "method": "clustering method",
                           "computed_at": "when the clusters were computed (UTC)"},
    "cluster_survival": {"patients": "patients in the cluster", "events": "events (deaths)",
                         "median_months": "Kaplan-Meier median survival (months)"},
    "cluster_cox": {"term": "model term (cluster vs the reference cluster, or a covariate)",
                    "hr": "hazard ratio", "p_value": "Wald test p-value"},
    "cluster_logrank": {"statistic": "log-rank test statistic", "p_value": "log-rank p-value"},
    "lesion_vectors": {"vector": "robust radiomics features, scaled (Yeo-Johnson + standardisation), float32",
                       "roi_name": "harmonised ROI name", "volume_mm3": "lesion volume (mm3)"},
    "lesion_embeddings": {"vector": "deep embedding of the lesion crop (float32)",
                          "roi_name": "harmonised ROI name", "volume_mm3": "lesion volume (mm3)"},
    "cohorts": {"name": "cohort name", "table_name": "its table (cohort_<name>)",
                "user": "who made the cohort", "lance_version": "lesion_vectors version searched",
                "n_rows": "rows of the cohort table", "audit_id": "the audit_log row of the search",
                "reference_lesion_id": "the reference lesion (NULL for a new image)"},
}


@dataclass(frozen=True)
class _Source:
    """One exported table: where it comes from and its natural key."""

    name: str
    keys: tuple[str, ...]
    table: str = ""  # DuckDB table (default: name); '' for Lance
    sql: str = ""  # the SELECT (identifiers only); default SELECT * FROM table
    partition_by: tuple[str, ...] = ()
    lance: bool = False
    description: str = ""


#: The exported tables, in order (the cohort tables ``cohort_<name>`` follow, one per registered cohort).
SOURCES: tuple[_Source, ...] = (
    _Source("lesions", ("lesion_id",), sql="SELECT l.*, p.space FROM lesions l "
            "LEFT JOIN radiomics_provenance p USING (lesion_id)",
            description="One row per lesion (segment component) found in the segmentations: geometry, status "
            "and feature space. Pseudonymised keys only."),
    _Source("radiomics_features", ("lesion_id", "image_type", "feature_class", "feature"),
            sql="SELECT p.space, f.* FROM radiomics_features f LEFT JOIN radiomics_provenance p USING (lesion_id)",
            partition_by=("space",),
            description="Radiomics feature values, long format (one row per lesion and feature), partitioned by "
            "feature space."),
    _Source("feature_robustness", ("space", "feature", "analysis"),
            description="Reproducibility (ICC with 95 % CI) of each feature per feature space."),
    _Source("robust_feature_sets", ("version",),
            sql="SELECT s.*, s.version IN (SELECT version FROM active_robust_features) AS active "
            "FROM robust_feature_sets s",
            description="Robust feature sets (features passing the ICC threshold, redundancy pruned)."),
    _Source("phenotype_clusters", ("space", "lesion_id"),
            description="Phenotype cluster of each lesion, per feature space."),
    _Source("cluster_survival", ("space", "cluster"),
            description="Kaplan-Meier survival of each phenotype cluster."),
    _Source("cluster_cox", ("space", "term"), description="Cox model of survival by phenotype cluster."),
    _Source("cluster_logrank", ("space",), description="Log-rank test of survival across phenotype clusters."),
    _Source("lesion_vectors", ("lesion_id",), lance=True,
            description="Scaled robust-feature vector of each lesion (copy of the Lance table lesion_vectors)."),
    _Source("lesion_embeddings", ("lesion_id",), lance=True,
            description="Deep embedding of each lesion (copy of the Lance table lesion_embeddings)."),
    _Source("cohorts", ("name",), description="Registry of stored similar-case cohorts."),
)


@dataclass(frozen=True)
class DeltaTableResult(delta.MergeResult):
    """One exported table after a run: what its merge did, and which table (and Lance version) it copied."""

    table: str = ""
    source_version: int | None = None  # the Lance version copied (Lance tables only)

    def as_row(self) -> dict[str, Any]:
        """The table's line in asset metadata."""
        return {k: getattr(self, k) for k in ("table", "version", "rows", "inserted", "updated", "deleted",
                                                 "created", "files_added", "files_removed", "elapsed_s")}


@dataclass(frozen=True)
class DeltaExportResult:
    """What :func:`export_delta_tables` wrote."""

    delta_uri: str
    tables: list[DeltaTableResult]
    skipped: dict[str, str] = field(default_factory=dict)  # table -> why (missing upstream)
    properties: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def rows(self) -> int:
        """Rows over all exported tables."""
        return sum(t.rows for t in self.tables)

    def table(self, name: str) -> DeltaTableResult | None:
        """The result of one table (None when it was skipped)."""
        return next((t for t in self.tables if t.table == name), None)


def project_version() -> str:
    """The installed imaging_assets version (package metadata, else ``imaging_assets.__version__``)."""
    try:
        from importlib.metadata import version

        return version("imaging_assets")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        import imaging_assets

        return imaging_assets.__version__


def _utc(table: pa.Table) -> pa.Table:
    """Naive timestamps (the warehouse keeps UTC) as UTC timestamps: Delta's ``timestamp`` type, which every
    reader knows (a naive one would need the ``timestampNtz`` table feature)."""
    fields = [f.with_type(pa.timestamp(f.type.unit, "UTC")) if pa.types.is_timestamp(f.type) and f.type.tz is None
              else f for f in table.schema]
    schema = pa.schema(fields)
    return table if schema.equals(table.schema) else table.cast(schema)


def _drop(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    return table.drop_columns([c for c in columns if c in table.column_names])


def _comments(name: str, table: pa.Table) -> dict[str, str]:
    wanted = {**_COMMON, **COMMENTS.get("cohort_*" if name.startswith("cohort_") else name, {})}
    return {c: text for c, text in wanted.items() if c in table.column_names}


def _duckdb_tables(con: Any) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}


def _governance(con: Any, tables: set[str]) -> dict[str, str]:
    """The table properties every exported table carries."""
    props = {"project_version": project_version()}
    if "feature_spaces" in tables:
        for space, params_hash in con.execute("SELECT space, params_hash FROM feature_spaces ORDER BY space").fetchall():
            props[f"params_hash.{space}"] = str(params_hash)
    if {"robust_feature_sets", "robust_feature_set_history"} <= tables:
        for space, version in con.execute(
                "SELECT DISTINCT space, version FROM active_robust_features ORDER BY space").fetchall():
            props[f"robust_set.{space}"] = str(version)
    return props


def _read_duckdb(wh: Warehouse, progress: Callable[[str], None] | None) -> tuple[
        dict[str, pa.Table], dict[str, str], dict[str, str], list[str]]:
    """Every DuckDB source as Arrow (one short read-only connection), the skipped ones and the properties."""
    out: dict[str, pa.Table] = {}
    skipped: dict[str, str] = {}
    with wh.connect(read_only=True) as con:
        tables = _duckdb_tables(con)
        props = _governance(con, tables)
        for src in SOURCES:
            if src.lance:
                continue
            needed = {src.table or src.name} | ({"radiomics_provenance"} if "radiomics_provenance" in src.sql else set())
            if "active_robust_features" in src.sql:
                needed |= {"robust_feature_set_history"}
            missing = sorted(needed - tables)
            if missing:
                skipped[src.name] = f"no DuckDB table {', '.join(missing)} yet"
                continue
            # identifiers from SOURCES only (no values): DDL-like text, not user input
            out[src.name] = con.sql(src.sql or f"SELECT * FROM {src.table or src.name}").to_arrow_table()
        cohorts: list[str] = []
        if "cohorts" in tables:
            for (table_name,) in con.execute("SELECT table_name FROM cohorts ORDER BY name").fetchall():
                if table_name in tables and table_name.startswith("cohort_") and table_name.replace("_", "").isalnum():
                    out[table_name] = con.sql(f"SELECT * FROM {table_name}").to_arrow_table()
                    cohorts.append(table_name)
                else:
                    skipped[table_name] = "registered in cohorts but its table is missing"
    if progress is not None:
        progress(f"read {len(out)} DuckDB tables")
    return out, skipped, props, cohorts


def _read_lance(wh: Warehouse, name: str) -> tuple[pa.Table | None, int | None]:
    from imaging_assets.store.lance import open_dataset, table_version

    try:
        version = table_version(wh.lance_uri, name)
    except Exception:  # noqa: BLE001 - no such Lance table (yet)
        return None, None
    if version is None:
        return None, None
    return open_dataset(wh.lance_uri, name, version).to_table(), version


def export_delta_tables(wh: Warehouse, run_id: str = "", asset_key: str = "delta_tables",
                        tables: Sequence[str] | None = None,
                        progress: Callable[[str], None] | None = None) -> DeltaExportResult:
    """Merge the governed tables into Delta tables under ``wh.delta_uri`` (one version per table per run).

    Parameters
    ----------
    wh
        The warehouse (its ``delta_uri`` is ``<files>/delta``: a local folder or ``s3://...``).
    run_id
        The Dagster run id (or any id of the run), recorded in each commit's metadata.
    asset_key
        The asset that wrote the commit (recorded likewise).
    tables
        Export only these (default: all of :data:`SOURCES` plus every registered cohort table).
    progress
        Called with a line per table written.

    Returns
    -------
    DeltaExportResult
        Per table: Delta version, rows, inserted / updated / deleted; tables skipped and why.
    """
    t0 = time.perf_counter()
    frames, skipped, props, cohorts = _read_duckdb(wh, progress)
    lance_versions: dict[str, int] = {}
    for src in SOURCES:
        if src.lance:
            tbl, version = _read_lance(wh, src.name)
            if tbl is None:
                skipped[src.name] = "no Lance table yet"
                continue
            frames[src.name] = tbl
            lance_versions[src.name] = int(version)
    specs: dict[str, _Source] = {s.name: s for s in SOURCES}
    for name in cohorts:
        specs[name] = _Source(name, ("lesion_id",), description=f"Similar-case cohort {name[len('cohort_'):]!r} "
                              "(one row per member; see the cohorts table for its query).")
    wanted = list(specs) if tables is None else [t for t in tables if t in specs]
    results: list[DeltaTableResult] = []
    for name in wanted:
        if name not in frames:
            continue
        spec = specs[name]
        dropped = DROPPED.get("cohort_*" if name.startswith("cohort_") else name, ())
        table = _utc(_drop(frames[name], dropped))
        keys = list(spec.keys)
        if name.startswith("cohort_") and "lesion_id" not in table.column_names:
            skipped[name] = "no lesion_id column"
            continue
        lineage = {"asset_key": asset_key, "run_id": run_id, "project_version": props["project_version"],
                   "source": ("lance:" if spec.lance else "duckdb:") + name}
        if name in lance_versions:
            lineage["source_version"] = lance_versions[name]
        r = delta.merge_table(objstore.join(wh.delta_uri, name), table, keys,
                              partition_by=list(spec.partition_by) or None, name=name,
                              description=spec.description, column_comments=_comments(name, table),
                              properties=props, lineage=lineage, volatile=VOLATILE)
        results.append(DeltaTableResult(**dataclasses.asdict(r), table=name, source_version=lance_versions.get(name)))
        logger.info("delta %s v%s: %d rows (+%d ~%d -%d)", name, r.version, r.rows, r.inserted, r.updated, r.deleted)
        if progress is not None:
            progress(f"{name}: v{r.version}, {r.rows} rows (+{r.inserted} ~{r.updated} -{r.deleted})")
    if tables is not None:
        skipped = {k: v for k, v in skipped.items() if k in tables}
    return DeltaExportResult(delta_uri=wh.delta_uri, tables=results, skipped=skipped,
                             properties={f"{delta.PROPERTY_PREFIX}{k}": v for k, v in props.items()},
                             elapsed_s=round(time.perf_counter() - t0, 3))


def delta_table_versions(wh: Warehouse) -> dict[str, int]:
    """Name -> current version of every Delta table of the warehouse ({} before the first export)."""
    return {name: int(delta.table_version(objstore.join(wh.delta_uri, name)) or 0)
            for name in delta.list_tables(wh.delta_uri)}


__all__ = ["COMMENTS", "DROPPED", "SOURCES", "DeltaExportResult", "DeltaTableResult", "delta_table_versions",
           "export_delta_tables", "project_version"]
