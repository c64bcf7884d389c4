"""Read-only ad-hoc SQL over the warehouse (DuckDB tables + Lance tables as views), audited.

Guards (a query is refused with a clear message before anything runs):

* **only plain reads, decided by DuckDB's own parser**: every statement must be a ``SELECT`` (incl. ``WITH``,
  ``VALUES``, ``FROM t``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``) or an ``EXPLAIN [ANALYZE]`` of one; each
  ``SELECT`` is serialised by DuckDB (``json_serialize_sql``) and every query node in it, in every CTE and
  subquery, must be a SELECT / set operation / CTE node (so ``WITH d AS (DELETE … RETURNING …) SELECT …``
  is refused); the ``query(...)`` table function (SQL text the parser cannot see into) is refused; a
  statement DuckDB's Python API cannot even classify (``UPDATE EXTENSIONS``) is refused, not a traceback;
* the query runs on a **private snapshot** of the warehouse (:meth:`Warehouse.snapshot`), so it never holds
  the warehouse file's lock while it runs: writers and searches go on;
* the connection is read-only, with ``enable_external_access = false`` (no ``read_csv('/etc/passwd')``,
  no ``ATTACH``, no ``COPY ... TO``, no ``INSTALL``/``LOAD``), no temp directory (``temp_directory = ''``:
  nothing to spill to and no folder ``COPY`` could reach), a memory limit (``IMAGING_ASSETS_SQL_MEMORY_LIMIT``,
  default 2GB) and ``lock_configuration = true`` (a query cannot change any of them);
* a statement timeout (``IMAGING_ASSETS_SQL_TIMEOUT_S``, default 30 s): the query is interrupted and
  fails with ``duckdb.InterruptException``;
* ``audit_log`` in the snapshot holds only the asking user's rows unless ``see_all_audit`` (admins);
* every attempt is audited once: ``ok``, ``refused: …``, ``timeout: …`` or ``error: …`` (also for
  statements the parser cannot classify and for an interrupted query).

Lance tables are registered as Arrow views before the lock, so SQL joins them with DuckDB tables; so are
the Delta Lake copies (``<files>/delta/<table>``, :mod:`imaging_assets.store.delta`) as ``delta_<table>``
(``delta_lesions``, ...; the prefix keeps them from shadowing the DuckDB tables), through
``DeltaTable.to_pyarrow_dataset()`` because DuckDB's ``delta`` extension cannot be installed for duckdb 2.0
here. The audit row records the Lance and Delta versions the query saw.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import duckdb

from imaging_assets.errors import QueryRefused
from imaging_assets.store import audit
from imaging_assets.store.warehouse import Warehouse

logger = logging.getLogger(__name__)

#: Query-node types of a plain read (DuckDB's ``json_serialize_sql`` names); anything else is refused.
_READ_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
#: Table/scalar functions whose argument is SQL text the parser cannot check.
_REFUSED_FUNCTIONS = {"query"}


def _short(text: str) -> str:
    return repr(text.strip()[:80])


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _check_select(text: str) -> None:
    """Refuse a SELECT-classified statement unless DuckDB's parse tree has only read query nodes."""
    con = duckdb.connect()
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0]
    finally:
        con.close()
    tree = json.loads(raw)
    if tree.get("error"):
        raise QueryRefused(f"cannot check the statement {_short(text)}: {tree.get('error_message')}")
    for node in _walk(tree.get("statements", [])):
        kind = node.get("type")
        if isinstance(kind, str) and kind.endswith("_NODE") and kind not in _READ_NODES:
            what = kind.removesuffix("_NODE").removesuffix("_QUERY").replace("_", " ")
            raise QueryRefused(f"only read-only queries are allowed; refused a {what} inside {_short(text)}")
        name = node.get("function_name")
        if isinstance(name, str) and name.lower() in _REFUSED_FUNCTIONS:
            raise QueryRefused(f"the {name}() function is not allowed (its SQL text cannot be checked): "
                               f"{_short(text)}")


