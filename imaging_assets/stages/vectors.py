"""Vectors: the step behind ``lesion_vectors`` (the Lance table of scaled robust features) and its check.

Per feature space: the space's robust set, its own scaler, its lesions. All spaces share one Lance table
with a ``space`` column; a space with fewer robust features than the table's dimension is zero-padded
(L2 distances within a space are unchanged) and every search filters on its space.

Each extractable lesion becomes one float32 vector: its robust features (the active
``robust_feature_sets`` version, in sorted name order) scaled by a
:class:`~imaging_assets.features.scaling.Scaler` (Yeo-Johnson, then standardisation) fitted on the cohort.
The scaler is stored in DuckDB (``vector_scalers``, keyed by feature-set version) so a new lesion — e.g.
the reference of a cohort query extracted from a new image — is scaled exactly the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imaging_assets.errors import NoRobustSetError
from imaging_assets.stages.reproducibility import (
    _has_table,
    current_robust_set,
    current_robust_sets,
    feature_matrix,
    lesion_spaces,
)
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows

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
    #: per feature space: space, rows, dim, feature_set_version, excluded (lesions left out)
    spaces: list[dict[str, Any]]
    #: lesions left out of the vectors, with the reason (lesion_id, space, reason)
    excluded: list[dict[str, Any]]
    #: the version retention applied after the write (:class:`~imaging_assets.store.lance.retention.RetentionReport`
    #: as a dict: versions before/after, removed, kept pinned/recent, bytes removed, keep_days); {} without a table
    retention: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VectorIntegrity:
    """The ``vectors_integrity`` check: rows in Lance vs lesions expected, and the problems found."""

    rows: int
    expected_rows: int
    problems: list[str]


def load_scaler(con: Any, version: str | None = None, space: str | None = None):
    """The stored :class:`~imaging_assets.features.scaling.Scaler` of a feature-set version (default: the
    active one of ``space``, or of the only space), or None (none stored, or one stored before the power
    transform existed: the vectors must be rebuilt by materializing ``lesion_vectors``)."""
    from imaging_assets.features.scaling import Scaler

    if not _has_table(con, "vector_scalers"):
        return None
    if version is None:
        version, _ = current_robust_set(con, space)
    columns = {r[0] for r in con.execute("DESCRIBE vector_scalers").fetchall()}
    if not set(_SCALER_ADDED) <= columns:
        return None
    row = con.execute("SELECT feature_names, center, scale, lambdas, mean, std FROM vector_scalers "
                      "WHERE feature_set_version = ?", [version]).fetchone()
    if row is None or any(v is None for v in row):
        return None
    return Scaler(list(row[0]), *(np.asarray(v, dtype=float) for v in row[1:]))


def load_quantiles(con: Any, version: str) -> np.ndarray | None:
    """The stored ``(101, n_features)`` quantiles of a feature-set version's scaled features, or None."""
    if not _has_table(con, "vector_scalers"):
        return None
    columns = {r[0] for r in con.execute("DESCRIBE vector_scalers").fetchall()}
    if "quantiles" not in columns:
        return None
    row = con.execute("SELECT quantiles FROM vector_scalers WHERE feature_set_version = ?", [version]).fetchone()
    if row is None or row[0] is None:
        return None
    return np.asarray(row[0], dtype=float)


