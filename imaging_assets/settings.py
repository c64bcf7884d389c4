"""Default locations, all overridable from the environment (no Dagster here).

This is the only module that reads the path variables; everything else asks it (the warehouse through
:meth:`imaging_assets.store.warehouse.Warehouse.from_settings`, the Dagster resources through their
defaults, the CLI through both).

=================================  =============================================  ==========================
setting                            environment variable                            default
=================================  =============================================  ==========================
data folder                        ``IMAGING_ASSETS_DATA``                         ``<repo>/data``
warehouse (a folder, or            ``IMAGING_ASSETS_WAREHOUSE``                    ``<data>/warehouse``
``s3://bucket/prefix`` for its
files and tables)
the DuckDB file's folder (always   ``IMAGING_ASSETS_DUCKDB_DIR``                   the warehouse folder; for
local disk)                                                                        ``s3://b/p``: ``<data>/duckdb/
                                                                                   b/p``
S3 endpoint and credentials        ``AWS_ENDPOINT_URL``, ``AWS_REGION``,           the AWS defaults
                                   ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
Lance vector tables (folder / URI) ``IMAGING_ASSETS_LANCE_URI``                    ``<warehouse>/lance``
outcome files (file or folder)     ``IMAGING_ASSETS_OUTCOMES``                     ``<demo>/outcomes.csv``
DICOM roots (``os.pathsep`` list)  ``IMAGING_ASSETS_DICOM_ROOTS``                  ``<data>/demo/dicom``
NIfTI/NRRD manifests (list)        ``IMAGING_ASSETS_MANIFESTS``                    none
pseudonymisation secret            ``IMAGING_ASSETS_PSEUDONYM_KEY``                the key file below
pseudonymisation key file          ``IMAGING_ASSETS_PSEUDONYM_KEY_FILE``           ``~/.config/imaging_assets/
                                                                                   pseudonym.key`` (made 0600)
pictures' public URL               ``IMAGING_ASSETS_PICTURES_URL``                 none (pictures inlined)
users, roles and token hashes      ``IMAGING_ASSETS_USERS``                        ``<warehouse>/users.json``
a running search server (the CLI)  ``IMAGING_ASSETS_SERVER_URL`` + ``_TOKEN``      none (files opened)
ad-hoc SQL statement timeout (s)   ``IMAGING_ASSETS_SQL_TIMEOUT_S``                ``30``
ad-hoc SQL memory limit            ``IMAGING_ASSETS_SQL_MEMORY_LIMIT``             ``2GB``
Lance versions kept for (days)     ``IMAGING_ASSETS_LANCE_KEEP_DAYS``              ``1`` (+ pinned versions)
your embedding model (TorchScript  ``IMAGING_ASSETS_EMBEDDING_MODEL``              none (the encoder trained
or ONNX file, with its sidecar     (+ ``_INPUT_SIZE``, ``_CHANNELS``,               on the cohort)
``<file>.json`` or the settings)   ``_INTENSITY``)
series per batch (partition) of    ``IMAGING_ASSETS_SERIES_PER_BATCH``             ``32``
the extraction
=================================  =============================================  ==========================
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Folder holding params, the demo cohort and (by default) the warehouse."""
    return Path(os.environ.get("IMAGING_ASSETS_DATA", PROJECT_ROOT / "data"))


def demo_dir() -> Path:
    """Where ``imaging-assets demo-data`` writes the synthetic cohort by default."""
    return data_dir() / "demo"


def warehouse_location() -> str:
    """Root of the warehouse's files and tables: a local folder (which also holds ``warehouse.duckdb``) or
    an object-store URI ``s3://bucket/prefix`` (the DuckDB file then lives in :func:`duckdb_dir`)."""
    return os.environ.get("IMAGING_ASSETS_WAREHOUSE") or str(data_dir() / "warehouse")


