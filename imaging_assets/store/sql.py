"""Read-only ad-hoc SQL over the warehouse (DuckDB tables + Lance tables as views), audited.

Guards (a query is refused with a clear message before anything runs):

* only read statements: what DuckDB's own parser classifies as SELECT (incl. WITH, VALUES, DESCRIBE,
  SHOW, SUMMARIZE) or EXPLAIN, statement by statement;
* the connection is read-only, with ``enable_external_access = false`` (no ``read_csv('/etc/passwd')``,
  no ``ATTACH``, no ``COPY ... TO``, no ``INSTALL``/``LOAD``) and ``lock_configuration = true`` (a query
  cannot turn them back on).

Lance tables are registered as Arrow views before the lock, so SQL joins them with DuckDB tables.
"""

from __future__ import annotations

from typing import Any

import duckdb

from imaging_assets.errors import QueryRefused
from imaging_assets.store import audit
from imaging_assets.store.warehouse import Warehouse

_ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only(sql: str) -> None:
    """Raise :class:`QueryRefused` unless every statement of ``sql`` only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRefused(f"cannot parse the query: {exc}") from exc
    if not statements:
        raise QueryRefused("empty query")
    for st in statements:
        kind = st.type.name
        if kind not in _ALLOWED:
            raise QueryRefused(f"only read-only queries are allowed; refused a {kind} statement: "
                               f"{st.query.strip()[:80]!r}")


def run_sql(wh: Warehouse, sql: str, limit: int | None = None, user: str | None = None,
            see_all_audit: bool = False) -> Any:
    """Run a read-only query on the warehouse (DuckDB tables plus its Lance tables as views) and return a
    pandas DataFrame; audited as ``user`` (default: the OS user), also when refused or failing."""
    from imaging_assets.store.lance import VECTOR_TABLE, register_duckdb_views, table_version

    database, lance_uri = wh.duckdb_path, wh.lance_uri
    versions: dict[str, Any] = {}
    try:
        check_read_only(sql)
    except QueryRefused as exc:
        audit.record(database, "sql", sql, {}, {}, 0, status=f"refused: {exc}", user=user)
        raise
    try:
        with wh.connect(read_only=True) as con:
            if lance_uri:
                try:  # pin the version first, so the audit names exactly what the query read
                    pinned = {VECTOR_TABLE: table_version(lance_uri, VECTOR_TABLE)}
                    if pinned[VECTOR_TABLE] is not None:
                        register_duckdb_views(con, lance_uri, [VECTOR_TABLE], versions=pinned)
                        versions = pinned
                except Exception:  # noqa: BLE001 - no Lance tables yet
                    versions = {}
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            df = con.execute(sql).fetchdf()
    except duckdb.Error as exc:
        audit.record(database, "sql", sql, {}, versions, 0, status=f"error: {exc}", user=user)
        raise
    audit.record(database, "sql", sql, {"limit": limit}, versions, len(df), user=user)
    return df.head(limit) if limit else df
