"""One file per extractable lesion under the warehouse, kept current by content hash: the shared step behind
``lesion_thumbnails`` (a PNG per lesion) and ``lesion_crops`` (the encoder's input, a ``.npy`` per lesion).

A lesion's file is made again only when its **content hash** changes (what the file depends on: the lesion's
source fingerprint, modality, body part, component and the maker's version), or when it is missing; files of
lesions that left the ``lesions`` table are removed. Each series' image is decoded once per worker for all
its lesions. Files live in the warehouse files (a local folder or object storage,
:attr:`~imaging_assets.store.warehouse.Warehouse.objects`); each is written atomically (a temporary name
moved into place, or one PUT on S3); the rows of the step's table
(``lesion_id, path, content_hash, status, error, <time>``) are replaced in one transaction after the files
are made, and removed files are deleted after their rows: a crash leaves the previous files and rows (at
worst a file without a row), never half a file.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from imaging_assets.errors import error_text
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows

#: A maker: (SimpleITK image, mask, lesion row) -> the file's bytes. A module-level function (pickled to workers).
Maker = Callable[[Any, Any, Mapping[str, Any]], bytes]


@dataclass(frozen=True)
class LesionFilesResult:
    """One run: files made, kept (unchanged), removed, failed (with reasons); the extractable lesions."""

    folder: str
    made: int
    unchanged: int
    removed: int
    failed: list[dict[str, str]]
    total: int
    elapsed_s: float
    #: the extractable lesion rows (for the callers' metadata)
    lesions: list[dict[str, Any]]


def lesion_hash(lesion: Mapping[str, Any], version: str) -> str:
    """What a lesion's file depends on: its id, source fingerprint (files and options), modality, body part,
    segment, component, and the maker's ``version``."""
    key = "|".join(str(lesion.get(k)) for k in ("lesion_id", "source_fingerprint", "modality", "body_part",
                                                "segment_number", "component"))
    return hashlib.sha1(f"{key}|{version}".encode()).hexdigest()[:20]


def _make_series(task: tuple[dict, list[tuple[dict, dict]], tuple[str, Any, str], str, Maker]
                 ) -> list[tuple[str, str | None]]:
    """In a worker: load one series once and make each of its lesions' files; (lesion_id, error)."""
    from imaging_assets.features.pipeline import LesionOptions, SeriesLesionLoader
    from imaging_assets.store.objects import store

    series, items, (root, options, folder), suffix, make = task
    files = store(root, options)
    out = []
    for lesion, seg in items:
        lid = lesion["lesion_id"]
        try:
            options = LesionOptions(split_components=int(lesion.get("component") or 0) > 0, resample_mask=True)
            image, mask, _ = SeriesLesionLoader(series, seg, int(lesion["segment_number"]),
                                                int(lesion.get("component") or 0), options)()
            files.write_bytes(f"{folder}/{lid}{suffix}", make(image, mask, lesion))
            out.append((lid, None))
        except Exception as exc:  # noqa: BLE001 - one bad lesion must not stop the others
            out.append((lid, error_text(exc, 480)))
    return out


def update_lesion_files(wh: Warehouse, table: str, folder_name: str, suffix: str, make: Maker, version: str,
                        workers: int | None = None, force: bool = False) -> LesionFilesResult:
    """Make the missing or outdated files ``<warehouse files>/<folder_name>/<lesion_id><suffix>`` of every
    extractable lesion with ``make`` and record them in ``table`` (see the module docstring).

    Parameters
    ----------
    version
        The maker's version: part of every content hash (a new version makes every file again).
    workers
        Worker processes (default: the CPUs of this machine, at most the number of series to process).
    force
        Make every file again.
    """
    from imaging_assets.features.extract import default_workers

    t0 = time.perf_counter()
    files = wh.objects
    with wh.connect() as con:
        ensure_schema(con)
        lesions = [dict(r) for r in table_rows(con, "lesions") if r["extractable"]]
        series = {r["series_key"]: r for r in table_rows(con, "imaging_series")}
        segs = {r["seg_key"]: r for r in table_rows(con, "segmentations")}
        stored = {r["lesion_id"]: r for r in table_rows(con, table)}
    hashes = {r["lesion_id"]: lesion_hash(r, version) for r in lesions}
    present = set(files.list(folder_name))  # one listing, not a request per lesion
    todo: dict[str, list[tuple[dict, dict]]] = {}
    unchanged = 0
    for les in lesions:
        lid = les["lesion_id"]
        old = stored.get(lid)
        if (not force and old is not None and old["content_hash"] == hashes[lid]
                and (old["status"] != "ok" or f"{lid}{suffix}" in present)):
            unchanged += 1  # same inputs: the same file (or the same failure)
            continue
        if les["series_key"] in series and les["seg_key"] in segs:
            todo.setdefault(les["series_key"], []).append((les, dict(segs[les["seg_key"]])))
    where = (wh.files, wh.s3, folder_name)
    tasks = [(dict(series[k]), items, where, suffix, make) for k, items in sorted(todo.items())]
    results: list[tuple[str, str | None]] = []
    n = max(1, min(workers or default_workers(), len(tasks)))
    if len(tasks) <= 1 or n == 1:
        for t in tasks:
            results.extend(_make_series(t))
    else:
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            for part in pool.map(_make_series, tasks, chunksize=max(1, len(tasks) // (4 * n))):
                results.extend(part)
    current = {r["lesion_id"] for r in lesions}
    rows = [[lid, f"{folder_name}/{lid}{suffix}", hashes[lid], "ok" if err is None else "error", err]
            for lid, err in results]
    gone = sorted(set(stored) - current)
    with wh.transaction() as con:
        if rows:
            con.execute(f"DELETE FROM {table} WHERE list_contains(?, lesion_id)", [[r[0] for r in rows]])
            con.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))", rows)
        if gone:
            con.execute(f"DELETE FROM {table} WHERE list_contains(?, lesion_id)", [gone])
    for lid in gone:  # after the rows: a crash in between leaves a file without a row, never the reverse
        files.delete(f"{folder_name}/{lid}{suffix}")
    failed = [{"lesion_id": r[0], "error": r[4]} for r in rows if r[4]]
    return LesionFilesResult(folder=files.uri(folder_name), made=len(rows) - len(failed), unchanged=unchanged, removed=len(gone),
                             failed=failed, total=len(lesions), elapsed_s=round(time.perf_counter() - t0, 3),
                             lesions=lesions)
