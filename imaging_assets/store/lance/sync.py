"""Writes to the vector table: diff, one upsert, read-back verification; cluster updates.

Writes (:func:`sync_vectors`)
    The new cohort is compared with the current table content *before* anything is written: row by row,
    by ``lesion_id``, every column (vector bit for bit, metadata null-aware) — an exact, vectorised
    comparison, which is what a per-row content hash would approximate. Nothing changed → nothing is
    written and the table version stays the same. Otherwise the changed and new rows go through one
    ``merge_insert("lesion_id")`` (update matched, insert unmatched) and the lesions that disappeared are
    deleted. Afterwards the table is **read back and verified** (exactly the expected ``lesion_id``\\ s,
    no duplicates, the expected content). LanceDB has had releases where ``merge_insert`` on a key with
    a scalar index silently updated 0 rows; if the verification fails the changed ids are deleted and
    re-added (``delete`` + ``add``) and the table verified again; if it is still wrong a
    :class:`VectorStoreIntegrityError` says how (missing / unexpected / duplicated / different rows).
    One writer at a time is assumed (the ``lesion_vectors`` asset): a concurrent write between the diff
    and the read-back would show up as a mismatch and be overwritten by the fallback.
    A different vector dimension (a new feature-set version with another number of robust features) or
    an older column layout rewrites the table (``mode="overwrite"``; older versions stay readable by
    time travel until cleaned up).
    After every write the index policy of :mod:`~imaging_assets.store.lance.index` is applied.

The ``cluster`` column
    Owned by the phenotype-clustering stage. Pass a ``cluster`` column to set it (it is then compared
    like any other column); leave it out and unchanged lesions keep the cluster they have, while new or
    changed lesions get ``NULL`` (their old cluster, if any, described another vector).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imaging_assets.errors import VectorStoreIntegrityError
from imaging_assets.store.lance.connection import _open_table, _require_table, _uri_str, open_db
from imaging_assets.store.lance.index import (
    ANN_INDEX_TYPES,
    DATA_STORAGE_VERSION,
    DEFAULT_INDEX_TYPE,
    DEFAULT_SCALAR_INDEXES,
    _maintain_indexes,
    default_exact_threshold,
)
from imaging_assets.store.lance.schema import (
    METADATA_TYPES,
    VECTOR_COLUMN,
    VECTOR_TABLE,
    _conform,
    _same_layout,
    _schema_dim,
    _vectors_numpy,
    vector_schema,
)
from imaging_assets.store.lance.search import _in_list

logger = logging.getLogger(__name__)

_DELETE_CHUNK = 5_000


# ------------------------------------------------------------------------------------------------- diffs


def _rows_equal(a: pa.Table, b: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Row-wise equality of two aligned tables over ``columns`` (nulls equal nulls, vectors bit-exact)."""
    n = a.num_rows
    equal = np.ones(n, dtype=bool)
    if n == 0:
        return equal
    for name in columns:
        if name == VECTOR_COLUMN:
            va, vb = _vectors_numpy(a[name]), _vectors_numpy(b[name])
            if va.shape != vb.shape:
                return np.zeros(n, dtype=bool)
            equal &= np.all(va.view(np.uint32) == vb.view(np.uint32), axis=1)
            continue
        ca, cb = a[name].combine_chunks(), b[name].combine_chunks()
        if ca.type != cb.type:
            cb = cb.cast(ca.type)
        same = pc.fill_null(pc.equal(ca, cb), False)
        both_null = pc.and_(pc.is_null(ca), pc.is_null(cb))
        equal &= pc.or_(same, both_null).to_numpy(zero_copy_only=False)
    return equal


@dataclass
class _Diff:
    new_ids: list[str]
    changed_ids: list[str]
    deleted_ids: list[str]
    unchanged: int
    expected: pa.Table  # the full table as it must read after the sync
    to_write: pa.Table  # rows to upsert (new + changed), with their final cluster value


