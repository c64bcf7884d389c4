"""Similar-case search and cohort tables: the one search path of the job, the CLI and the Python API.

:func:`find_similar` answers "which lesions look like this one?" for a lesion id of the warehouse or for a
vector (a new image + mask goes through :func:`query_vector`: extracted by the pipeline's code and scaled
with the stored scaler), with metadata filters; by default the query lesion's patient is left out (its
other lesions and re-scans would otherwise rank first); every search is audited once, also when it fails.
:func:`discover_cohort` writes the ranked answer, joined to clusters and outcomes, into a DuckDB table
``cohort_<name>`` and registers it in ``cohorts`` with the query that made it. No Dagster here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.store import audit
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, transaction

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

#: Columns of a :func:`find_similar` answer, in order (``distance``: L2 on the scaled robust features).
RESULT_COLUMNS = ("rank", "lesion_id", "distance", "patient_key", "series_instance_uid", "segment_number",
                  "raw_label", "roi_name", "modality", "body_part", "volume_mm3", "study_date", "cluster",
                  "feature_set_version")


@dataclass(frozen=True)
class CohortResult:
    """A stored cohort: its table, row count, the Lance version searched, the query, a preview."""

    table: str
    rows: int
    lance_version: int | None
    query: dict[str, Any]
    preview: list[dict[str, Any]]
    elapsed_s: float

    @property
    def read_command(self) -> str:
        """The command that prints the cohort."""
        return f"imaging-assets sql \"SELECT * FROM {self.table} ORDER BY rank\""


def cohort_table_name(name: str) -> str:
    """``cohort_<name>`` for a valid name (lower-case letters, digits, underscores; starts with a letter)."""
    if not _NAME.match(name or ""):
        raise ValueError(f"cohort name {name!r} is not valid: use lower-case letters, digits and underscores, "
                         "starting with a letter (at most 48 characters)")
    return f"cohort_{name}"


def _warehouse(warehouse: Warehouse | str | Path | None) -> Warehouse:
    if isinstance(warehouse, Warehouse):
        return warehouse
    return Warehouse.from_settings(root=warehouse)


def query_vector(wh: Warehouse, image: str | Path, mask: str | Path, label: int | None = None,
                 segment: str | None = None) -> tuple[np.ndarray, str]:
    """Vector of a lesion from a new image + mask: features by the pipeline's code, the active robust set,
    the stored scaler. Returns (vector, feature-set version)."""
    from imaging_assets.features.pipeline import extract_one
    from imaging_assets.stages.reproducibility import current_robust_set
    from imaging_assets.stages.vectors import load_scaler

    with wh.connect(read_only=True) as con:
        scaler = load_scaler(con)
        version, _ = current_robust_set(con)
    if scaler is None:
        raise RuntimeError("no vector scaler stored yet: materialize lesion_vectors first")
    outcome = extract_one(image, mask, label=label, segment=segment)
    if not outcome.ok:
        raise ValueError(f"{mask}: extraction failed: {outcome.error}")
    values = np.array([[outcome.features.get(n, np.nan) for n in scaler.feature_names]], dtype=float)
    return scaler.transform(values)[0], str(version)


def find_similar(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: Warehouse | str | Path | None = None, version: int | None = None,
                 action: str = "search", extra_params: dict[str, Any] | None = None):
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
    warehouse
        A :class:`~imaging_assets.store.warehouse.Warehouse`, a warehouse folder, or None for the
        configured one (``IMAGING_ASSETS_WAREHOUSE`` and ``IMAGING_ASSETS_LANCE_URI``).
    version
        Search an older version of the Lance table (the audit log names the version of every answer).
    action, extra_params
        What the audit row calls this search (``search`` | ``cohort``) and extra parameters it records.

    Returns
    -------
    polars.DataFrame
        :data:`RESULT_COLUMNS`. The query is audited once (with ``status`` ``error: ...`` when it fails).

    Raises
    ------
    KeyError
        ``lesion_id`` is not in the vector table.
    """
    import polars as pl

    from imaging_assets.stages.reproducibility import current_robust_set
    from imaging_assets.store import lance

    wh = _warehouse(warehouse)
    if (lesion_id is None) == (vector is None):
        raise ValueError("give either a lesion_id or a vector")
    params: dict[str, Any] = {"lesion_id": lesion_id, "k": k, "filters": where or {}, "version": version,
                              "exclude_same_patient": exclude_same_patient, **(extra_params or {})}
    query: str | np.ndarray = lesion_id if lesion_id is not None else np.asarray(vector, np.float32)
    if vector is not None:
        vec = np.asarray(vector, np.float32)
        params["vector_sha1"] = hashlib.sha1(vec.tobytes()).hexdigest()
        params["vector"] = [round(float(x), 6) for x in vec]
    # One connection per search: opening a DuckDB file costs ~10 ms, the Lance search itself ~3 ms; the
    # write lock is held for the search's few milliseconds only (robust-set version, audit row, metadata).
    with wh.connect() as con:
        ensure_schema(con)
        # pin the table version first: the audit names exactly the version that was searched
        pinned = version if version is not None else lance.table_version(wh.lance_uri)
        fs_version, _ = current_robust_set(con)
        versions = {"lesion_vectors": pinned, "robust_feature_set": fs_version}
        try:
            patient, extra = None, 0
            if lesion_id is not None and exclude_same_patient:
                ds = lance.lance_dataset(wh.lance_uri, version=pinned)
                row = ds.to_table(columns=["patient_key"],
                                  filter=f"lesion_id = {lance.sql_string(lesion_id)}").to_pylist()
                if not row:
                    raise KeyError(f"lesion {lesion_id!r} is not in the vector table at {wh.lance_uri}")
                patient = row[0]["patient_key"]
                if patient is not None:  # fetch enough rows to still return k after dropping the patient's own
                    extra = ds.count_rows(filter=f"patient_key = {lance.sql_string(patient)}")
            rows = lance.nearest(wh.lance_uri, query, k=k + extra, filters=where or None, version=pinned,
                                 exclude_self=exclude_same_patient)
        except Exception as exc:
            audit.record_on(con, action, "find_similar", params, versions, 0, status=f"error: {exc}")
            raise
        if patient is not None:
            rows = [r for r in rows if r.get("patient_key") != patient]
        rows = rows[:k]
        audit.record_on(con, action, "find_similar", params, versions, len(rows))
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
        "feature_set_version": [r.get("feature_set_version") for r in rows],
    }, schema_overrides={"rank": pl.Int64, "lesion_id": pl.String, "distance": pl.Float64,
                         "patient_key": pl.String, "series_instance_uid": pl.String, "segment_number": pl.Int32,
                         "raw_label": pl.String, "roi_name": pl.String, "modality": pl.String,
                         "body_part": pl.String, "volume_mm3": pl.Float64, "study_date": pl.Date,
                         "cluster": pl.Int32, "feature_set_version": pl.String})


