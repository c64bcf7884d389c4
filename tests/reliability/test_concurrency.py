"""Concurrency: similar-case search and SQL, from other processes, while ``lesion_vectors`` is rewritten and its
ANN index rebuilt, and while another process makes short write transactions on the DuckDB file.

Processes (all ``reliability_driver.py``):

* ``vector-writer`` alternates two vector sets with ``sync_vectors``: 600 rows (>= the 300-row threshold: an
  ANN index is trained) and 200 rows with other vectors for the same first 200 ids (< 240 rows: the index
  is dropped), so rows are updated, deleted, inserted and the index rebuilt on every cycle;
* ``duckdb-writer`` makes short write transactions (own table + audit rows) on the DuckDB file in a loop;
* ``reader`` loops audited searches (by vector, by lesion id), ``nearest`` pinned to the version it just
  read, and ``run_sql`` over the Lance view;
* this process runs ``imaging-assets sql`` and ``imaging-assets similar`` (the CLI) in a loop meanwhile.

Every answer is then checked against the content of every committed table version (Lance keeps them all:
``sync_vectors`` removes no version; retention runs in the vectors stage only): zero errors, and every answer
equals the exact answer of some committed version (the pinned ones: of their own version). Every audited
call left exactly one audit row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import reliability_helpers as rh
from reliability_driver import CONCURRENT_THRESHOLD, DIM_CONCURRENT, concurrent_set
from reliability_helpers import DriverProcess

pytestmark = pytest.mark.slow

CLI_SECONDS = 14.0
K = 5


class Versions:
    """The content of every committed version of the table, for checking answers."""

    def __init__(self, uri: Path) -> None:
        import lancedb

        tbl = lancedb.connect(str(uri)).open_table("lesion_vectors")
        self.content: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for v in sorted(int(x["version"]) for x in tbl.list_versions()):
            tbl.checkout(v)
            data = tbl.to_arrow().sort_by("lesion_id")
            ids = np.array(data["lesion_id"].to_pylist())
            mat = np.asarray(data["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                             dtype=np.float32).reshape(-1, DIM_CONCURRENT)
            self.content[v] = (ids, mat)

    def top_k(self, v: int, q: np.ndarray, exclude: str | None = None) -> tuple[list[str], np.ndarray]:
        ids, mat = self.content[v]
        d = np.sqrt(((mat.astype(np.float64) - q.astype(np.float64)) ** 2).sum(axis=1))
        order = [i for i in np.lexsort((ids, d)) if ids[i] != exclude][:K]
        return ids[order].tolist(), d[order]

    def vector_of(self, v: int, lesion_id: str) -> np.ndarray | None:
        ids, mat = self.content[v]
        hit = np.nonzero(ids == lesion_id)[0]
        return mat[hit[0]] if len(hit) else None

    def matches(self, v: int, ids: list[str], dist: list[float], q: np.ndarray, exclude: str | None = None) -> bool:
        want_ids, want_d = self.top_k(v, q, exclude)
        return want_ids == ids and np.allclose(want_d, dist, rtol=1e-4, atol=1e-4)

    def any_version(self, ids: list[str], dist: list[float], q: np.ndarray | None = None,
                    by_id: str | None = None) -> list[int]:
        out = []
        for v in self.content:
            query = q if by_id is None else self.vector_of(v, by_id)
            if query is not None and self.matches(v, ids, dist, query, exclude=by_id):
                out.append(v)
        return out

    def sql_states(self) -> list[tuple[int, int, float]]:
        return [(len(ids), len(set(ids.tolist())), float(mat[:, 0].astype(np.float64).sum()))
                for ids, mat in self.content.values()]


def _sql_consistent(states, n: int, d: int, s: float) -> bool:
    return n == d and any(n == sn and abs(s - ss) <= 1e-3 * max(1.0, abs(ss)) for sn, _, ss in states)


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imaging_assets.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=180)


def test_search_and_sql_while_vectors_are_rewritten_and_duckdb_is_written(clean_chain, tmp_path, driver_env):
    from imaging_assets.store.lance import DEFAULT_INDEX_TYPE, sync_vectors

    wh = tmp_path / "wh"
    wh.mkdir()
    db = wh / "warehouse.duckdb"
    shutil.copyfile(clean_chain["db"], db)
    uri = wh / "lance"
    first = sync_vectors(uri, concurrent_set("big"), dim=DIM_CONCURRENT, exact_threshold=CONCURRENT_THRESHOLD)
    assert first.index == DEFAULT_INDEX_TYPE
    stop = tmp_path / "stop"
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("writer", "reader", "duckdb")}

    procs = {
        "writer": DriverProcess(["vector-writer", "--uri", uri, "--stop", stop, "--log", logs["writer"],
                                 "--min-cycles", 3], env=driver_env),
        "duckdb": DriverProcess(["duckdb-writer", "--db", db, "--stop", stop, "--log", logs["duckdb"]],
                                env=driver_env),
        "reader": DriverProcess(["reader", "--db", db, "--uri", uri, "--stop", stop, "--log", logs["reader"],
                                 "--seed", 5], env={**driver_env, "IMAGING_ASSETS_USER": "reader-proc"}),
    }
    cli_env = {**driver_env, "IMAGING_ASSETS_USER": "cli-user"}
    sql = "SELECT count(*) AS n, count(DISTINCT lesion_id) AS d, sum(vector[1]) AS s FROM lesion_vectors"
    cli: list[tuple[str, subprocess.CompletedProcess]] = []
    try:
        t_end = time.monotonic() + CLI_SECONDS
        while time.monotonic() < t_end or len(cli) < 4:
            if len(cli) % 2 == 0:
                cli.append(("sql", _cli(["sql", sql, "--warehouse", wh, "--json"], cli_env)))
            else:
                # the synthetic vectors share patients: keep them, the query comes first at distance 0
                cli.append(("similar", _cli(["similar", "C0007", "-k", int(K) + 1, "--include-same-patient",
                                             "--warehouse", wh, "--json"], cli_env)))
        stop.touch()
        codes = {name: p.finish(timeout=240) for name, p in procs.items()}
    finally:
        stop.touch()
        for p in procs.values():
            if p.proc.poll() is None:
                p.kill()
    assert codes == {"writer": 0, "duckdb": 0, "reader": 0}, {n: p.output()[-3000:] for n, p in procs.items()}

    writes = [json.loads(line) for line in logs["writer"].read_text().splitlines()]
    assert len(writes) >= 6
    assert {w["index"] for w in writes} == {DEFAULT_INDEX_TYPE, "none"} and sum(w["rebuilt_index"] for w in writes) >= 3
    records = [json.loads(line) for line in logs["reader"].read_text().splitlines()]
    errors = [r for r in records if r["kind"] == "error"]
    assert not errors, "\n".join(r["traceback"] for r in errors[:3])
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["iterations"] >= 3
    dwrites = [json.loads(line) for line in logs["duckdb"].read_text().splitlines()]
    assert not [r for r in dwrites if r["kind"] == "error"], dwrites[:3]
    assert next(r for r in dwrites if r["kind"] == "summary")["writes"] >= 20

    # every answer is the exact answer of some committed version
    versions = Versions(uri)
    states = versions.sql_states()
    bad = []
    for r in records:
        if r["kind"] == "search_vec":
            ok = versions.any_version(r["ids"], r["d"], q=np.array(r["q"], np.float32))
        elif r["kind"] == "search_id":
            ok = versions.any_version(r["ids"], r["d"], by_id="C0007")
        elif r["kind"] == "pinned":
            ok = versions.matches(r["v"], r["ids"], r["d"], np.array(r["q"], np.float32))
        elif r["kind"] == "sql":
            ok = _sql_consistent(states, r["n"], r["d"], r["s"])
        else:
            continue
        if not ok:
            bad.append(r)
    assert not bad, f"{len(bad)} answers match no committed version, e.g. {bad[:2]}"

    for kind, res in cli:
        assert res.returncode == 0, (kind, res.returncode, res.stderr[-2000:])
        rows = json.loads(res.stdout)
        if kind == "sql":
            assert _sql_consistent(states, rows[0]["n"], rows[0]["d"], rows[0]["s"]), rows
        else:
            assert rows[0]["lesion_id"] == "C0007" and rows[0]["distance"] == 0.0, rows[0]
            assert versions.any_version([r["lesion_id"] for r in rows[1:]], [r["distance"] for r in rows[1:]],
                                        by_id="C0007"), rows

    # one audit row per audited call, all ok, none lost under lock contention
    con = duckdb.connect(str(db), read_only=True)
    try:
        per_user = dict(con.execute('SELECT "user", count(*) FROM audit_log WHERE "user" IN '
                                    "('reader-proc', 'cli-user') GROUP BY 1").fetchall())
        statuses = {s for (s,) in con.execute('SELECT DISTINCT status FROM audit_log WHERE "user" IN '
                                              "('reader-proc', 'cli-user')").fetchall()}
    finally:
        con.close()
    assert per_user == {"reader-proc": summary["audited"], "cli-user": len(cli)}
    assert statuses == {"ok"}


# ---------------------------------------------------- audited table version vs the version actually read


def _drop_from_lance(lance: str, lesion_id: str) -> None:
    """What a concurrent ``lesion_vectors`` materialization does: commit a new version (here: one lesion less)."""
    from imaging_assets.store.lance import sync_vectors

    rows = [r for r in rh.lance_rows(lance, "lesion_vectors") if r["lesion_id"] != lesion_id]
    sync_vectors(lance, rows, dim=len(rows[0]["vector"]))


def _last_audit(db: Path) -> dict:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute("SELECT * FROM audit_log ORDER BY logged_at DESC LIMIT 1")
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))
    finally:
        con.close()


def test_search_audits_the_version_it_searched(chain_copy, monkeypatch):
    import imaging_assets.store.lance as vectors_mod
    from imaging_assets.stages.similar import find_similar

    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    con = duckdb.connect(str(db), read_only=True)
    lid = con.execute("SELECT min(lesion_id) FROM lesions WHERE extractable").fetchone()[0]
    con.close()
    real = vectors_mod.nearest
    nearest = real(lance, lid, k=1)[0]["lesion_id"]

    def racing(uri, query, **kwargs):  # a write lands between the version read and the search
        _drop_from_lance(lance, nearest)
        return real(uri, query, **kwargs)

    monkeypatch.setattr(vectors_mod, "nearest", racing)
    answer = find_similar(lid, k=3, warehouse=wh)
    monkeypatch.undo()
    audited = json.loads(_last_audit(db)["table_versions"])["lesion_vectors"]
    replay = find_similar(lid, k=3, warehouse=wh, version=audited)
    assert replay["lesion_id"].to_list() == answer["lesion_id"].to_list()


def test_sql_audits_the_version_it_read(chain_copy, monkeypatch):
    import imaging_assets.store.lance as vectors_mod
    from imaging_assets.store.sql import run_sql

    db, lance, wh = chain_copy["db"], chain_copy["lance"], chain_copy["warehouse"]
    real = vectors_mod.register_duckdb_views
    victim = rh.lance_rows(lance, "lesion_vectors")[0]["lesion_id"]

    def racing(con, uri, *args, **kwargs):  # a write lands between the registration and the version read
        names = real(con, uri, *args, **kwargs)
        _drop_from_lance(lance, victim)
        return names

    monkeypatch.setattr(vectors_mod, "register_duckdb_views", racing)
    n = int(run_sql(wh, "SELECT count(*) AS n FROM lesion_vectors")["n"][0])
    monkeypatch.undo()
    audited = json.loads(_last_audit(db)["table_versions"])["lesion_vectors"]
    assert vectors_mod.lance_dataset(lance, version=audited).count_rows() == n



def _calibrated_cross_join(seconds: float) -> str:
    """An analytic query that runs for about ``seconds`` on this machine now (a cross join, sized from a
    short timing run)."""
    con = duckdb.connect()
    try:
        n0 = 12_000
        t0 = time.perf_counter()
        con.execute(f"SELECT sum((a.range * b.range) % 7) FROM range({n0}) a, range({n0}) b").fetchone()
        per_row = (time.perf_counter() - t0) / n0**2
    finally:
        con.close()
    n = int((seconds / max(per_row, 1e-12)) ** 0.5)
    return f"SELECT sum((a.range * b.range) % 7) AS s FROM range({n}) a, range({n}) b"


def test_a_long_sql_query_does_not_stop_the_pipeline_writer_or_searches(chain_copy, tmp_path, driver_env,
                                                                        monkeypatch):
    """A >= 60 s analyst query while the pipeline writes (an incremental rerun of the whole chain, and short
    write transactions with audit rows in a loop) and searches run: all finish, no write waits more than a
    few seconds (issue 18, finding 7: the query used to hold the file lock, the writer gave up after ~47 s)."""
    import threading

    from imaging_assets.stages.similar import similar_rows
    from imaging_assets.store.sql import run_sql

    wh, db, cohort = chain_copy["warehouse"], chain_copy["db"], chain_copy["cohort"]
    lesion = rh.lance_rows(chain_copy["lance"], "lesion_vectors")[0]["lesion_id"]
    monkeypatch.setenv("IMAGING_ASSETS_SQL_TIMEOUT_S", "600")
    sql = _calibrated_cross_join(90.0)
    result: dict = {}

    def analyst() -> None:
        t0 = time.perf_counter()
        try:
            result["df"] = run_sql(wh, sql)
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc
        result["seconds"] = time.perf_counter() - t0

    query = threading.Thread(target=analyst)
    query.start()
    time.sleep(3)  # the query is running on its snapshot
    stop, log = tmp_path / "stop", tmp_path / "writer.jsonl"
    writer = DriverProcess(["duckdb-writer", "--db", db, "--stop", stop, "--log", log, "--min-writes", 20],
                           env=driver_env)
    chain = DriverProcess(["chain", "--warehouse", chain_copy["wh"], "--dicom", cohort.dicom_dir,
                           "--outcomes", cohort.outcomes_csv, "--workers", 1], env=driver_env)
    searches = []
    while query.is_alive() and len(searches) < 200:
        t0 = time.perf_counter()
        rows = similar_rows(lesion_id=lesion, k=3, warehouse=wh)
        searches.append((time.perf_counter() - t0, len(rows)))
        time.sleep(1.0)
    assert chain.finish(timeout=600) == 0, chain.output()
    query.join(timeout=600)
    stop.touch()
    assert writer.finish(timeout=120) == 0
    assert "error" not in result, result.get("error")
    assert result["seconds"] >= 60, f"the query took {result['seconds']:.0f} s only: calibration"
    assert int(result["df"]["s"][0]) > 0
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    errors = [e for e in entries if e["kind"] == "error"]
    assert errors == [], errors[:3]
    summary = entries[-1]
    assert summary["kind"] == "summary" and summary["writes"] >= 20
    assert summary["slowest_s"] < 20, summary  # the chain rerun is a writer too
    assert searches and all(n == 3 for _, n in searches)
    assert max(s for s, _ in searches) < 20, searches
    print(f"query {result['seconds']:.0f} s; writer: {summary['writes']} writes, slowest {summary['slowest_s']} s; "
          f"{len(searches)} searches, slowest {max(s for s, _ in searches):.2f} s")
