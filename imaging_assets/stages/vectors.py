"""Vectors: the step behind ``lesion_vectors`` (the Lance table of scaled robust features) and its check.

Each extractable lesion becomes one float32 vector: its robust features (the active
``robust_feature_sets`` version, in sorted name order) scaled by a
:class:`~imaging_assets.features.scaling.Scaler` (Yeo-Johnson, then standardisation) fitted on the cohort.
The scaler is stored in DuckDB (``vector_scalers``, keyed by feature-set version) so a new lesion — e.g.
the reference of a cohort query extracted from a new image — is scaled exactly the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from imaging_assets.errors import NoRobustSetError
from imaging_assets.stages.reproducibility import _has_table, current_robust_set, feature_matrix
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows, transaction

logger = logging.getLogger(__name__)

#: Scaler columns added after the first release (a warehouse made before has them NULL: refit on next run).
_SCALER_ADDED = ("center", "scale", "lambdas")


@dataclass(frozen=True)
class VectorsResult:
    """One vectors build: feature-set version, dimension, rows, the sync counts, table version, index."""

    feature_set_version: str
    dim: int
    rows: int
    inserted: int
    updated: int
    deleted: int
    unchanged: int
    table_version: int | None
    index: str
    elapsed_s: float


@dataclass(frozen=True)
class VectorIntegrity:
    """The ``vectors_integrity`` check: rows in Lance vs lesions expected, and the problems found."""

    rows: int
    expected_rows: int
    problems: list[str]


def load_scaler(con: Any, version: str | None = None):
    """The stored :class:`~imaging_assets.features.scaling.Scaler` of a feature-set version (default: the
    active one), or None (none stored, or one stored before the power transform existed: the vectors
    must be rebuilt by materializing ``lesion_vectors``)."""
    from imaging_assets.features.scaling import Scaler

    if not _has_table(con, "vector_scalers"):
        return None
    if version is None:
        version, _ = current_robust_set(con)
    columns = {r[0] for r in con.execute("DESCRIBE vector_scalers").fetchall()}
    if not set(_SCALER_ADDED) <= columns:
        return None
    row = con.execute("SELECT feature_names, center, scale, lambdas, mean, std FROM vector_scalers "
                      "WHERE feature_set_version = ?", [version]).fetchone()
    if row is None or any(v is None for v in row):
        return None
    return Scaler(list(row[0]), *(np.asarray(v, dtype=float) for v in row[1:]))


def build_lesion_vectors(wh: Warehouse, exact_threshold: int | None = None) -> VectorsResult:
    """Standardise the robust features of every extractable lesion and sync them into LanceDB.

    Raises
    ------
    NoRobustSetError
        When ``robust_feature_set`` has not produced a set yet, or the set is empty.
    """
    from imaging_assets.features.scaling import fit_scaler
    from imaging_assets.store.lance import sync_vectors

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_schema(con)
        version, features = current_robust_set(con)
        if not version or not features:
            raise NoRobustSetError("no robust feature set yet (or it is empty): materialize robust_feature_set "
                                   "and check its `robust_set_not_collapsed` result")
        lesions = {r["lesion_id"]: r for r in table_rows(con, "lesions") if r["extractable"]}
        wide = feature_matrix(con)
        clusters: dict[str, int] = dict(con.execute(
            "SELECT lesion_id, cluster FROM phenotype_clusters WHERE feature_set_version = ?", [version]).fetchall())
    ids = [i for i in wide.index if i in lesions] if not wide.empty else []
    missing = [f for f in features if f not in wide.columns]
    if missing:
        raise NoRobustSetError(f"robust features missing from radiomics_features: {missing[:5]}")
    values = wide.loc[ids, features].to_numpy(dtype=float) if ids else np.zeros((0, len(features)))
    scaler = fit_scaler(values, list(features))
    vectors = scaler.transform(values).astype(np.float32)
    rows = []
    for i, lid in enumerate(ids):
        les = lesions[lid]
        rows.append({
            "lesion_id": lid, "vector": vectors[i].tolist(), "patient_key": les["patient_key"],
            "study_date": les["study_date"], "modality": les["modality"], "body_part": les["body_part"],
            "roi_name": les["roi_name"], "volume_mm3": les["volume_mm3"],
            "series_instance_uid": les["series_instance_uid"], "feature_set_version": version,
            "cluster": clusters.get(lid),
        })
    with wh.connect() as con:
        stored = scaler.to_dict()
        with transaction(con):
            con.execute("DELETE FROM vector_scalers WHERE feature_set_version = ?", [version])
            con.execute(
                "INSERT INTO vector_scalers (feature_set_version, feature_names, mean, std, n_lesions, fitted_at, "
                "center, scale, lambdas) VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?)",
                [version, list(features), stored["mean"], stored["std"], len(ids),
                 stored["center"], stored["scale"], stored["lambdas"]])
    report = sync_vectors(wh.lance_uri, rows, dim=len(features), exact_threshold=exact_threshold)
    return VectorsResult(
        feature_set_version=version,
        dim=len(features),
        rows=report.rows,
        inserted=report.inserted,
        updated=report.updated,
        deleted=report.deleted,
        unchanged=report.unchanged,
        table_version=report.version,
        index=report.index,
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def vectors_frame(lance_uri: str):
    """The Lance ``lesion_vectors`` table as (Arrow table, float32 matrix), or (None, None) if absent."""
    from imaging_assets.store.lance import VECTOR_TABLE, open_db

    try:
        tbl = open_db(lance_uri).open_table(VECTOR_TABLE).to_arrow().sort_by("lesion_id")
    except (ValueError, FileNotFoundError, OSError):
        return None, None
    dim = tbl.schema.field("vector").type.list_size
    flat = tbl.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return tbl, np.asarray(flat, dtype=np.float32).reshape(-1, dim) if len(tbl) else np.zeros((0, dim), np.float32)


def vector_integrity(wh: Warehouse) -> VectorIntegrity:
    """Compare the Lance table with the DuckDB lesions and the active robust set: one row per extractable
    lesion with features, no duplicates, finite values, the set's dimension and version."""
    tbl, mat = vectors_frame(wh.lance_uri)
    with wh.connect(read_only=True) as con:
        version, features = current_robust_set(con)
        expected = {r[0] for r in con.execute(
            "SELECT lesion_id FROM lesions JOIN radiomics_provenance USING (lesion_id) WHERE extractable").fetchall()}
    ids = tbl.column("lesion_id").to_pylist() if tbl is not None else []
    problems = []
    if len(ids) != len(set(ids)):
        problems.append("duplicate lesion ids")
    if set(ids) != expected:
        problems.append(f"{len(expected - set(ids))} lesions missing, {len(set(ids) - expected)} extra")
    if mat is not None and mat.size and not np.isfinite(mat).all():
        problems.append("non-finite vector values")
    if mat is not None and mat.shape[1] != len(features):
        problems.append(f"dimension {mat.shape[1]} != robust set size {len(features)}")
    versions = set(tbl.column("feature_set_version").to_pylist()) if tbl is not None else set()
    if versions and versions != {version}:
        problems.append(f"feature-set versions {sorted(versions)} != active {version}")
    return VectorIntegrity(rows=len(ids), expected_rows=len(expected), problems=problems)
