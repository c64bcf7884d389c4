"""Pictures of lesions: the step behind ``lesion_thumbnails`` and the montages of cohorts.

Every extractable lesion gets a PNG ``<warehouse files>/thumbnails/<lesion_id>.png`` (a local folder or
object storage: :class:`~imaging_assets.store.objects.ObjectStore`; axial, coronal and sagittal
slices through its centre with the mask outline, windowed per modality, scale bar and orientation letters;
drawn by :mod:`imaging_assets.analysis.thumbnails`, no patient information in the picture), named by the
lesion id so any tool can open it. The step is incremental: a picture is drawn again only when its
**content hash** changes (the lesion's source fingerprint, modality, body part and the renderer's
version), and pictures of lesions that left the ``lesions`` table are removed. Each file is written to a
temporary name and moved into place (on S3 one PUT), and the ``lesion_thumbnails`` rows are replaced in one transaction
after the pictures are drawn: a crash leaves the previous pictures and rows, never half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imaging_assets.stages.lesion_files import lesion_hash, update_lesion_files
from imaging_assets.store.warehouse import Warehouse

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


def thumbnail_key(lesion_id: str) -> str:
    """A lesion's picture's key in the warehouse files: ``thumbnails/<lesion_id>.png``."""
    return f"{THUMBNAIL_DIR}/{lesion_id}.png"


def thumbnail_uri(wh: Warehouse, lesion_id: str) -> str:
    """Where a lesion's picture lives (whether drawn yet or not): a local path or an ``s3://`` URI."""
    return wh.objects.uri(thumbnail_key(lesion_id))


def thumbnail_ids(wh: Warehouse) -> set[str]:
    """The lesions that have a picture (one listing of the folder, not a request per lesion)."""
    return {n[:-4] for n in wh.objects.list(THUMBNAIL_DIR) if n.endswith(".png") and not n.startswith(".")}


def thumbnail_bytes(wh: Warehouse, lesion_id: str) -> bytes | None:
    """A lesion's picture (PNG bytes), None when it has none."""
    try:
        return wh.objects.read_bytes(thumbnail_key(lesion_id))
    except FileNotFoundError:
        return None


def keep_picture(wh: Warehouse, name: str, data: bytes | Path | None) -> str | None:
    """Store a plot as ``plots/<name>-<sha8>.png`` in the warehouse files (one atomic write; the newest
    :data:`PLOTS_KEPT` versions of ``name`` are kept) and return its file name; None for no plot."""
    if data is None:
        return None
    raw = Path(data).read_bytes() if isinstance(data, Path) else bytes(data)
    final = f"{name}-{hashlib.sha1(raw).hexdigest()[:8]}.png"
    store = wh.objects
    store.write_bytes(f"{PLOT_DIR}/{final}", raw)  # also when present: its time makes it the newest version
    times = store.list_times(PLOT_DIR)
    pattern = re.compile(rf"^{re.escape(name)}-[0-9a-f]{{8}}\.png$")
    versions = sorted((n for n in times if pattern.match(n)), key=lambda n: (n == final, times[n]), reverse=True)
    for old in versions[PLOTS_KEPT:]:
        stem = old[:-4]
        for copy in times:
            if copy.startswith(f"{stem}-w") and copy.endswith(".png"):
                store.delete(f"{PLOT_DIR}/{copy}")
        store.delete(f"{PLOT_DIR}/{old}")
    return final


def picture_bytes(wh: Warehouse, folder: str, name: str) -> bytes | None:
    """A stored picture (``thumbnails`` / ``plots``), None when there is none."""
    try:
        return wh.objects.read_bytes(f"{folder}/{name}")
    except FileNotFoundError:
        return None


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