def _explained(text: str) -> str:
    """The statement an ``EXPLAIN [ANALYZE]`` wraps (DuckDB's tokenizer, so comments cannot hide a word)."""
    tokens = [(pos, kind) for pos, kind in duckdb.tokenize(text) if kind.name != "comment"]
    words = [text[pos:(tokens[i + 1][0] if i + 1 < len(tokens) else len(text))].strip().upper()
             for i, (pos, _) in enumerate(tokens)]
    if not words or words[0].split()[0] != "EXPLAIN":
        raise QueryRefused(f"cannot read the EXPLAIN statement {_short(text)}")
    start = 1
    if len(words) > 1 and words[1] in ("ANALYZE", "ANALYSE"):
        start = 2
    if start >= len(tokens):
        raise QueryRefused(f"EXPLAIN of nothing: {_short(text)}")
    return text[tokens[start][0]:]


def _check_statement(text: str, kind: str, depth: int = 0) -> None:
    if kind == "SELECT":
        _check_select(text)
    elif kind == "EXPLAIN" and depth == 0:
        inner = _explained(text)
        statements = _statements(inner)
        if len(statements) != 1:
            raise QueryRefused(f"EXPLAIN must wrap exactly one statement: {_short(text)}")
        _check_statement(statements[0][0], statements[0][1], depth + 1)
    else:
        raise QueryRefused(f"only read-only queries are allowed; refused a {kind} statement: {_short(text)}")


def _statements(sql: str) -> list[tuple[str, str]]:
    try:
        statements = duckdb.extract_statements(sql)
        return [(st.query, st.type.name) for st in statements]
    except duckdb.Error as exc:
        raise QueryRefused(f"cannot parse the query: {exc}") from exc
    except ValueError as exc:  # a statement type the Python API cannot name (e.g. UPDATE EXTENSIONS)
        raise QueryRefused(f"only read-only queries are allowed; refused a statement of a type DuckDB's "
                           f"Python API does not know ({exc})") from exc


def check_read_only(sql: str) -> None:
    """Raise :class:`QueryRefused` unless every statement of ``sql`` is a plain read (DuckDB's parser decides:
    statement types, what an ``EXPLAIN [ANALYZE]`` wraps, and every query node of every CTE and subquery)."""
    statements = _statements(sql)
    if not statements:
        raise QueryRefused("empty query")
    for text, kind in statements:
        _check_statement(text, kind)


def run_sql(wh: Warehouse, sql: str, limit: int | None = None, user: str | None = None,
            see_all_audit: bool = False) -> Any:
    """Run a read-only query on a snapshot of the warehouse (DuckDB tables plus its Lance tables as views)
    and return a pandas DataFrame; every attempt is audited (also when refused, failing or stopped).

    Parameters
    ----------
    wh
        The warehouse.
    sql
        One or more read statements (:func:`check_read_only`).
    limit
        Return at most this many rows.
    user
        Who asks: the audit row's user, and whose ``audit_log`` rows the query sees (default
        :func:`imaging_assets.store.audit.current_user`: the OS user for the CLI).
    see_all_audit
        Let the query see every user's ``audit_log`` rows (admins); otherwise only ``user``'s own.

    Raises
    ------
    QueryRefused
        Not a plain read (nothing ran).
    duckdb.InterruptException
        Stopped at the statement timeout (``IMAGING_ASSETS_SQL_TIMEOUT_S``).
    duckdb.Error
        The query failed (e.g. over the memory limit, ``IMAGING_ASSETS_SQL_MEMORY_LIMIT``).
    """
    from imaging_assets import settings

    database = wh.duckdb_path
    who = user or audit.current_user()
    versions: dict[str, Any] = {}
    params: dict[str, Any] = {"limit": limit}
    status = ""
    n_rows = 0
    try:
        try:
            check_read_only(sql)
        except QueryRefused as exc:
            status = f"refused: {exc}"
            raise
        timeout_s = settings.sql_timeout_s()
        memory = settings.sql_memory_limit()
        params.update({"timeout_s": timeout_s, "memory_limit": memory})

        def only_own_audit_rows(con: duckdb.DuckDBPyConnection) -> None:
            if see_all_audit:
                return
            exists = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'audit_log' "
                                 "AND schema_name = 'main'").fetchone()[0]
            if exists:
                con.execute('DELETE FROM audit_log WHERE "user" IS DISTINCT FROM ?', [who])

        try:
            with wh.snapshot(prepare=only_own_audit_rows) as con:
                versions = _register_lance(con, wh.lance_uri)
                versions.update(_register_delta(con, wh.delta_uri))
                con.execute("SET memory_limit = ?", [memory])
                con.execute("SET temp_directory = ''")
                con.execute("SET enable_progress_bar = false")
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
                fired = threading.Event()

                def stop(con: duckdb.DuckDBPyConnection = con) -> None:
                    fired.set()
                    con.interrupt()

                timer = threading.Timer(timeout_s, stop)
                timer.daemon = True
                timer.start()
                try:
                    df = con.execute(sql).fetchdf()
                except duckdb.InterruptException as exc:
                    if not fired.is_set():  # interrupted by someone else
                        raise
                    status = f"timeout: stopped after {timeout_s:g} s"
                    raise duckdb.InterruptException(
                        f"query stopped after {timeout_s:g} s (the statement timeout, "
                        f"IMAGING_ASSETS_SQL_TIMEOUT_S)") from exc
                finally:
                    timer.cancel()
        except duckdb.Error as exc:
            if not status.startswith("timeout"):
                status = f"error: {exc}"
            raise
        n_rows = len(df)
        status = "ok"
    except BaseException as exc:
        if not status:  # not classified above (a bad setting, Ctrl-C, ...)
            status = f"error: {type(exc).__name__}: {exc}" if isinstance(exc, Exception) else "error: interrupted"
        raise
    finally:
        audit.record(database, "sql", sql, params, versions, n_rows, status=status or "error: interrupted", user=who)
    return df.head(limit) if limit else df


