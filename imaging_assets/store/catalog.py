"""The file catalog's storage operations: which files are known, and one crawl's outcome in one transaction.

Storage only: the rows are the records of ``imaging_assets.dicom.records`` (``dicom_files`` and
``dicom_quarantine`` in :mod:`imaging_assets.store.schema`), but nothing of the dicom package is imported.

A row's ``status`` is ``'active'`` while it is part of the catalog; it leaves as ``'removed'`` (gone from
disk under a crawled root) or ``'out_of_roots'`` (its root is no longer configured), with ``removed_at``,
and is never deleted. ``duplicate_of`` marks an active row as a byte-identical copy of another active row
(its canonical path): copies are known (never read again while unchanged) but :func:`active_files` leaves
them out, so series assembly and segmentation linking see one record per SOP instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.store.schema import FILE_COLUMNS, ensure_schema
from imaging_assets.store.warehouse import fetch_dicts, insert_rows, transaction

#: Active image / SEG rows catalogued before ``samples_per_pixel`` existed: read again once.
_OUTDATED = "kind IN ('image', 'seg') AND samples_per_pixel IS NULL"


def known_files(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every active catalogued or quarantined file (copies included).

    Files quarantined as ``unreadable`` are left out, so every crawl tries them again: a permission fix
    (chmod/chown) changes neither size nor mtime. :func:`apply_crawl` leaves their rows untouched while
    the outcome stays the same. Image / SEG rows written before the catalog had ``samples_per_pixel``
    are left out too (:func:`outdated_paths`), so the next crawl reads them once more.
    """
    ensure_schema(con)
    cols = con.execute(
        f"SELECT path, size, mtime_ns FROM dicom_files WHERE status = 'active' AND NOT ({_OUTDATED}) "
        "UNION ALL SELECT path, size, mtime_ns FROM dicom_quarantine WHERE status = 'active' "
        "AND reason <> 'unreadable'"
    ).fetchnumpy()
    return dict(zip(cols["path"].tolist(), zip(cols["size"].tolist(), cols["mtime_ns"].tolist())))