def _diff(old: pa.Table, new: pa.Table, compare_cluster: bool) -> _Diff:
    """Compare the current table content ``old`` with the cohort ``new`` (both in the vector layout)."""
    old_ids = old["lesion_id"].combine_chunks()
    new_ids = new["lesion_id"].combine_chunks()
    pos = pc.index_in(new_ids, value_set=old_ids)  # first occurrence in old, null when new
    matched = pc.is_valid(pos).to_numpy(zero_copy_only=False)
    # Ids stored more than once (a corrupt table) are always rewritten.
    counts = pc.value_counts(old_ids)
    multi = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    duplicated = pc.is_in(new_ids, value_set=multi).to_numpy(zero_copy_only=False) if len(multi) else np.zeros(
        len(new_ids), bool
    )
    compare = [c for c in new.column_names if c != "lesion_id" and (compare_cluster or c != "cluster")]
    equal = np.zeros(new.num_rows, dtype=bool)
    midx = np.flatnonzero(matched)
    if midx.size:
        old_rows = old.take(pc.take(pos, pa.array(midx)))
        equal[midx] = _rows_equal(old_rows, new.take(pa.array(midx)), compare)
    unchanged_mask = matched & equal & ~duplicated
    changed_mask = matched & ~unchanged_mask
    # Final cluster: given by the input, else kept for unchanged rows and NULL for new/changed ones.
    if compare_cluster:
        expected = new
    else:
        cluster = np.full(new.num_rows, 0, dtype=np.int32)
        valid = np.zeros(new.num_rows, dtype=bool)
        uidx = np.flatnonzero(unchanged_mask)
        if uidx.size:
            old_cluster = old["cluster"].combine_chunks().take(pc.take(pos, pa.array(uidx)))
            valid[uidx] = pc.is_valid(old_cluster).to_numpy(zero_copy_only=False)
            cluster[uidx] = old_cluster.fill_null(0).to_numpy(zero_copy_only=False)
        cluster_arr = pa.array(cluster, type=pa.int32(), mask=~valid)
        expected = new.set_column(new.schema.get_field_index("cluster"), new.schema.field("cluster"), cluster_arr)
    write_mask = ~unchanged_mask
    in_new = pc.is_in(old_ids, value_set=new_ids).to_numpy(zero_copy_only=False)
    deleted = sorted(set(old_ids.filter(pa.array(~in_new)).to_pylist()))
    return _Diff(
        new_ids=new_ids.filter(pa.array(~matched)).to_pylist(),
        changed_ids=new_ids.filter(pa.array(changed_mask)).to_pylist(),
        deleted_ids=deleted,
        unchanged=int(unchanged_mask.sum()),
        expected=expected,
        to_write=expected.filter(pa.array(write_mask)),
    )


@dataclass
class _Verification:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.duplicated or self.different)

    def bad_ids(self) -> list[str]:
        return sorted(set(self.missing) | set(self.unexpected) | set(self.duplicated) | set(self.different))

    def describe(self) -> str:
        parts = []
        for label, ids in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("duplicated", self.duplicated),
            ("with other content", self.different),
        ):
            if ids:
                parts.append(f"{len(ids)} {label} (e.g. {ids[:3]})")
        return ", ".join(parts) or "consistent"


def _read_all(tbl: Any) -> pa.Table:
    return tbl.to_lance().to_table()


def _verify(tbl: Any, expected: pa.Table) -> _Verification:
    """Read the table back and compare it with ``expected`` (ids, duplicates, every column)."""
    actual = _read_all(tbl)
    result = _Verification()
    act_ids = actual["lesion_id"].combine_chunks()
    exp_ids = expected["lesion_id"].combine_chunks()
    counts = pc.value_counts(act_ids)
    result.duplicated = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()
    result.missing = exp_ids.filter(pc.invert(pc.is_in(exp_ids, value_set=act_ids))).to_pylist()
    result.unexpected = sorted(set(act_ids.filter(pc.invert(pc.is_in(act_ids, value_set=exp_ids))).to_pylist()))
    pos = pc.index_in(exp_ids, value_set=act_ids)
    present = np.flatnonzero(pc.is_valid(pos).to_numpy(zero_copy_only=False))
    if present.size:
        cols = [c for c in expected.column_names if c != "lesion_id"]
        actual_rows = actual.select(expected.column_names).take(pc.take(pos, pa.array(present)))
        equal = _rows_equal(actual_rows, expected.take(pa.array(present)), cols)
        result.different = exp_ids.take(pa.array(present[~equal])).to_pylist()
    return result


# -------------------------------------------------------------------------------------------------- sync


