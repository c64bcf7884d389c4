"""The ad-hoc SQL guard under attack (issue 18, finding 6): DuckDB's parser decides, every CTE and what an
``EXPLAIN ANALYZE`` wraps included; no reachable temp directory; a statement timeout and a memory limit;
every attempt audited; a user sees only their own audit rows unless admin.

A small warehouse of its own (the declared schema, a few rows): no pipeline run needed.
"""

from __future__ import annotations

import hashlib
import time

import duckdb
import pytest

from imaging_assets.errors import QueryRefused
from imaging_assets.store import audit
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.sql import check_read_only, run_sql
from imaging_assets.store.warehouse import Warehouse, connect


@pytest.fixture()
def wh(tmp_path):
    warehouse = Warehouse(tmp_path / "wh", lance_uri=str(tmp_path / "no-lance"))
    with warehouse.connect() as con:
        ensure_schema(con)
        con.execute("CREATE TABLE notes (id INTEGER, note VARCHAR)")
        con.execute("INSERT INTO notes VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    for who in ("alice", "bob", "bob"):
        audit.record(warehouse.duckdb_path, "search", f"query of {who}", user=who)
    return warehouse


def _state(db) -> str:
    """A fingerprint of every table's content (audit_log aside: attempts add rows to it)."""
    with connect(db, read_only=True) as con:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE table_name <> 'audit_log' ORDER BY 1").fetchall()]
        parts = [f"{t}:{con.execute(f'SELECT count(*), sum(hash(t)) FROM {t} t').fetchone()}" for t in tables]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _last_audit(db, sql):
    with connect(db, read_only=True) as con:
        return con.execute("SELECT status, \"user\" FROM audit_log WHERE action = 'sql' AND query = ? "
                           "ORDER BY logged_at DESC", [sql]).fetchall()


ATTACKS = [
    "EXPLAIN ANALYZE DELETE FROM notes",
    "EXPLAIN /* hidden */ ANALYZE DELETE FROM notes",
    "EXPLAIN ANALYZE UPDATE notes SET note = 'x'",
    "EXPLAIN ANALYZE CREATE TABLE leak AS SELECT * FROM notes",
    "EXPLAIN ANALYZE COPY notes TO 'leak.csv'",
    "WITH d AS (DELETE FROM notes RETURNING *) SELECT * FROM d",
    "WITH d AS (UPDATE notes SET note = 'x' RETURNING *) SELECT count(*) FROM d",
    "WITH d AS (INSERT INTO notes VALUES (9, 'z') RETURNING *) SELECT * FROM d",
    "WITH a AS (SELECT 1), d AS (DELETE FROM notes RETURNING id) SELECT * FROM a, d",
    "SELECT * FROM (WITH d AS (DELETE FROM notes RETURNING *) SELECT * FROM d)",
    "SELECT (WITH d AS (DELETE FROM notes RETURNING id) SELECT count(*) FROM d)",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM notes RETURNING *) SELECT * FROM d",
    "SELECT * FROM query('SELECT * FROM audit_log')",
    "UPDATE EXTENSIONS",
    "SELECT 1; DELETE FROM notes",
]


@pytest.mark.parametrize("sql", ATTACKS)
def test_statement_level_attacks_are_refused_by_the_parser_and_audited(wh, sql):
    before = _state(wh.duckdb_path)
    with pytest.raises(QueryRefused):
        run_sql(wh, sql, user="mallory")
    assert _state(wh.duckdb_path) == before
    rows = _last_audit(wh.duckdb_path, sql)
    assert len(rows) == 1 and rows[0][0].startswith("refused: ") and rows[0][1] == "mallory", rows


@pytest.mark.parametrize("sql", [
    "SELECT 1", "EXPLAIN SELECT * FROM notes", "EXPLAIN ANALYZE SELECT count(*) FROM notes",
    "WITH a AS (SELECT * FROM notes) SELECT * FROM a", "DESCRIBE notes", "SHOW TABLES", "SUMMARIZE notes",
    "FROM notes", "VALUES (1, 2)", "SELECT * FROM notes UNION ALL SELECT * FROM notes",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
    "SELECT id FROM notes WHERE id IN (SELECT id FROM notes) QUALIFY row_number() OVER (ORDER BY id) < 3",
])
def test_plain_reads_pass(sql):
    check_read_only(sql)


