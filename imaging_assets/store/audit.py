"""Audit log: one row per similar-case search, cohort and SQL query (no Dagster here).

``audit_log``: id, logged_at (UTC), user (``IMAGING_ASSETS_USER`` or the login name), action ('search' |
'cohort' | 'sql'), query (text), params (JSON), table_versions (JSON: Lance table versions and the robust
feature-set version the answer was computed on), n_rows, status ('ok' | 'error: ...').
"""

from __future__ import annotations

import getpass
import json
import os
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
    """Append one audit row (its own short write transaction) and return its id."""
    with connect(database) as con:
        return record_on(con, action, query, params, table_versions, n_rows, status, user)


def record_on(con: Any, action: str, query: str, params: dict[str, Any] | None = None,
              table_versions: dict[str, Any] | None = None, n_rows: int | None = None, status: str = "ok",
              user: str | None = None) -> str:
    """:func:`record` on an open read-write connection (one statement: committed on its own)."""
    import uuid

    audit_id = uuid.uuid4().hex
    con.execute(_AUDIT_DDL)
    con.execute(
        "INSERT INTO audit_log VALUES (?, (now() AT TIME ZONE 'UTC'), ?, ?, ?, ?, ?, ?, ?)",
        [audit_id, user or current_user(), action, query, json.dumps(params or {}, default=str, sort_keys=True),
         json.dumps(table_versions or {}, default=str, sort_keys=True), n_rows, status],
    )
    return audit_id
