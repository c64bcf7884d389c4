"""Discovery: the steps behind the ``ingest`` assets (catalog, series, segmentations) and their checks.

Each step takes the :class:`~imaging_assets.store.warehouse.Warehouse`, opens the DuckDB file briefly, does
one step in one transaction and returns a frozen result that the Dagster layer turns into metadata. The
read queries behind the ingest checks live here too. No Dagster here.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging_assets.dicom.crawl import crawl
from imaging_assets.dicom.pseudonym import pseudonym_secret
from imaging_assets.dicom.records import VOLUME_SUFFIXES
from imaging_assets.dicom.segmentations import link_segmentations, read_manifest
from imaging_assets.dicom.series import assemble_series
from imaging_assets.store.catalog import active_files, apply_crawl, known_files, unreadable_rows
from imaging_assets.store.warehouse import Warehouse, replace_table, table_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogResult:
    """One crawl: files seen/read/unchanged/removed, active catalog rows by kind, quarantine by reason."""

    seen: int
    read: int
    unchanged: int
    removed: int
    catalogued: int
    catalogued_by_kind: dict[str, int]
    quarantined: int
    quarantine_by_reason: dict[str, int]
    missing_roots: list[str]
    elapsed_s: float


@dataclass(frozen=True)
class SeriesResult:
    """Series assembled: counts, flag codes and the flagged series (key, uid, slices, flags, details)."""

    series: int
    usable: int
    flagged: int
    flag_counts: dict[str, int]
    flagged_series: list[dict[str, Any]]
    elapsed_s: float


@dataclass(frozen=True)
class SegmentationResult:
    """Segmentations linked: counts by rule and kind, the unlinked ones with reasons (path, reason)."""

    segmentations: int
    linked: int
    unlinked: int
    by_rule: dict[str, int]
    by_kind: dict[str, int]
    unlinked_rows: list[dict[str, Any]]
    elapsed_s: float


@dataclass(frozen=True)
class WarehouseSummary:
    """What ``imaging-assets summary`` prints: rows per table, quarantine reasons, series flags, link rules."""

    rows_by_table: dict[str, int]
    quarantine_by_reason: dict[str, int]
    series_flags: dict[str, int]
    link_rules: dict[str, int]


@dataclass(frozen=True)
class GeometryReport:
    """What the ``series_geometry`` check reports: series not usable, and the total."""

    flagged: list[dict[str, Any]]
    series: int


@dataclass(frozen=True)
class LinkReport:
    """What the ``segmentations_linked`` check reports: unlinked segmentations (path, reason), and the total."""

    unlinked: list[dict[str, Any]]
    segmentations: int


def refresh_catalog(
    wh: Warehouse,
    roots: Sequence[str | Path],
    secret: str | None = None,
    workers: int | None = None,
) -> CatalogResult:
    """Crawl ``roots`` incrementally and bring ``dicom_files`` / ``dicom_quarantine`` up to date.

    Only new or changed files (by path, size and mtime) are read; files gone from disk are marked
    removed. Missing roots are reported, not fatal.

    Returns
    -------
    CatalogResult
    """
    t0 = time.perf_counter()
    existing = [str(r) for r in roots if Path(r).exists()]
    missing = [str(r) for r in roots if not Path(r).exists()]
    for r in missing:
        logger.warning("DICOM root %s does not exist; nothing crawled there", r)
    with wh.connect() as con:
        known = known_files(con)
        retried = unreadable_rows(con)
        before = _catalog_summary(con)
    result = crawl(existing, known=known, secret=pseudonym_secret(secret), workers=workers)
    # unreadable rows are not in `known` (so they are retried); those that vanished are removed here
    seen = set(result.unchanged) | {r["path"] for r in result.records} | {q["path"] for q in result.quarantined}
    roots_abs = [os.path.abspath(r) for r in existing]
    vanished = [p for p in retried if p not in seen
                and any(p == r or p.startswith(os.path.join(r, "")) for r in roots_abs)]
    result.removed = sorted(set(result.removed) | set(vanished))
    changed_quarantine = [q for q in result.quarantined
                          if retried.get(q["path"]) != (q["size"], q["mtime_ns"], q["reason"], q["message"])]
    if result.records or changed_quarantine or result.removed:
        with wh.connect() as con:
            apply_crawl(con, result.records, changed_quarantine, result.removed)
            by_kind, by_reason = _catalog_summary(con)
    else:  # nothing to write: no second connection, the counts are those read before the crawl
        by_kind, by_reason = before
    catalogued = sum(by_kind.values())
    return CatalogResult(
        seen=result.seen,
        read=result.read,
        unchanged=len(result.unchanged),
        removed=len(result.removed),
        catalogued=int(catalogued),
        catalogued_by_kind=by_kind,
        quarantined=int(sum(by_reason.values())),
        quarantine_by_reason=by_reason,
        missing_roots=missing,
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def _catalog_summary(con: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Active catalog rows by kind, active quarantine rows by reason."""
    by_kind = dict(con.execute(
        "SELECT kind, count(*) FROM dicom_files WHERE status = 'active' GROUP BY kind ORDER BY kind").fetchall())
    by_reason = dict(con.execute(
        "SELECT reason, count(*) FROM dicom_quarantine WHERE status = 'active' "
        "GROUP BY reason ORDER BY count(*) DESC, reason").fetchall())
    return by_kind, by_reason


