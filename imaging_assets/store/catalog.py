"""The file catalog's storage operations: which files are known, and one crawl's outcome in one transaction.

Storage only: the rows are the records of ``imaging_assets.dicom.records`` (``dicom_files`` and
``dicom_quarantine`` in :mod:`imaging_assets.store.schema`), but nothing of the dicom package is imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.store.schema import FILE_COLUMNS, ensure_schema
from imaging_assets.store.warehouse import fetch_dicts, insert_rows, transaction


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
        insert_rows(con, "dicom_files", records, now_sql)
        insert_rows(con, "dicom_quarantine", quarantined, now_sql)
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


def active_files(con: duckdb.DuckDBPyConnection, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Active catalog records (FILE_COLUMNS keys), optionally only some kinds, ordered by path."""
    ensure_schema(con)
    cols = ", ".join(f'"{c}"' for c in FILE_COLUMNS)
    if kinds:
        return fetch_dicts(
            con,
            f"SELECT {cols} FROM dicom_files WHERE status = 'active' AND list_contains(?, kind) ORDER BY path",
            [list(kinds)],
        )
    return fetch_dicts(con, f"SELECT {cols} FROM dicom_files WHERE status = 'active' ORDER BY path")