def outdated_paths(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Active catalog rows that :func:`known_files` leaves out so that they are read again (older schema)."""
    ensure_schema(con)
    return [r[0] for r in con.execute(
        f"SELECT path FROM dicom_files WHERE status = 'active' AND {_OUTDATED} ORDER BY path").fetchall()]


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
    out_of_roots: Iterable[str] = (),
) -> dict[str, int]:
    """Write one crawl's outcome in a single transaction.

    New or re-read paths replace their previous row in either table (a modified file may move between
    the catalog and the quarantine); removed paths are marked ``status='removed'`` and ``out_of_roots``
    paths (whose root is no longer configured) ``status='out_of_roots'``, both with ``removed_at``, never
    deleted, so history stays queryable. Unchanged paths are not touched, except that copies of a re-read
    file lose their ``duplicate_of`` link (its content may have changed: they are compared again).

    Returns
    -------
    dict
        Counts: ``upserted``, ``quarantined``, ``removed``, ``out_of_roots``.
    """
    removed = sorted(set(removed))
    out_of_roots = sorted(set(out_of_roots) - set(removed))
    if not (records or quarantined or removed or out_of_roots):
        return {"upserted": 0, "quarantined": 0, "removed": 0, "out_of_roots": 0}
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
                con.execute(f"UPDATE {table} SET duplicate_of = NULL, copy_checked = NULL WHERE status = 'active' "
                            "AND duplicate_of IN (SELECT path FROM _touched)")
            con.unregister("_touched")
        insert_rows(con, "dicom_files", records, now_sql)
        insert_rows(con, "dicom_quarantine", quarantined, now_sql)
        for status, paths in (("removed", removed), ("out_of_roots", out_of_roots)):
            if not paths:
                continue
            con.register("_gone", pa.table({"path": pa.array(paths, pa.string())}))
            for table in ("dicom_files", "dicom_quarantine"):
                con.execute(
                    f"UPDATE {table} SET status = ?, removed_at = (now() AT TIME ZONE 'UTC') "
                    "WHERE status = 'active' AND path IN (SELECT path FROM _gone)", [status]
                )
            con.unregister("_gone")
    return {"upserted": len(records), "quarantined": len(quarantined), "removed": len(removed),
            "out_of_roots": len(out_of_roots)}


def _roots_table(con: duckdb.DuckDBPyConnection, roots: Sequence[str], sep: str) -> None:
    con.register("_roots", pa.table({
        "root": pa.array(list(roots), pa.string()),
        "prefix": pa.array([r if r.endswith(sep) else r + sep for r in roots], pa.string()),
    }))


def paths_outside(con: duckdb.DuckDBPyConnection, roots: Sequence[str], sep: str = "/") -> list[str]:
    """Active paths of either catalog table that are neither one of ``roots`` nor inside one of them.

    ``roots`` are absolute paths spelled as the crawl spells the paths it stores (``sep`` separates
    folders); with no roots every active path is outside. Reads only (also on a read-only connection).
    """
    _roots_table(con, roots, sep)
    try:
        return [r[0] for r in con.execute(
            "SELECT path FROM (SELECT path FROM dicom_files WHERE status = 'active' "
            "UNION SELECT path FROM dicom_quarantine WHERE status = 'active') f "
            "WHERE NOT EXISTS (SELECT 1 FROM _roots r WHERE f.path = r.root OR starts_with(f.path, r.prefix)) "
            "ORDER BY path").fetchall()]
    finally:
        con.unregister("_roots")


def active_counts_under(con: duckdb.DuckDBPyConnection, roots: Sequence[str], sep: str = "/") -> dict[str, int]:
    """``root -> active rows`` (catalog and quarantine together) at or inside each of ``roots``. Reads only."""
    if not roots:
        return {}
    _roots_table(con, roots, sep)
    try:
        counts = dict(con.execute(
            "SELECT r.root, count(f.path) FROM _roots r LEFT JOIN (SELECT path FROM dicom_files WHERE "
            "status = 'active' UNION ALL SELECT path FROM dicom_quarantine WHERE status = 'active') f "
            "ON f.path = r.root OR starts_with(f.path, r.prefix) GROUP BY r.root").fetchall())
    finally:
        con.unregister("_roots")
    return {r: int(counts.get(r, 0)) for r in roots}


#: What makes rows of each catalog table candidates for being copies of each other (a row without a key
#: is a group of its own: quarantined files as 'unreadable' are retried every crawl and cannot be compared,
#: and empty files have no content to be a copy of), and which rows in the same folder count as a copy's
#: siblings (its series).
_GROUP_KEYS = {
    "dicom_files": ("sop_instance_uid", "series_instance_uid"),
    "dicom_quarantine": ("CASE WHEN reason NOT IN ('unreadable', 'empty_file') AND size > 0 THEN "
                         "concat_ws(chr(0), reason, CAST(size AS VARCHAR), message) END", "NULL"),
}


def duplicate_candidates(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Groups of active rows whose copy links must be (re)decided: ``table -> group -> rows``.

    A group is the active rows sharing a SOP Instance UID (``dicom_files``) or a reason, size and message
    (``dicom_quarantine``). It needs a decision when two of its unlinked rows have the same size and one of
    them was not compared since it was read (``copy_checked``: new copies, or copies of a re-read file),
    or when a row links to a path that is no longer an active, unlinked row of the group (its canonical
    left). Rows carry ``path``, ``size``, ``duplicate_of``, ``checked``, ``read_at`` (when the row was last
    read, ISO text) and ``siblings`` (active rows of the same series in the same folder; 0 in the
    quarantine). Everything else is settled and not returned: files of equal size that were found to
    differ are not read again while unchanged.
    """
    ensure_schema(con)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for table, (key, sibling_key) in _GROUP_KEYS.items():
        rows = fetch_dicts(con, f"""
            WITH k AS (SELECT path, coalesce({key}, chr(1) || path) AS g, size, duplicate_of,
                              coalesce(copy_checked, false) AS checked,
                              coalesce(updated_at, TIMESTAMP '1970-01-01') AS read_at,
                              {sibling_key} AS s, regexp_extract(path, '^(.*)/', 1) AS dir
                       FROM {table} WHERE status = 'active'),
                 dirty AS (SELECT g FROM k WHERE duplicate_of IS NULL GROUP BY g, size
                           HAVING count(*) > 1 AND NOT bool_and(checked)
                           UNION
                           SELECT d.g FROM k d WHERE d.duplicate_of IS NOT NULL AND NOT EXISTS (
                               SELECT 1 FROM k c WHERE c.path = d.duplicate_of AND c.g = d.g
                               AND c.duplicate_of IS NULL)),
                 cand AS (SELECT * FROM k WHERE g IN (SELECT g FROM dirty)),
                 sib AS (SELECT dir, s, count(*) AS n FROM k WHERE s IS NOT NULL AND EXISTS (
                             SELECT 1 FROM cand c WHERE c.dir = k.dir AND c.s = k.s) GROUP BY dir, s)
            SELECT c.g, c.path, c.size, c.duplicate_of, c.checked, c.read_at, coalesce(sib.n, 0) AS siblings
            FROM cand c LEFT JOIN sib ON sib.dir = c.dir AND sib.s = c.s ORDER BY c.g, c.path
            """)
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r.pop("g"), []).append(r)
        if groups:
            out[table] = groups
    return out


def set_duplicates(con: duckdb.DuckDBPyConnection, table: str, links: Mapping[str, str | None]) -> int:
    """Store ``path -> canonical path`` (None: canonical or unique) for active rows of one catalog table and
    mark them ``copy_checked``, in one transaction; returns how many links changed."""
    if table not in _GROUP_KEYS:
        raise ValueError(f"{table} is not a catalog table")
    if not links:
        return 0
    ensure_schema(con)
    con.register("_links", pa.table({"path": pa.array(list(links), pa.string()),
                                     "dup": pa.array(list(links.values()), pa.string())}))
    try:
        with transaction(con):
            changed = con.execute(
                f"SELECT count(*) FROM {table} t JOIN _links l USING (path) WHERE t.status = 'active' "
                "AND t.duplicate_of IS DISTINCT FROM l.dup").fetchone()[0]
            con.execute(f"UPDATE {table} SET duplicate_of = l.dup, copy_checked = true FROM _links l "
                        f"WHERE {table}.path = l.path AND {table}.status = 'active' "
                        f"AND ({table}.duplicate_of IS DISTINCT FROM l.dup OR {table}.copy_checked IS NOT true)")
    finally:
        con.unregister("_links")
    return int(changed)


def active_files(con: duckdb.DuckDBPyConnection, kinds: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Active catalog records (FILE_COLUMNS keys), optionally only some kinds, ordered by path; copies
    (``duplicate_of`` set) are left out: one record per instance, at its canonical path."""
    ensure_schema(con)
    cols = ", ".join(f'"{c}"' for c in FILE_COLUMNS)
    where = "status = 'active' AND duplicate_of IS NULL"
    if kinds:
        return fetch_dicts(
            con, f"SELECT {cols} FROM dicom_files WHERE {where} AND list_contains(?, kind) ORDER BY path",
            [list(kinds)],
        )
    return fetch_dicts(con, f"SELECT {cols} FROM dicom_files WHERE {where} ORDER BY path")