def rebuild_series(wh: Warehouse) -> SeriesResult:
    """Assemble ``imaging_series`` from the active image files of the catalog (full, atomic rewrite)."""
    t0 = time.perf_counter()
    with wh.connect() as con:
        images = active_files(con, kinds=["image"])
    series = assemble_series(images)
    with wh.connect() as con:
        replace_table(con, "imaging_series", series)
    flagged = [s for s in series if s["flags"]]
    return SeriesResult(
        series=len(series),
        usable=len(series) - len(flagged),
        flagged=len(flagged),
        flag_counts=dict(Counter(f for s in flagged for f in s["flags"])),
        flagged_series=[
            {
                "series_key": s["series_key"],
                "series_instance_uid": s["series_instance_uid"],
                "n_slices": s["n_slices"],
                "flags": list(s["flags"]),
                "details": list(s["flag_details"]),
            }
            for s in flagged
        ],
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def rebuild_segmentations(
    wh: Warehouse, manifests: Sequence[str | Path] = (), secret: str | None = None
) -> SegmentationResult:
    """Link every SEG / RTSTRUCT of the catalog (and manifest NIfTI/NRRD pairs) to its image series.

    Manifest images become extra rows of ``imaging_series`` so that one table lists every volume.
    """
    t0 = time.perf_counter()
    secret = pseudonym_secret(secret)
    with wh.connect() as con:
        seg_files = active_files(con, kinds=["seg", "rtstruct"])
        series = table_rows(con, "imaging_series")
    dicom_series = [s for s in series if not _is_manifest_series(s)]
    rows = link_segmentations(seg_files, dicom_series, secret=secret)
    manifest_series: list[dict[str, Any]] = []
    for manifest in manifests:
        m_series, m_segs = read_manifest(Path(manifest), secret=secret)
        manifest_series.extend(m_series)
        rows.extend(m_segs)
    with wh.connect() as con:
        if manifest_series or any(_is_manifest_series(s) for s in series):
            replace_table(con, "imaging_series", dicom_series + manifest_series)
        replace_table(con, "segmentations", rows)
    unlinked = [r for r in rows if not r["linked_series_key"]]
    return SegmentationResult(
        segmentations=len(rows),
        linked=len(rows) - len(unlinked),
        unlinked=len(unlinked),
        by_rule=dict(Counter(r["link_rule"] or "unlinked" for r in rows)),
        by_kind=dict(Counter(r["kind"] for r in rows)),
        unlinked_rows=[{"path": r["path"], "reason": r["unlinked_reason"]} for r in unlinked],
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def _is_manifest_series(series_row: dict[str, Any]) -> bool:
    """Series rows made from manifest NIfTI/NRRD images (rebuilt from the manifests each time)."""
    files = series_row.get("files") or []
    return bool(files) and str(files[0]).lower().endswith(VOLUME_SUFFIXES)


def roots_fingerprint(roots: Sequence[str | Path]) -> dict[str, Any]:
    """A cheap fingerprint of the files under ``roots`` (no file is opened; one ``stat`` each).

    Any added, deleted, modified or touched file changes ``digest``. Used by the new-DICOM sensor.

    Returns
    -------
    dict
        ``files``, ``bytes``, ``max_mtime_ns`` and ``digest`` (sha1 over sorted path/size/mtime).
    """
    import hashlib

    from imaging_assets.dicom.crawl import iter_files

    entries = sorted(iter_files([r for r in roots if Path(r).exists()]))
    h = hashlib.sha1()
    for path, size, mtime_ns in entries:
        h.update(f"{path}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {
        "files": len(entries),
        "bytes": sum(e[1] for e in entries),
        "max_mtime_ns": max((e[2] for e in entries), default=0),
        "digest": h.hexdigest(),
    }


def geometry_report(wh: Warehouse) -> GeometryReport:
    """Series that failed geometry QC (uid, slices, flags, details), for the ``series_geometry`` check."""
    with wh.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT series_instance_uid, n_slices, flags, flag_details FROM imaging_series "
            "WHERE NOT usable ORDER BY series_instance_uid").fetchall()
        total = con.execute("SELECT count(*) FROM imaging_series").fetchone()[0]
    return GeometryReport(
        flagged=[{"series_instance_uid": r[0], "n_slices": r[1], "flags": r[2], "details": r[3]} for r in rows],
        series=int(total))


def link_report(wh: Warehouse) -> LinkReport:
    """Segmentations without an image series (path, reason), for the ``segmentations_linked`` check."""
    with wh.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT path, unlinked_reason FROM segmentations WHERE linked_series_key IS NULL ORDER BY path"
        ).fetchall()
        total = con.execute("SELECT count(*) FROM segmentations").fetchone()[0]
    return LinkReport(unlinked=[{"path": p, "reason": r} for p, r in rows], segmentations=int(total))


def warehouse_summary(wh: Warehouse) -> WarehouseSummary:
    """Row counts of every table and view, and the catalog's quarantine, geometry and link breakdowns."""
    with wh.connect(read_only=True) as con:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1").fetchall()]
        # identifiers from information_schema itself, quoted: no value reaches the SQL text
        rows = {t: int(con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}

        def breakdown(table: str, sql: str) -> dict[str, int]:
            return {str(a): int(b) for a, b in con.execute(sql).fetchall()} if table in rows else {}

        return WarehouseSummary(
            rows_by_table=rows,
            quarantine_by_reason=breakdown("dicom_quarantine", "SELECT reason, count(*) FROM dicom_quarantine "
                                           "WHERE status = 'active' GROUP BY 1 ORDER BY 2 DESC, 1"),
            series_flags=breakdown("imaging_series", "SELECT f, count(*) FROM (SELECT unnest(flags) AS f FROM "
                                   "imaging_series) GROUP BY 1 ORDER BY 2 DESC, 1"),
            link_rules=breakdown("segmentations", "SELECT coalesce(link_rule, 'unlinked'), count(*) FROM "
                                 "segmentations GROUP BY 1 ORDER BY 2 DESC, 1"))
