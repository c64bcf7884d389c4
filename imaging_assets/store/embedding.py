"""Build the ``lesion_vectors`` Lance table from the robust feature set (no Dagster here).

Each extractable lesion becomes one float32 vector: its robust features (the active
``robust_feature_sets`` version, in sorted name order) scaled by a
:class:`~imaging_assets.features.scaling.Scaler` (Yeo-Johnson, then standardisation) fitted on the cohort.
The scaler is stored in DuckDB (``vector_scalers``, keyed by feature-set version) so a new lesion — e.g.
the reference of a cohort query extracted from a new image — is scaled exactly the same way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.store.robustness import current_robust_set, ensure_robustness_schema, feature_matrix
from imaging_assets.store.warehouse import connect, table_rows, transaction

logger = logging.getLogger(__name__)

_SCALER_SQL = """CREATE TABLE IF NOT EXISTS vector_scalers (
    feature_set_version VARCHAR PRIMARY KEY, feature_names VARCHAR[], mean DOUBLE[], std DOUBLE[],
    n_lesions INTEGER, fitted_at TIMESTAMP, center DOUBLE[], scale DOUBLE[], lambdas DOUBLE[])"""
#: Columns added after the first release; a warehouse made before gets them (NULL: refit on next run).
_SCALER_ADDED = ("center", "scale", "lambdas")


def _ensure_scaler_table(con: Any) -> None:
    con.execute(_SCALER_SQL)
    for column in _SCALER_ADDED:
        con.execute(f"ALTER TABLE vector_scalers ADD COLUMN IF NOT EXISTS {column} DOUBLE[]")


class NoRobustSetError(RuntimeError):
    """Raised when vectors are requested before a robust feature set exists."""


def load_scaler(con: Any, version: str | None = None):
    """The stored :class:`~imaging_assets.features.scaling.Scaler` of a feature-set version (default: the
    active one), or None (none stored, or one stored before the power transform existed: the vectors
    must be rebuilt by materializing ``lesion_vectors``)."""
    from imaging_assets.features.scaling import Scaler
    from imaging_assets.store.robustness import _has_table

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


def build_lesion_vectors(database: str | Path, lance_uri: str,
                         exact_threshold: int | None = None) -> dict[str, Any]:
    """Standardise the robust features of every extractable lesion and sync them into LanceDB.

    Returns
    -------
    dict
        ``feature_set_version``, ``dim``, ``rows``, the :class:`SyncReport` fields (``inserted``,
        ``updated``, ``deleted``, ``unchanged``, ``version``, ``index``), ``elapsed_s``.

    Raises
    ------
    NoRobustSetError
        When ``robust_feature_set`` has not produced a set yet, or the set is empty.
    """
    from imaging_assets.features.scaling import fit_scaler
    from imaging_assets.store.vectors import sync_vectors

    t0 = time.perf_counter()
    with connect(database) as con:
        ensure_robustness_schema(con)
        _ensure_scaler_table(con)
        version, features = current_robust_set(con)
        if not version or not features:
            raise NoRobustSetError("no robust feature set yet (or it is empty): materialize robust_feature_set "
                                   "and check its `robust_set_not_collapsed` result")
        lesions = {r["lesion_id"]: r for r in table_rows(con, "lesions") if r["extractable"]}
        wide = feature_matrix(con)
        clusters: dict[str, int] = {}
        if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'phenotype_clusters'"
                       ).fetchone()[0]:
            clusters = dict(con.execute("SELECT lesion_id, cluster FROM phenotype_clusters "
                                        "WHERE feature_set_version = ?", [version]).fetchall())
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
    with connect(database) as con:
        _ensure_scaler_table(con)
        stored = scaler.to_dict()
        with transaction(con):
            con.execute("DELETE FROM vector_scalers WHERE feature_set_version = ?", [version])
            con.execute(
                "INSERT INTO vector_scalers (feature_set_version, feature_names, mean, std, n_lesions, fitted_at, "
                "center, scale, lambdas) VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?)",
                [version, list(features), stored["mean"], stored["std"], len(ids),
                 stored["center"], stored["scale"], stored["lambdas"]])
    report = sync_vectors(lance_uri, rows, dim=len(features), exact_threshold=exact_threshold)
    return {
        "feature_set_version": version,
        "dim": len(features),
        "rows": report.rows,
        "inserted": report.inserted,
        "updated": report.updated,
        "deleted": report.deleted,
        "unchanged": report.unchanged,
        "table_version": report.version,
        "index": report.index,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }


def vectors_frame(lance_uri: str):
    """The Lance ``lesion_vectors`` table as (Arrow table, float32 matrix), or (None, None) if absent."""
    from imaging_assets.store.vectors import VECTOR_TABLE, open_db

    try:
        tbl = open_db(lance_uri).open_table(VECTOR_TABLE).to_arrow().sort_by("lesion_id")
    except (ValueError, FileNotFoundError, OSError):
        return None, None
    dim = tbl.schema.field("vector").type.list_size
    flat = tbl.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return tbl, np.asarray(flat, dtype=np.float32).reshape(-1, dim) if len(tbl) else np.zeros((0, dim), np.float32)
