"""The DuckDB side of the warehouse: connections, schema, and transactional writes of catalog records.

Every write happens inside one transaction, so a crash leaves the previous committed state, never half a
batch. Values always travel as parameters or registered Arrow tables, never formatted into SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.dicom.records import (
    EXTRACTION_ERROR_FIELDS,
    FEATURE_FIELDS,
    FILE_FIELDS,
    LESION_FIELDS,
    PROVENANCE_FIELDS,
    QUARANTINE_FIELDS,
    SEGMENTATION_FIELDS,
    SERIES_FIELDS,
)

logger = logging.getLogger(__name__)

DUCKDB_FILENAME = "warehouse.duckdb"

_ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "DATE": pa.string(),  # ISO strings; cast to DATE by DuckDB on insert
    "DOUBLE[]": pa.list_(pa.float64()),
    "DOUBLE[][]": pa.list_(pa.list_(pa.float64())),
    "VARCHAR[]": pa.list_(pa.string()),
    "INTEGER[]": pa.list_(pa.int32()),
    "TIMESTAMP": pa.timestamp("us"),
}

#: Columns the catalog tables add to the record fields.
_CATALOG_EXTRA = {"status": "VARCHAR", "updated_at": "TIMESTAMP", "removed_at": "TIMESTAMP"}

_STAMPED = {"created_at": "TIMESTAMP"}

#: Table name -> (record fields, extra bookkeeping columns, primary key columns).
TABLES: dict[str, tuple[Mapping[str, str], Mapping[str, str], tuple[str, ...]]] = {
    "dicom_files": (FILE_FIELDS, _CATALOG_EXTRA, ("path",)),
    "dicom_quarantine": (QUARANTINE_FIELDS, _CATALOG_EXTRA, ("path",)),
    "imaging_series": (SERIES_FIELDS, {}, ("series_key",)),
    "segmentations": (SEGMENTATION_FIELDS, {}, ("seg_key",)),
    "lesions": (LESION_FIELDS, {}, ("lesion_id",)),
    "radiomics_features": (FEATURE_FIELDS, {}, ("lesion_id", "image_type", "feature_class", "feature")),
    "radiomics_provenance": (PROVENANCE_FIELDS, _STAMPED, ("lesion_id",)),
    "radiomics_errors": (EXTRACTION_ERROR_FIELDS, _STAMPED, ("lesion_id",)),
}


def duckdb_path(warehouse: str | Path) -> Path:
    """Path of the DuckDB file inside a warehouse folder."""
    return Path(warehouse) / DUCKDB_FILENAME


@contextmanager
def connect(
    database: str | Path, read_only: bool = False, retries: int = 50, wait_s: float = 0.1
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open a DuckDB connection briefly, retrying while another process holds the write lock.

    Parameters
    ----------
    database
        Path of the DuckDB file (its folder is created for writers) or ``":memory:"``.
    read_only
        Open read-only (sensors, queries). A read-only open of a file that does not exist yet fails.
    retries, wait_s
        How often and how long to wait for a lock held by another process.
    """
    if str(database) != ":memory:" and not read_only:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries):
        try:
            con = duckdb.connect(str(database), read_only=read_only)
            break
        except duckdb.IOException as exc:  # lock held by another process
            if "lock" not in str(exc).lower():
                raise
            last = exc
            time.sleep(wait_s * min(1 + attempt, 10))
    else:
        raise RuntimeError(f"could not open {database}: still locked after {retries} tries: {last}")
    try:
        yield con
    finally:
        con.close()


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` ... ``COMMIT``, or ``ROLLBACK`` on any exception (also KeyboardInterrupt): all or nothing."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the catalog tables when missing (idempotent)."""
    present = {r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    for name, (fields, extra, key) in TABLES.items():
        if name in present:
            continue
        cols = [f'"{c}" {t}' for c, t in {**fields, **extra}.items()]
        cols.append("PRIMARY KEY (" + ", ".join(f'"{k}"' for k in key) + ")")
        con.execute(f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(cols)})")


def arrow_table(rows: Sequence[Mapping[str, Any]], fields: Mapping[str, str]) -> pa.Table:
    """Build an Arrow table with the declared column types from record dicts."""
    schema = pa.schema([(c, _ARROW_TYPES[t]) for c, t in fields.items()])
    columns = {c: [r.get(c) for r in rows] for c in fields}
    return pa.table(columns, schema=schema)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]],
                fields: Mapping[str, str], extra_sql: Mapping[str, str]) -> None:
    """Insert record dicts (typed through Arrow) plus SQL-valued bookkeeping columns; caller holds the
    transaction."""
    if not rows:
        return
    incoming = arrow_table(rows, fields)
    con.register("_incoming", incoming)
    try:
        cols = [f'"{c}"' for c in fields] + [f'"{c}"' for c in extra_sql]
        select = [f'CAST("{c}" AS {t})' for c, t in fields.items()] + list(extra_sql.values())
        con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(select)} FROM _incoming")
    finally:
        try:
            con.unregister("_incoming")
        except duckdb.Error:  # the transaction is already aborted: keep the original error visible
            pass


def known_files(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every active catalogued or quarantined file.

    Files quarantined as ``unreadable`` are left out, so every crawl tries them again: a permission fix
    (chmod/chown) changes neither size nor mtime. :func:`apply_crawl` leaves their rows untouched while
    the outcome stays the same.
    """
    ensure_schema(con)
    cols = con.execute(
        "SELECT path, size, mtime_ns FROM dicom_files WHERE status = 'active' "
        "UNION ALL SELECT path, size, mtime_ns FROM dicom_quarantine WHERE status = 'active' "
        "AND reason <> 'unreadable'"
    ).fetchnumpy()
    return dict(zip(cols["path"].tolist(), zip(cols["size"].tolist(), cols["mtime_ns"].tolist())))


def unreadable_rows(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int, str, str]]:
    """``path -> (size, mtime_ns, reason, message)`` of active quarantine rows with reason ``unreadable``
    (retried on every crawl, see :func:`known_files`)."""
    ensure_schema(con)
    return {r[0]: (int(r[1]), int(r[2]), r[3], r[4]) for r in con.execute(
        "SELECT path, size, mtime_ns, reason, message FROM dicom_quarantine WHERE status = 'active' "
        "AND reason = 'unreadable'").fetchall()}


def apply_crawl(
    con: duckdb.DuckDBPyConnection,
    records: Sequence[Mapping[str, Any]],
    quarantined: Sequence[Mapping[str, Any]],
    removed: Iterable[str],
) -> dict[str, int]:
    """Write one crawl's outcome in a single transaction.

    New or re-read paths replace their previous row in either table (a modified file may move between
    the catalog and the quarantine); removed paths are marked ``status='removed'`` with ``removed_at``,
    never deleted, so history stays queryable. Unchanged paths are not touched.

    Returns
    -------
    dict
        Counts: ``upserted``, ``quarantined``, ``removed``.
    """
    removed = sorted(set(removed))
    if not (records or quarantined or removed):
        return {"upserted": 0, "quarantined": 0, "removed": 0}
    ensure_schema(con)
    if quarantined:  # a quarantine row that would be rewritten identically is left alone (no-op reruns)
        same = {tuple(r) for r in con.execute(
            "SELECT path, size, mtime_ns, reason, message FROM dicom_quarantine WHERE status = 'active' "
            "AND list_contains(?, path)", [[q["path"] for q in quarantined]]).fetchall()}
        quarantined = [q for q in quarantined
                       if (q["path"], q["size"], q["mtime_ns"], q["reason"], q["message"]) not in same]
    touched = [r["path"] for r in records] + [q["path"] for q in quarantined]
    now_sql = {"status": "'active'", "updated_at": "(now() AT TIME ZONE 'UTC')", "removed_at": "NULL"}
    with transaction(con):
        if touched:
            paths = pa.table({"path": pa.array(touched, pa.string())})
            con.register("_touched", paths)
            for table in ("dicom_files", "dicom_quarantine"):
                con.execute(f"DELETE FROM {table} WHERE path IN (SELECT path FROM _touched)")
            con.unregister("_touched")
        insert_rows(con, "dicom_files", records, FILE_FIELDS, now_sql)
        insert_rows(con, "dicom_quarantine", quarantined, QUARANTINE_FIELDS, now_sql)
        if removed:
            gone = pa.table({"path": pa.array(removed, pa.string())})
            con.register("_gone", gone)
            for table in ("dicom_files", "dicom_quarantine"):
                con.execute(
                    f"UPDATE {table} SET status = 'removed', removed_at = (now() AT TIME ZONE 'UTC') "
                    "WHERE status = 'active' AND path IN (SELECT path FROM _gone)"
                )
            con.unregister("_gone")
    return {"upserted": len(records), "quarantined": len(quarantined), "removed": len(removed)}


def replace_table(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Atomically replace the content of a derived table (``imaging_series``, ``segmentations``)."""
    fields, extra, _ = TABLES[table]
    ensure_schema(con)
    with transaction(con):
        con.execute(f"DELETE FROM {table}")
        insert_rows(con, table, rows, fields, {})
    return len(rows)


def fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Run a query and return rows as dicts (dates as ISO strings, lists as lists)."""
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        rec = dict(zip(names, row))
        for k, v in rec.items():
            if hasattr(v, "isoformat") and not isinstance(v, str):
                rec[k] = v.isoformat()
        out.append(rec)
    return out


def active_files(con: duckdb.DuckDBPyConnection, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Active catalog records (FILE_FIELDS keys), optionally only some kinds, ordered by path."""
    ensure_schema(con)
    cols = ", ".join(f'"{c}"' for c in FILE_FIELDS)
    if kinds:
        return fetch_dicts(
            con,
            f"SELECT {cols} FROM dicom_files WHERE status = 'active' AND list_contains(?, kind) ORDER BY path",
            [list(kinds)],
        )
    return fetch_dicts(con, f"SELECT {cols} FROM dicom_files WHERE status = 'active' ORDER BY path")


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[dict[str, Any]]:
    """All rows of a derived table as dicts, in primary-key order."""
    fields, _, key = TABLES[table]
    ensure_schema(con)
    cols = ", ".join(f'"{c}"' for c in fields)
    order = ", ".join(f'"{k}"' for k in key)
    return fetch_dicts(con, f"SELECT {cols} FROM {table} ORDER BY {order}")
