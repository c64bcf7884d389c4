"""The audit journal of the search server: durable at once, copied into ``audit_log`` exactly once."""

from __future__ import annotations

import json
import multiprocessing
import threading

import duckdb

from imaging_assets.store import audit
from imaging_assets.store.audit import AuditJournal, journal_path
from imaging_assets.store.warehouse import connect


def _rows(db) -> list[tuple]:
    with connect(db, read_only=True) as con:
        return con.execute('SELECT id, "user", action, n_rows, status FROM audit_log ORDER BY logged_at').fetchall()


def _record_many(db: str, n: int, user: str) -> None:
    j = AuditJournal(db)
    for i in range(n):
        j.record("search", "find_similar", {"i": i}, {"lesion_vectors": 3}, i, user=user)


def test_rows_wait_in_the_journal_and_land_once(tmp_path):
    db = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(db)).close()
    j = AuditJournal(db)
    ids = [j.record("search", "find_similar", {"k": k}, {"lesion_vectors": 1}, k, user="dr.a") for k in range(3)]
    assert journal_path(db).stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in journal_path(db).read_text().splitlines()]
    assert [r["id"] for r in lines] == ids and all(r["user"] == "dr.a" for r in lines)
    assert j.pending()
    assert j.flush() == 3
    assert not j.pending() and j.flush() == 0
    assert [r[0] for r in _rows(db)] == ids
    # a row copied twice (a flush that died after its insert, before removing the batch) is not duplicated
    journal_path(db).write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert j.flush() == 3
    assert [r[0] for r in _rows(db)] == ids


def test_a_crashed_servers_rows_land_with_the_next_audited_action(tmp_path):
    """A server killed before its flush leaves rows in the journal: the next audit.record() copies them in."""
    db = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(db)).close()
    proc = multiprocessing.get_context("spawn").Process(target=_record_many, args=(str(db), 5, "dr.b"))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert not _has_audit(db)  # nothing copied yet: the rows are in the journal only
    audit.record(db, "sql", "SELECT 1", {}, {}, 1, user="dr.c")
    users = [r[1] for r in _rows(db)]
    assert users.count("dr.b") == 5 and users.count("dr.c") == 1
    assert not AuditJournal(db).pending()


def _has_audit(db) -> bool:
    with connect(db, read_only=True) as con:
        return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'audit_log'")
                    .fetchone()[0])


def test_records_during_flushes_are_neither_lost_nor_doubled(tmp_path):
    """Two processes and a thread append while another thread flushes again and again."""
    db = tmp_path / "warehouse.duckdb"
    duckdb.connect(str(db)).close()
    j = AuditJournal(db)
    stop = threading.Event()

    def flusher():
        while not stop.is_set():
            j.flush()

    t = threading.Thread(target=flusher)
    t.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(db), 60, f"p{i}")) for i in range(2)]
    for p in procs:
        p.start()
    _record_many(str(db), 60, "t")
    for p in procs:
        p.join(120)
    stop.set()
    t.join()
    j.flush()
    rows = _rows(db)
    assert len(rows) == 180 and len({r[0] for r in rows}) == 180
    assert sorted({r[1] for r in rows}) == ["p0", "p1", "t"]