def test_the_temp_directory_is_unreachable(wh):
    """DuckDB's default temp folder is ``<db>.tmp`` next to the database; the query gets none at all."""
    (wh.root / "warehouse.duckdb.tmp").mkdir()
    df = run_sql(wh, "SELECT current_setting('temp_directory') AS t")
    assert df["t"][0] == ""
    with pytest.raises(QueryRefused):
        run_sql(wh, f"COPY notes TO '{wh.root / 'warehouse.duckdb.tmp' / 'leak.csv'}'")
    assert list((wh.root / "warehouse.duckdb.tmp").iterdir()) == []


def test_statement_timeout_stops_a_long_query_and_is_audited(wh, monkeypatch):
    monkeypatch.setenv("IMAGING_ASSETS_SQL_TIMEOUT_S", "1")
    sql = "SELECT sum(a.range * b.range) FROM range(60000) a, range(60000) b"
    t0 = time.perf_counter()
    with pytest.raises(duckdb.InterruptException, match="IMAGING_ASSETS_SQL_TIMEOUT_S"):
        run_sql(wh, sql)
    assert time.perf_counter() - t0 < 10
    rows = _last_audit(wh.duckdb_path, sql)
    assert len(rows) == 1 and rows[0][0].startswith("timeout: stopped after 1 s"), rows


def test_memory_limit_is_set_and_locked(wh, monkeypatch):
    monkeypatch.setenv("IMAGING_ASSETS_SQL_MEMORY_LIMIT", "256MB")
    df = run_sql(wh, "SELECT current_setting('memory_limit') AS m, current_setting('lock_configuration') AS l")
    assert df["m"][0] == "244.1 MiB" and bool(df["l"][0])
    with pytest.raises(duckdb.Error, match="(?i)memory"):
        run_sql(wh, "SELECT list(repeat('x', 1000)) FROM range(2000000)")
    monkeypatch.setenv("IMAGING_ASSETS_SQL_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="IMAGING_ASSETS_SQL_MEMORY_LIMIT"):
        run_sql(wh, "SELECT 1")


def test_failed_queries_are_audited_once(wh):
    sql = "SELECT no_such_column FROM notes"
    with pytest.raises(duckdb.Error):
        run_sql(wh, sql, user="carol")
    rows = _last_audit(wh.duckdb_path, sql)
    assert len(rows) == 1 and rows[0][0].startswith("error: ") and rows[0][1] == "carol"
    ok = "SELECT count(*) AS n FROM notes"
    assert int(run_sql(wh, ok, user="carol")["n"][0]) == 3
    assert _last_audit(wh.duckdb_path, ok) == [("ok", "carol")]


@pytest.mark.parametrize("sql", [
    'SELECT DISTINCT "user" AS u FROM audit_log',
    'SELECT DISTINCT "user" AS u FROM main.audit_log',
    'SELECT DISTINCT "user" AS u FROM query_table(\'audit_log\')',
    'SELECT DISTINCT "user" AS u FROM (SELECT * FROM audit_log UNION ALL SELECT * FROM main.audit_log)',
])
def test_a_user_sees_only_their_own_audit_rows_unless_admin(wh, sql):
    seen = set(run_sql(wh, sql, user="alice")["u"])
    assert seen == {"alice"}
    seen_admin = set(run_sql(wh, sql, user="root", see_all_audit=True)["u"])
    assert {"alice", "bob"} <= seen_admin
    # the snapshot hides rows from the reader only: the warehouse keeps every row
    with connect(wh.duckdb_path, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM audit_log WHERE \"user\" = 'bob'").fetchone()[0] == 2


def test_the_query_runs_on_a_private_snapshot_that_is_removed(wh):
    run_sql(wh, "SELECT count(*) FROM notes")
    assert list((wh.root / ".snapshots").iterdir()) == []
