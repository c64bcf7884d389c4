"""Batches of series: the partitions of the extraction, their input files and their result files.

The extraction is the stage that grows with the archive (0.15-0.9 s per lesion per core), so it is split
into **batches of image series** that any process on any machine can extract:

* ``lesions`` assigns every series that has an extractable lesion to a batch (:func:`assign_batches`),
  once: a batch's membership never changes, new series go into new batches. It writes each batch's
  inputs (its lesion, series and segmentation rows and the lesion options) to
  ``<warehouse>/partitions/radiomics/<batch>/_inputs.json``.
* A batch is extracted from that file alone (:func:`extract_batch`: no DuckDB, so Celery workers or
  Kubernetes pods can run batches side by side) into Parquet files committed by a manifest
  (:class:`~imaging_assets.store.partfiles.PartitionFiles`): re-running a batch replaces exactly its
  files; a killed run leaves the previous version. Lesions whose provenance is current are carried over
  from the batch's previous version, not extracted again.
* ``radiomics_features`` is the one DuckDB writer: it extracts here whatever batch is not current (a
  single-machine run needs nothing else) and loads each batch whose files changed into the feature tables
  in one transaction per batch (:func:`load_batch`).

No Dagster here: the Dagster layer registers the batch ids as dynamic partitions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.store.partfiles import PartitionFiles, PartitionVersion
from imaging_assets.store.schema import TABLES, arrow_table, ensure_schema
from imaging_assets.store.warehouse import Warehouse, fetch_dicts, insert_rows, transaction

logger = logging.getLogger(__name__)

#: Series per batch unless configured (``IMAGING_ASSETS_SERIES_PER_BATCH`` or the ``lesions`` config).
#: Measured on this project's presets (ct: 0.15-0.9 s per lesion on one core, 1-3 lesions per series, see
#: benchmarks/scale.py): 32 series are about a minute of one core's work, long enough that Dagster's
#: per-run cost (~5 s to start a run, ~1 s per step) stays a small share, short enough that a failed or
#: killed batch loses little and a backfill spreads evenly over many workers.
DEFAULT_SERIES_PER_BATCH = 32
TABLE_NAMES = ("features", "provenance", "errors")
_STORE_TABLES = {"features": "radiomics_features", "provenance": "radiomics_provenance",
                 "errors": "radiomics_errors"}
Progress = Callable[[int, int], None]


def series_per_batch(configured: int | None = None) -> int:
    """The batch size: ``configured``, else ``IMAGING_ASSETS_SERIES_PER_BATCH``, else the default."""
    from imaging_assets import settings

    value = int(configured) if configured else (settings.series_per_batch() or DEFAULT_SERIES_PER_BATCH)
    if value < 1:
        raise ValueError(f"series per batch must be at least 1, got {value}")
    return value


def batch_files(wh: Warehouse) -> PartitionFiles:
    """The extraction's partition folders: ``<warehouse>/partitions/radiomics``."""
    return PartitionFiles(wh.objects, "partitions/radiomics")


@dataclass(frozen=True)
class BatchAssignment:
    """Every batch id (sorted), those made by this call, and the batches whose inputs changed."""

    batches: tuple[str, ...]
    new: tuple[str, ...]
    changed: tuple[str, ...]
    series_per_batch: int


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def assign_batches(con: duckdb.DuckDBPyConnection, files: PartitionFiles, options: Mapping[str, Any],
                   size: int | None = None) -> BatchAssignment:
    """Put every series with an extractable lesion that has no batch into new batches of ``size`` series
    (in series-key order), and (re)write the inputs of every batch whose rows changed.

    Called by the ``lesions`` step, inside the DuckDB writer, after the lesion rows are written.
    """
    size = series_per_batch(size)
    ensure_schema(con)
    wanted = [r[0] for r in con.execute(
        "SELECT DISTINCT series_key FROM lesions WHERE extractable ORDER BY 1").fetchall()]
    assigned = dict(con.execute("SELECT series_key, batch_id FROM series_batches").fetchall())
    fresh = [s for s in wanted if s not in assigned]
    numbers = [int(b.rsplit("-", 1)[1]) for b in set(assigned.values()) if b.rsplit("-", 1)[-1].isdigit()]
    start = max(numbers, default=0) + 1
    new_rows = [{"series_key": s, "batch_id": f"batch-{start + i // size:05d}"} for i, s in enumerate(fresh)]
    if new_rows:
        with transaction(con):
            insert_rows(con, "series_batches", new_rows, {"created_at": "(now() AT TIME ZONE 'UTC')"})
    batches = sorted({*assigned.values(), *(r["batch_id"] for r in new_rows)})
    changed = []
    for batch in batches:
        lesions = fetch_dicts(con, "SELECT l.* FROM lesions l JOIN series_batches b USING (series_key) "
                                   "WHERE b.batch_id = ? AND l.extractable ORDER BY l.series_key, l.lesion_id",
                              [batch])
        series = fetch_dicts(con, "SELECT s.* FROM imaging_series s JOIN series_batches b USING (series_key) "
                                  "WHERE b.batch_id = ? ORDER BY s.series_key", [batch])
        segs = fetch_dicts(con, "SELECT DISTINCT g.* FROM segmentations g JOIN lesions l USING (seg_key) "
                                "JOIN series_batches b ON b.series_key = l.series_key "
                                "WHERE b.batch_id = ? AND l.extractable ORDER BY g.seg_key", [batch])
        body = {"batch": batch, "options": dict(options), "lesions": lesions, "series": series,
                "segmentations": segs}
        if files.write_inputs(batch, {**body, "digest": _digest(body)}):
            changed.append(batch)
    return BatchAssignment(tuple(batches), tuple(sorted({r["batch_id"] for r in new_rows})), tuple(changed), size)


