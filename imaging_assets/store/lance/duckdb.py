"""The Lance tables as DuckDB views.

SQL (:func:`register_duckdb_views`)
    DuckDB cannot load its ``lance`` extension here; each table is registered through pylance's
    ``LanceDataset`` (a ``pyarrow.dataset.Dataset``), so DuckDB scans it lazily with projection and
    filter push-down, no copy of the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from imaging_assets.store.lance.connection import open_dataset
from imaging_assets.store.lance.schema import VECTOR_TABLE

if TYPE_CHECKING:  # the top-level duckdb package (absolute import), only for annotations
    import duckdb


def lance_dataset(uri: str | os.PathLike[str], table_name: str = VECTOR_TABLE, version: int | None = None) -> Any:
    """The pylance ``LanceDataset`` behind a table (latest or ``version``), with the connection's storage options
    (a local table is opened directly, without importing ``lancedb``: :func:`~.connection.open_dataset`)."""
    return open_dataset(uri, table_name, version)


def register_duckdb_views(
    con: duckdb.DuckDBPyConnection,
    uri: str | os.PathLike[str],
    table_names: Sequence[str] = (VECTOR_TABLE,),
    versions: Mapping[str, int | None] | None = None,
) -> list[str]:
    """Make Lance tables queryable from DuckDB SQL as views of the same name.

    Each table's pylance dataset (a ``pyarrow.dataset.Dataset``) is registered on ``con``: DuckDB scans
    it lazily at query time, pushing projections and filters down, without copying the table (no
    ``lance`` extension needed). The view sees the version current at registration; call again after a
    write to see the new version. The ``vector`` column reads as ``FLOAT[dim]``.

    ``versions`` pins tables to given versions (e.g. the version an audit row records).

    Returns
    -------
    list of str
        The registered view names.
    """
    names: list[str] = []
    for name in table_names:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"table name {name!r} is not a plain identifier")
        con.register(name, lance_dataset(uri, name, (versions or {}).get(name)))
        names.append(name)
    return names