def discover_cohort(wh: Warehouse, name: str, reference_lesion_id: str | None = None, image: str | None = None,
                    mask: str | None = None, segment: str | None = None, k: int = 20,
                    filters: dict[str, Any] | None = None, exclude_same_patient: bool = True) -> CohortResult:
    """Run a similar-case search (:func:`find_similar`) and store the ranked cohort as ``cohort_<name>``.

    Columns: those of :func:`find_similar` with the cluster of ``phenotype_clusters`` and the outcome
    (time_months, event, stage) of ``patient_outcomes`` joined (NULL where there is none). Re-running a name
    replaces its table and registry row. By default the reference patient is left out, as everywhere.
    """
    from imaging_assets.store.lance import table_version

    t0 = time.perf_counter()
    table = cohort_table_name(name)
    vector, fs_version = None, None
    if reference_lesion_id is None:
        if not (image and mask):
            raise ValueError("a cohort needs reference_lesion_id, or image and mask of a new lesion")
        vector, fs_version = query_vector(wh, image, mask, segment=segment)
    lance_version = table_version(wh.lance_uri)
    found = find_similar(reference_lesion_id, vector=vector, k=k, where=filters, warehouse=wh,
                         exclude_same_patient=exclude_same_patient, version=lance_version, action="cohort",
                         extra_params={"name": name, "image": image, "mask": mask, "segment": segment})
    df = found.to_pandas()
    query = {"reference_lesion_id": reference_lesion_id, "image": image, "mask": mask, "k": k,
             "filters": filters or {}, "exclude_same_patient": exclude_same_patient}
    fs = fs_version or (df["feature_set_version"].iloc[0] if len(df) else None)
    with wh.connect() as con:
        ensure_schema(con)
        con.register("_cohort", df)
        try:
            with transaction(con):
                # the name is validated by cohort_table_name: DDL cannot take it as a parameter
                con.execute(
                    f"CREATE OR REPLACE TABLE {table} AS SELECT c.* EXCLUDE (cluster), "
                    "coalesce(pc.cluster, c.cluster) AS cluster, o.time_months, o.event, o.stage FROM _cohort c "
                    "LEFT JOIN phenotype_clusters pc USING (lesion_id) "
                    "LEFT JOIN patient_outcomes o ON o.patient_key = c.patient_key ORDER BY c.rank")
                con.execute("DELETE FROM cohorts WHERE name = ?", [name])
                con.execute("INSERT INTO cohorts VALUES (?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?, ?, ?, NULL)",
                            [name, table, audit.current_user(), json.dumps(query, sort_keys=True), lance_version,
                             fs, len(df)])
        finally:
            con.unregister("_cohort")
        last = con.execute("SELECT id FROM audit_log WHERE action = 'cohort' ORDER BY logged_at DESC LIMIT 1").fetchone()
        if last:
            con.execute("UPDATE cohorts SET audit_id = ? WHERE name = ?", [last[0], name])
    preview = found.head(10).to_dicts()
    return CohortResult(table=table, rows=len(df), lance_version=lance_version, query=query, preview=preview,
                        elapsed_s=round(time.perf_counter() - t0, 3))
