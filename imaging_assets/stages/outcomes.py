"""Outcomes: loading outcome files into DuckDB, phenotype clusters of the lesion vectors, and survival per
cluster -- the steps behind ``clinical_outcomes``, ``phenotype_clusters`` and ``cluster_outcomes``.

How an outcome file is read (columns, aliases, value rules) is pure code in
:mod:`imaging_assets.analysis.outcomes`; this module writes what it reads:

``clinical_outcomes`` (primary key ``patient_key, source_file``)
    One row per patient and file. The raw patient id is replaced by
    :func:`imaging_assets.dicom.pseudonym.patient_key` (the same keyed HMAC discovery uses), so outcomes
    join to ``lesions``/``imaging_series`` on ``patient_key``. ``loaded_at`` (UTC) is when that row's
    values were last inserted or changed; an unchanged row keeps its time.
    ``time_from`` says whether the time was given (``'time_months'``) or computed from dates
    (``'dates'``; the dates themselves are not stored).
``outcome_rejects`` (``source_file, row_number, field, problem, reason, row_kept, loaded_at``)
    One row per problem found: the field, the kind of problem (``problem``, e.g. ``"age not numeric"``),
    ``reason`` (the problem with a detail that never quotes the value) and ``row_kept``: True when only
    that field was set to NULL and the row loaded (an optional field: age, sex, stage, a date the time
    did not need), False when the row was dropped (patient id, time or event invalid). ``row_number`` is
    the 1-based data row (the CSV line number minus one; the header is not counted). A file that cannot
    be read at all gets one row with ``row_number`` NULL. The table reflects the latest attempt at each
    file: a reload of a file replaces that file's rejects. Never holds the raw patient id or a value.
``outcome_files`` (``source_file, size, mtime_ns, sha256, loaded_at, status, n_rows, n_rejected,
n_fields_rejected, gone_at``)
    One row per file ever seen; ``status`` is ``'loaded'``, ``'failed'`` or ``'gone'`` (no longer under
    the configured source: its rows and rejects were removed at ``gone_at``; the row stays as history).
    A file whose SHA-256 is unchanged is skipped entirely, so loading the same file twice adds nothing; a
    gone file that comes back is loaded again.

The view ``patient_outcomes`` keeps one row per ``patient_key`` across files (the most recently loaded row;
ties: the greatest ``source_file``), which is what the survival analysis joins to.

A file that changed is applied in one transaction: new rows inserted, changed rows updated, rows whose
patient disappeared from that file deleted, its rejects replaced. A file that cannot be parsed (not
text, no header, required columns absent) leaves everything already stored from it in place and records
one reject naming the problem. A file loaded before that is no longer found under the configured source
(deleted, moved, or the configured path changed or does not exist) has its rows removed from
``clinical_outcomes`` (so from ``patient_outcomes``) and is marked ``'gone'``. A configured path that does
not exist is not an error: the load reports it (``OutcomeLoadResult.source_problem``, the
``outcomes_source_present`` check) and the outcome table is what the existing files give, possibly empty.

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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from imaging_assets.analysis.outcomes import (
    VALUE_FIELDS,
    OutcomeFileError,
    Problem,
    find_outcome_files,
    read_outcome_file,
    validate_row,
)
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.stages.keys import check_key
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, fetch_dicts, insert_rows, replace_frame, transaction

logger = logging.getLogger(__name__)

OUTCOMES_TABLE = "clinical_outcomes"
REJECTS_TABLE = "outcome_rejects"
FILES_TABLE = "outcome_files"
PATIENT_VIEW = "patient_outcomes"


@dataclass(frozen=True)
class OutcomeLoadResult:
    """One load: files found / loaded / skipped (unchanged SHA-256) / failed / gone, rows by fate, rejects
    by reason. ``rejected`` counts dropped rows, ``fields_rejected`` the fields set to NULL in kept rows;
    ``source_problem`` says why the configured source is not usable (None when it is)."""

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
    fields_rejected: int = 0
    files_gone: int = 0
    rows_removed: int = 0
    sources: list[str] = field(default_factory=list)
    sources_missing: list[str] = field(default_factory=list)
    source_problem: str | None = None

    @property
    def source_present(self) -> bool:
        """True when every configured path exists and holds at least one outcome file."""
        return self.source_problem is None


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
    #: per feature space: space, lesions, k, sizes, first_cluster (ids are unique across spaces), note
    spaces: list[dict[str, Any]] = field(default_factory=list)
    #: per space, why its clusters are no phenotypes (fewer than 2, or one below the minimum cluster size of
    #: analysis.clustering; a space not clustered); [] when every space is fine
    inadequate: list[str] = field(default_factory=list)


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
    #: why the comparison is not to be trusted (see analysis.survival: minimum sizes); [] when it is
    inadequate: list[str] = field(default_factory=list)
    events: int = 0
    compared_clusters: list[int] = field(default_factory=list)
    thresholds: str = ""
    #: per feature space: space, patients, events, logrank_p, adequate (the headline fields above are the
    #: largest space's; every space's rows are in the tables, with their `space`)
    spaces: list[dict[str, Any]] = field(default_factory=list)

    @property
    def adequate(self) -> bool:
        """True when the log-rank test and the Cox model ran on enough patients and events."""
        return not self.inadequate


@dataclass(frozen=True)
class OutcomeTableReport:
    """What ``clinical_outcomes`` shows: patients, and patients/events by stage."""

    patients: int
    by_stage: list[dict[str, Any]]


@dataclass(frozen=True)
class CoverageReport:
    """Clustered patients with and without outcomes, and rejected outcome rows (``outcomes_coverage`` check)."""

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
                f"SELECT patient_key, {', '.join(VALUE_FIELDS)} FROM {OUTCOMES_TABLE} "
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


def _retire_file(con: duckdb.DuckDBPyConnection, source: str, now: datetime) -> int:
    """A file no longer under the configured source: its rows and rejects leave, its record stays 'gone'."""
    with transaction(con):
        n = con.execute(f"SELECT count(*) FROM {OUTCOMES_TABLE} WHERE source_file = ?", [source]).fetchone()[0]
        con.execute(f"DELETE FROM {OUTCOMES_TABLE} WHERE source_file = ?", [source])
        con.execute(f"DELETE FROM {REJECTS_TABLE} WHERE source_file = ?", [source])
        con.execute(f"UPDATE {FILES_TABLE} SET status = 'gone', gone_at = ? WHERE source_file = ?", [now, source])
    return int(n)


def _reject(source: str, row: int | None, p: Problem, kept: bool, now: datetime) -> dict[str, Any]:
    return {"source_file": source, "row_number": row, "field": p.field, "problem": p.code, "reason": p.reason,
            "row_kept": kept, "loaded_at": now}


def load_outcomes(
    wh: Warehouse,
    folder_or_files: str | Path | Sequence[str | Path] | None,
    secret: str | None = None,
) -> OutcomeLoadResult:
    """Load outcome files into ``clinical_outcomes`` incrementally (see the module docstring for rules).

    Parameters
    ----------
    folder_or_files
        A folder (searched recursively for ``.csv``, ``.tsv``, ``.parquet``, ``.pq``), one file, or a list
        of files/folders. A path that does not exist (or None) is reported in the result, not raised: the
        rows of files loaded before and no longer found are removed.
    secret
        Pseudonymisation secret passed to :func:`imaging_assets.dicom.pseudonym.patient_key` (default: the
        configured key, exactly as discovery); checked against the warehouse's key fingerprint
        (:func:`imaging_assets.stages.keys.check_key`).
    """
    t0 = time.perf_counter()
    secret = check_key(wh, secret)  # another key than the warehouse's is refused before anything is written
    sources = find_outcome_files(folder_or_files)
    problem = sources.problem()
    if problem:
        logger.warning("outcomes: %s", problem)
    summary: dict[str, Any] = {
        "files": len(sources.files), "files_loaded": 0, "files_skipped": 0, "files_failed": 0, "rows_read": 0,
        "inserted": 0, "updated": 0, "unchanged": 0, "deleted": 0, "rejected": 0, "fields_rejected": 0,
        "files_gone": 0, "rows_removed": 0,
    }
    by_reason: Counter[str] = Counter()
    with wh.connect() as con:
        ensure_schema(con)
        known = {r[0]: (r[1], r[2]) for r in con.execute(
            f"SELECT source_file, sha256, status FROM {FILES_TABLE}").fetchall()}
        seen = set()
        for path in sources.files:
            source = str(path)
            seen.add(source)
            stat = path.stat()
            sha = _sha256(path)
            if source in known and known[source][0] == sha and known[source][1] != "gone":
                summary["files_skipped"] += 1
                logger.debug("%s: unchanged (sha256 %s), skipped", source, sha[:12])
                continue
            now = _now()
            file_row = {"source_file": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "sha256": sha, "loaded_at": now, "gone_at": None, "n_fields_rejected": 0}
            try:
                table = read_outcome_file(path)
            except OutcomeFileError as exc:
                logger.warning("%s: %s; previously stored rows kept", source, exc)
                file_row.update(status="failed", n_rows=0, n_rejected=1)
                unreadable = Problem("file", "file unreadable", f"file {path.name}: {exc}", fatal=True)
                _apply_file(con, source, file_row, None, [_reject(source, None, unreadable, False, now)], now)
                summary["files_failed"] += 1
                summary["rejected"] += 1
                by_reason["file unreadable"] += 1
                continue
            good: list[dict[str, Any]] = []
            rejects: list[dict[str, Any]] = []
            first_row: dict[str, int] = {}
            dropped = fields = 0
            for i, raw in enumerate(table.rows, start=1):
                values, problems = validate_row(raw, table.date_orders, table.columns)
                pid = values.pop("patient_id")
                key = patient_key(pid, secret) if pid is not None else None
                if key is not None:
                    if key in first_row:
                        problems.append(Problem("patient_id", "patient_id duplicated in file",
                                                f"same patient as data row {first_row[key]}", fatal=True))
                    else:
                        first_row[key] = i
                kept = not any(p.fatal for p in problems)
                by_reason.update(p.code for p in problems)
                rejects.extend(_reject(source, i, p, kept, now) for p in problems)
                if kept:
                    fields += len(problems)
                    good.append({"patient_key": key, **values})
                else:
                    dropped += 1
            file_row.update(status="loaded", n_rows=len(table.rows), n_rejected=dropped, n_fields_rejected=fields)
            counts = _apply_file(con, source, file_row, good, rejects, now)
            for k, v in counts.items():
                summary[k] += v
            summary["files_loaded"] += 1
            summary["rows_read"] += len(table.rows)
            summary["rejected"] += dropped
            summary["fields_rejected"] += fields
            logger.info("%s: %d rows read, %d inserted, %d updated, %d unchanged, %d deleted, %d rejected, "
                        "%d field(s) set to NULL", source, len(table.rows), counts["inserted"], counts["updated"],
                        counts["unchanged"], counts["deleted"], dropped, fields)
        for source in sorted(s for s, (_, status) in known.items() if status != "gone" and s not in seen):
            removed = _retire_file(con, source, _now())
            summary["files_gone"] += 1
            summary["rows_removed"] += removed
            logger.warning("%s is no longer under the configured outcome source(s): its %d row(s) were removed",
                           source, removed)
    return OutcomeLoadResult(**summary, rejects_by_reason=dict(sorted(by_reason.items())),
                             elapsed_s=round(time.perf_counter() - t0, 3), sources=sources.configured,
                             sources_missing=sources.missing, source_problem=problem)


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
            f"(SELECT max(loaded_at) FROM {FILES_TABLE}), (SELECT max(gone_at) FROM {FILES_TABLE})) AS latest_load, "
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
    """Cluster the lesion vectors of each feature space separately (a CT lesion is never clustered with MR
    lesions); store labels and per-cluster profiles; draw the 2-D projection of the largest space.

    Cluster ids are unique across spaces (each space's clusters follow the previous space's), so every
    cluster belongs to one space (``phenotype_clusters.space``). A space with fewer than 3 lesions is not
    clustered (reported in ``spaces``).
    """
    from imaging_assets.analysis.clustering import cluster_profile, cluster_vectors, projection_png
    from imaging_assets.stages.vectors import load_scaler, vectors_frame

    t0 = time.perf_counter()
    tbl, vectors = vectors_frame(wh.lance_uri)
    if tbl is None or len(tbl) < 3:
        raise RuntimeError(f"lesion_vectors at {wh.lance_uri} holds {0 if tbl is None else len(tbl)} rows; "
                           "clustering needs at least 3")
    all_ids = tbl.column("lesion_id").to_pylist()
    all_spaces = tbl.column("space").to_pylist()
    all_versions = tbl.column("feature_set_version").to_pylist()
    patients = tbl.column("patient_key").to_pylist()
    frames, profiles, space_rows, labels_of = [], [], [], {}
    offset = 0
    largest = None
    for space in sorted(set(all_spaces), key=lambda x: (-all_spaces.count(x), str(x))):
        idx = [i for i, sp in enumerate(all_spaces) if sp == space]
        version = all_versions[idx[0]]
        with wh.connect() as con:
            scaler = load_scaler(con, version)
        dim = len(scaler.feature_names) if scaler is not None else vectors.shape[1]
        x = vectors[idx][:, :dim].astype(float)
        if len(idx) < 3:
            space_rows.append({"space": space, "lesions": len(idx), "k": 0, "sizes": [],
                               "note": "fewer than 3 lesions: not clustered"})
            continue
        result = cluster_vectors(x, k=k, k_range=k_range, method=method, seed=seed)
        names = scaler.feature_names if scaler is not None else [f"f{i}" for i in range(dim)]
        labels = np.where(result.labels >= 0, result.labels.astype(int) + offset, -1)  # -1: HDBSCAN noise
        profile = pd.DataFrame(cluster_profile(x, list(names), result.labels))
        if len(profile):
            profile["cluster"] = profile["cluster"].astype(int) + offset  # profiles cover clusters >= 0 only
        profile["space"] = space
        profiles.append(profile)
        frames.append(pd.DataFrame({
            "space": space, "lesion_id": [all_ids[i] for i in idx], "patient_key": [patients[i] for i in idx],
            "cluster": labels, "feature_set_version": version, "k": int(result.k), "method": result.method}))
        labels_of.update(zip((all_ids[i] for i in idx), (int(c) for c in labels)))
        space_rows.append({"space": space, "lesions": len(idx), "k": int(result.k), "sizes": list(result.sizes),
                           "first_cluster": offset, "note": getattr(result, "note", None),
                           "min_size": int(result.min_size), "adequate": bool(result.adequate)})
        if largest is None:
            largest = (space, x, result, version)
        offset += int(result.k)
    if largest is None:
        raise RuntimeError("no feature space holds 3 or more lesions: nothing to cluster")
    clusters = pd.concat(frames, ignore_index=True)
    clusters["computed_at"] = pd.Timestamp.now(tz="UTC").tz_localize(None)
    profile_all = pd.concat(profiles, ignore_index=True) if profiles else pd.DataFrame()
    with wh.transaction() as con:
        replace_frame(con, "phenotype_clusters", clusters)
        replace_frame(con, "cluster_profiles", profile_all)
    # the Lance table's `cluster` column too, so `similar --filter cluster=...` works at once
    from imaging_assets.store.lance import update_clusters

    update_clusters(wh.lance_uri, labels_of)
    space, x, result, version = largest
    png = None
    if png_path is not None:
        png = projection_png(x, result.labels, Path(png_path),
                             f"Lesion phenotypes, {space} (k={result.k}, {len(x)} lesions)")
    return ClusterResult(
        k=int(result.k), method=result.method, sizes=list(result.sizes),
        silhouette_by_k={int(a): (None if b is None else float(b)) for a, b in result.silhouette_by_k.items()},
        lesions=len(clusters), feature_set_version=version, profile=profile_all.to_dict("records"), png=png,
        note=getattr(result, "note", None), elapsed_s=round(time.perf_counter() - t0, 3), spaces=space_rows,
        inadequate=[f"{r['space']}: {r['note'] or 'k=' + str(r['k']) + ', sizes ' + str(r['sizes'])}"
                    for r in space_rows if not r.get("adequate")],
    )


def analyse_cluster_outcomes(
    wh: Warehouse, covariates: Sequence[str] = ("age", "stage"), png_path: Path | None = None,
) -> SurvivalResult:
    """Kaplan-Meier, log-rank and Cox PH of cluster membership; results into DuckDB tables."""
    from imaging_assets.analysis.survival import analyse_survival, minimums, one_row_per_patient

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_schema(con)
        lesions = con.execute(
            "SELECT c.space, c.lesion_id, c.patient_key, c.cluster, l.volume_mm3 FROM phenotype_clusters c "
            "JOIN lesions l USING (lesion_id)").fetchdf()
        outcomes = con.execute("SELECT * FROM patient_outcomes").fetchdf()
    no_outcomes = ("no outcomes: patient_outcomes is empty (no outcome source, or no valid row; see the "
                   "clinical_outcomes asset and its outcomes_source_present check)")
    # one analysis per feature space: clusters of different modalities are different phenotypes, and a
    # patient counts once per space (the cluster of their largest lesion in that space)
    spaces = sorted(lesions["space"].dropna().unique().tolist(), key=lambda sp: (-(lesions["space"] == sp).sum(), sp))
    if not spaces:
        spaces = [None]
    tables: dict[str, list[Any]] = {"cluster_survival": [], "cluster_cox": [], "cluster_logrank": [],
                                    "cluster_patients": []}
    per_space, headline, all_per_patient, all_patients = [], None, 0, 0
    for i, space in enumerate(spaces):
        mine = lesions[lesions["space"] == space] if space is not None else lesions
        per_patient = one_row_per_patient(mine.drop(columns=["space"]), rule="largest")
        patients = per_patient.merge(outcomes, on="patient_key", how="inner")
        png = png_path if i == 0 or png_path is None else Path(png_path).with_name(
            f"{Path(png_path).stem}_{space}{Path(png_path).suffix}")
        result = analyse_survival(patients, covariates=list(covariates), png_path=png)
        if outcomes.empty:  # say it plainly: the analysis is empty because there are no outcomes at all
            result.notes.insert(0, no_outcomes)
            result.inadequate.insert(0, no_outcomes)
        elif len(spaces) > 1:
            result.notes[:] = [f"[{space}] {n}" for n in result.notes]
            result.inadequate[:] = [f"[{space}] {n}" for n in result.inadequate]
        for name, rows in result.as_rows().items():
            tables.setdefault(name, []).extend({**r, "space": space} for r in rows)
        patients = patients.assign(space=space)
        tables["cluster_patients"].extend(patients.to_dict("records"))
        lr = result.logrank or {}
        per_space.append({"space": space, "patients": result.n_patients,
                          "events": int(sum(r["events"] for r in result.per_cluster)),
                          "logrank_p": lr.get("p_value"), "adequate": not result.inadequate})
        all_per_patient += len(per_patient)
        all_patients += len(patients)
        headline = headline or result
    with wh.transaction() as con:
        for name, rows in tables.items():
            replace_frame(con, name, rows)
    result = headline
    others = [n for r in per_space[1:] for n in ([] if r["adequate"] else [f"space {r['space']} inadequate"])]
    return SurvivalResult(
        per_cluster=[r for r in tables["cluster_survival"]], logrank=result.logrank, cox=result.cox,
        notes=list(getattr(result, "notes", []) or []) + ([result.cox_note] if result.cox_note else []),
        n_patients=result.n_patients, patients_without_outcomes=int(all_per_patient - all_patients),
        png=result.km_png, elapsed_s=round(time.perf_counter() - t0, 3),
        inadequate=list(result.inadequate) + others,
        events=int(sum(r["events"] for r in result.per_cluster)), compared_clusters=list(result.compared_clusters),
        thresholds=minimums(), spaces=per_space,
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
        rejects = con.execute(  # dropped rows (and unreadable files), not the fields emptied in kept rows
            "SELECT count(DISTINCT (source_file, coalesce(row_number, -1))) FROM outcome_rejects "
            "WHERE NOT coalesce(row_kept, false)").fetchone()[0]
    return CoverageReport(int(total), int(covered), int(rejects))


def outcome_folder_digest(source: str | Path) -> str:
    """sha1 over path, size and mtime of the outcome files under ``source`` (no file is opened); the digest
    of an empty list when the source does not exist (so a source that disappears changes the digest)."""
    h = hashlib.sha1()
    for f in find_outcome_files(source).files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
