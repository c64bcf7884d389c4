"""Outcomes: loading outcome files into DuckDB, phenotype clusters of the lesion vectors, and survival per
cluster -- the steps behind ``clinical_outcomes``, ``phenotype_clusters`` and ``cluster_outcomes``.

How an outcome file is read (columns, aliases, value rules) is pure code in
:mod:`imaging_assets.analysis.outcomes`; this module writes what it reads:

``clinical_outcomes`` (primary key ``patient_key, source_file``)
    One row per patient and file. The raw patient id is replaced by
    :func:`imaging_assets.dicom.pseudonym.patient_key` (the same keyed HMAC discovery uses), so outcomes
    join to ``lesions``/``imaging_series`` on ``patient_key``. ``loaded_at`` (UTC) is when that row's
    values were last inserted or changed; an unchanged row keeps its time.
``outcome_rejects`` (``source_file, row_number, reason, loaded_at``)
    Rows that failed validation, with every reason (``"; "``-separated). ``row_number`` is the 1-based
    data row (the CSV line number minus one; the header is not counted). A file that cannot be read at
    all gets one row with ``row_number`` NULL. The table reflects the latest attempt at each file: a
    reload of a file replaces that file's rejects. Never holds the raw patient id.
``outcome_files`` (``source_file, size, mtime_ns, sha256, loaded_at, status, n_rows, n_rejected``)
    One row per file seen; ``status`` is ``'loaded'`` or ``'failed'``. A file whose SHA-256 is unchanged is
    skipped entirely, so loading the same file twice adds nothing.

The view ``patient_outcomes`` keeps one row per ``patient_key`` across files (the most recently loaded row;
ties: the greatest ``source_file``), which is what the survival analysis joins to.

A file that changed is applied in one transaction: new rows inserted, changed rows updated, rows whose
patient disappeared from that file deleted, its rejects replaced. A file that cannot be parsed (not
text, no header, required columns absent) leaves everything already stored from it in place and records
one reject naming the problem. Rows of a file that vanished from the folder are kept (logged).

Cluster tables (replaced in one transaction on each run): ``phenotype_clusters``, ``cluster_profiles``,
``cluster_survival``, ``cluster_cox``, ``cluster_logrank``, ``cluster_patients``. Patients with several
lesions count once per analysis: the cluster of their largest lesion
(:func:`imaging_assets.analysis.survival.one_row_per_patient`, rule ``largest``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from imaging_assets.analysis.outcomes import (
    VALUE_FIELDS,
    OutcomeFileError,
    outcome_files,
    patient_id_text,
    read_outcome_table,
    validate_row,
)
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, fetch_dicts, insert_rows, replace_frame, transaction

logger = logging.getLogger(__name__)

OUTCOMES_TABLE = "clinical_outcomes"
REJECTS_TABLE = "outcome_rejects"
FILES_TABLE = "outcome_files"
PATIENT_VIEW = "patient_outcomes"


@dataclass(frozen=True)
class OutcomeLoadResult:
    """One load: files found / loaded / skipped (unchanged SHA-256) / failed, rows by fate, rejects by reason."""

    files: int
    files_loaded: int
    files_skipped: int
    files_failed: int
    rows_read: int
    inserted: int
    updated: int
    unchanged: int
    deleted: int
    rejected: int
    rejects_by_reason: dict[str, int]
    elapsed_s: float


@dataclass(frozen=True)
class ClusterResult:
    """Clusters of the lesion vectors: k, sizes, silhouettes, profile rows, the projection plot."""

    k: int
    method: str
    sizes: list[int]
    silhouette_by_k: dict[int, float | None]
    lesions: int
    feature_set_version: str
    profile: list[dict[str, Any]]
    png: Path | None
    note: str | None
    elapsed_s: float


@dataclass(frozen=True)
class SurvivalResult:
    """Survival per cluster: KM summaries, log-rank, Cox rows, notes, patients, the KM plot."""

    per_cluster: list[dict[str, Any]]
    logrank: dict[str, Any] | None
    cox: list[dict[str, Any]]
    notes: list[str]
    n_patients: int
    patients_without_outcomes: int
    png: Path | None
    elapsed_s: float


@dataclass(frozen=True)
class OutcomeTableReport:
    """What ``clinical_outcomes`` shows: patients, and patients/events by stage."""

    patients: int
    by_stage: list[dict[str, Any]]


@dataclass(frozen=True)
class CoverageReport:
    """Clustered patients with and without outcomes, and outcome rejects (``outcomes_coverage`` check)."""

    clustered_patients: int
    patients_with_outcomes: int
    outcome_rejects: int


# ----------------------------------------------------------------------------------------------- loading
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _apply_file(con: duckdb.DuckDBPyConnection, source: str, file_row: dict[str, Any],
                rows: list[dict[str, Any]] | None, rejects: list[dict[str, Any]],
                now: datetime) -> dict[str, int]:
    """Write one file's outcome in one transaction; ``rows`` None means the file failed to parse."""
    counts = {"inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0}
    with transaction(con):
        if rows is not None:
            stored = con.execute(
                f"SELECT patient_key, time_months, event, age, sex, stage FROM {OUTCOMES_TABLE} "
                "WHERE source_file = ?", [source]).fetchall()
            existing = {t[0]: dict(zip(VALUE_FIELDS, t[1:])) for t in stored}
            new_keys = {r["patient_key"] for r in rows}
            changed: list[dict[str, Any]] = []
            for r in rows:
                old = existing.get(r["patient_key"])
                if old is None:
                    counts["inserted"] += 1
                    changed.append(r)
                elif any(old[f] != r[f] for f in VALUE_FIELDS):
                    counts["updated"] += 1
                    changed.append(r)
                else:
                    counts["unchanged"] += 1
            gone = [k for k in existing if k not in new_keys]
            counts["deleted"] = len(gone)
            drop = gone + [r["patient_key"] for r in changed if r["patient_key"] in existing]
            if drop:
                con.register("_drop", pa.table({"patient_key": pa.array(drop, pa.string())}))
                con.execute(f"DELETE FROM {OUTCOMES_TABLE} WHERE source_file = ? AND patient_key IN "
                            "(SELECT patient_key FROM _drop)", [source])
                con.unregister("_drop")
            if changed:
                for r in changed:
                    r["source_file"] = source
                    r["loaded_at"] = now
                insert_rows(con, OUTCOMES_TABLE, changed)
        con.execute(f"DELETE FROM {REJECTS_TABLE} WHERE source_file = ?", [source])
        insert_rows(con, REJECTS_TABLE, rejects)
        con.execute(f"DELETE FROM {FILES_TABLE} WHERE source_file = ?", [source])
        insert_rows(con, FILES_TABLE, [file_row])
    return counts


def load_outcomes(
    wh: Warehouse,
    folder_or_files: str | Path | Sequence[str | Path],
    secret: str | None = None,
) -> OutcomeLoadResult:
    """Load outcome files into ``clinical_outcomes`` incrementally (see the module docstring for rules).

    Parameters
    ----------
    folder_or_files
        A folder (searched recursively for ``.csv``, ``.tsv``, ``.parquet``, ``.pq``), one file, or a list
        of files/folders.
    secret
        Pseudonymisation secret passed to :func:`imaging_assets.dicom.pseudonym.patient_key` (default: the
        environment / development key, exactly as discovery).
    """
    t0 = time.perf_counter()
    files = outcome_files(folder_or_files)
    summary: dict[str, Any] = {
        "files": len(files), "files_loaded": 0, "files_skipped": 0, "files_failed": 0, "rows_read": 0,
        "inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0, "rejected": 0,
    }
    by_reason: Counter[str] = Counter()
    with wh.connect() as con:
        ensure_schema(con)
        known = {r[0]: r[1] for r in con.execute(f"SELECT source_file, sha256 FROM {FILES_TABLE}").fetchall()}
        seen = set()
        for path in files:
            source = str(path)
            seen.add(source)
            stat = path.stat()
            sha = _sha256(path)
            if known.get(source) == sha:
                summary["files_skipped"] += 1
                logger.debug("%s: unchanged (sha256 %s), skipped", source, sha[:12])
                continue
            now = _now()
            file_row = {"source_file": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": sha, "loaded_at": now}
            try:
                raw_rows = read_outcome_table(path)
            except OutcomeFileError as exc:
                reason = f"file {path.name} unreadable: {exc}"
                logger.warning("%s: %s; previously stored rows kept", source, exc)
                file_row.update(status="failed", n_rows=0, n_rejected=1)
                _apply_file(con, source, file_row, None,
                            [{"source_file": source, "row_number": None, "reason": reason, "loaded_at": now}],
                            now)
                summary["files_failed"] += 1
                summary["rejected"] += 1
                by_reason["file unreadable"] += 1
                continue
            good: list[dict[str, Any]] = []
            rejects: list[dict[str, Any]] = []
            first_row: dict[str, int] = {}
            ids = {t for t in (patient_id_text(r.get("patient_id")) for r in raw_rows) if t}
            for i, raw in enumerate(raw_rows, start=1):
                values, problems = validate_row(raw, ids)
                pid = values.pop("patient_id")
                key = patient_key(pid, secret) if pid is not None else None
                if key is not None:
                    if key in first_row:
                        problems.append(("duplicate patient id in file",
                                         f"same patient as data row {first_row[key]}"))
                    else:
                        first_row[key] = i
                if problems:
                    by_reason.update(code for code, _ in problems)
                    rejects.append({"source_file": source, "row_number": i, "loaded_at": now,
                                    "reason": "; ".join(f"{c}: {d}" for c, d in problems)})
                    continue
                good.append({"patient_key": key, **values})
            file_row.update(status="loaded", n_rows=len(raw_rows), n_rejected=len(rejects))
            counts = _apply_file(con, source, file_row, good, rejects, now)
            for k, v in counts.items():
                summary[k] += v
            summary["files_loaded"] += 1
            summary["rows_read"] += len(raw_rows)
            summary["rejected"] += len(rejects)
            logger.info("%s: %d rows read, %d inserted, %d updated, %d unchanged, %d deleted, %d rejected",
                        source, len(raw_rows), counts["inserted"], counts["updated"], counts["unchanged"],
                        counts["deleted"], len(rejects))
        vanished = sorted(set(known) - seen)
        if vanished and isinstance(folder_or_files, (str, Path)) and Path(folder_or_files).is_dir():
            logger.info("%d previously loaded outcome file(s) are no longer in %s; their rows are kept",
                        len(vanished), folder_or_files)
    return OutcomeLoadResult(**summary, rejects_by_reason=dict(sorted(by_reason.items())),
                             elapsed_s=round(time.perf_counter() - t0, 3))


def outcomes_state(wh: Warehouse, read_only: bool = True) -> dict[str, Any]:
    """A small fingerprint of the outcome tables for a sensor cursor.

    Returns
    -------
    dict
        ``rows`` (in ``clinical_outcomes``), ``latest_load`` (ISO time of the newest file load or row
        change, None when empty), ``files`` (files seen), ``checksum`` (an order-independent hash of the
        stored rows, so a deletion that keeps the count also changes the state). A missing database or
        missing tables give zeros.
    """
    empty = {"rows": 0, "latest_load": None, "files": 0, "checksum": "0"}
    if not wh.duckdb_path.exists():
        return empty
    with wh.connect(read_only=read_only) as con:
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if OUTCOMES_TABLE not in tables or FILES_TABLE not in tables:
            return empty
        row = fetch_dicts(con, (
            f"SELECT (SELECT count(*) FROM {OUTCOMES_TABLE}) AS rows, "
            f"(SELECT count(*) FROM {FILES_TABLE}) AS files, "
            f"greatest((SELECT max(loaded_at) FROM {OUTCOMES_TABLE}), "
            f"(SELECT max(loaded_at) FROM {FILES_TABLE})) AS latest_load, "
            f"(SELECT coalesce(bit_xor(hash(patient_key, source_file, time_months, event, age, sex, stage)), 0) "
            f"FROM {OUTCOMES_TABLE}) AS checksum"))[0]
    return {"rows": int(row["rows"]), "latest_load": row["latest_load"], "files": int(row["files"]),
            "checksum": str(row["checksum"])}


def read_patient_outcomes(wh: Warehouse) -> list[dict[str, Any]]:
    """One outcome row per patient key (the ``patient_outcomes`` view), ordered by key; [] when absent."""
    if not wh.duckdb_path.exists():
        return []
    with wh.connect(read_only=True) as con:
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
        if PATIENT_VIEW not in tables:
            return []
        return fetch_dicts(con, f"SELECT * FROM {PATIENT_VIEW} ORDER BY patient_key")


# ---------------------------------------------------------------------------------------------- clusters
def build_clusters(
    wh: Warehouse, k: int | None = None, k_range: tuple[int, int] = (2, 8),
    method: str = "kmeans", seed: int = 0, png_path: Path | None = None,
) -> ClusterResult:
    """Cluster the lesion vectors; store labels and per-cluster profiles; draw the 2-D projection."""
    from imaging_assets.analysis.clustering import cluster_profile, cluster_vectors, projection_png
    from imaging_assets.stages.vectors import load_scaler, vectors_frame

    t0 = time.perf_counter()
    tbl, vectors = vectors_frame(wh.lance_uri)
    if tbl is None or len(tbl) < 3:
        raise RuntimeError(f"lesion_vectors at {wh.lance_uri} holds {0 if tbl is None else len(tbl)} rows; "
                           "clustering needs at least 3")
    ids = tbl.column("lesion_id").to_pylist()
    versions = sorted(set(tbl.column("feature_set_version").to_pylist()))
    result = cluster_vectors(vectors.astype(float), k=k, k_range=k_range, method=method, seed=seed)
    with wh.connect() as con:
        scaler = load_scaler(con, versions[-1])
    names = scaler.feature_names if scaler is not None else [f"f{i}" for i in range(vectors.shape[1])]
    profile = cluster_profile(vectors.astype(float), list(names), result.labels)
    clusters = pd.DataFrame({
        "lesion_id": ids, "patient_key": tbl.column("patient_key").to_pylist(),
        "cluster": result.labels.astype(int), "feature_set_version": tbl.column("feature_set_version").to_pylist(),
        "k": int(result.k), "method": result.method,
    })
    clusters["computed_at"] = pd.Timestamp.now(tz="UTC").tz_localize(None)
    with wh.connect() as con:
        with transaction(con):
            replace_frame(con, "phenotype_clusters", clusters)
            replace_frame(con, "cluster_profiles", profile)
    # the Lance table's `cluster` column too, so `similar --filter cluster=...` works at once
    from imaging_assets.store.lance import update_clusters

    update_clusters(wh.lance_uri, dict(zip(ids, (int(c) for c in result.labels))))
    png = None
    if png_path is not None:
        png = projection_png(vectors.astype(float), result.labels, Path(png_path),
                             f"Lesion phenotypes (k={result.k}, {len(ids)} lesions)")
    return ClusterResult(
        k=int(result.k), method=result.method, sizes=list(result.sizes),
        silhouette_by_k={int(a): (None if b is None else float(b)) for a, b in result.silhouette_by_k.items()},
        lesions=len(ids), feature_set_version=versions[-1], profile=profile, png=png,
        note=getattr(result, "note", None), elapsed_s=round(time.perf_counter() - t0, 3),
    )


def analyse_cluster_outcomes(
    wh: Warehouse, covariates: Sequence[str] = ("age", "stage"), png_path: Path | None = None,
) -> SurvivalResult:
    """Kaplan-Meier, log-rank and Cox PH of cluster membership; results into DuckDB tables."""
    from imaging_assets.analysis.survival import analyse_survival, one_row_per_patient

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_schema(con)
        lesions = con.execute(
            "SELECT c.lesion_id, c.patient_key, c.cluster, l.volume_mm3 FROM phenotype_clusters c "
            "JOIN lesions l USING (lesion_id)").fetchdf()
        outcomes = con.execute("SELECT * FROM patient_outcomes").fetchdf()
    per_patient = one_row_per_patient(lesions, rule="largest")
    patients = per_patient.merge(outcomes, on="patient_key", how="inner")
    result = analyse_survival(patients, covariates=list(covariates), png_path=png_path)
    rows = result.as_rows()
    with wh.connect() as con:
        with transaction(con):
            replace_frame(con, "cluster_survival", rows["cluster_survival"])
            replace_frame(con, "cluster_cox", rows["cluster_cox"])
            replace_frame(con, "cluster_logrank", rows["cluster_logrank"])
            replace_frame(con, "cluster_patients", patients)
    return SurvivalResult(
        per_cluster=result.per_cluster, logrank=result.logrank, cox=result.cox,
        notes=list(getattr(result, "notes", []) or []) + ([result.cox_note] if result.cox_note else []),
        n_patients=result.n_patients, patients_without_outcomes=int(len(per_patient) - len(patients)),
        png=result.km_png, elapsed_s=round(time.perf_counter() - t0, 3),
    )


def outcome_table_report(wh: Warehouse) -> OutcomeTableReport:
    """Patients with outcomes, and patients/events by stage."""
    with wh.connect(read_only=True) as con:
        n = con.execute("SELECT count(*) FROM patient_outcomes").fetchone()[0]
        stages = con.execute("SELECT stage, count(*) AS patients, sum(event) AS events FROM patient_outcomes "
                             "GROUP BY 1 ORDER BY 1").fetchdf().to_dict("records")
    return OutcomeTableReport(int(n), stages)


def coverage_report(wh: Warehouse) -> CoverageReport:
    """Clustered patients, those with an outcome row, and outcome rejects."""
    with wh.connect(read_only=True) as con:
        total = con.execute("SELECT count(DISTINCT patient_key) FROM phenotype_clusters").fetchone()[0]
        covered = con.execute("SELECT count(*) FROM cluster_patients").fetchone()[0]
        rejects = con.execute("SELECT count(*) FROM outcome_rejects").fetchone()[0]
    return CoverageReport(int(total), int(covered), int(rejects))


def outcome_folder_digest(source: str | Path) -> str:
    """sha1 over path, size and mtime of the outcome files under ``source`` (no file is opened); the digest
    of an empty list when the source does not exist."""
    h = hashlib.sha1()
    try:
        files = outcome_files(source)
    except (FileNotFoundError, ValueError):
        files = []
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
