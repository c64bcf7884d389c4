"""Connections to the LanceDB database (cached per URI) and opening its tables.

``uri`` everywhere is a local folder or an object-store URI (``s3://``, ``gs://``, ``az://``). For
``s3://`` the endpoint and credentials are those registered for the warehouse
(:func:`imaging_assets.store.objects.storage_options`: the resource's fields, else the standard AWS
environment variables), passed to LanceDB as ``storage_options``; other schemes use the client's own
environment variables.

Reads of a local table (:func:`open_dataset`, :func:`table_version`) open its pylance dataset
(``<uri>/<table>.lance``, the folder LanceDB itself writes) directly: importing ``lancedb`` costs ~1 s of
a command's start (its namespace and embedding clients), ``lance`` alone a tenth of it. Object-store URIs,
and anything the direct path cannot open, go through LanceDB's connection as before.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imaging_assets.store.lance.schema import VECTOR_TABLE
from imaging_assets.store.objects import storage_options

if TYPE_CHECKING:  # heavy imports stay lazy (the Dagster loader imports modules that import this one)
    import lancedb
    import lancedb.table

logger = logging.getLogger(__name__)

_CONNECTIONS: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
_CONNECTIONS_LOCK = threading.Lock()


def _uri_str(uri: str | os.PathLike[str]) -> str:
    text = os.fspath(uri)
    if "://" not in text:  # local folder: absolute, so cached connections do not depend on the cwd
        text = str(Path(text).expanduser().resolve())
    return text


def open_db(uri: str | os.PathLike[str]) -> lancedb.DBConnection:
    """Connect to the LanceDB database at ``uri``.

    Parameters
    ----------
    uri
        Local folder (created on first write) or object-store URI (``s3://bucket/prefix``, ``gs://``,
        ``az://``). ``s3://`` endpoints and credentials: :func:`~imaging_assets.store.objects.storage_options`;
        others from the environment, read by LanceDB itself (``GOOGLE_SERVICE_ACCOUNT``,
        ``AZURE_STORAGE_ACCOUNT_NAME``...).

    Returns
    -------
    lancedb.DBConnection
        A connection, cached per URI inside this process (so the index and metadata caches of Lance
        survive between searches).
    """
    key = _uri_str(uri)
    options = storage_options(key)
    cache_key = (key, tuple(sorted(options.items())) if options else ())  # new credentials: a new connection
    with _CONNECTIONS_LOCK:
        con = _CONNECTIONS.get(cache_key)
        if con is None:
            import lancedb

            con = lancedb.connect(key, storage_options=options) if options else lancedb.connect(key)
            _CONNECTIONS[cache_key] = con
        return con


def table_names(db: Any) -> list[str]:
    """Every table of a LanceDB connection (``list_tables`` is paginated)."""
    names: list[str] = []
    token = None
    while True:
        resp = db.list_tables(page_token=token)
        names.extend(resp.tables)
        token = getattr(resp, "page_token", None)
        if not token:
            return names


def _open_table(uri: str | os.PathLike[str], table_name: str) -> lancedb.table.Table | None:
    db = open_db(uri)
    try:
        return db.open_table(table_name)
    except (FileNotFoundError, ValueError) as exc:
        if table_name in table_names(db):
            raise
        logger.debug("no table %s at %s: %s", table_name, _uri_str(uri), exc)
        return None


def _require_table(uri: str | os.PathLike[str], table_name: str) -> lancedb.table.Table:
    tbl = _open_table(uri, table_name)
    if tbl is None:
        raise FileNotFoundError(
            f"no LanceDB table {table_name!r} at {_uri_str(uri)} (materialize lesion_vectors first)"
        )
    return tbl


def _local_dataset_path(uri: str | os.PathLike[str], table_name: str) -> Path | None:
    """The folder of a local table as LanceDB lays it out (``<uri>/<table>.lance``) when it holds a committed
    version, else None (object-store URI, no such table yet, or not a plain table name)."""
    text = os.fspath(uri)
    if "://" in text or not table_name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return None
    path = Path(_uri_str(text)) / f"{table_name}.lance"
    return path if (path / "_versions").is_dir() else None


def open_dataset(uri: str | os.PathLike[str], table_name: str = VECTOR_TABLE, version: int | None = None) -> Any:
    """The pylance ``LanceDataset`` of a table, latest or at ``version`` (read-only).

    A local table is opened directly with ``lance.dataset`` (no ``lancedb`` import); an object-store
    table, or a version the direct open refuses, through LanceDB (:func:`open_db`), which raises the
    explanations (no such table: ``FileNotFoundError``; no such version: ``ValueError`` listing the
    available ones).
    """
    path = _local_dataset_path(uri, table_name)
    if path is not None:
        import lance

        try:
            return lance.dataset(str(path), version=None if version is None else int(version))
        except Exception as exc:  # noqa: BLE001 - let LanceDB open it, or explain why it cannot
            logger.debug("direct open of %s (version %s) failed, trying LanceDB: %s", path, version, exc)
    return _checked_out(uri, table_name, version).to_lance()


def table_version(uri: str | os.PathLike[str], table_name: str = VECTOR_TABLE) -> int | None:
    """Current version of the table (for time travel), ``None`` when it does not exist."""
    if _local_dataset_path(uri, table_name) is not None:
        return int(open_dataset(uri, table_name).version)
    tbl = _open_table(uri, table_name)
    return None if tbl is None else int(tbl.version)


def _checked_out(uri: str | os.PathLike[str], table_name: str, version: int | None) -> Any:
    """The table, at ``version`` (read-only) when given."""
    tbl = _require_table(uri, table_name)
    if version is not None:
        try:
            tbl.checkout(int(version))
        except Exception as exc:  # noqa: BLE001 - Lance raises several types for a missing version
            available = [int(v["version"]) for v in tbl.list_versions()]
            raise ValueError(
                f"version {version} of {table_name!r} at {_uri_str(uri)} is not available (never written, or "
                f"removed by optimize's cleanup); available versions: {available[:3]}...{available[-3:]}"
            ) from exc
    return tbl
