"""Pictures of lesions: the step behind ``lesion_thumbnails`` and the montages of cohorts.

Every extractable lesion gets a PNG ``<warehouse>/thumbnails/<lesion_id>.png`` (axial, coronal and sagittal
slices through its centre with the mask outline, windowed per modality, scale bar and orientation letters;
drawn by :mod:`imaging_assets.analysis.thumbnails`, no patient information in the picture), named by the
lesion id so any tool can open it. The step is incremental: a picture is drawn again only when its
**content hash** changes (the lesion's source fingerprint, modality, body part and the renderer's
version), and pictures of lesions that left the ``lesions`` table are removed. Each file is written to a
temporary name and moved into place, and the ``lesion_thumbnails`` rows are replaced in one transaction
after the pictures are drawn: a crash leaves the previous pictures and rows, never half a file.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging_assets.errors import error_text
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows

logger = logging.getLogger(__name__)

#: Folder of the pictures under the warehouse root.
THUMBNAIL_DIR = "thumbnails"
#: Folder of the plots and montages shown on asset pages (content-addressed file names).
PLOT_DIR = "plots"
#: Versions of one plot kept (older materializations' pages still find their picture).
PLOTS_KEPT = 20


@dataclass(frozen=True)
class ThumbnailsResult:
    """One thumbnails run: pictures drawn, kept (unchanged), removed, failed (with reasons), where."""

    folder: str
    rendered: int
    unchanged: int
    removed: int
    failed: list[dict[str, str]]
    total: int
    elapsed_s: float
    #: a few lesions' pictures (lesion_id, path), largest lesions first, for the asset page
    examples: list[dict[str, Any]]


def thumbnail_dir(wh: Warehouse) -> Path:
    """``<warehouse root>/thumbnails``."""
    return Path(wh.root) / THUMBNAIL_DIR


def thumbnail_path(wh: Warehouse, lesion_id: str) -> Path:
    """Where a lesion's picture lives (whether drawn yet or not)."""
    return thumbnail_dir(wh) / f"{lesion_id}.png"


def keep_picture(wh: Warehouse, name: str, data: bytes | Path | None) -> Path | None:
    """Store a plot under ``<warehouse>/plots/<name>-<sha8>.png`` (written to a temporary name, then moved;
    the newest :data:`PLOTS_KEPT` versions of ``name`` are kept) and return its path; None for no plot."""
    if data is None:
        return None
    raw = Path(data).read_bytes() if isinstance(data, Path) else bytes(data)
    folder = Path(wh.root) / PLOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}-{hashlib.sha1(raw).hexdigest()[:8]}.png"
    if not final.is_file():
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, final)
    else:
        os.utime(final)
    versions = sorted(folder.glob(f"{name}-????????.png"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in versions[PLOTS_KEPT:]:
        for copy in folder.glob(f"{old.stem}-w*.png"):
            copy.unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return final


#: The warehouse's key for signed picture links (made on first use, mode 0600).
PICTURE_KEY = ".pictures_key"


def _picture_key(wh: Warehouse) -> bytes:
    import secrets

    path = Path(wh.root) / PICTURE_KEY
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by another process meanwhile
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        return path.read_bytes()


def picture_signature(wh: Warehouse, folder: str, name: str) -> str:
    """HMAC-SHA256 (hex, 32 characters) of ``<folder>/<name>`` with the warehouse's picture key: a link
    carrying it opens that one picture without a token (what a browser's ``<img>`` in the Dagster UI needs)."""
    import hmac

    return hmac.new(_picture_key(wh), f"{folder}/{name}".encode(), hashlib.sha256).hexdigest()[:32]


def picture_signature_ok(wh: Warehouse, folder: str, name: str, signature: str) -> bool:
    """Whether ``signature`` is :func:`picture_signature` of that picture (constant-time comparison)."""
    import hmac

    return bool(signature) and hmac.compare_digest(picture_signature(wh, folder, name), str(signature))


def picture_url(wh: Warehouse, base: str, folder: str, name: str) -> str:
    """The signed link to a picture under ``base`` (``IMAGING_ASSETS_PICTURES_URL``, or the server's own)."""
    return f"{base.rstrip('/')}/{folder}/{name}?sig={picture_signature(wh, folder, name)}"


def page_sized(wh: Warehouse, path: Path, width: int) -> Path:
    """``path`` itself when at most ``width`` pixels wide, else a scaled-down copy kept beside it."""
    from PIL import Image

    with Image.open(path) as im:
        if im.width <= width:
            return path
        small = im.convert("RGB").resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS)
    out = path.with_name(f"{path.stem}-w{width}.png")
    if not out.is_file():
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        small.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, out)
    return out