def _register_lance(con: duckdb.DuckDBPyConnection, lance_uri: str) -> dict[str, Any]:
    """Register the Lance tables (``lesion_vectors``, ``lesion_embeddings``) at their current versions (pinned
    first, so the audit names exactly what the query read); ``{}`` when there is no Lance table yet."""
    from imaging_assets.store.lance import EMBEDDING_TABLE, VECTOR_TABLE, register_duckdb_views, table_version

    if not lance_uri:
        return {}
    pinned: dict[str, Any] = {}
    for table in (VECTOR_TABLE, EMBEDDING_TABLE):
        try:
            version = table_version(lance_uri, table)
            if version is None:
                continue
            register_duckdb_views(con, lance_uri, [table], versions={table: version})
            pinned[table] = version
        except Exception:  # noqa: BLE001 - no such Lance table yet
            continue
    return pinned


def _register_delta(con: duckdb.DuckDBPyConnection, delta_uri: str) -> dict[str, Any]:
    """Register the warehouse's Delta tables (``<files>/delta/<table>``) as ``delta_<table>`` at their current
    versions and return ``{"delta_<table>": version}`` for the audit row; ``{}`` when there are none.

    DuckDB's ``delta`` extension has no build for duckdb 2.0 here (and extensions cannot be downloaded), so
    each table's ``DeltaTable.to_pyarrow_dataset()`` is registered, as the Lance tables are: DuckDB scans
    it lazily with projection and filter push-down. The ``delta_`` prefix keeps the copies from shadowing
    the DuckDB tables; a name a DuckDB table already has is left out.
    """
    from imaging_assets.store import delta

    if not delta_uri:
        return {}
    try:
        names = delta.list_tables(delta_uri)
    except Exception:  # noqa: BLE001 - no Delta folder / object store unreachable: the query runs without them
        logger.warning("Delta tables under %s not registered", delta_uri, exc_info=True)
        return {}
    taken = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    wanted = [n for n in names if f"delta_{n}" not in taken and f"delta_{n}".replace("_", "").isalnum()]
    try:
        seen = delta.register_duckdb_views(con, delta_uri, wanted, prefix="delta_")
    except Exception:  # noqa: BLE001 - a table that cannot be opened: register the others
        seen = {}
        for name in wanted:
            try:
                seen.update(delta.register_duckdb_views(con, delta_uri, [name], prefix="delta_"))
            except Exception:  # noqa: BLE001
                logger.warning("Delta table %s not registered", name, exc_info=True)
    return {f"delta_{name}": version for name, version in seen.items()}
