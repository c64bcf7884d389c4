"""Similar-case search and cohort tables (no Dagster here).

:func:`search` answers "which lesions look like this one?" for a lesion id of the warehouse or for a new
image + mask (extracted through the same code as the pipeline and scaled with the stored scaler), with
metadata filters; every search is audited. :func:`discover_cohort` writes the ranked answer, joined to
clusters and outcomes when those exist, into a DuckDB table ``cohort_<name>`` and registers it in
``cohorts`` with the query that made it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.store import audit
from imaging_assets.store.warehouse import connect, transaction

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
COHORTS_DDL = """CREATE TABLE IF NOT EXISTS cohorts (
    name VARCHAR PRIMARY KEY, table_name VARCHAR, created_at TIMESTAMP, "user" VARCHAR, query VARCHAR,
    lance_version INTEGER, feature_set_version VARCHAR, n_rows INTEGER, audit_id VARCHAR)"""


def cohort_table_name(name: str) -> str:
    """``cohort_<name>`` for a valid name (lower-case letters, digits, underscores; starts with a letter)."""
    if not _NAME.match(name or ""):
        raise ValueError(f"cohort name {name!r} is not valid: use lower-case letters, digits and underscores, "
                         "starting with a letter (at most 48 characters)")
    return f"cohort_{name}"


def query_vector(database: str | Path, image: str | Path, mask: str | Path, label: int | None = None,
                 segment: str | None = None) -> tuple[np.ndarray, str]:
    """Vector of a lesion from a new image + mask: features by the pipeline's code, the active robust set,
    the stored scaler. Returns (vector, feature-set version)."""
    from imaging_assets.features.pipeline import extract_one
    from imaging_assets.store.embedding import load_scaler

    with connect(database, read_only=True) as con:
        scaler = load_scaler(con)
        from imaging_assets.store.robustness import current_robust_set

        version, _ = current_robust_set(con)
    if scaler is None:
        raise RuntimeError("no vector scaler stored yet: materialize lesion_vectors first")
    outcome = extract_one(image, mask, label=label, segment=segment)
    if not outcome.ok:
        raise ValueError(f"{mask}: extraction failed: {outcome.error}")
    values = np.array([[outcome.features.get(n, np.nan) for n in scaler.feature_names]], dtype=float)
    return scaler.transform(values)[0], str(version)


def search(database: str | Path, lance_uri: str, lesion_id: str | None = None, vector: np.ndarray | None = None,
           k: int = 10, filters: dict[str, Any] | None = None, version: int | None = None,
           action: str = "search", extra_params: dict[str, Any] | None = None,
           exclude_self: bool = True) -> list[dict[str, Any]]:
    """k most similar lesions (L2 on the scaled robust features), audited.

    Exactly one of ``lesion_id`` / ``vector`` is given; ``version`` searches an older table version.
    """
    with connect(database) as con:
        return _search_on(con, lance_uri, lesion_id, vector, k, filters, version, action, extra_params,
                          exclude_self)


def _search_on(con: Any, lance_uri: str, lesion_id: str | None, vector: np.ndarray | None, k: int,
               filters: dict[str, Any] | None, version: int | None, action: str,
               extra_params: dict[str, Any] | None, exclude_self: bool) -> list[dict[str, Any]]:
    """:func:`search` on one open read-write DuckDB connection (robust-set version, then the audit row).

    One connection per search: opening a DuckDB file costs ~10 ms, the Lance search itself ~3 ms. The
    write lock is held for the search's few milliseconds only.
    """
    import hashlib

    from imaging_assets.store.robustness import current_robust_set
    from imaging_assets.store.vectors import find_similar, table_version

    if (lesion_id is None) == (vector is None):
        raise ValueError("give either a lesion_id or a vector")
    params: dict[str, Any] = {"lesion_id": lesion_id, "k": k, "filters": filters or {}, "version": version,
                              **(extra_params or {})}
    if vector is not None:
        vec = np.asarray(vector, np.float32)
        params["vector_sha1"] = hashlib.sha1(vec.tobytes()).hexdigest()
        params["vector"] = [round(float(x), 6) for x in vec]
    # pin the table version first: the audit names exactly the version that was searched
    pinned = version if version is not None else table_version(lance_uri)
    fs_version, _ = current_robust_set(con)
    versions = {"lesion_vectors": pinned, "robust_feature_set": fs_version}
    try:
        rows = find_similar(lance_uri, lesion_id if lesion_id is not None else np.asarray(vector, np.float32),
                            k=k, filters=filters or None, version=pinned, exclude_self=exclude_self)
    except Exception as exc:
        audit.record_on(con, action, "find_similar", params, versions, 0, status=f"error: {exc}")
        raise
    audit.record_on(con, action, "find_similar", params, versions, len(rows))
    return rows


def find_similar(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: str | Path | None = None, lance_uri: str | None = None,
                 version: int | None = None):
    """The lesions most similar to a lesion (or a vector), as a polars DataFrame ranked by distance.

    Parameters
    ----------
    lesion_id, vector
        The query: a lesion of the warehouse, or a standardised vector (see :func:`query_vector`).
    k
        Number of rows returned.
    where
        Structured filters ``{column: value | [values] | (low, high)}`` on modality, body_part, roi_name,
        patient_key, cluster, study_date, volume_mm3; values are quoted by the vector store, never
        spliced into a filter string.
    exclude_same_patient
        Leave out the query lesion's patient (its other lesions and retest scans). With False, the query
        lesion itself comes first (distance 0).
    warehouse, lance_uri
        Default: the configured warehouse (``IMAGING_ASSETS_WAREHOUSE``) and its ``lance`` folder.

    Returns
    -------
    polars.DataFrame
        rank, lesion_id, distance, patient_key, series_instance_uid, segment_number, raw_label, roi_name,
        modality, body_part, volume_mm3, study_date, cluster. The query is audited once.
    """
    import polars as pl

    from imaging_assets import settings
    from imaging_assets.store.warehouse import duckdb_path

    root = Path(warehouse) if warehouse else settings.warehouse_dir()
    database = duckdb_path(root)
    lance_uri = lance_uri or str(root / "lance")
    from imaging_assets.store.vectors import lance_dataset, sql_string

    patient, extra = None, 0
    if lesion_id is not None and exclude_same_patient:
        ds = lance_dataset(lance_uri, version=version)
        row = ds.to_table(columns=["patient_key"], filter=f"lesion_id = {sql_string(lesion_id)}").to_pylist()
        if not row:
            raise KeyError(f"lesion {lesion_id!r} is not in the vector table at {lance_uri}")
        patient = row[0]["patient_key"]
        if patient is not None:  # fetch enough rows to still return k after dropping the patient's own
            extra = ds.count_rows(filter=f"patient_key = {sql_string(patient)}")
    with connect(database) as con:  # one connection: robust-set version, audit row, lesion metadata
        rows = _search_on(con, lance_uri, lesion_id, vector, k + extra, where, version, "search",
                          {"k_requested": k, "exclude_same_patient": exclude_same_patient}, exclude_same_patient)
        if patient is not None:
            rows = [r for r in rows if r.get("patient_key") != patient]
        rows = rows[:k]
        ids = [r["lesion_id"] for r in rows]
        meta = {r[0]: r[1:] for r in con.execute(
            "SELECT lesion_id, segment_number, raw_label FROM lesions WHERE list_contains(?, lesion_id)",
            [ids]).fetchall()}
    return pl.DataFrame({
        "rank": list(range(1, len(rows) + 1)),
        "lesion_id": ids,
        "distance": [float(r["_distance"]) for r in rows],
        "patient_key": [r.get("patient_key") for r in rows],
        "series_instance_uid": [r.get("series_instance_uid") for r in rows],
        "segment_number": [meta.get(i, (None, None))[0] for i in ids],
        "raw_label": [meta.get(i, (None, None))[1] for i in ids],
        "roi_name": [r.get("roi_name") for r in rows],
        "modality": [r.get("modality") for r in rows],
        "body_part": [r.get("body_part") for r in rows],
        "volume_mm3": [r.get("volume_mm3") for r in rows],
        "study_date": [r.get("study_date") for r in rows],
        "cluster": [r.get("cluster") for r in rows],
    }, schema_overrides={"segment_number": pl.Int32, "cluster": pl.Int32})


def discover_cohort(database: str | Path, lance_uri: str, name: str, reference_lesion_id: str | None = None,
                    image: str | None = None, mask: str | None = None, segment: str | None = None,
                    k: int = 20, filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a similar-case search and store the ranked cohort as ``cohort_<name>``.

    Columns: rank, lesion_id, patient_key, distance, modality, roi_name, volume_mm3, study_date, cluster
    (when clusters exist), time_months / event / stage (when outcomes exist). Re-running a name replaces
    its table and registry row.
    """
    from imaging_assets.store.vectors import table_version

    t0 = time.perf_counter()
    table = cohort_table_name(name)
    vector, fs_version = None, None
    if reference_lesion_id is None:
        if not (image and mask):
            raise ValueError("a cohort needs reference_lesion_id, or image and mask of a new lesion")
        vector, fs_version = query_vector(database, image, mask, segment=segment)
    lance_version = table_version(lance_uri)
    rows = search(database, lance_uri, lesion_id=reference_lesion_id, vector=vector, k=k, filters=filters,
                  action="cohort", extra_params={"name": name, "image": image, "mask": mask, "segment": segment})
    import pandas as pd

    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["lesion_id", "_distance"])
    df.insert(0, "rank", range(1, len(df) + 1))
    df = df.rename(columns={"_distance": "distance"}).drop(columns=["vector"], errors="ignore")
    query = {"reference_lesion_id": reference_lesion_id, "image": image, "mask": mask, "k": k,
             "filters": filters or {}}
    with connect(database) as con:
        con.execute(COHORTS_DDL)
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        con.register("_cohort", df)
        select = "SELECT c.*"
        joins = ""
        if "phenotype_clusters" in tables and "cluster" in df.columns:
            select = "SELECT c.* EXCLUDE (cluster), coalesce(pc.cluster, c.cluster) AS cluster"
            joins += " LEFT JOIN phenotype_clusters pc USING (lesion_id)"
        if "patient_outcomes" in tables and "patient_key" in df.columns:
            select += ", o.time_months, o.event, o.stage"
            joins += " LEFT JOIN patient_outcomes o ON o.patient_key = c.patient_key"
        try:
            with transaction(con):
                con.execute(f"CREATE OR REPLACE TABLE {table} AS {select} FROM _cohort c{joins} ORDER BY c.rank")
                fs = fs_version or (df["feature_set_version"].iloc[0] if "feature_set_version" in df and len(df)
                                    else None)
                con.execute("DELETE FROM cohorts WHERE name = ?", [name])
                con.execute("INSERT INTO cohorts VALUES (?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?, ?, ?, NULL)",
                            [name, table, audit.current_user(), json.dumps(query, sort_keys=True), lance_version,
                             fs, len(df)])
        finally:
            con.unregister("_cohort")
        last = con.execute("SELECT id FROM audit_log WHERE action = 'cohort' ORDER BY logged_at DESC LIMIT 1").fetchone()
        if last:
            con.execute("UPDATE cohorts SET audit_id = ? WHERE name = ?", [last[0], name])
    return {"table": table, "rows": len(df), "lance_version": lance_version, "query": query,
            "preview": df.head(10).to_dict("records"), "elapsed_s": round(time.perf_counter() - t0, 3)}