def content_hash(lesion: Mapping[str, Any]) -> str:
    """What a picture depends on: the lesion's source fingerprint (its files and options), modality, body
    part, component and the renderer's version."""
    from imaging_assets.analysis.thumbnails import RENDER_VERSION

    key = "|".join(str(lesion.get(k)) for k in ("lesion_id", "source_fingerprint", "modality", "body_part",
                                                "segment_number", "component"))
    return hashlib.sha1(f"{key}|{RENDER_VERSION}".encode()).hexdigest()[:20]


def _render_series(task: tuple[dict, list[tuple[dict, dict]], str]) -> list[tuple[str, str | None, str | None]]:
    """In a worker: load one series once and draw each of its lesions; (lesion_id, window, error)."""
    from imaging_assets.analysis.thumbnails import render_thumbnail
    from imaging_assets.features.pipeline import LesionOptions, SeriesLesionLoader

    series, items, folder = task
    out = []
    for lesion, seg in items:
        lid = lesion["lesion_id"]
        try:
            options = LesionOptions(split_components=int(lesion.get("component") or 0) > 0, resample_mask=True)
            image, mask, _ = SeriesLesionLoader(series, seg, int(lesion["segment_number"]),
                                                int(lesion.get("component") or 0), options)()
            png = render_thumbnail(image, mask, modality=lesion.get("modality"), body_part=lesion.get("body_part"))
            final = Path(folder) / f"{lid}.png"
            tmp = final.with_name(f".{lid}.{os.getpid()}.tmp")
            tmp.write_bytes(png)
            os.replace(tmp, final)
            out.append((lid, None, None))
        except Exception as exc:  # noqa: BLE001 - one bad lesion must not stop the others
            out.append((lid, None, error_text(exc, 480)))
    return out