def is_remote(location: str | Path) -> bool:
    """True for an object-store URI (``s3://...``)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def duckdb_dir(location: str | Path | None = None) -> Path:
    """Local folder of the DuckDB file (and the private snapshots of SQL readers).

    ``IMAGING_ASSETS_DUCKDB_DIR`` when set; else the warehouse folder itself, or, for a warehouse on object
    storage (DuckDB cannot keep its file there), ``<data>/duckdb/<bucket>/<prefix>``."""
    env = os.environ.get("IMAGING_ASSETS_DUCKDB_DIR")
    if env:
        return Path(env)
    location = os.fspath(location) if location is not None else warehouse_location()
    if not is_remote(location):
        return Path(location)
    rest = location.split("://", 1)[1].strip("/")
    return data_dir() / "duckdb" / Path(*[p for p in rest.split("/") if p not in ("", ".", "..")])


def lance_uri(warehouse: str | Path | None = None) -> str:
    """LanceDB URI of the vector tables: ``IMAGING_ASSETS_LANCE_URI`` (a folder or ``s3://...``), else
    ``<warehouse>/lance``."""
    env = os.environ.get("IMAGING_ASSETS_LANCE_URI")
    if env:
        return env
    location = os.fspath(warehouse) if warehouse is not None else warehouse_location()
    if is_remote(location):
        return location.rstrip("/") + "/lance"
    return str(Path(location) / "lance")


def users_file() -> Path:
    """The users file of :mod:`imaging_assets.access` (names, roles, token hashes): ``IMAGING_ASSETS_USERS``,
    else ``<warehouse>/users.json``.

    Next to the warehouse by default because the users are those of that warehouse (its web server, its
    audit log), and a second warehouse gets its own; point the variable elsewhere to keep the file off a
    shared warehouse folder. The file holds no token in clear, only SHA-256 hashes, and is written 0600.
    """
    env = os.environ.get("IMAGING_ASSETS_USERS", "").strip()
    return Path(env) if env else duckdb_dir() / "users.json"


def pseudonym_key_file() -> Path:
    """The installation's pseudonymisation key file (:mod:`imaging_assets.dicom.pseudonym`), used when
    ``IMAGING_ASSETS_PSEUDONYM_KEY`` is not set: ``IMAGING_ASSETS_PSEUDONYM_KEY_FILE``, else
    ``$XDG_CONFIG_HOME/imaging_assets/pseudonym.key`` (``~/.config/...``). Outside the warehouse on purpose:
    whoever can read the warehouse must not also get the key (``stages.keys`` refuses a key file under it)."""
    env = os.environ.get("IMAGING_ASSETS_PSEUDONYM_KEY_FILE", "").strip()
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return (Path(config) if config else Path.home() / ".config") / "imaging_assets" / "pseudonym.key"


def pictures_url() -> str | None:
    """Base URL under which ``imaging-assets serve`` publishes the warehouse's pictures (``.../pictures``),
    as the Dagster UI's browser reaches it: ``IMAGING_ASSETS_PICTURES_URL`` (``make dev`` sets it), else None
    (asset metadata then carries the pictures themselves, behind the UI's "Show Markdown")."""
    env = os.environ.get("IMAGING_ASSETS_PICTURES_URL", "").strip()
    return env.rstrip("/") or None


def search_server() -> tuple[str, str] | None:
    """(URL, token) of a running ``imaging-assets serve`` that ``imaging-assets similar`` asks instead of
    opening the warehouse's files: ``IMAGING_ASSETS_SERVER_URL`` and ``IMAGING_ASSETS_TOKEN``, or None when
    either is unset."""
    url = os.environ.get("IMAGING_ASSETS_SERVER_URL", "").strip().rstrip("/")
    token = os.environ.get("IMAGING_ASSETS_TOKEN", "").strip()
    return (url, token) if url and token else None


def outcomes_source() -> Path:
    """Outcome files: ``IMAGING_ASSETS_OUTCOMES`` (a file or folder) or the demo cohort's ``outcomes.csv``."""
    env = os.environ.get("IMAGING_ASSETS_OUTCOMES")
    return Path(env) if env else demo_dir() / "outcomes.csv"


def _path_list(var: str) -> list[str]:
    raw = os.environ.get(var, "")
    return [p for p in raw.split(os.pathsep) if p.strip()]


def dicom_roots() -> list[str]:
    """Folders crawled by discovery."""
    return _path_list("IMAGING_ASSETS_DICOM_ROOTS") or [str(demo_dir() / "dicom")]


def manifests() -> list[str]:
    """Manifest CSVs of NIfTI/NRRD image + mask pairs (see ``dicom.segmentations.read_manifest``)."""
    return _path_list("IMAGING_ASSETS_MANIFESTS")


def sql_timeout_s() -> float:
    """Statement timeout of ad-hoc SQL (``imaging-assets sql``, :func:`imaging_assets.store.sql.run_sql`) in
    seconds: ``IMAGING_ASSETS_SQL_TIMEOUT_S`` (a positive number), default 30."""
    raw = os.environ.get("IMAGING_ASSETS_SQL_TIMEOUT_S", "").strip()
    if not raw:
        return 30.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"IMAGING_ASSETS_SQL_TIMEOUT_S={raw!r}: expected a positive number of seconds")
    return value


def sql_memory_limit() -> str:
    """Memory limit of one ad-hoc SQL query (DuckDB's ``memory_limit`` syntax, e.g. ``2GB``, ``512MB``):
    ``IMAGING_ASSETS_SQL_MEMORY_LIMIT``, default ``2GB``."""
    import re

    raw = os.environ.get("IMAGING_ASSETS_SQL_MEMORY_LIMIT", "").strip() or "2GB"
    if not re.fullmatch(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", raw, flags=re.IGNORECASE):
        raise ValueError(f"IMAGING_ASSETS_SQL_MEMORY_LIMIT={raw!r}: expected a size such as 2GB or 512MB")
    return raw


def lance_keep_days() -> float:
    """How long unpinned versions of the Lance tables stay for time travel, in days:
    ``IMAGING_ASSETS_LANCE_KEEP_DAYS`` (a number >= 0), default 1. Versions named by audit rows and cohorts
    stay regardless, and none younger than an hour is removed."""
    raw = os.environ.get("IMAGING_ASSETS_LANCE_KEEP_DAYS", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"IMAGING_ASSETS_LANCE_KEEP_DAYS={raw!r}: expected a number of days >= 0")
    return value


def embedding_model() -> dict[str, object] | None:
    """A model file of yours for the deep embeddings (``IMAGING_ASSETS_EMBEDDING_MODEL``: a local TorchScript or
    ONNX file, never downloaded), with ``IMAGING_ASSETS_EMBEDDING_INPUT_SIZE`` (voxels per side),
    ``_CHANNELS`` (1 or 2) and ``_INTENSITY`` (``project`` | ``zscore`` | ``minmax``) when its sidecar
    ``<file>.json`` does not say; None when unset (the encoder trained on the cohort is used)."""
    path = os.environ.get("IMAGING_ASSETS_EMBEDDING_MODEL", "").strip()
    if not path:
        return None
    out: dict[str, object] = {"path": str(Path(path).expanduser())}
    for key, var in (("input_size", "IMAGING_ASSETS_EMBEDDING_INPUT_SIZE"),
                     ("channels", "IMAGING_ASSETS_EMBEDDING_CHANNELS")):
        raw = os.environ.get(var, "").strip()
        if raw:
            try:
                out[key] = int(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: expected a whole number") from exc
    raw = os.environ.get("IMAGING_ASSETS_EMBEDDING_INTENSITY", "").strip()
    if raw:
        out["intensity"] = raw
    return out


def series_per_batch() -> int | None:
    """Series per batch of the partitioned extraction from ``IMAGING_ASSETS_SERIES_PER_BATCH`` (None when
    unset: the stage's default). A value that is not a whole number >= 1 raises, naming the variable."""
    raw = os.environ.get("IMAGING_ASSETS_SERIES_PER_BATCH", "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"IMAGING_ASSETS_SERIES_PER_BATCH={raw!r}: not a whole number") from exc
    if value < 1:
        raise ValueError(f"IMAGING_ASSETS_SERIES_PER_BATCH={raw!r}: must be at least 1")
    return value