def build_lesion_vectors(wh: Warehouse, exact_threshold: int | None = None) -> VectorsResult:
    """Per feature space, standardise the robust features of every extractable lesion with the space's own
    scaler, and sync all spaces into the Lance table (zero-padded to the largest space's dimension).

    A lesion that lacks one of its space's robust features (pyradiomics skipped a filter for it) is left
    out, with the reason in ``excluded``.

    Raises
    ------
    NoRobustSetError
        When ``robust_feature_set`` has not produced a set yet, or every set is empty.
    """
    from imaging_assets.features.explain import quantiles_of
    from imaging_assets.features.scaling import fit_scaler
    from imaging_assets.store.lance import sync_vectors

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_schema(con)
        sets = {space: vf for space, vf in current_robust_sets(con).items() if vf[1]}
        if not sets:
            raise NoRobustSetError("no robust feature set yet (or every one is empty): materialize "
                                   "robust_feature_set and check its `robust_set_not_collapsed` result")
        lesions = {r["lesion_id"]: r for r in table_rows(con, "lesions") if r["extractable"]}
        spaces_of = lesion_spaces(con)
        wides = {space: feature_matrix(con, space=space) for space in sets}
        clusters: dict[str, int] = dict(con.execute(
            "SELECT lesion_id, cluster FROM phenotype_clusters WHERE list_contains(?, feature_set_version)",
            [[v for v, _ in sets.values()]]).fetchall())
    dim = max(len(f) for _, f in sets.values())
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    space_rows: list[dict[str, Any]] = []
    scalers = []
    for space, (version, features) in sorted(sets.items()):
        wide = wides[space]
        ids = [i for i in wide.index if i in lesions] if not wide.empty else []
        missing = [f for f in features if f not in wide.columns]
        if missing:
            raise NoRobustSetError(f"space {space}: robust features missing from radiomics_features: {missing[:5]}")
        values = wide.loc[ids, features].to_numpy(dtype=float) if ids else np.zeros((0, len(features)))
        ok = np.isfinite(values).all(axis=1) if len(ids) else np.zeros(0, bool)
        for lid, good in zip(ids, ok):
            if not good:
                lacks = spaces_of.get(lid, {}).get("missing_image_types") or []
                excluded.append({"lesion_id": lid, "space": space, "reason": (
                    f"lacks robust features of image types {', '.join(lacks)} (skipped by pyradiomics)" if lacks
                    else "a robust feature is not finite")})
        ids = [lid for lid, good in zip(ids, ok) if good]
        values = values[ok] if len(ok) else values
        scaler = fit_scaler(values, list(features))
        vectors = scaler.transform(values).astype(np.float32)
        scalers.append((version, features, scaler, len(ids), quantiles_of(vectors)))
        padded = np.zeros((len(ids), dim), np.float32)
        padded[:, : len(features)] = vectors
        for i, lid in enumerate(ids):
            les = lesions[lid]
            rows.append({
                "lesion_id": lid, "vector": padded[i].tolist(), "patient_key": les["patient_key"],
                "study_date": les["study_date"], "modality": les["modality"], "body_part": les["body_part"],
                "roi_name": les["roi_name"], "volume_mm3": les["volume_mm3"],
                "series_instance_uid": les["series_instance_uid"], "feature_set_version": version,
                "cluster": clusters.get(lid), "space": space,
            })
        space_rows.append({"space": space, "rows": len(ids), "dim": len(features), "feature_set_version": version,
                           "excluded": sum(1 for e in excluded if e["space"] == space)})
    with wh.transaction() as con:
        for version, features, scaler, n, quantiles in scalers:
            stored = scaler.to_dict()
            con.execute("DELETE FROM vector_scalers WHERE feature_set_version = ?", [version])
            con.execute(
                "INSERT INTO vector_scalers (feature_set_version, feature_names, mean, std, n_lesions, fitted_at, "
                "center, scale, lambdas, quantiles) VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?, ?)",
                [version, list(features), stored["mean"], stored["std"], n,
                 stored["center"], stored["scale"], stored["lambdas"],
                 [[float(x) for x in row] for row in np.nan_to_num(quantiles, nan=0.0)]])
    report = sync_vectors(wh.lance_uri, rows, dim=dim, exact_threshold=exact_threshold)
    retention = apply_version_retention(wh)
    return VectorsResult(
        feature_set_version=", ".join(sorted(v for v, _ in sets.values())),
        dim=dim,
        rows=report.rows,
        inserted=report.inserted,
        updated=report.updated,
        deleted=report.deleted,
        unchanged=report.unchanged,
        table_version=report.version,
        index=report.index,
        elapsed_s=round(time.perf_counter() - t0, 3),
        spaces=space_rows,
        excluded=excluded,
        retention=retention,
    )


def pinned_lance_versions(con: Any, table: str = "lesion_vectors") -> set[int]:
    """Versions of a Lance table that answers recorded in the warehouse name: every audit row's
    ``table_versions`` (searches, cohorts, SQL) and every cohort's ``lance_version``. They stay (replays)."""
    pinned: set[int] = set()
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
    if "audit_log" in tables:
        pinned.update(int(v) for (v,) in con.execute(
            "SELECT DISTINCT TRY_CAST(json_extract_string(table_versions, '$.' || ?) AS BIGINT) AS v FROM audit_log "
            "WHERE v IS NOT NULL", [table]).fetchall())
    if "cohorts" in tables and table == "lesion_vectors":
        pinned.update(int(v) for (v,) in con.execute(
            "SELECT DISTINCT lance_version FROM cohorts WHERE lance_version IS NOT NULL").fetchall())
    return pinned


