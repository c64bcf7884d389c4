"""Delta Lake tables written and read with ``deltalake`` (delta-rs) from Arrow, locally or on S3.

Storage only (no Dagster, no domain package). The lakehouse stage (:mod:`imaging_assets.stages.lakehouse`)
copies the governed DuckDB / Lance tables here so Spark, Databricks, polars, DuckDB or Trino users read them
without touching the warehouse.

Writing (:func:`merge_table`)
    The first call creates the table (``write_deltalake``: name, description, partition columns); each later
    call is **one** ``MERGE`` on the natural key: rows whose non-key columns changed are updated, new keys
    inserted, keys that vanished deleted (``when_not_matched_by_source_delete``). The update carries the
    predicate "some non-key column ``IS DISTINCT FROM`` the source" (measured with delta-rs 1.6.6: without
    it every matched row counts as updated and every data file is rewritten; with it an unchanged run adds
    and removes no data file; ``IS DISTINCT FROM`` treats NULL = NULL and NaN = NaN, also inside list and
    fixed-size list columns). delta-rs does not commit a merge that changed nothing, so such a run commits an
    empty append (a ``WRITE`` of zero files) carrying the run's lineage: the version history grows by one per
    call, and ``DESCRIBE HISTORY`` names every run.

Governance
    * description: the table's metadata (``DESCRIBE DETAIL``);
    * column comments: ``{"comment": ...}`` in each field's metadata, as Spark stores ``COMMENT``;
    * table properties (``TBLPROPERTIES``): delta-rs 1.6 refuses keys it does not know at creation
      (``configuration={"imaging_assets.version": ...}`` fails with "Error parsing property"), but
      ``alter.set_table_properties(..., raise_if_not_exists=False)`` accepts them. That is a commit of its
      own (even when the values are the same), so it runs only when a managed value changed -- and then
      it is the run's version when the data did not change, otherwise a second version of the same run;
    * lineage: the commit's custom metadata (``CommitProperties(custom_metadata=...)``): every key as
      ``imaging_assets.<key>`` in ``commitInfo``, and all of them as JSON in ``userMetadata`` (the column
      Spark's ``DESCRIBE HISTORY`` shows).

A schema change (a column added, removed or retyped, a comment or the partitioning changed) rewrites the
table in one ``WRITE`` (``mode="overwrite"``, ``schema_mode="overwrite"``): the older versions keep the old
schema (time travel still reads them).

Reading: :func:`open_table`, :func:`history`, :func:`table_version`, :func:`table_properties`,
:func:`column_comments`, :func:`list_tables`, and :func:`register_duckdb_views` (a table's
``to_pyarrow_dataset()`` registered on a DuckDB connection: DuckDB's ``delta`` extension has no build for
duckdb 2.0 here, so Arrow datasets are the path, as for Lance). Every call passes
:func:`imaging_assets.store.objects.storage_options` (None for a local path), so ``s3://`` URIs work with
the options registered for the warehouse.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from imaging_assets.store import objects as objstore

if TYPE_CHECKING:  # annotations only: deltalake and duckdb are imported where used
    import duckdb
    from deltalake import DeltaTable

logger = logging.getLogger(__name__)

#: Prefix of the table properties and commit metadata keys this module manages.
PROPERTY_PREFIX = "imaging_assets."
#: Key of the field metadata that holds a column comment (Spark's convention).
COMMENT_KEY = "comment"


@dataclass(frozen=True)
class MergeResult:
    """What one :func:`merge_table` call did to one Delta table.

    ``version`` is the table's version after the call; ``versions_added`` the commits it made (1, or 2 when
    the managed table properties changed as well as the data); ``files_added`` / ``files_removed`` the data
    files the merge wrote and retired (0 / 0 for an unchanged run).
    """

    uri: str
    version: int
    rows: int
    inserted: int
    updated: int
    deleted: int
    created: bool
    rewritten: bool = False
    files_added: int = 0
    files_removed: int = 0
    properties_changed: bool = False
    versions_added: int = 1
    elapsed_s: float = 0.0

    @property
    def changed(self) -> bool:
        """True when rows were inserted, updated or deleted (or the table was created or rewritten)."""
        return bool(self.created or self.rewritten or self.inserted or self.updated or self.deleted)


# ------------------------------------------------------------------------------------------------ helpers
def _options(uri: str) -> dict[str, str] | None:
    return objstore.storage_options(uri)


def _quote(name: str) -> str:
    """A DataFusion SQL identifier (double quotes; delta-rs lower-cases unquoted names)."""
    return '"' + name.replace('"', '""') + '"'


def with_comments(table: pa.Table, comments: Mapping[str, str] | None) -> pa.Table:
    """``table`` with ``{"comment": text}`` in the field metadata of each commented column (others keep
    theirs); a comment for a column the table lacks is an error (a typo would silently lose it)."""
    comments = dict(comments or {})
    unknown = set(comments) - set(table.column_names)
    if unknown:
        raise ValueError(f"comments for columns the table does not have: {', '.join(sorted(unknown))}")
    fields = []
    for f in table.schema:
        meta = dict(f.metadata or {})
        if f.name in comments:
            meta[COMMENT_KEY.encode()] = str(comments[f.name]).encode()
        fields.append(f.with_metadata(meta) if meta else f.remove_metadata())
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def _delta_layout(table: pa.Table) -> pa.Table:
    """Fixed-size lists as plain lists: Delta has no fixed-size list type (a vector is ``array<float>``),
    and data files written with one disagree with the table's schema for readers such as polars."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            return pa.list_(pa.field(t.value_field.name, plain(t.value_type), t.value_field.nullable))
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        return t

    fields = [f.with_type(plain(f.type)) for f in table.schema]
    schema = pa.schema(fields, metadata=table.schema.metadata)
    return table if schema.equals(table.schema, check_metadata=True) else table.cast(schema)


