"""Audit log: one row per similar-case search, cohort and SQL query (no Dagster here).

``audit_log``: id, logged_at (UTC), user (``IMAGING_ASSETS_USER`` or the login name), action ('search' |
'cohort' | 'sql'), query (text), params (JSON), table_versions (JSON: Lance table versions and the robust
feature-set version the answer was computed on), n_rows, status ('ok' | 'error: ...').
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imaging_assets.store.schema import TABLES, create_sql
from imaging_assets.store.warehouse import connect

#: The declared ``audit_log`` table (cheap ``CREATE TABLE IF NOT EXISTS``, run before each append).
_AUDIT_DDL = create_sql("audit_log", TABLES["audit_log"])


def current_user() -> str:
    """Who is asking: ``IMAGING_ASSETS_USER``, else the login name, else ``unknown``."""
    user = os.environ.get("IMAGING_ASSETS_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


def record(database: str | Path, action: str, query: str, params: dict[str, Any] | None = None,
           table_versions: dict[str, Any] | None = None, n_rows: int | None = None, status: str = "ok",
           user: str | None = None) -> str:
    """Append one audit row (its own short write transaction) and return its id; rows a server left in its
    :class:`AuditJournal` are copied in on the way."""
    journal = AuditJournal(database)
    if journal.pending():
        try:
            journal.flush()
        except Exception:  # noqa: BLE001 - the journal keeps them for the next flush; this row must land
            pass
    with connect(database) as con:
        return record_on(con, action, query, params, table_versions, n_rows, status, user)


def record_on(con: Any, action: str, query: str, params: dict[str, Any] | None = None,
              table_versions: dict[str, Any] | None = None, n_rows: int | None = None, status: str = "ok",
              user: str | None = None) -> str:
    """:func:`record` on an open read-write connection (one statement: committed on its own)."""
    row = _row(action, query, params, table_versions, n_rows, status, user)
    con.execute(_AUDIT_DDL)
    con.execute("INSERT INTO audit_log VALUES (?, CAST(? AS TIMESTAMP), ?, ?, ?, ?, ?, ?, ?)",
                [row[c] for c in ("id", "logged_at", "user", "action", "query", "params", "table_versions", "n_rows",
                                  "status")])
    return row["id"]


class AuditJournal:
    """Audit rows made durable at once in an append-only journal file, copied into ``audit_log`` later.

    A server answering in milliseconds cannot open the DuckDB file for every search (an open costs
    20-100 ms and needs the write lock the pipeline may hold). :meth:`record` appends one JSON line to
    ``<warehouse>/warehouse.duckdb.audit-journal`` under an exclusive ``flock`` and ``fsync``\\ s it (the row
    survives a crash of the server); :meth:`flush` copies the journal's rows into ``audit_log`` in one
    transaction (idempotent: rows already there by id are skipped) and empties the journal. The server
    flushes from a background thread about every second and at shutdown; :func:`record` (every other
    audited action) flushes a left-over journal too, so rows of a crashed server land with the next audit.
    """

    def __init__(self, database: str | Path) -> None:
        self.database = Path(database)
        self.path = journal_path(database)

    def record(self, action: str, query: str, params: dict[str, Any] | None = None,
               table_versions: dict[str, Any] | None = None, n_rows: int | None = None, status: str = "ok",
               user: str | None = None) -> str:
        """Append one audit row to the journal (durable when this returns) and return its id."""
        row = _row(action, query, params, table_versions, n_rows, status, user)
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = None
                if current != os.fstat(fd).st_ino:  # a flush moved the journal away meanwhile: the new one
                    continue
                os.write(fd, line)
                os.fsync(fd)
                return row["id"]
            finally:
                os.close(fd)  # closing releases the lock

    def pending(self) -> bool:
        """Whether the journal (or a batch a crashed flush left) holds rows not yet in ``audit_log``."""
        try:
            if self.path.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass
        return any(self._batches())

    def _batches(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.*.batch"))

    def flush(self, retries: int = 3) -> int:
        """Copy the journal's rows into ``audit_log`` and remove them; the number of rows copied.

        The journal is moved aside as a batch under its lock (microseconds: a concurrent :meth:`record`
        starts a new journal), then the batch is inserted and deleted. When the DuckDB file stays locked by
        another writer, nothing is lost: the batch stays for the next flush (``RuntimeError`` from
        :func:`~imaging_assets.store.warehouse.connect`)."""
        import uuid

        try:
            fd = os.open(self.path, os.O_RDWR) if self.path.stat().st_size > 0 else -1
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_size > 0:
                    os.replace(self.path, f"{self.path}.{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.batch")
            finally:
                os.close(fd)
        batches = self._batches()
        rows = [json.loads(line) for b in batches for line in b.read_bytes().splitlines() if line.strip()]
        if rows:
            with connect(self.database, retries=retries) as con:
                _insert(con, rows)
        for b in batches:
            b.unlink(missing_ok=True)
        return len(rows)


def journal_path(database: str | Path) -> Path:
    """The audit journal of a DuckDB file (beside it)."""
    return Path(f"{database}.audit-journal")


def _row(action: str, query: str, params: dict[str, Any] | None, table_versions: dict[str, Any] | None,
         n_rows: int | None, status: str, user: str | None) -> dict[str, Any]:
    import uuid

    return {"id": uuid.uuid4().hex, "logged_at": datetime.now(UTC).replace(tzinfo=None).isoformat(),
            "user": user or current_user(), "action": action, "query": query,
            "params": json.dumps(params or {}, default=str, sort_keys=True),
            "table_versions": json.dumps(table_versions or {}, default=str, sort_keys=True),
            "n_rows": n_rows, "status": status}


def _insert(con: Any, rows: list[dict[str, Any]]) -> None:
    """Insert audit rows not yet in ``audit_log`` (by id), in one transaction."""
    con.execute(_AUDIT_DDL)
    con.execute("BEGIN TRANSACTION")
    try:
        con.executemany(
            "INSERT INTO audit_log SELECT ?, CAST(? AS TIMESTAMP), ?, ?, ?, ?, ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM audit_log WHERE id = ?)",
            [[r["id"], r["logged_at"], r["user"], r["action"], r["query"], r["params"], r["table_versions"],
              r["n_rows"], r["status"], r["id"]] for r in rows])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
