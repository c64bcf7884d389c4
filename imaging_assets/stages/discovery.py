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

from imaging_assets.dicom.crawl import crawl, resolve_duplicates, under_roots
from imaging_assets.dicom.records import VOLUME_SUFFIXES
from imaging_assets.dicom.segmentations import link_segmentations, read_manifest
from imaging_assets.dicom.series import assemble_series
from imaging_assets.errors import DicomRootsMissingError
from imaging_assets.stages.keys import check_key
from imaging_assets.store.catalog import (
    active_counts_under,
    active_files,
    apply_crawl,
    duplicate_candidates,
    known_files,
    outdated_paths,
    paths_outside,
    set_duplicates,
    unreadable_rows,
)
from imaging_assets.store.warehouse import Warehouse, replace_table, table_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogResult:
    """One crawl: files seen/read/unchanged/removed, active catalog rows by kind, quarantine by reason
    (copies counted once), rows that left because their root is no longer configured (``out_of_roots``)
    or stayed although outside every root because a root is missing (``kept_outside_roots``), active
    copies of other files (``duplicates``)."""

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
    out_of_roots: int = 0
    kept_outside_roots: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class RootsReport:
    """What the ``dicom_roots_present`` check reports: the configured roots, the missing ones, active rows
    kept under each missing root, and active rows outside every configured root (kept while one is missing)."""

    roots: list[str]
    missing: list[str]
    active_under_missing: dict[str, int]
    outside_roots: int


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