def apply_version_retention(wh: Warehouse, keep_days: float | None = None, table: str | None = None) -> dict[str, Any]:
    """Remove the old versions of a Lance table (default ``lesion_vectors``; also ``lesion_embeddings``) the
    retention policy lets go: not the latest, not pinned by audit rows or cohorts (:func:`pinned_lance_versions`),
    older than ``keep_days`` (default ``IMAGING_ASSETS_LANCE_KEEP_DAYS``, 1) and than an hour. Returns the
    report as a dict ({} without a table)."""
    import datetime as dt

    from imaging_assets import settings
    from imaging_assets.store.lance import VECTOR_TABLE
    from imaging_assets.store.lance.retention import apply_retention

    table = table or VECTOR_TABLE
    days = settings.lance_keep_days() if keep_days is None else keep_days
    with wh.connect(read_only=True) as con:
        pinned = pinned_lance_versions(con, table)
    report = apply_retention(wh.lance_uri, pinned, dt.timedelta(days=days), table)
    return report.to_dict() if report is not None else {}


def vectors_frame(lance_uri: str, table: str | None = None):
    """A Lance vector table (default ``lesion_vectors``) as (Arrow table sorted by lesion id, float32 matrix),
    or (None, None) if absent."""
    from imaging_assets.store.lance import VECTOR_TABLE, open_db

    try:
        tbl = open_db(lance_uri).open_table(table or VECTOR_TABLE).to_arrow().sort_by("lesion_id")
    except (ValueError, FileNotFoundError, OSError):
        return None, None
    dim = tbl.schema.field("vector").type.list_size
    flat = tbl.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return tbl, np.asarray(flat, dtype=np.float32).reshape(-1, dim) if len(tbl) else np.zeros((0, dim), np.float32)


def vector_integrity(wh: Warehouse) -> VectorIntegrity:
    """Compare the Lance table with the DuckDB lesions and the active robust sets: one row per extractable
    lesion with complete robust features, no duplicates, finite values, each space's version, and zeros
    beyond each space's dimension."""
    tbl, mat = vectors_frame(wh.lance_uri)
    with wh.connect(read_only=True) as con:
        sets = {space: vf for space, vf in current_robust_sets(con).items() if vf[1]}
        with_features = {r[0]: r[1] for r in con.execute(
            "SELECT lesion_id, p.space FROM lesions JOIN radiomics_provenance p USING (lesion_id) "
            "WHERE extractable").fetchall()}
        wides = {space: feature_matrix(con, space=space) for space in sets}
    expected = set()
    for space, (_, features) in sets.items():
        wide = wides[space]
        if wide.empty:
            continue
        present = wide.reindex(columns=features)
        complete = present.index[np.isfinite(present.to_numpy(float)).all(axis=1)]
        expected |= {lid for lid in complete if lid in with_features}
    ids = tbl.column("lesion_id").to_pylist() if tbl is not None else []
    problems = []
    if len(ids) != len(set(ids)):
        problems.append("duplicate lesion ids")
    if set(ids) != expected:
        problems.append(f"{len(expected - set(ids))} lesions missing, {len(set(ids) - expected)} extra")
    if mat is not None and mat.size and not np.isfinite(mat).all():
        problems.append("non-finite vector values")
    if tbl is not None and len(tbl):
        spaces = tbl.column("space").to_pylist()
        versions = tbl.column("feature_set_version").to_pylist()
        for space in sorted(set(spaces), key=str):
            if space not in sets:
                problems.append(f"rows of space {space} without an active robust set")
                continue
            version, features = sets[space]
            mine = np.array([s == space for s in spaces])
            if {v for v, m in zip(versions, mine) if m} != {version}:
                problems.append(f"space {space}: feature-set versions differ from the active {version}")
            if mat is not None and (mat.shape[1] < len(features) or np.any(mat[mine][:, len(features):] != 0)):
                problems.append(f"space {space}: dimension does not match its robust set of {len(features)}")
    return VectorIntegrity(rows=len(ids), expected_rows=len(expected), problems=problems)
