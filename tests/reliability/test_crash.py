"""Crash safety: SIGKILL the process (group) in the middle of extraction and of a vector-table write, rerun,
and compare with a clean run.

The chain runs in ``reliability_driver.py chain`` (a subprocess in its own session, with its process pool);
kill points are chosen from the driver's own output lines, with seeded random delays:

1. inside the write transaction of an extraction batch (the driver stops after inserting the batch's
   features and before its provenance rows: the worst moment for "no partial lesion");
2. a random delay after a worker finished a lesion (workers busy, a batch partly buffered);
3. a random delay just after a batch committed (the next transaction may be running).

The vector-table writes use ``sync_vectors`` directly with 50,000 synthetic rows (big enough to interrupt):
during the first creation, between the ``merge_insert`` commit and the deletes, and at random moments of a
re-sync.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import reliability_helpers as rh
from reliability_driver import vector_set
from reliability_helpers import DriverProcess

pytestmark = pytest.mark.slow


def _features(db: Path) -> dict[tuple, float]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {tuple(r[:4]): r[4] for r in con.execute(
            "SELECT lesion_id, image_type, feature_class, feature, value FROM radiomics_features").fetchall()}
    finally:
        con.close()


def _check_extraction_state(db: Path, clean: dict[tuple, float], full: int) -> set[str]:
    """Whole lesions only: each lesion with features has all of them (the clean values, bit for bit), exactly
    one provenance row saying so, and no duplicated feature rows. Returns the lesions with features."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        per = dict(con.execute("SELECT lesion_id, count(*) FROM radiomics_features GROUP BY 1").fetchall())
        dups = con.execute("SELECT count(*) FROM (SELECT lesion_id, image_type, feature_class, feature "
                           "FROM radiomics_features GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        prov = con.execute("SELECT lesion_id, n_features FROM radiomics_provenance").fetchall()
        errors = con.execute("SELECT count(*) FROM radiomics_errors").fetchone()[0]
    finally:
        con.close()
    assert dups == 0
    partial = {lid: n for lid, n in per.items() if n != full}
    assert not partial, f"lesions with a partial feature set (of {full}): {partial}"
    assert len(prov) == len({p[0] for p in prov}), "duplicated provenance rows"
    assert {p[0] for p in prov} == set(per), "provenance rows differ from the lesions with features"
    assert all(n == full for _, n in prov)
    assert errors == 0
    got = _features(db)
    assert set(got) <= set(clean)
    assert all(got[k] == clean[k] for k in got), "a feature value differs from the clean run"
    return set(per)


def _flush_bounds(lines: list[str]) -> tuple[int, int]:
    """(lesions in batches whose commit returned, lesions in batches whose write started)."""
    begun = {int(p[1]): int(p[2]) for p in (ln.split() for ln in lines) if p[0] == "FLUSH_BEGIN"}
    ended = {int(p[1]) for p in (ln.split() for ln in lines) if p[0] == "FLUSH_END"}
    return sum(n for k, n in begun.items() if k in ended), sum(begun.values())


def test_kill_during_extraction_then_rerun_equals_clean_run(clean_chain, tmp_path, driver_env):
    rng = random.Random(20261126)
    cohort = clean_chain["cohort"]
    clean = _features(clean_chain["db"])
    con = duckdb.connect(str(clean_chain["db"]), read_only=True)
    full = con.execute("SELECT max(n_features) FROM radiomics_provenance").fetchone()[0]
    n_lesions = con.execute("SELECT count(*) FROM lesions WHERE extractable").fetchone()[0]
    con.close()
    assert n_lesions >= 10 and full > 1000

    wh = tmp_path / "wh"
    db = wh / "warehouse.duckdb"
    args = ["chain", "--warehouse", wh, "--dicom", cohort.dicom_dir, "--outcomes", cohort.outcomes_csv,
            "--workers", 2, "--batch-size", 2]
    plans = [
        ("inside the write transaction of batch 2", ["--hang-in-flush", 2],
         lambda ln: ln.startswith("IN_TXN"), 0.0),
        ("a random delay after the first lesion of this run was extracted", [],
         lambda ln: ln.startswith("PROGRESS 1 "), rng.uniform(0.0, 0.6)),
        ("a random delay after the first batch of this run committed", [],
         lambda ln: ln.startswith("FLUSH_END 1"), rng.uniform(0.0, 0.05)),
    ]
    done: set[str] = set()
    for what, extra, trigger, delay in plans:
        d = DriverProcess(args + extra, env=driver_env)
        hit = d.wait_for(trigger, timeout=180)
        assert hit is not None, f"driver ended before the kill point ({what}):\n{d.output()}"
        time.sleep(delay)
        d.kill()
        assert "STEP feature_robustness" not in d.lines, f"kill ({what}) landed after extraction"
        low, high = _flush_bounds(d.lines)
        now = _check_extraction_state(db, clean, full)
        new = now - done
        assert now >= done, "lesions committed by an earlier run lost their features"
        assert low <= len(new) <= high, (what, low, len(new), high)
        if extra:  # killed inside batch 2: exactly batch 1 is there
            assert len(new) == low > 0
        done = now
    assert 0 < len(done) < n_lesions

    d = DriverProcess(args, env=driver_env)
    assert d.finish(timeout=300) == 0, d.output()
    assert "DONE" in d.lines
    # whole lesions, no duplicates, every extractable lesion once, and everything equals the clean run
    final = _check_extraction_state(db, clean, full)
    assert len(final) == n_lesions and set(_features(db)) == set(clean)
    assert rh.diff_hashes(rh.duckdb_table_hashes(db), clean_chain["duckdb_hashes"]) == {}
    lance = rh.lance_table_hashes(wh / "lance")
    assert lance["lesion_vectors"][0] == n_lesions
    assert rh.diff_hashes(lance, clean_chain["lance_hashes"]) == {}


# ------------------------------------------------------------------------------------------------ vectors

N_VECTORS = 50_000
DIM = 16


def _by_id(table) -> dict[str, tuple]:
    ids = table["lesion_id"].to_pylist()
    vec = np.asarray(table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, DIM)
    vol = table["volume_mm3"].to_pylist()
    return {i: (vec[k].tobytes(), vol[k]) for k, i in enumerate(ids)}


def _lance_state(uri: Path):
    """The current lesion_vectors table as an Arrow table, or None when no version was ever committed."""
    import lancedb

    db = lancedb.connect(str(uri))
    names = rh.lance_table_names(uri)
    if "lesion_vectors" not in names:
        return None
    return db.open_table("lesion_vectors").to_arrow()


def _assert_rows_from(state, *sources: dict[str, tuple]) -> None:
    """No duplicated ids and every row equal to that lesion's row in one of ``sources`` (no torn row)."""
    ids = state["lesion_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicated lesion ids"
    got = _by_id(state)
    bad = [i for i, row in got.items() if not any(src.get(i) == row for src in sources)]
    assert not bad, f"{len(bad)} rows equal to no written version, e.g. {bad[:3]}"


def _assert_exactly(uri: Path, expected) -> None:
    state = _lance_state(uri)
    assert state is not None and state.num_rows == expected.num_rows
    assert _by_id(state) == _by_id(expected)
    s = state.sort_by("lesion_id")
    e = expected.sort_by("lesion_id")
    for col in ("lesion_id", "patient_key", "modality", "roi_name", "volume_mm3"):
        assert s[col].to_pylist() == e[col].to_pylist(), col
    assert set(s["cluster"].to_pylist()) == {None}


def test_kill_during_vector_table_write_then_resync_is_exact(tmp_path, driver_env):
    from imaging_assets.store.lance import nearest

    rng = random.Random(7)
    uri = tmp_path / "lance"
    a, b = vector_set("A", N_VECTORS, DIM), vector_set("B", N_VECTORS, DIM)
    rows_a, rows_b = _by_id(a), _by_id(b)
    base = ["vectors", "--uri", uri, "--n", N_VECTORS, "--dim", DIM]
    interrupted = 0

    def kill_after(variant: str, extra: list, trigger, delay: float):
        nonlocal interrupted
        d = DriverProcess(base + ["--variant", variant] + extra, env=driver_env)
        assert d.wait_for(trigger, timeout=120) is not None, d.output()
        time.sleep(delay)
        d.kill()
        if not any(ln.startswith("SYNC_DONE") for ln in d.lines):
            interrupted += 1

    def complete(variant: str) -> str:
        d = DriverProcess(base + ["--variant", variant], env=driver_env)
        assert d.finish(timeout=180) == 0, d.output()
        return next(ln for ln in d.lines if ln.startswith("SYNC_DONE"))

    # 1. during the very first write (table creation, scalar indexes, optimize)
    kill_after("A", [], lambda ln: ln == "SYNC_START", rng.uniform(0.2, 1.0))
    state = _lance_state(uri)
    if state is not None:
        _assert_rows_from(state, rows_a)
    complete("A")
    _assert_exactly(uri, a)

    # 2. between the merge_insert commit (updates + inserts) and the deletes
    kill_after("B", ["--hang-before-delete"], lambda ln: ln.startswith("DELETING"), 0.0)
    state = _lance_state(uri)
    _assert_rows_from(state, rows_a, rows_b)
    got = _by_id(state)
    # the merge is one commit: every new or changed row of B is there, and nothing is deleted yet
    assert set(got) == set(rows_a) | set(rows_b)
    assert all(got[i] == row for i, row in rows_b.items())
    assert all(got[i] == rows_a[i] for i in set(rows_a) - set(rows_b))
    # 3./4. random moments of the re-syncs that follow (diff, deletes, verification, optimize, indexes)
    for _ in range(2):
        kill_after("B", [], lambda ln: ln == "SYNC_START", rng.uniform(0.05, 1.0))
        _assert_rows_from(_lance_state(uri), rows_a, rows_b)
    assert interrupted >= 3, f"only {interrupted} of 4 kills interrupted a sync"

    complete("B")
    _assert_exactly(uri, b)
    # a second sync finds nothing to do, and search works on the result
    again = complete("B")
    assert '"inserted": 0, "updated": 0, "deleted": 0' in again
    hits = nearest(str(uri), "V000001", k=5)
    assert len(hits) == 5 and all(h["lesion_id"] in rows_b and h["lesion_id"] != "V000001" for h in hits)


# ------------------------------------------------------------------------------------ dead Dagster runs

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _dagster_env(home: Path, wh: Path, cohort, base: dict) -> dict:
    env = {k: v for k, v in base.items() if not k.startswith("IMAGING_ASSETS_") or k.endswith("PSEUDONYM_KEY")}
    env.update({"DAGSTER_HOME": str(home), "IMAGING_ASSETS_WAREHOUSE": str(wh),
                "IMAGING_ASSETS_DICOM_ROOTS": str(cohort.dicom_dir), "IMAGING_ASSETS_OUTCOMES": str(cohort.outcomes_csv),
                "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [base.get("PYTHONPATH")])])})
    return env


def _start_daemon(env: dict, log: Path) -> subprocess.Popen:
    """``dagster-daemon run`` (run queue, run monitoring) in its own session: its code server, the run
    workers it launches and their process pools all share its process group."""
    return subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _launch(env: dict) -> None:
    done = subprocess.run([str(BIN / "dagster"), "job", "launch", "-w", "workspace.yaml", "-j", "refresh_job",
                           "-o", "*radiomics_features"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _worker_pid(instance, run_id: str) -> int:
    """The run worker's pid, from its "Started process for run (pid: N)" engine event."""
    for record in instance.all_logs(run_id):
        message = (record.dagster_event.message if record.dagster_event is not None else None) or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.split("pid: ")[1].split(")")[0])
    raise AssertionError(f"no run worker pid logged for run {run_id}")


def _wait(what: str, predicate, timeout: float, log: Path, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; daemon log:\n"
                         + log.read_text(errors="replace")[-4000:])


def test_a_run_killed_mid_extraction_frees_its_pool_slot_and_the_next_run_finishes(clean_chain, tmp_path,
                                                                                    driver_env):
    """kill -9 of the run's process group (daemon, code server, run worker, extraction pool) mid-extraction;
    after the daemon restarts, run monitoring marks the dead run failed and frees its ``duckdb_writer`` slot:
    the next run starts within 2 minutes and ends with the clean run's tables (issue 18, finding 8)."""
    import dagster as dg

    cohort = clean_chain["cohort"]
    clean = _features(clean_chain["db"])
    with duckdb.connect(str(clean_chain["db"]), read_only=True) as con:
        full = con.execute("SELECT max(n_features) FROM radiomics_provenance").fetchone()[0]
    home, wh, log = tmp_path / "dagster_home", tmp_path / "wh", tmp_path / "daemon.log"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = _dagster_env(home, wh, cohort, driver_env)
    previous_home = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    instance = dg.DagsterInstance.get()  # creates the instance's storage once, before the daemon and the CLI
    instance.get_runs()
    daemon = _start_daemon(env, log)
    try:

        def runs():
            return sorted(instance.get_runs(), key=lambda r: instance.get_run_record_by_id(r.run_id).create_timestamp)

        def logged(run_id: str, text: str) -> bool:
            return any(text in (e.user_message or "") for e in instance.all_logs(run_id))

        _launch(env)
        first = _wait("the first run", lambda: runs()[0] if runs() else None, 60, log)
        _wait("extraction in the first run", lambda: logged(first.run_id, "lesions extracted:"), 600, log)
        worker = _worker_pid(instance, first.run_id)
        group = os.getpgid(worker)
        assert group != os.getpgid(0), "the run worker shares the test's process group"
        (tmp_path / "ps.txt").write_text(subprocess.run(["ps", "-eo", "pid,ppid,pgid,sid,cmd"], capture_output=True,
                                                        text=True).stdout)
        os.killpg(group, signal.SIGKILL)  # the run's process group: run worker, extraction pool, code server
        time.sleep(3)
        assert instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.STARTED  # dead, not marked
        if daemon.poll() is not None:  # the daemon was in that group too: it restarts (as a service would)
            daemon = _start_daemon(env, log)
        launched = time.monotonic()
        _launch(env)
        second = _wait("the second run", lambda: runs()[1] if len(runs()) > 1 else None, 60, log)

        def started_a_step() -> bool:
            return any(e.dagster_event is not None and e.dagster_event.event_type == dg.DagsterEventType.STEP_START
                       for e in instance.all_logs(second.run_id))

        _wait("the second run's first step (the pool slot)", started_a_step, 120, log)
        assert time.monotonic() - launched <= 120
        status = _wait("the second run to end", lambda: (instance.get_run_by_id(second.run_id).status
                                                          if instance.get_run_by_id(second.run_id).is_finished
                                                          else None), 900, log, poll=3)
        assert status == dg.DagsterRunStatus.SUCCESS, log.read_text(errors="replace")[-4000:]
        assert instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.FAILURE
        assert any("is gone" in ((e.dagster_event.message if e.dagster_event else None) or "")
                   for e in instance.all_logs(first.run_id))  # the health check found the dead worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(30)
        if previous_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = previous_home
    db = wh / "warehouse.duckdb"
    final = _check_extraction_state(db, clean, full)
    assert set(_features(db)) == set(clean) and len(final) == len({k[0] for k in clean})
    stages = {"dicom_files", "dicom_quarantine", "imaging_series", "segmentations", "lesions", "radiomics_features",
              "radiomics_provenance", "radiomics_errors"}
    mine, theirs = rh.duckdb_table_hashes(db), clean_chain["duckdb_hashes"]
    assert rh.diff_hashes({t: mine[t] for t in stages if t in mine}, {t: theirs[t] for t in stages if t in theirs}) == {}


def _s3_state(uri: str):
    """The current lesion_vectors table on object storage (options registered for ``uri``), or None."""
    from imaging_assets.store.lance import open_db, table_names

    db = open_db(uri)
    if "lesion_vectors" not in table_names(db):
        return None
    return db.open_table("lesion_vectors").to_arrow()


def test_s3_kill_during_vector_table_write_leaves_the_last_version(tmp_path, driver_env, s3_server):
    """The same kills with the Lance table on a real S3 server: a writer killed between its data files and its
    commit (or inside the commit's conditional PUT) leaves the table readable at its last version."""
    from imaging_assets.store import objects
    from imaging_assets.store.lance import nearest, table_version

    n = 20_000
    uri = s3_server.bucket("crash-vectors") + "/lance"
    objects.configure(uri, s3_server.options)
    env = {**driver_env, **s3_server.env()}
    a, b = vector_set("A", n, DIM), vector_set("B", n, DIM)
    rows_a, rows_b = _by_id(a), _by_id(b)
    base = ["vectors", "--uri", uri, "--n", n, "--dim", DIM]

    def run(variant: str, extra: list = (), trigger=None, delay: float = 0.0) -> bool:
        d = DriverProcess(base + ["--variant", variant, *extra], env=env)
        if trigger is None:
            assert d.finish(timeout=300) == 0, d.output()
            return True
        assert d.wait_for(trigger, timeout=180) is not None, d.output()
        time.sleep(delay)
        d.kill()
        return any(ln.startswith("SYNC_DONE") for ln in d.lines)

    run("A")
    state = _s3_state(uri)
    assert state is not None and _by_id(state) == rows_a
    committed = table_version(uri)
    # killed after the merge commit, before the deletes: the merge is one commit, the table readable
    assert not run("B", ["--hang-before-delete"], lambda ln: ln.startswith("DELETING"))
    state = _s3_state(uri)
    _assert_rows_from(state, rows_a, rows_b)
    assert set(_by_id(state)) == set(rows_a) | set(rows_b)
    assert table_version(uri) > committed
    # killed at random moments of the re-syncs (diff, deletes, verification, optimize, indexes)
    rng = random.Random(11)
    for _ in range(2):
        before = table_version(uri)
        run("B", [], lambda ln: ln == "SYNC_START", rng.uniform(0.05, 1.5))
        state = _s3_state(uri)  # readable at whatever version was last committed, never torn
        _assert_rows_from(state, rows_a, rows_b)
        assert table_version(uri) >= before
    run("B")
    state = _s3_state(uri)
    assert _by_id(state) == rows_b and state.num_rows == n
    hits = nearest(uri, "V000001", k=5)
    assert len(hits) == 5 and all(h["lesion_id"] in rows_b and h["lesion_id"] != "V000001" for h in hits)
