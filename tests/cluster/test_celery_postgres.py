"""The partitioned extraction on Dagster's own engines, with real servers this module starts and stops:
PostgreSQL (run, event-log and schedule storage: dagster-postgres.yaml), Redis (the Celery broker and
result backend), two Celery workers and the Dagster daemon (imaging_assets.localcluster).

A backfill of every batch over the workers gives the same tables as one process; a worker killed in the
middle of a batch fails its run, the instance retries it, and the retried batch leaves no duplicate or
partial row. ``pytest -k celery`` and ``pytest -k postgres`` select these tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from imaging_assets import localcluster
from imaging_assets.stages.batches import batch_files
from imaging_assets.stages.radiomics import extract_features
from imaging_assets.store.warehouse import Warehouse

pytestmark = pytest.mark.slow

KEY = "imaging-assets-demo-key-for-synthetic-data-only"


def _servers_available() -> str | None:
    try:
        localcluster.postgres_bindir()
        localcluster.redis_binary()
    except FileNotFoundError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def cluster(small_cohort, tmp_path_factory):
    """PostgreSQL + Redis + 2 Celery workers + the daemon, the instance in DAGSTER_HOME, and a warehouse
    whose lesions were materialized through Dagster on that instance (one series per batch)."""
    missing = _servers_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("cluster")
    wh = base / "warehouse"
    env = {"IMAGING_ASSETS_WAREHOUSE": str(wh), "IMAGING_ASSETS_DICOM_ROOTS": str(small_cohort.dicom_dir),
           "IMAGING_ASSETS_OUTCOMES": str(small_cohort.outcomes_csv), "IMAGING_ASSETS_PSEUDONYM_KEY": KEY,
           "IMAGING_ASSETS_SERIES_PER_BATCH": "1"}
    with localcluster.local_cluster(base / "servers", workers=2, extra_env=env) as c:
        full_env = {**os.environ, **env, **c.env}
        r = subprocess.run([str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m",
                            "imaging_assets.definitions", "--select",
                            "dicom_files,imaging_series,segmentations,lesions"],
                           env=full_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        pristine = base / "after-lesions"
        shutil.copytree(wh, pristine)
        old = {k: os.environ.get(k) for k in full_env}
        os.environ.update({k: v for k, v in full_env.items() if k in env or k in c.env})
        try:
            yield {"c": c, "wh": Warehouse(wh), "pristine": pristine, "env": full_env, "base": base}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _table_digest(db: Path) -> dict[str, tuple[int, str]]:
    """Content hash of the feature tables (timing and commit-time columns left out)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for table, cols in {
            "radiomics_features": "lesion_id, image_type, feature_class, feature, value",
            "radiomics_provenance": "lesion_id, pyradiomics_version, params_hash, image_hash, mask_hash, "
                                    "source_fingerprint, crop_index, crop_size, n_features, space, missing_image_types",
            "radiomics_errors": "lesion_id, params_hash, source_fingerprint, message, space",
        }.items():
            rows = con.execute(f"SELECT {cols} FROM {table} ORDER BY ALL").fetchall()
            out[table] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())
        dup = con.execute("SELECT count(*) FROM (SELECT lesion_id, image_type, feature_class, feature FROM "
                          "radiomics_features GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        assert dup == 0, f"{dup} duplicated feature rows in {db}"
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def single_process(cluster, tmp_path_factory):
    """The same warehouse extracted by one process without Dagster: the reference."""
    root = tmp_path_factory.mktemp("single") / "warehouse"
    shutil.copytree(cluster["pristine"], root)
    r = extract_features(Warehouse(root), workers=1)
    assert r.failed == 0 and r.extracted > 0
    return _table_digest(root / "warehouse.duckdb")


def dg_datetime(ts: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.UTC)


def _materializations(instance, partitions=None):
    import dagster as dg

    res = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey("radiomics_batches"),
                                                                asset_partitions=partitions), limit=1000)
    return [r.asset_materialization for r in res.records]