def _configured_roots(roots: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(as configured, absolute)`` per root, duplicates dropped (absolute as the crawl stores paths)."""
    out: list[tuple[str, str]] = []
    for r in roots:
        absolute = os.path.abspath(os.fspath(r))
        if absolute not in {a for _, a in out}:
            out.append((str(r), absolute))
    return out


def refresh_catalog(
    wh: Warehouse,
    roots: Sequence[str | Path],
    secret: str | None = None,
    workers: int | None = None,
) -> CatalogResult:
    """Crawl ``roots`` incrementally and bring ``dicom_files`` / ``dicom_quarantine`` up to date.

    The configured roots define the catalog:

    * only new or changed files (by path, size and mtime) are read; files gone from disk under a crawled
      root are marked ``removed``;
    * active rows outside every configured root (a root that was dropped or replaced) are marked
      ``out_of_roots`` with ``removed_at`` (kept as history, re-read if their root comes back), so their
      series, segmentations, lesions and features leave downstream, which rebuilds from active files;
    * a missing root is reported (``missing_roots``; the ``dicom_roots_present`` check warns) and its
      files stay active; while any root is missing nothing leaves as ``out_of_roots`` either (a mistyped
      root must not retire the files it was meant to name and drop their features): they are counted in
      ``kept_outside_roots``;
    * when no configured root exists at all the catalog is not touched and
      :class:`~imaging_assets.errors.DicomRootsMissingError` is raised;
    * byte-identical copies of one file at several paths are one instance: the copies get
      ``duplicate_of`` = the canonical path (the row read first; among copies read together, the one in
      the folder holding most files of its series, then the smallest path; see
      :func:`~imaging_assets.dicom.crawl.resolve_duplicates`), are counted once and are never assembled,
      linked or extracted. A canonical keeps its place when a new copy appears, so series files, lesion
      fingerprints and features do not change.

    Returns
    -------
    CatalogResult

    Raises
    ------
    DicomRootsMissingError
        When ``roots`` is empty or none of them exists.
    """
    t0 = time.perf_counter()
    configured = _configured_roots(roots)
    if not configured:
        raise DicomRootsMissingError(
            "no DICOM roots are configured (IMAGING_ASSETS_DICOM_ROOTS / dicom_sources.roots is empty); "
            "the catalog was left as it was")
    existing = [a for _, a in configured if os.path.exists(a)]
    missing = [given for given, a in configured if not os.path.exists(a)]
    if not existing:
        raise DicomRootsMissingError(
            f"none of the configured DICOM roots exists: {', '.join(missing)}; the catalog was left as it was "
            "(no file marked removed). Fix IMAGING_ASSETS_DICOM_ROOTS (or the dicom_sources resource) or mount "
            "the archive, then materialize again")
    for r in missing:
        logger.warning("DICOM root %s does not exist; nothing crawled there, its files stay in the catalog", r)
    secret = check_key(wh, secret)  # another key than the warehouse's is refused before anything is read
    with wh.connect() as con:
        known = known_files(con)
        retried = unreadable_rows(con)
        outdated = outdated_paths(con)
        outside = paths_outside(con, [a for _, a in configured], os.sep)
        leftover_copies = duplicate_candidates(con)
        before = _catalog_summary(con)
    result = crawl(existing, known=known, secret=secret, workers=workers)
    # unreadable and outdated rows are not in `known` (so they are read again); those that vanished are
    # removed here
    seen = set(result.unchanged) | {r["path"] for r in result.records} | {q["path"] for q in result.quarantined}
    vanished = [p for p in [*retried, *outdated] if p not in seen and under_roots(p, existing)]
    result.removed = sorted(set(result.removed) | set(vanished))
    changed_quarantine = [q for q in result.quarantined
                          if retried.get(q["path"]) != (q["size"], q["mtime_ns"], q["reason"], q["message"])]
    retire = [] if missing else outside
    if missing and outside:
        logger.warning("%d catalogued files lie outside the configured roots; they stay active while %s "
                       "missing", len(outside), ", ".join(missing) + (" is" if len(missing) == 1 else " are"))
    summary = before  # nothing written: the counts are those read before the crawl
    candidates = leftover_copies  # copies left undecided by an earlier run that stopped half way
    if result.records or changed_quarantine or result.removed or retire:
        with wh.connect() as con:
            apply_crawl(con, result.records, changed_quarantine, result.removed, out_of_roots=retire)
            candidates = duplicate_candidates(con)
            summary = _catalog_summary(con)
    if candidates:  # decided with no connection open: comparing copies reads files
        links = _decide_copies(candidates, workers)
        with wh.connect() as con:
            for table, table_links in links.items():
                set_duplicates(con, table, table_links)
            summary = _catalog_summary(con)
    by_kind, by_reason, n_copies = summary
    return CatalogResult(
        seen=result.seen,
        read=result.read,
        unchanged=len(result.unchanged),
        removed=len(result.removed),
        catalogued=int(sum(by_kind.values())),
        catalogued_by_kind=by_kind,
        quarantined=int(sum(by_reason.values())),
        quarantine_by_reason=by_reason,
        missing_roots=missing,
        elapsed_s=round(time.perf_counter() - t0, 3),
        out_of_roots=len(retire),
        kept_outside_roots=len(outside) if missing else 0,
        duplicates=n_copies,
    )


def _decide_copies(candidates: dict[str, dict[str, list[dict[str, Any]]]],
                   workers: int | None) -> dict[str, dict[str, str | None]]:
    """``table -> path -> canonical`` for the candidate groups; groups are compared in threads (the
    comparisons read files)."""
    from concurrent.futures import ThreadPoolExecutor

    out: dict[str, dict[str, str | None]] = {}
    for table, groups in candidates.items():
        # the copy read first stays canonical; among copies read together, the one beside most files of
        # its series (a slice copied elsewhere must not pull its series apart), then the smallest path
        ranked = [[{**r, "rank": (r["read_at"], -int(r["siblings"]))} for r in rows] for rows in groups.values()]
        links: dict[str, str | None] = {}
        if len(ranked) < 8:
            for rows in ranked:
                links.update(resolve_duplicates(rows))
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(8, workers or os.cpu_count() or 1))) as pool:
                for decided in pool.map(resolve_duplicates, ranked):
                    links.update(decided)
        copies = sum(v is not None for v in links.values())
        if copies:
            logger.info("%s: %d files are copies of other files (counted once)", table, copies)
        out[table] = links
    return out


def _catalog_summary(con: Any) -> tuple[dict[str, int], dict[str, int], int]:
    """Active catalog rows by kind, active quarantine rows by reason (copies counted once), active copies."""
    by_kind = dict(con.execute(
        "SELECT kind, count(*) FROM dicom_files WHERE status = 'active' AND duplicate_of IS NULL "
        "GROUP BY kind ORDER BY kind").fetchall())
    by_reason = dict(con.execute(
        "SELECT reason, count(*) FROM dicom_quarantine WHERE status = 'active' AND duplicate_of IS NULL "
        "GROUP BY reason ORDER BY count(*) DESC, reason").fetchall())
    copies = con.execute(
        "SELECT (SELECT count(*) FROM dicom_files WHERE status = 'active' AND duplicate_of IS NOT NULL) + "
        "(SELECT count(*) FROM dicom_quarantine WHERE status = 'active' AND duplicate_of IS NOT NULL)").fetchone()[0]
    return by_kind, by_reason, int(copies)


def roots_report(wh: Warehouse, roots: Sequence[str | Path]) -> RootsReport:
    """Which configured roots are missing, and what the catalog keeps because of them (for the
    ``dicom_roots_present`` check)."""
    configured = _configured_roots(roots)
    missing = [(given, a) for given, a in configured if not os.path.exists(a)]
    under: dict[str, int] = {}
    outside = 0
    if wh.duckdb_path.exists():
        with wh.connect(read_only=True) as con:
            counts = active_counts_under(con, [a for _, a in missing], os.sep)
            under = {given: counts.get(a, 0) for given, a in missing}
            outside = len(paths_outside(con, [a for _, a in configured], os.sep)) if configured else 0
    return RootsReport(roots=[g for g, _ in configured], missing=[g for g, _ in missing],
                       active_under_missing=under, outside_roots=outside)


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
    secret = check_key(wh, secret)
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