@dataclass
class SyncReport:
    """What :func:`sync_vectors` did.

    Attributes
    ----------
    inserted, updated, deleted, unchanged
        Lesions added, rewritten (vector or metadata changed), removed, left as they were.
    rows
        Rows in the table afterwards.
    version
        Table version afterwards (equal to the version before when nothing changed); put it in the asset
        metadata for time travel.
    index
        Vector index afterwards: ``"none"`` (exact search), ``"IVF_SQ"``, ``"IVF_PQ"`` or ``"IVF_HNSW_SQ"``.
    rebuilt_index
        Whether the ANN index was (re)trained in this sync (rather than extended by ``optimize``).
    fallback
        Whether the read-back verification failed after ``merge_insert`` and delete+add repaired it.
    rewritten
        Whether the table was overwritten (new dimension or column layout).
    """

    inserted: int
    updated: int
    deleted: int
    unchanged: int
    rows: int
    version: int
    index: str
    rebuilt_index: bool
    fallback: bool = False
    rewritten: bool = False

    @property
    def changed(self) -> bool:
        """Whether anything was written."""
        return bool(self.inserted or self.updated or self.deleted or self.rewritten)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for asset metadata)."""
        return asdict(self)


def _delete_ids(tbl: Any, ids: Sequence[str]) -> None:
    for start in range(0, len(ids), _DELETE_CHUNK):
        tbl.delete(_in_list("lesion_id", ids[start : start + _DELETE_CHUNK]))


def _resolve_scalar(scalar_index_columns: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    if scalar_index_columns is None:
        return dict(DEFAULT_SCALAR_INDEXES)
    if isinstance(scalar_index_columns, Mapping):
        cols = dict(scalar_index_columns)
    else:
        cols = {c: DEFAULT_SCALAR_INDEXES.get(c, "BTREE") for c in scalar_index_columns}
    unknown = [c for c in cols if c not in METADATA_TYPES]
    if unknown:
        raise ValueError(f"scalar_index_columns: unknown column(s) {unknown}")
    return cols


#: ``optimize``'s cleanup age that removes nothing (LanceDB always cleans up, by default after 7 days).
_NO_CLEANUP = timedelta(days=365 * 20)


def sync_vectors(
    uri: str | os.PathLike[str],
    table: pa.Table | list[dict],
    dim: int,
    table_name: str = VECTOR_TABLE,
    exact_threshold: int | None = None,
    cleanup_older_than: timedelta | None = None,
    *,
    index_type: str = DEFAULT_INDEX_TYPE,
    scalar_index_columns: Sequence[str] | Mapping[str, str] | None = None,
) -> SyncReport:
    """Make the LanceDB table hold exactly ``table`` (idempotent upsert by ``lesion_id``).

    Parameters
    ----------
    uri
        Database folder or object-store URI (:func:`open_db`).
    table
        One row per lesion: ``lesion_id``, ``vector`` (``dim`` finite floats) and any of the
        :data:`METADATA_COLUMNS` (missing ones are null). A pyarrow Table or a list of dicts.
    dim
        Vector dimension. A table of another dimension is overwritten.
    table_name
        Table name (default :data:`VECTOR_TABLE`).
    exact_threshold
        Row count from which an ANN index is kept (below it, exact search); default
        :func:`default_exact_threshold` of ``dim``.
    cleanup_older_than
        ``None`` (default): ``optimize`` after a write compacts and updates the indexes but removes no
        version: old versions go by the retention policy (:func:`~imaging_assets.store.lance.retention.apply_retention`,
        run by the vectors stage), which keeps the versions audit rows and cohorts name. A value removes
        every version older than it, pinned or not (and too short an age breaks readers and writers).
    index_type
        ``"IVF_SQ"`` (default), ``"IVF_PQ"`` or ``"IVF_HNSW_SQ"``.
    scalar_index_columns
        Columns with a scalar index (a list, or ``{column: "BTREE" | "BITMAP"}``); default
        :data:`DEFAULT_SCALAR_INDEXES`; ``()`` for none.

    Returns
    -------
    SyncReport

    Raises
    ------
    ValueError
        Bad input (unknown columns, duplicated or missing ids, NaN vectors, wrong dimension).
    VectorStoreIntegrityError
        The table still differs from the input after ``merge_insert`` and the delete+add fallback.
    """
    if index_type not in ANN_INDEX_TYPES:
        raise ValueError(f"index_type must be one of {ANN_INDEX_TYPES}, got {index_type!r}")
    if cleanup_older_than is not None and cleanup_older_than < timedelta(minutes=10):
        logger.warning("cleanup_older_than=%s: readers on older versions may fail", cleanup_older_than)
    scalar = _resolve_scalar(scalar_index_columns)
    if exact_threshold is None:
        exact_threshold = default_exact_threshold(dim)
    new, cluster_given = _conform(table, dim)
    schema = vector_schema(dim)
    db = open_db(uri)
    tbl = _open_table(uri, table_name)

    def finish(tbl: Any, rep: dict[str, Any], wrote: bool) -> SyncReport:
        if wrote:
            tbl.optimize(cleanup_older_than=cleanup_older_than if cleanup_older_than is not None else _NO_CLEANUP)
        rows = tbl.count_rows()
        index, rebuilt = _maintain_indexes(tbl, rows, dim, exact_threshold, index_type, scalar)
        return SyncReport(rows=rows, version=int(tbl.version), index=index, rebuilt_index=rebuilt, **rep)

    # --- new table, or one with another dimension/layout: write everything
    if tbl is None or not _same_layout(tbl.schema, dim):
        existed = tbl is not None
        old_rows = tbl.count_rows() if tbl is not None else 0
        if tbl is not None:
            logger.warning(
                "%s: stored layout (dim %s) differs from dim %d: overwriting the table",
                table_name, _schema_dim(tbl.schema), dim,
            )
        expected = new
        tbl = db.create_table(
            table_name, data=expected, schema=schema, mode="overwrite" if existed else "create",
            storage_options={"new_table_data_storage_version": DATA_STORAGE_VERSION},
        )
        check = _verify(tbl, expected)
        if not check.ok:
            raise VectorStoreIntegrityError(
                f"{table_name} at {_uri_str(uri)} v{tbl.version}: after writing {expected.num_rows} rows the "
                f"table differs: {check.describe()}"
            )
        rep = dict(inserted=new.num_rows, updated=0, deleted=old_rows, unchanged=0, rewritten=existed)
        return finish(tbl, rep, wrote=True)

    # --- diff against the current content
    diff = _diff(_read_all(tbl), new, compare_cluster=cluster_given)
    rep = dict(
        inserted=len(diff.new_ids), updated=len(diff.changed_ids), deleted=len(diff.deleted_ids),
        unchanged=diff.unchanged,
    )
    if diff.to_write.num_rows == 0 and not diff.deleted_ids:
        logger.info("%s: unchanged (%d lesions), version %d", table_name, diff.unchanged, tbl.version)
        return finish(tbl, rep, wrote=False)

    if diff.to_write.num_rows:
        result = (
            tbl.merge_insert("lesion_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(diff.to_write)
        )
        got = (getattr(result, "num_updated_rows", None), getattr(result, "num_inserted_rows", None))
        if got != (None, None) and got != (len(diff.changed_ids), len(diff.new_ids)):
            logger.warning(
                "%s: merge_insert reported %s updated / %s inserted, expected %d / %d; verifying",
                table_name, got[0], got[1], len(diff.changed_ids), len(diff.new_ids),
            )
    if diff.deleted_ids:
        _delete_ids(tbl, diff.deleted_ids)

    check = _verify(tbl, diff.expected)
    fallback = False
    if not check.ok:
        fallback = True
        logger.warning(
            "%s: after merge_insert the table differs from the cohort (%s): falling back to delete+add",
            table_name, check.describe(),
        )
        bad = check.bad_ids()
        _delete_ids(tbl, bad)
        readd = diff.expected.filter(pc.is_in(diff.expected["lesion_id"], value_set=pa.array(bad, pa.string())))
        if readd.num_rows:
            tbl.add(readd)
        check = _verify(tbl, diff.expected)
        if not check.ok:
            raise VectorStoreIntegrityError(
                f"{table_name} at {_uri_str(uri)} v{tbl.version}: merge_insert and the delete+add fallback both "
                f"left the table different from the {diff.expected.num_rows} expected lesions: {check.describe()}. "
                "Re-run the materialization; if it persists, rewrite the table (drop it) and report the "
                "LanceDB version."
            )
        logger.warning("%s: delete+add fallback repaired %d lesion(s)", table_name, len(bad))
    rep["fallback"] = fallback
    return finish(tbl, rep, wrote=True)


def update_clusters(
    uri: str | os.PathLike[str],
    clusters: Mapping[str, int | None],
    table_name: str = VECTOR_TABLE,
    **sync_options: Any,
) -> SyncReport:
    """Set the ``cluster`` column (phenotype clustering) through :func:`sync_vectors`.

    Parameters
    ----------
    uri, table_name
        The vector table.
    clusters
        ``{lesion_id: cluster}``; lesions not in the mapping get ``NULL``. Ids not in the table are
        ignored (logged).
    sync_options
        Passed on to :func:`sync_vectors` (``exact_threshold``, ``index_type``...).

    Returns
    -------
    SyncReport
        Only lesions whose cluster changed are rewritten; the same read-back verification applies.
    """
    tbl = _require_table(uri, table_name)
    current = _read_all(tbl)
    dim = _schema_dim(current.schema)
    if dim is None:
        raise ValueError(f"{table_name} at {_uri_str(uri)} has no fixed-size vector column")
    ids = current["lesion_id"].to_pylist()
    unknown = set(clusters) - set(ids)
    if unknown:
        logger.warning(
            "update_clusters: %d lesion id(s) not in %s, e.g. %s", len(unknown), table_name, sorted(unknown)[:3]
        )
    values = pa.array([clusters.get(i) for i in ids], pa.int32())
    updated = current.set_column(current.schema.get_field_index("cluster"), pa.field("cluster", pa.int32()), values)
    return sync_vectors(uri, updated, dim, table_name=table_name, **sync_options)