def _load(cluster) -> dict:
    """Materialize radiomics_features (the one DuckDB writer) on the PostgreSQL instance; its metadata."""
    import dagster as dg

    r = subprocess.run([str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m",
                        "imaging_assets.definitions", "--select", "radiomics_features"],
                       env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    instance = dg.DagsterInstance.get()
    ev = instance.get_latest_materialization_event(dg.AssetKey("radiomics_features"))
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


def test_celery_backfill_on_postgres_equals_one_process(cluster, single_process):
    import dagster as dg

    from imaging_assets.defs.backfill import submit_backfill, wait_for_backfill

    instance = dg.DagsterInstance.get()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    partitions = instance.get_dynamic_partitions("series_batches")
    assert len(partitions) >= 4, partitions
    assert partitions == batch_files(cluster["wh"]).folders()
    tag = submit_backfill("extraction_celery_job", partitions)
    report = wait_for_backfill(tag, len(partitions), timeout_s=900, instance=instance)
    assert report.ok, report
    assert sorted(report.runs) == partitions
    runs = [instance.get_run_by_id(run_id) for run_id, _ in report.runs.values()]
    assert all(r.tags.get("imaging_assets/stage") == "extraction" for r in runs)
    # every step ran inside a Celery worker (their process groups), and both workers took batches
    mats = _materializations(instance)
    pids = {m.partition: int(m.metadata["worker_pid"].value) for m in mats}
    assert set(pids) == set(partitions)
    groups = {w.proc.pid: w.name for w in cluster["c"].workers}
    ran_in = {}
    for partition, pid in pids.items():
        try:
            ran_in[partition] = groups.get(os.getpgid(pid), f"pid {pid} outside the workers")
        except ProcessLookupError:
            ran_in[partition] = f"pid {pid} gone"
    assert set(ran_in.values()) == set(groups.values()), ran_in
    # the load step reads the batches' files and extracts nothing itself
    meta = _load(cluster)
    assert meta["batches_extracted_here"] == 0 and meta["batches_loaded"] == len(partitions), meta
    assert _table_digest(cluster["wh"].duckdb_path) == single_process


def _kill_mid_batch(instance, files, batch: str) -> tuple[bool, object]:
    """Reset ``batch`` to never extracted, backfill it, SIGKILL the worker process running its step as soon as
    the step logs that it started; returns (the kill landed before the batch's commit, the backfill report)."""
    import threading

    import dagster as dg

    from imaging_assets.defs.backfill import run_backfill

    for name in files.names(batch):  # only its inputs remain
        if name != "_inputs.json":
            files.store.delete(f"{files.prefix}/{batch}/{name}")
    t0 = time.time()
    result = {}
    backfill = threading.Thread(target=lambda: result.update(report=run_backfill(
        "extraction_celery_job", [batch], retries=2, timeout_s=600, instance=instance)))
    backfill.start()
    deadline = time.monotonic() + 300
    victim = None
    while victim is None and time.monotonic() < deadline:
        for run in instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": batch},
                                                           created_after=dg_datetime(t0))):
            for entry in instance.all_logs(run.run_id):
                msg = entry.user_message or ""
                if msg.startswith(f"batch {batch} on ") and " pid " in msg:
                    victim = int(msg.rsplit(" pid ", 1)[1])
        time.sleep(0.02)
    assert victim is not None, "the batch's step never started"
    os.kill(victim, signal.SIGKILL)
    mid = files.current(batch) is None
    backfill.join(700)
    report = result["report"]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": batch}, created_after=dg_datetime(t0)))
    statuses = sorted(r.status.value for r in runs)
    assert report.ok and statuses.count("SUCCESS") == 1 and "FAILURE" in statuses, (report, statuses)
    return mid, report


def test_celery_worker_killed_mid_batch_is_retried_without_duplicates_postgres(cluster, single_process):
    import dagster as dg

    instance = dg.DagsterInstance.get()
    files = batch_files(cluster["wh"])
    sizes = {p: len(files.read_inputs(p)["lesions"]) for p in instance.get_dynamic_partitions("series_batches")}
    candidates = sorted(sizes, key=lambda p: (-sizes[p], p))[:3]
    if any(files.current(b) is None for b in candidates):
        pytest.skip("the backfill test did not run first")
    tried, mid = [], []
    for batch in candidates:  # the largest batches first, until a kill lands before the batch's commit
        landed, _ = _kill_mid_batch(instance, files, batch)
        tried.append(batch)
        assert files.current(batch) is not None
        assert not [name for name in files.names(batch) if name.startswith(".")]
        if landed:
            mid.append(batch)
            break
    assert mid, f"every kill landed after the batch's commit (batches too fast): {tried}"
    meta = _load(cluster)
    assert meta["batches_extracted_here"] == 0 and meta["batches_loaded"] == len(tried), meta
    assert _table_digest(cluster["wh"].duckdb_path) == single_process