def page_sized(wh: Warehouse, name: str, width: int) -> str:
    """The plot ``name`` itself when at most ``width`` pixels wide, else a scaled-down copy kept beside it
    (``<stem>-w<width>.png``); returns the file name under ``plots``."""
    import io

    from PIL import Image

    store = wh.objects
    raw = store.read_bytes(f"{PLOT_DIR}/{name}")
    with Image.open(io.BytesIO(raw)) as im:
        if im.width <= width:
            return name
        out = f"{name[:-4]}-w{width}.png"
        if store.exists(f"{PLOT_DIR}/{out}"):
            return out
        small = im.convert("RGB").resize((width, max(1, round(im.height * width / im.width))), Image.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    store.write_bytes(f"{PLOT_DIR}/{out}", buf.getvalue())
    return out


def content_hash(lesion: Mapping[str, Any]) -> str:
    """What a picture depends on: the lesion's source fingerprint (its files and options), modality, body
    part, component and the renderer's version."""
    from imaging_assets.analysis.thumbnails import RENDER_VERSION

    return lesion_hash(lesion, RENDER_VERSION)


def _thumbnail_png(image: Any, mask: Any, lesion: Mapping[str, Any]) -> bytes:
    """In a worker: one lesion's picture."""
    from imaging_assets.analysis.thumbnails import render_thumbnail

    return render_thumbnail(image, mask, modality=lesion.get("modality"), body_part=lesion.get("body_part"))


def render_lesion_thumbnails(wh: Warehouse, workers: int | None = None, force: bool = False) -> ThumbnailsResult:
    """Draw the missing or outdated pictures of every extractable lesion (see the module docstring and
    :func:`~imaging_assets.stages.lesion_files.update_lesion_files`).

    Parameters
    ----------
    workers
        Worker processes (default: the CPUs of this machine, at most the number of series to draw).
    force
        Draw every picture again.
    """
    from imaging_assets.analysis.thumbnails import RENDER_VERSION

    r = update_lesion_files(wh, "lesion_thumbnails", THUMBNAIL_DIR, ".png", _thumbnail_png, RENDER_VERSION,
                            workers=workers, force=force)
    for f in r.failed[:10]:
        logger.warning("thumbnail of lesion %s: %s", f["lesion_id"], f["error"])
    largest = sorted(r.lesions, key=lambda x: -(x.get("volume_mm3") or 0))[:4]
    have = thumbnail_ids(wh)
    examples = [{"lesion_id": x["lesion_id"], "path": thumbnail_uri(wh, x["lesion_id"]),
                 "modality": x.get("modality"), "volume_mm3": x.get("volume_mm3")}
                for x in largest if x["lesion_id"] in have]
    return ThumbnailsResult(folder=r.folder, rendered=r.made, unchanged=r.unchanged, removed=r.removed,
                            failed=r.failed, total=r.total, elapsed_s=r.elapsed_s, examples=examples)


def thumbnail_coverage(wh: Warehouse) -> dict[str, Any]:
    """For the ``thumbnails_complete`` check: extractable lesions, pictures on disk, failures."""
    with wh.connect(read_only=True) as con:
        ids = [r[0] for r in con.execute("SELECT lesion_id FROM lesions WHERE extractable").fetchall()]
        errors = con.execute("SELECT lesion_id, error FROM lesion_thumbnails WHERE status = 'error' "
                             "ORDER BY lesion_id").fetchall()
    have = thumbnail_ids(wh)
    missing = [i for i in ids if i not in have]
    return {"lesions": len(ids), "with_picture": len(ids) - len(missing), "missing": missing,
            "errors": [{"lesion_id": e[0], "error": e[1]} for e in errors]}


def montage_png(wh: Warehouse, tiles: Sequence[Mapping[str, Any]], title: str | None = None,
                columns: int = 6) -> bytes:
    """One picture of several lesions side by side: ``tiles`` of ``{"lesion_id", "caption": [lines]}``; a
    lesion without a picture gets an empty tile saying so."""
    from imaging_assets.analysis.thumbnails import montage

    items = []
    for t in tiles:
        items.append((thumbnail_bytes(wh, str(t["lesion_id"])), list(t.get("caption") or [])))
    return montage(items, columns=columns, title=title)