def render_lesion_thumbnails(wh: Warehouse, workers: int | None = None, force: bool = False) -> ThumbnailsResult:
    """Draw the missing or outdated pictures of every extractable lesion (see the module docstring).

    Parameters
    ----------
    workers
        Worker processes (default: the CPUs of this machine, at most the number of series to draw).
    force
        Draw every picture again.
    """
    from imaging_assets.features.extract import default_workers

    t0 = time.perf_counter()
    folder = thumbnail_dir(wh)
    folder.mkdir(parents=True, exist_ok=True)
    with wh.connect() as con:
        ensure_schema(con)
        lesions = [r for r in table_rows(con, "lesions") if r["extractable"]]
        series = {r["series_key"]: r for r in table_rows(con, "imaging_series")}
        segs = {r["seg_key"]: r for r in table_rows(con, "segmentations")}
        stored = {r["lesion_id"]: r for r in table_rows(con, "lesion_thumbnails")}
    hashes = {r["lesion_id"]: content_hash(r) for r in lesions}
    todo: dict[str, list[tuple[dict, dict]]] = {}
    unchanged = 0
    for les in lesions:
        lid = les["lesion_id"]
        old = stored.get(lid)
        if (not force and old is not None and old["content_hash"] == hashes[lid]
                and (old["status"] != "ok" or thumbnail_path(wh, lid).is_file())):
            unchanged += 1  # same inputs: the same picture (or the same failure)
            continue
        if les["series_key"] in series and les["seg_key"] in segs:
            todo.setdefault(les["series_key"], []).append((dict(les), dict(segs[les["seg_key"]])))
    tasks = [(dict(series[k]), items, str(folder)) for k, items in sorted(todo.items())]
    results: list[tuple[str, str | None, str | None]] = []
    n = max(1, min(workers or default_workers(), len(tasks)))
    if len(tasks) <= 1 or n == 1:
        for t in tasks:
            results.extend(_render_series(t))
    else:
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            for part in pool.map(_render_series, tasks, chunksize=max(1, len(tasks) // (4 * n))):
                results.extend(part)
    by_id = {r["lesion_id"]: r for r in lesions}
    rows = [{"lesion_id": lid, "path": f"{THUMBNAIL_DIR}/{lid}.png", "content_hash": hashes[lid],
             "status": "ok" if err is None else "error", "error": err} for lid, _, err in results]
    gone = sorted(set(stored) - set(by_id))
    with wh.transaction() as con:
        if rows:
            con.execute("DELETE FROM lesion_thumbnails WHERE list_contains(?, lesion_id)", [[r["lesion_id"] for r in rows]])
            con.executemany("INSERT INTO lesion_thumbnails VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                            [[r["lesion_id"], r["path"], r["content_hash"], r["status"], r["error"]] for r in rows])
        if gone:
            con.execute("DELETE FROM lesion_thumbnails WHERE list_contains(?, lesion_id)", [gone])
    for lid in gone:  # after the rows: a crash in between leaves a file without a row, never the reverse
        thumbnail_path(wh, lid).unlink(missing_ok=True)
    failed = [{"lesion_id": r["lesion_id"], "error": r["error"]} for r in rows if r["error"]]
    for f in failed[:10]:
        logger.warning("thumbnail of lesion %s: %s", f["lesion_id"], f["error"])
    largest = sorted(lesions, key=lambda r: -(r.get("volume_mm3") or 0))[:4]
    examples = [{"lesion_id": r["lesion_id"], "path": str(thumbnail_path(wh, r["lesion_id"])),
                 "modality": r.get("modality"), "volume_mm3": r.get("volume_mm3")}
                for r in largest if thumbnail_path(wh, r["lesion_id"]).is_file()]
    return ThumbnailsResult(folder=str(folder), rendered=len(rows) - len(failed), unchanged=unchanged,
                            removed=len(gone), failed=failed, total=len(lesions),
                            elapsed_s=round(time.perf_counter() - t0, 3), examples=examples)


def thumbnail_coverage(wh: Warehouse) -> dict[str, Any]:
    """For the ``thumbnails_complete`` check: extractable lesions, pictures on disk, failures."""
    with wh.connect(read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT lesion_id FROM lesions WHERE extractable").fetchall()]
        errors = con.execute("SELECT lesion_id, error FROM lesion_thumbnails WHERE status = 'error' "
                             "ORDER BY lesion_id").fetchall()
    missing = [i for i in ids if not thumbnail_path(wh, i).is_file()]
    return {"lesions": len(ids), "with_picture": len(ids) - len(missing), "missing": missing,
            "errors": [{"lesion_id": e[0], "error": e[1]} for e in errors]}


def montage_png(wh: Warehouse, tiles: Sequence[Mapping[str, Any]], title: str | None = None,
                columns: int = 6) -> bytes:
    """One picture of several lesions side by side: ``tiles`` of ``{"lesion_id", "caption": [lines]}``; a
    lesion without a picture gets an empty tile saying so."""
    from imaging_assets.analysis.thumbnails import montage

    items = []
    for t in tiles:
        p = thumbnail_path(wh, str(t["lesion_id"]))
        items.append((p.read_bytes() if p.is_file() else None, list(t.get("caption") or [])))
    return montage(items, columns=columns, title=title)