def _check_keys(table: pa.Table, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise ValueError(f"key columns {missing} are not columns of the table ({', '.join(table.column_names)})")
    if not keys:
        raise ValueError("a merge needs at least one key column")
    if table.num_rows == 0:
        return
    for k in keys:
        if table.column(k).null_count:
            raise ValueError(f"key column {k!r} has {table.column(k).null_count} NULL value(s)")
    counts = table.select(list(keys)).group_by(list(keys)).aggregate([([], "count_all")])
    dup = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dup.num_rows:
        example = {k: dup.column(k)[0].as_py() for k in keys}
        raise ValueError(f"the key ({', '.join(keys)}) is not unique: {dup.num_rows} key(s) occur more than "
                         f"once, e.g. {example}")


def lineage_metadata(lineage: Mapping[str, Any] | None) -> dict[str, str]:
    """The commit's custom metadata for ``lineage``: ``imaging_assets.<key>`` strings plus ``userMetadata``
    (all of it as JSON, the column Spark's ``DESCRIBE HISTORY`` shows)."""
    lineage = {str(k): v for k, v in (lineage or {}).items()}
    out = {f"{PROPERTY_PREFIX}{k}": (v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
           for k, v in lineage.items() if v is not None}
    if lineage:
        out["userMetadata"] = json.dumps(lineage, sort_keys=True, default=str)
    return out


def _commit(lineage: Mapping[str, Any] | None) -> Any:
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata=lineage_metadata(lineage) or None)


def _schema_of(dt: DeltaTable) -> pa.Schema:
    return pa.schema(dt.schema().to_arrow())


def _field_signature(schema: pa.Schema) -> list[tuple[str, str, str | None]]:
    """Name, type and comment of each field: what decides whether a merge can keep the stored schema."""
    out = []
    for f in schema:
        meta = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in (f.metadata or {}).items()}
        out.append((f.name, str(f.type), meta.get(COMMENT_KEY)))
    return out


def _conform(table: pa.Table, stored: pa.Schema) -> pa.Table | None:
    """``table`` cast to the stored schema when it has the same columns, types and comments (in any order:
    Delta's string/large-string and view types differ only in Arrow), else None (a rewrite is needed)."""
    if sorted(table.column_names) != sorted(stored.names):
        return None
    try:
        cast = table.select(stored.names).cast(stored)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    want = {n: (t, c) for n, t, c in _field_signature(table.schema)}
    for name, _typ, comment in _field_signature(stored):
        if want[name][1] != comment:
            return None
        stored_type, new_type = stored.field(name).type, table.schema.field(name).type
        if not _same_type(stored_type, new_type):
            return None
    return cast