# ------------------------------------------------------------------------------------------ one batch
@dataclass
class BatchPlan:
    """What one batch needs: its jobs, the lesions to extract, the rows carried over unchanged."""

    batch: str
    inputs_digest: str
    state: str
    jobs: list[Any]
    todo: list[Any]
    fingerprints: dict[str, str]
    spaces: dict[str, str]
    settings: dict[str, Any]
    #: previous rows per lesion, by table ("features" / "provenance" / "errors")
    prior: dict[str, dict[str, list[dict[str, Any]]]]
    skipped_current: int = 0
    skipped_failed: int = 0
    outcomes: list[Any] = field(default_factory=list)

    @property
    def lesion_ids(self) -> list[str]:
        """The batch's extractable lesions."""
        return [job.lesion_id for job, _ in self.jobs]


def _rows_by_lesion(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table.to_pylist():
        out[row["lesion_id"]].append(row)
    return dict(out)


def prior_from_version(version: PartitionVersion | None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The rows of a batch's committed version, per table and lesion (empty when there is none)."""
    if version is None:
        return {name: {} for name in TABLE_NAMES}
    return {name: _rows_by_lesion(version.read(name)) for name in TABLE_NAMES}


def prior_from_store(con: duckdb.DuckDBPyConnection, lesion_ids: Sequence[str]) -> dict[str, dict[str, list]]:
    """The stored feature rows of some lesions (a warehouse made before batches existed: its features are
    carried into the batch files instead of being extracted again)."""
    out: dict[str, dict[str, list]] = {}
    con.register("_ids", pa.table({"lesion_id": pa.array(list(lesion_ids), pa.string())}))
    try:
        for name, table in _STORE_TABLES.items():
            cols = ", ".join(f'"{c}"' for c in TABLES[table].all_columns)
            rows = con.sql(f"SELECT {cols} FROM {table} WHERE lesion_id IN (SELECT lesion_id FROM _ids)"
                           ).to_arrow_table()
            out[name] = _rows_by_lesion(rows)
    finally:
        con.unregister("_ids")
    return out


def plan_batch(files: PartitionFiles, batch: str, params_override: str | Path | None = None,
               retry_failed: bool = False,
               prior: Mapping[str, Mapping[str, list[dict[str, Any]]]] | None = None) -> BatchPlan:
    """Read a batch's inputs, resolve the extraction settings (a bad parameter file raises here, naming
    the file and the key) and split its lesions into current ones (carried over) and ones to extract.

    ``prior`` defaults to the batch's committed version.
    """
    from imaging_assets.features.pipeline import LesionOptions, extraction_jobs

    inputs = files.read_inputs(batch)
    opts = inputs.get("options") or {}
    options = LesionOptions(bool(opts.get("split_components", False)), float(opts.get("fractional_threshold", 0.5)),
                            tuple(tuple(m) for m in opts["roi_mapping"]) if opts.get("roi_mapping") else None)
    jobs = extraction_jobs(inputs["lesions"], inputs["series"], inputs["segmentations"], params_override, options)
    fingerprints = {r["lesion_id"]: r["source_fingerprint"] for r in inputs["lesions"]}
    if prior is None:
        prior = prior_from_version(files.current(batch))
    plan = BatchPlan(batch=batch, inputs_digest=inputs["digest"], state="", jobs=jobs, todo=[],
                     fingerprints=fingerprints, spaces={job.lesion_id: s.space for job, s in jobs},
                     settings={s.space: s for _, s in jobs},
                     prior={name: dict(prior.get(name, {})) for name in TABLE_NAMES})
    for job, settings in jobs:
        state = (settings.params_hash, fingerprints[job.lesion_id])
        prov = plan.prior["provenance"].get(job.lesion_id)
        err = plan.prior["errors"].get(job.lesion_id)
        if prov and (prov[0]["params_hash"], prov[0]["source_fingerprint"]) == state:
            plan.skipped_current += 1
        elif err and (err[0]["params_hash"], err[0]["source_fingerprint"]) == state and not retry_failed:
            plan.skipped_failed += 1
        else:
            plan.todo.append(job)
    plan.state = _digest([plan.inputs_digest, sorted((job.lesion_id, s.params_hash) for job, s in jobs)])
    return plan


def is_current(files: PartitionFiles, plan: BatchPlan) -> bool:
    """True when the batch's committed version already holds exactly what the plan would write."""
    version = files.current(plan.batch)
    return not plan.todo and version is not None and version.meta.get("state") == plan.state


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def commit_batch(files: PartitionFiles, plan: BatchPlan, worker: Mapping[str, Any] | None = None) -> PartitionVersion:
    """Write the batch's new version: carried rows for current lesions, the plan's outcomes for the rest.

    A success replaces the lesion's features, provenance and error; a failure records the error and keeps
    the lesion's last good features and provenance (a failed re-extraction never removes features).
    """
    from imaging_assets.stages.radiomics import feature_rows

    now = _now()
    fresh = {o.lesion_id: o for o in plan.outcomes}
    feats: list[dict[str, Any]] = []
    prov: list[dict[str, Any]] = []
    errs: list[dict[str, Any]] = []
    for lid in plan.lesion_ids:
        o = fresh.get(lid)
        fp, space = plan.fingerprints[lid], plan.spaces.get(lid)
        if o is None:  # current: carried over as it was
            feats += plan.prior["features"].get(lid, [])
            prov += plan.prior["provenance"].get(lid, [])
            errs += plan.prior["errors"].get(lid, [])
        elif o.ok:
            feats += feature_rows(lid, o.features)
            prov.append({
                "lesion_id": lid, "pyradiomics_version": o.pyradiomics_version, "params_hash": o.params_hash,
                "image_hash": o.image_hash, "mask_hash": o.mask_hash, "source_fingerprint": fp,
                "crop_index": list(o.crop_index or []) or None, "crop_size": list(o.crop_size or []) or None,
                "n_features": len(o.features), "elapsed_s": float(o.elapsed_s), "space": space,
                "missing_image_types": None, "created_at": now,
            })
        else:
            feats += plan.prior["features"].get(lid, [])
            prov += plan.prior["provenance"].get(lid, [])
            errs.append({"lesion_id": lid, "params_hash": o.params_hash, "source_fingerprint": fp,
                         "message": o.error, "space": space, "created_at": now})
    tables = {name: arrow_table(rows, TABLES[_STORE_TABLES[name]].all_columns)
              for name, rows in (("features", feats), ("provenance", prov), ("errors", errs))}
    meta = {"state": plan.state, "inputs_digest": plan.inputs_digest, "lesions": len(plan.lesion_ids),
            "extracted": sum(1 for o in plan.outcomes if o.ok), "failed": sum(1 for o in plan.outcomes if not o.ok),
            "committed_at": now.isoformat(), **({"worker": dict(worker)} if worker else {})}
    return files.commit(plan.batch, tables, meta)


@dataclass(frozen=True)
class BatchResult:
    """One batch extracted (the partitioned asset): counts, errors, whether anything was written."""

    batch: str
    lesions: int
    extracted: int
    failed: int
    skipped_current: int
    skipped_failed: int
    committed: bool
    token: str | None
    errors: list[dict[str, str]]
    elapsed_s: float


def extract_batch(wh: Warehouse, batch: str, params_override: str | Path | None = None,
                  workers: int | None = 1, retry_failed: bool = False, progress: Progress | None = None,
                  worker: Mapping[str, Any] | None = None) -> BatchResult:
    """Extract one batch from its input file into its result files; never opens the DuckDB file.

    ``workers`` defaults to 1 (in this process, with one SimpleITK thread): on a cluster each worker
    process runs one batch per core.
    """
    import time

    from imaging_assets.features.extract import extract_many

    t0 = time.perf_counter()
    files = batch_files(wh)
    plan = plan_batch(files, batch, params_override, retry_failed)
    if is_current(files, plan):
        version = files.current(batch)
        return BatchResult(batch, len(plan.jobs), 0, 0, plan.skipped_current, plan.skipped_failed, False,
                           version.token if version else None, [], round(time.perf_counter() - t0, 3))
    plan.outcomes = list(extract_many(plan.todo, workers=workers, progress=progress,
                                      itk_threads=1 if workers == 1 else None))
    version = commit_batch(files, plan, worker)
    errors = [{"lesion_id": o.lesion_id, "message": o.error} for o in plan.outcomes if not o.ok]
    return BatchResult(batch, len(plan.jobs), len(plan.outcomes) - len(errors), len(errors), plan.skipped_current,
                       plan.skipped_failed, True, version.token, errors, round(time.perf_counter() - t0, 3))


def extract_plans(files: PartitionFiles, plans: Sequence[BatchPlan], workers: int | None = None,
                  progress: Progress | None = None) -> Iterable[tuple[BatchPlan, PartitionVersion]]:
    """Extract the lesions of many batches in one process pool and commit each batch as soon as its last
    lesion is done; yields (plan, committed version) in commit order."""
    from imaging_assets.features.extract import extract_many

    owner = {job.lesion_id: plan for plan in plans for job in plan.todo}
    left = {plan.batch: len(plan.todo) for plan in plans}
    for plan in plans:  # nothing to extract, but the version differs: commit from the carried rows
        if not plan.todo:
            yield plan, commit_batch(files, plan)
    for outcome in extract_many([job for plan in plans for job in plan.todo], workers=workers, progress=progress):
        plan = owner[outcome.lesion_id]
        plan.outcomes.append(outcome)
        left[plan.batch] -= 1
        if left[plan.batch] == 0:
            yield plan, commit_batch(files, plan)


# --------------------------------------------------------------------------------------- the one writer
def loaded_tokens(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """batch id -> the token of its version loaded into the feature tables."""
    return dict(con.execute("SELECT batch_id, token FROM batch_loads").fetchall())


def load_batch(con: duckdb.DuckDBPyConnection, version: PartitionVersion) -> int:
    """Swap one batch's committed files into ``radiomics_features`` / ``_provenance`` / ``_errors`` in one
    transaction: the rows of the batch's lesions (those loaded before and those in the files) are replaced
    by the files' rows of lesions that are still extractable. Returns the lesions with features loaded."""
    tables = {name: version.read(name) for name in TABLE_NAMES}
    ids = set()
    for t in tables.values():
        ids.update(t["lesion_id"].to_pylist())
    for (before,) in con.execute("SELECT lesion_ids FROM batch_loads WHERE batch_id = ?", [version.key]).fetchall():
        ids.update(before or [])
    con.register("_ids", pa.table({"lesion_id": pa.array(sorted(ids), pa.string())}))
    try:
        with transaction(con):
            for name, store in _STORE_TABLES.items():
                con.execute(f"DELETE FROM {store} WHERE lesion_id IN (SELECT lesion_id FROM _ids)")
                cols = ", ".join(f'"{c}"' for c in TABLES[store].all_columns)
                con.register("_rows", tables[name])
                try:
                    con.execute(f"INSERT INTO {store} ({cols}) SELECT {cols} FROM _rows "
                                "WHERE lesion_id IN (SELECT lesion_id FROM lesions WHERE extractable)")
                finally:
                    con.unregister("_rows")
            con.execute("DELETE FROM batch_loads WHERE batch_id = ?", [version.key])
            con.execute("INSERT INTO batch_loads (batch_id, token, lesion_ids, loaded_at) "
                        "VALUES (?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                        [version.key, version.token, sorted(set(tables["provenance"]["lesion_id"].to_pylist())
                                                            | set(tables["errors"]["lesion_id"].to_pylist()))])
    finally:
        con.unregister("_ids")
    return tables["provenance"].num_rows


def batch_status(wh: Warehouse) -> list[dict[str, Any]]:
    """Per batch: series, lesions, committed token, loaded token and the worker that wrote it (the
    partitioned asset's metadata and `imaging-assets backfill`)."""
    files = batch_files(wh)
    with wh.connect(read_only=True) as con:
        series = dict(con.execute("SELECT batch_id, count(*) FROM series_batches GROUP BY 1").fetchall())
        loaded = loaded_tokens(con)
    out = []
    for batch in sorted(series):
        version = files.current(batch)
        out.append({"batch": batch, "series": int(series[batch]),
                    "lesions": (version.meta.get("lesions") if version else None),
                    "committed": version.token if version else None, "loaded": loaded.get(batch),
                    "worker": (version.meta.get("worker") or {}).get("host") if version else None})
    return out