def _plain(t: pa.DataType) -> pa.DataType:
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_large_list(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_fixed_size_list(t):  # Delta has no fixed-size list: stored as an array
        return pa.list_(_plain(t.value_type))
    if pa.types.is_timestamp(t):
        return pa.timestamp("us", t.tz)
    return t


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    return _plain(a) == _plain(b)


# -------------------------------------------------------------------------------------------------- write
def merge_table(
    uri: str,
    table: pa.Table,
    keys: Sequence[str],
    *,
    partition_by: Sequence[str] | None = None,
    name: str | None = None,
    description: str = "",
    column_comments: Mapping[str, str] | None = None,
    properties: Mapping[str, str] | None = None,
    lineage: Mapping[str, Any] | None = None,
    volatile: Sequence[str] = (),
) -> MergeResult:
    """Write ``table`` as the new content of the Delta table at ``uri``: created on the first call, then one
    ``MERGE`` on ``keys`` per call (update changed rows, insert new keys, delete vanished keys).

    Parameters
    ----------
    uri
        The table's folder or ``s3://bucket/prefix/table`` (storage options from
        :func:`imaging_assets.store.objects.storage_options`).
    table
        The complete current content; ``keys`` must be unique and not NULL.
    keys
        The natural key columns.
    partition_by
        Partition columns (Hive-style folders); changing them rewrites the table.
    name, description
        The table's name (default: the last part of ``uri``) and description (metadata); a changed
        description is set with one more commit.
    column_comments
        Column -> comment (field metadata ``comment``, as Spark's ``COMMENT``).
    properties
        Table properties (``TBLPROPERTIES``), keys prefixed with :data:`PROPERTY_PREFIX` unless they carry
        one; set (one commit) only when a value differs from the stored one.
    lineage
        Recorded in every commit this call makes (asset key, run id, source versions, ...):
        ``commitInfo.imaging_assets.<key>`` and ``commitInfo.userMetadata`` (JSON).
    volatile
        Columns that do not make a row changed (bookkeeping such as ``computed_at``, set anew each time a
        table is recomputed): a row whose other columns are equal keeps its stored values, so an upstream
        re-run with the same results rewrites nothing.

    Returns
    -------
    MergeResult
        The table version after the call and the rows inserted / updated / deleted.

    Raises
    ------
    ValueError
        A key column is missing, NULL or not unique, or a comment names a column the table lacks.
    """
    from deltalake import DeltaTable, write_deltalake

    t0 = time.perf_counter()
    keys = list(keys)
    partition_by = list(partition_by or [])
    opts = _options(uri)
    table = _delta_layout(with_comments(table, column_comments))
    _check_keys(table, keys)
    commit = _commit(lineage)
    wanted_props = {(k if k.startswith(PROPERTY_PREFIX) else PROPERTY_PREFIX + k): str(v)
                    for k, v in (properties or {}).items()}
    name = name or uri.rstrip("/").rsplit("/", 1)[-1]

    def finish(dt: DeltaTable, **kw: Any) -> MergeResult:
        return MergeResult(uri=uri, version=dt.version(), rows=table.num_rows,
                           elapsed_s=round(time.perf_counter() - t0, 3), **kw)

    if not exists(uri):
        write_deltalake(uri, table, mode="error", partition_by=partition_by or None, name=name,
                        description=description or None, storage_options=opts, commit_properties=commit)
        dt = DeltaTable(uri, storage_options=opts)
        added = 1
        if wanted_props:
            dt.alter.set_table_properties(wanted_props, raise_if_not_exists=False, commit_properties=commit)
            dt.update_incremental()
            added += 1
        logger.info("created Delta table %s (version %s, %d rows)", uri, dt.version(), table.num_rows)
        return finish(dt, inserted=table.num_rows, updated=0, deleted=0, created=True,
                      files_added=len(dt.file_uris()), properties_changed=bool(wanted_props), versions_added=added)

    dt = DeltaTable(uri, storage_options=opts)
    start_version = dt.version()
    meta = dt.metadata()
    stored = _schema_of(dt)
    source = _conform(table, stored) if list(meta.partition_columns) == partition_by else None
    if source is None:  # the schema or the partitioning changed: one overwrite with the new schema
        old_rows = dt.count()
        write_deltalake(dt, table, mode="overwrite", schema_mode="overwrite", partition_by=partition_by or None,
                        name=name, description=description or None, storage_options=opts,
                        commit_properties=commit)
        dt.update_incremental()
        logger.info("rewrote Delta table %s for a new schema (version %s)", uri, dt.version())
        changed = _set_metadata(dt, description, wanted_props, commit)
        return finish(dt, inserted=table.num_rows, updated=0, deleted=old_rows, created=False, rewritten=True,
                      properties_changed=changed, versions_added=dt.version() - start_version)

    props_changed = _set_metadata(dt, description, wanted_props, commit)
    dt.update_incremental()
    on = " AND ".join(f"t.{_quote(k)} = s.{_quote(k)}" for k in keys)
    builder = dt.merge(source, on, source_alias="s", target_alias="t", commit_properties=commit)
    others = [c for c in source.column_names if c not in keys and c not in set(volatile)]
    if others:
        changed = " OR ".join(f"(t.{_quote(c)} IS DISTINCT FROM s.{_quote(c)})" for c in others)
        builder = builder.when_matched_update_all(predicate=changed)
    metrics = builder.when_not_matched_insert_all().when_not_matched_by_source_delete().execute()
    dt.update_incremental()
    if dt.version() == start_version:  # nothing changed and nothing committed: record the run anyway
        write_deltalake(dt, source.slice(0, 0), mode="append", storage_options=opts, commit_properties=commit)
        dt.update_incremental()
    return finish(dt, inserted=int(metrics.get("num_target_rows_inserted", 0)),
                  updated=int(metrics.get("num_target_rows_updated", 0)),
                  deleted=int(metrics.get("num_target_rows_deleted", 0)), created=False,
                  files_added=int(metrics.get("num_target_files_added", 0)),
                  files_removed=int(metrics.get("num_target_files_removed", 0)),
                  properties_changed=props_changed, versions_added=dt.version() - start_version)


def _set_metadata(dt: DeltaTable, description: str, props: Mapping[str, str], commit: Any) -> bool:
    """Set the description and the managed properties where they differ (one commit each); True if any."""
    changed = False
    meta = dt.metadata()
    if description and (meta.description or "") != description:
        dt.alter.set_table_description(description, commit_properties=commit)
        dt.update_incremental()
        changed = True
    current = dict(dt.metadata().configuration or {})
    diff = {k: v for k, v in props.items() if current.get(k) != v}
    if diff:
        dt.alter.set_table_properties(diff, raise_if_not_exists=False, commit_properties=commit)
        dt.update_incremental()
        changed = True
    return changed


# --------------------------------------------------------------------------------------------------- read
def exists(uri: str) -> bool:
    """True when ``uri`` holds a Delta table.

    Opens the table rather than calling ``DeltaTable.is_deltatable``: in delta-rs 1.6.6 that call (like
    ``history()`` and the ``alter`` operations) keeps the GIL while it waits on the network, which hangs
    against an S3 server running in the same Python process (moto's ``ThreadedMotoServer``).
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        DeltaTable(uri, storage_options=_options(uri))
    except TableNotFoundError:
        return False
    return True


def open_table(uri: str, version: int | None = None) -> DeltaTable:
    """The ``DeltaTable`` at ``uri`` (latest, or ``version`` for time travel)."""
    from deltalake import DeltaTable

    return DeltaTable(uri, version=version, storage_options=_options(uri))


def table_version(uri: str) -> int | None:
    """The current version of the table at ``uri``, None when there is none."""
    if not exists(uri):
        return None
    return open_table(uri).version()


def history(uri: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The commits of the table, newest first (``DESCRIBE HISTORY``): version, timestamp, operation,
    operationMetrics, and the lineage keys (``imaging_assets.*``, ``userMetadata``) of each commit."""
    return list(open_table(uri).history(limit))


def table_properties(uri: str) -> dict[str, str]:
    """The table properties (``TBLPROPERTIES``)."""
    return dict(open_table(uri).metadata().configuration or {})


def column_comments(uri: str) -> dict[str, str]:
    """Column -> comment of the table's current schema (columns without a comment are left out)."""
    return {n: c for n, _t, c in _field_signature(_schema_of(open_table(uri))) if c}


def list_tables(root: str) -> list[str]:
    """Names of the Delta tables directly under ``root`` (a folder or ``s3://`` prefix), sorted."""
    if not objstore.is_remote(root):  # a folder with a _delta_log (no table opened: cheap for each SQL query)
        if not os.path.isdir(root):
            return []
        return sorted(n for n in os.listdir(root) if not n.startswith((".", "_"))
                      and os.path.isdir(os.path.join(root, n, "_delta_log")))
    found = objstore.store(root)
    return [n for n in found.list_dirs() if not n.startswith((".", "_")) and "_delta_log" in found.list_dirs(n)]


def register_duckdb_views(
    con: duckdb.DuckDBPyConnection,
    root: str,
    names: Sequence[str] | None = None,
    prefix: str = "",
    versions: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Register Delta tables under ``root`` on ``con`` as Arrow datasets named ``<prefix><table>``.

    DuckDB's ``delta`` extension cannot be installed with duckdb 2.0 here, so each table's
    ``DeltaTable.to_pyarrow_dataset()`` (the version current now, or ``versions[name]``) is registered:
    DuckDB scans it lazily with projection and filter push-down (partition pruning included).

    Returns
    -------
    dict
        Table name -> the version registered (what an audit row should record).
    """
    seen: dict[str, int] = {}
    for name in (list_tables(root) if names is None else names):
        view = f"{prefix}{name}"
        if not view.replace("_", "").isalnum():
            raise ValueError(f"view name {view!r} is not a plain identifier")
        uri = objstore.join(root, name)
        dt = open_table(uri, (versions or {}).get(name))
        con.register(view, dt.to_pyarrow_dataset())
        seen[name] = dt.version()
    return seen
