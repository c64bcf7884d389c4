"""The LanceDB vector store of lesions and the similar-case search over it.

One row per lesion in the table :data:`VECTOR_TABLE` (``lesion_vectors``): the reproducible ("robust")
radiomics features, scaled by a :class:`~imaging_assets.features.scaling.Scaler` fitted on the cohort
and stored in DuckDB (so a new lesion is scaled exactly like the cohort), as a
``fixed_size_list<float32>[dim]`` column ``vector``, plus the metadata columns :data:`METADATA_COLUMNS`
used for filters and display.

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

The ``cluster`` column
    Owned by the phenotype-clustering stage. Pass a ``cluster`` column to set it (it is then compared
    like any other column); leave it out and unchanged lesions keep the cluster they have, while new or
    changed lesions get ``NULL`` (their old cluster, if any, described another vector).

``study_date``
    Stored as ``date32`` (filters and DuckDB see a real DATE); inputs may be dates, timestamps or
    ``YYYY-MM-DD`` / ``YYYYMMDD`` strings.

Index policy (see ``benchmarks/search.py`` for the measurements behind it)
    * Below ``exact_threshold`` rows no vector index: exact (flat) search. The default,
      :func:`default_exact_threshold`, keeps a flat scan under ~10 ms: it is linear in rows x dimensions
      (measured on 2 cores: 2.8-3.1 ms at 10k x 128, 14-36 ms at 100k x 128, 314 ms at 1M x 128), so the
      threshold is :data:`EXACT_SCAN_BUDGET` / ``dim`` rows, clipped to [5,000, 100,000] (27,343 rows at
      128 dimensions).
    * At or above it an ANN index, ``IVF_SQ`` by default: IVF with :data:`IVF_PARTITION_SIZE` (4096) rows
      per partition and 8-bit scalar quantization of every dimension. At 1M x 128 radiomics-shaped
      vectors it builds in ~5-10 s on 2 cores (IVF_PQ: 31-36 s) and, probing 10 partitions and re-ranking
      2k candidates by exact distance, gave recall@10 ≈1.0 on radiomics-shaped and on isotropic 128-d
      clusters, where IVF_PQ (244 partitions, 16-32 sub-vectors) needed ``refine_factor`` 10 for 0.997 and
      0.969 respectively, ~1 ms slower; SQ codes take ``dim`` bytes per row (128 MB at 1M x 128).
      ``IVF_PQ`` (``target_partition_size ≈ sqrt(n)`` rows, ``num_sub_vectors`` = the divisor of ``dim``
      closest to ``dim / 4``; refine 10) and ``IVF_HNSW_SQ`` stay available (``index_type=``).
      Search defaults per index type: :data:`DEFAULT_NPROBES`, :data:`DEFAULT_REFINE`.
      The index is built when first needed; later writes are added by ``optimize()`` as delta
      segments (beyond 4 they are merged into one); it is retrained when the row count has
      moved the ideal partition count by more than 2× or the requested type changed, and dropped when
      the table shrinks below 80 % of the threshold. IVF indexes are created with a partition *size*, not
      a count, because Lance 14's ``optimize()`` splits/joins partitions towards the size the index was
      created for: given only a count it joined a 234-partition index into 2 (measured).
    * New tables use Lance file format :data:`DATA_STORAGE_VERSION` (2.1): with 2.2 reading the 10 result
      rows of a single-valued column (``feature_set_version``) cost 1.7 ms per search.
    * Scalar indexes on the filter columns (:data:`DEFAULT_SCALAR_INDEXES`): BITMAP for the
      low-cardinality ones, BTREE for the others and for ``lesion_id``; created when missing, updated by
      ``optimize()``.
    * ``optimize(cleanup_older_than=...)`` after every write: compaction, index update, and removal of
      versions older than the cleanup age (default 1 h: long enough for any reader that opened an older
      version to finish; versions older than that can no longer be checked out by time travel).

Search (:func:`find_similar`)
    By lesion id or raw vector, k nearest by Euclidean distance on the standardised vectors, with a
    SQL ``where`` or structured ``filters`` (validated and quoted, never formatted from raw values;
    applied before the vector search), optionally at an older table ``version``. The search runs on the
    table's pylance dataset, kept open per process and moved to the latest version on every call
    (~1.5 ms less per query than LanceDB's query builder plus ``open_table``).

SQL (:func:`register_duckdb_views`)
    DuckDB cannot load its ``lance`` extension here; each table is registered through pylance's
    ``LanceDataset`` (a ``pyarrow.dataset.Dataset``), so DuckDB scans it lazily with projection and
    filter push-down, no copy of the table.

``uri`` everywhere is a local folder or an object-store URI (``s3://``, ``gs://``, ``az://``); LanceDB
reads the credentials from the usual environment variables, so object storage works by configuration
alone.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # heavy imports stay lazy (the Dagster loader imports modules that import this one)
    import duckdb
    import lancedb
    import lancedb.table

logger = logging.getLogger(__name__)

VECTOR_TABLE = "lesion_vectors"
VECTOR_COLUMN = "vector"
ANN_INDEX_NAME = "vector_idx"
ANN_INDEX_TYPES = ("IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ")
DEFAULT_INDEX_TYPE = "IVF_SQ"
#: Rows per IVF partition of IVF_SQ / IVF_PQ indexes (the number of partitions is ``rows // 4096``).
IVF_PARTITION_SIZE = 4096
#: IVF partitions probed per search when ``find_similar`` is not told otherwise (IVF_PQ / IVF_HNSW_SQ:
#: LanceDB's default, 20).
DEFAULT_NPROBES = {"IVF_SQ": 10, "IVF_PQ": 20, "IVF_HNSW_SQ": 20}
#: Re-ranking by exact distance when ``find_similar`` is not told otherwise (``refine_factor="auto"``):
#: 8-bit scalar quantization keeps distances nearly exact, product quantization does not.
DEFAULT_REFINE = {"IVF_SQ": 2, "IVF_PQ": 10, "IVF_HNSW_SQ": 2, "none": None}
#: Lance file format of new tables. 2.2 (Lance 14's default) reads a few rows of a column holding a
#: single value (``feature_set_version``) by decoding the whole page: 1.7 ms per search at 1M rows, against
#: 0.2 ms with 2.1 (measured, ``benchmarks/search.py``).
DATA_STORAGE_VERSION = "2.1"

#: Metadata columns after ``lesion_id`` and ``vector``, with their Arrow types.
METADATA_TYPES: dict[str, pa.DataType] = {
    "lesion_id": pa.string(),
    "patient_key": pa.string(),
    "study_date": pa.date32(),
    "modality": pa.string(),
    "body_part": pa.string(),
    "roi_name": pa.string(),
    "volume_mm3": pa.float64(),
    "series_instance_uid": pa.string(),
    "feature_set_version": pa.string(),
    "cluster": pa.int32(),
}
METADATA_COLUMNS: list[str] = list(METADATA_TYPES)

#: Scalar index per filter column (created after writes when missing). BITMAP for few distinct values.
DEFAULT_SCALAR_INDEXES: dict[str, str] = {
    "lesion_id": "BTREE",
    "patient_key": "BTREE",
    "study_date": "BTREE",
    "volume_mm3": "BTREE",
    "modality": "BITMAP",
    "body_part": "BITMAP",
    "roi_name": "BITMAP",
    "cluster": "BITMAP",
    "feature_set_version": "BITMAP",
}

#: Lance index type names as ``list_indices()`` reports them -> the names used here.
_INDEX_TYPE_NAMES = {
    "IvfPq": "IVF_PQ",
    "IVF_PQ": "IVF_PQ",
    "IvfSq": "IVF_SQ",
    "IVF_SQ": "IVF_SQ",
    "IvfHnswSq": "IVF_HNSW_SQ",
    "IVF_HNSW_SQ": "IVF_HNSW_SQ",
    "HnswSq": "IVF_HNSW_SQ",
}

_DELETE_CHUNK = 5_000
_DROP_BELOW = 0.8  # drop the ANN index when rows < 0.8 x exact_threshold (hysteresis)
#: Float32 values (rows x dimensions) a flat scan covers in about 10 ms on 2 cores (benchmarks/search.py).
EXACT_SCAN_BUDGET = 3_500_000


def default_exact_threshold(dim: int) -> int:
    """Row count from which an ANN index is kept: ``EXACT_SCAN_BUDGET / dim``, clipped to [5,000, 100,000]."""
    return int(min(100_000, max(5_000, EXACT_SCAN_BUDGET // max(1, int(dim)))))
_MAX_ANN_SEGMENTS = 4  # merge the ANN index's delta segments beyond this many


class VectorStoreIntegrityError(RuntimeError):
    """The vector table does not hold what was written, even after the delete+add fallback."""


# ------------------------------------------------------------------------------------------------ schema


def vector_schema(dim: int) -> pa.Schema:
    """Arrow schema of the vector table for vectors of dimension ``dim``.

    ``lesion_id`` (string, not null), ``vector`` (``fixed_size_list<float32>[dim]``), then the other
    :data:`METADATA_COLUMNS` (nullable); ``study_date`` is ``date32``, ``cluster`` ``int32``.
    """
    if not isinstance(dim, Integral) or dim < 1:
        raise ValueError(f"vector dimension must be a positive integer, got {dim!r}")
    fields = [
        pa.field("lesion_id", pa.string(), nullable=False),
        pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), int(dim))),
    ]
    fields += [pa.field(name, typ) for name, typ in METADATA_TYPES.items() if name != "lesion_id"]
    return pa.schema(fields)


def _schema_dim(schema: pa.Schema) -> int | None:
    if VECTOR_COLUMN not in schema.names:
        return None
    typ = schema.field(VECTOR_COLUMN).type
    return typ.list_size if pa.types.is_fixed_size_list(typ) else None


def _same_layout(schema: pa.Schema, dim: int) -> bool:
    want = vector_schema(dim)
    if schema.names != want.names:
        return False
    return all(schema.field(n).type == want.field(n).type for n in want.names)


# --------------------------------------------------------------------------------------------- connection

_CONNECTIONS: dict[str, Any] = {}
_CONNECTIONS_LOCK = threading.Lock()


def default_uri() -> str:
    """``$IMAGING_ASSETS_LANCE_URI`` or ``<warehouse>/lance`` (the warehouse folder of :mod:`settings`)."""
    env = os.environ.get("IMAGING_ASSETS_LANCE_URI")
    if env:
        return env
    from imaging_assets.settings import warehouse_dir

    return str(Path(warehouse_dir()) / "lance")


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
        ``az://``). Credentials and endpoints come from the environment, read by LanceDB itself
        (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT``, ``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_ACCOUNT_NAME``...).

    Returns
    -------
    lancedb.DBConnection
        A connection, cached per URI inside this process (so the index and metadata caches of Lance
        survive between searches).
    """
    key = _uri_str(uri)
    with _CONNECTIONS_LOCK:
        con = _CONNECTIONS.get(key)
        if con is None:
            import lancedb

            con = lancedb.connect(key)
            _CONNECTIONS[key] = con
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


def table_version(uri: str | os.PathLike[str], table_name: str = VECTOR_TABLE) -> int | None:
    """Current version of the table (for time travel), ``None`` when it does not exist."""
    tbl = _open_table(uri, table_name)
    return None if tbl is None else int(tbl.version)


# ------------------------------------------------------------------------------------------- input shaping


def _as_arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, list | tuple):
        rows = list(data)
        if not rows:
            return pa.table({})
        if not all(isinstance(r, Mapping) for r in rows):
            raise TypeError("sync_vectors: a list input must hold one dict per lesion")
        names: list[str] = []
        for r in rows:
            names.extend(k for k in r if k not in names)
        cols: dict[str, Any] = {}
        for name in names:
            vals = [r.get(name) for r in rows]
            if name == VECTOR_COLUMN:
                if any(v is None for v in vals):
                    raise ValueError("sync_vectors: some rows have no vector")
                mat = np.asarray([np.asarray(v, dtype=np.float32).reshape(-1) for v in vals], dtype=np.float32)
                if mat.ndim != 2:
                    raise ValueError("sync_vectors: vectors of different lengths in the input")
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])
            else:
                cols[name] = pa.array(vals, type=METADATA_TYPES.get(name)) if name != "study_date" else pa.array(vals)
        return pa.table(cols)
    if hasattr(data, "to_arrow"):  # polars
        return _as_arrow(data.to_arrow())
    try:
        import pandas as pd

        if isinstance(data, pd.DataFrame):
            return pa.Table.from_pandas(data, preserve_index=False)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f"sync_vectors: unsupported input type {type(data).__name__} (use a pyarrow Table or list of dicts)"
    )


def _vectors_numpy(col: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    """``(n, dim)`` float32 matrix of a (fixed-size) list column."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    if arr.null_count:
        raise ValueError(f"{arr.null_count} vector(s) are null")
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        flat = arr.flatten()
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else (dim or 0)
        if n and not np.all(lengths == width):
            raise ValueError(f"vectors have different lengths ({sorted(set(lengths.tolist()))[:5]})")
        flat = arr.flatten()
    else:
        raise TypeError(f"vector column must be a list of floats, got {arr.type}")
    if dim is not None and width != dim:
        raise ValueError(f"vectors have dimension {width}, expected {dim}")
    values = flat.cast(pa.float32()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(n, width)


def _vector_array(mat: np.ndarray) -> pa.FixedSizeListArray:
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])


def _to_date32(col: pa.ChunkedArray) -> pa.ChunkedArray:
    typ = col.type
    if pa.types.is_date32(typ) or pa.types.is_null(typ):
        return col.cast(pa.date32())
    if pa.types.is_date64(typ) or pa.types.is_timestamp(typ):
        return col.cast(pa.date32())
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        text = pc.utf8_trim_whitespace(col.cast(pa.string()))
        text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        compact = pc.match_substring_regex(text, r"^\d{8}$")
        iso = pc.if_else(
            compact.fill_null(False),
            pc.binary_join_element_wise(
                pc.utf8_slice_codeunits(text, 0, 4), pc.utf8_slice_codeunits(text, 4, 6),
                pc.utf8_slice_codeunits(text, 6, 8), "-",
            ),
            text,
        )
        try:
            return pc.strptime(iso, format="%Y-%m-%d", unit="s").cast(pa.date32())
        except pa.ArrowInvalid as exc:
            raise ValueError(f"study_date: expected YYYY-MM-DD or YYYYMMDD strings ({exc})") from exc
    raise TypeError(f"study_date must be a date, timestamp or ISO string column, got {typ}")


def _conform(data: Any, dim: int) -> tuple[pa.Table, bool]:
    """Input -> table in :func:`vector_schema` layout; also whether the input set ``cluster``."""
    raw = _as_arrow(data)
    schema = vector_schema(dim)
    if raw.num_columns == 0 and raw.num_rows == 0:
        return schema.empty_table(), False
    unknown = [c for c in raw.column_names if c not in schema.names]
    if unknown:
        raise ValueError(f"sync_vectors: unknown column(s) {unknown}; the vector table has {schema.names}")
    for required in ("lesion_id", VECTOR_COLUMN):
        if required not in raw.column_names:
            raise ValueError(f"sync_vectors: the input has no {required!r} column")
    n = raw.num_rows
    ids = raw["lesion_id"].cast(pa.string())
    if ids.null_count:
        raise ValueError(f"sync_vectors: {ids.null_count} row(s) have no lesion_id")
    counts = pc.value_counts(ids.combine_chunks())
    dup_mask = pc.greater(counts.field("counts"), 1)
    if pc.any(dup_mask).as_py():
        dups = counts.field("values").filter(dup_mask).to_pylist()
        raise ValueError(f"sync_vectors: {len(dups)} duplicated lesion_id(s), e.g. {dups[:5]}")
    mat = _vectors_numpy(raw[VECTOR_COLUMN], dim)
    bad = ~np.all(np.isfinite(mat), axis=1)
    if bad.any():
        bad_ids = ids.combine_chunks().filter(pa.array(bad)).to_pylist()
        raise ValueError(
            f"sync_vectors: {int(bad.sum())} vector(s) contain NaN/inf, e.g. {bad_ids[:5]} "
            "(Scaler.transform maps missing features to 0)"
        )
    cols: dict[str, Any] = {"lesion_id": ids, VECTOR_COLUMN: _vector_array(mat)}
    for name, typ in METADATA_TYPES.items():
        if name == "lesion_id":
            continue
        if name not in raw.column_names:
            cols[name] = pa.nulls(n, typ)
        elif name == "study_date":
            cols[name] = _to_date32(raw[name])
        elif name == "volume_mm3":
            vol = raw[name].cast(pa.float64())
            cols[name] = pc.if_else(pc.is_nan(vol).fill_null(False), pa.scalar(None, pa.float64()), vol)
        else:
            try:
                cols[name] = raw[name].cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"sync_vectors: column {name!r} cannot be read as {typ}: {exc}") from exc
    return pa.table(cols, schema=schema), "cluster" in raw.column_names


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


# ---------------------------------------------------------------------------------------------- SQL text


def sql_string(value: str) -> str:
    """A SQL string literal for Lance/DataFusion: single quotes doubled (backslash is not an escape there)."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError("string values may not contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def _in_list(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(sql_string(v) for v in values)})"


def _sql_literal(column: str, typ: pa.DataType, value: Any) -> str:
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if not isinstance(value, str):
            raise ValueError(f"filter {column!r}: expected a string, got {value!r}")
        return sql_string(value)
    if pa.types.is_date(typ):
        if isinstance(value, dt.datetime):
            value = value.date()
        elif isinstance(value, str):
            try:
                value = dt.date.fromisoformat(value.strip())
            except ValueError as exc:
                raise ValueError(f"filter {column!r}: {value!r} is not an ISO date (YYYY-MM-DD)") from exc
        elif isinstance(value, np.datetime64):
            value = value.astype("datetime64[D]").item()
        if not isinstance(value, dt.date):
            raise ValueError(f"filter {column!r}: expected a date, got {value!r}")
        return f"date '{value.isoformat()}'"
    if pa.types.is_integer(typ):
        if isinstance(value, bool) or not isinstance(value, Real) or not float(value).is_integer():
            raise ValueError(f"filter {column!r}: expected an integer, got {value!r}")
        return str(int(value))
    if pa.types.is_floating(typ):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
            raise ValueError(f"filter {column!r}: expected a finite number, got {value!r}")
        return repr(float(value))
    if pa.types.is_boolean(typ):
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"filter {column!r}: expected true/false, got {value!r}")
        return "true" if value else "false"
    raise ValueError(f"filter {column!r}: columns of type {typ} cannot be filtered")


def filters_to_where(filters: Mapping[str, Any], schema: pa.Schema | None = None) -> str | None:
    """Turn structured filters into a safe SQL ``where`` clause.

    Parameters
    ----------
    filters
        ``{column: spec}``; ``spec`` is a value (``=``), ``None`` (``IS NULL``), a list/set of values
        (``IN``; an empty list matches nothing), or a ``(lo, hi)`` tuple: an inclusive range on a date or
        number column (either bound may be ``None``). Dates as :class:`datetime.date` or ISO strings.
    schema
        Table schema the columns are checked against (default: :func:`vector_schema`); the vector
        column cannot be filtered.

    Returns
    -------
    str or None
        The clauses joined by ``AND`` (``None`` without filters). Values are type-checked and written as
        escaped literals, never pasted in.

    Raises
    ------
    ValueError
        Unknown column (named in the message), wrong value type, or a range on a text column.
    """
    if not filters:
        return None
    if schema is None:
        schema = vector_schema(1)
    allowed = {f.name: f.type for f in schema if f.name != VECTOR_COLUMN}
    clauses: list[str] = []
    for column, spec in filters.items():
        if not isinstance(column, str) or column not in allowed:
            raise ValueError(f"unknown filter column {column!r}; filterable columns: {sorted(allowed)}")
        typ = allowed[column]
        if spec is None:
            clauses.append(f"{column} IS NULL")
        elif isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"filter {column!r}: a range is a (lo, hi) tuple, got {spec!r}")
            if not (pa.types.is_date(typ) or pa.types.is_integer(typ) or pa.types.is_floating(typ)):
                raise ValueError(f"filter {column!r}: ranges apply to date and number columns, not {typ}")
            lo, hi = spec
            parts = []
            if lo is not None:
                parts.append(f"{column} >= {_sql_literal(column, typ, lo)}")
            if hi is not None:
                parts.append(f"{column} <= {_sql_literal(column, typ, hi)}")
            clauses.extend(parts)
        elif isinstance(spec, list | set | frozenset | np.ndarray):
            values = list(spec)
            if not values:
                clauses.append("false")
            else:
                literals = sorted({_sql_literal(column, typ, v) for v in values})
                clauses.append(f"{column} IN ({', '.join(literals)})")
        else:
            clauses.append(f"{column} = {_sql_literal(column, typ, spec)}")
    return " AND ".join(f"({c})" for c in clauses) if clauses else None


# ------------------------------------------------------------------------------------------- index policy


def ivf_pq_params(rows: int, dim: int) -> dict[str, int]:
    """IVF_PQ parameters for ``rows`` vectors of dimension ``dim``.

    ``target_partition_size = max(256, round(sqrt(rows)))`` rows per partition, so
    ``num_partitions = rows // target ≈ sqrt(rows)`` (at most ``rows // 256``: Lance trains each centroid
    on 256 samples). The index is created with the *target size*, not a partition count: Lance 14's
    ``optimize()`` splits and joins partitions towards the size the index was created for, and with only
    a count given it joined a 234-partition index into 2 (measured). ``num_sub_vectors`` = the divisor of
    ``dim`` closest to ``dim / 4`` (≈4 dimensions per sub-vector, ties to more sub-vectors).
    """
    target = max(256, int(round(math.sqrt(max(rows, 1)))))
    divisors = [d for d in range(1, dim + 1) if dim % d == 0]
    sub_vectors = min(divisors, key=lambda d: (abs(d - dim / 4.0), -d))
    return {"num_partitions": max(1, rows // target), "target_partition_size": target, "num_sub_vectors": sub_vectors}


def ivf_sq_params(rows: int, dim: int) -> dict[str, int]:
    """IVF_SQ parameters: :data:`IVF_PARTITION_SIZE` (4096) rows per partition up to 128 dimensions, fewer
    beyond (``4096 * 128 / dim``: 1024 at 512) so that a probe scans ~512 KB of 8-bit codes whatever the
    dimension (at 100k x 512, 24 partitions of 4096 made ``nprobes`` 10 scan 40 % of the table: 4.4 ms).

    At 1M x 128 radiomics-shaped vectors: 244 partitions, built in ~10 s on 2 cores; ``nprobes`` 10 with
    ``refine_factor`` 2 gave recall@10 0.996 (``benchmarks/search.py``). Created with the partition *size*
    for the same reason as :func:`ivf_pq_params`.
    """
    size = max(256, IVF_PARTITION_SIZE * 128 // max(dim, 128))
    return {"num_partitions": max(1, rows // size), "target_partition_size": size}


def ivf_hnsw_sq_params(rows: int, dim: int) -> dict[str, int]:
    """IVF_HNSW_SQ parameters: one HNSW graph per ~1M vectors (Lance's default partition size)."""
    return {"num_partitions": max(1, math.ceil(rows / 1_000_000)), "target_partition_size": 1_000_000}


def _ann_config(index_type: str, rows: int, dim: int) -> Any:
    from lancedb.index import HnswSq, IvfPq, IvfSq

    if index_type == "IVF_SQ":
        return IvfSq(distance_type="l2", target_partition_size=ivf_sq_params(rows, dim)["target_partition_size"])
    if index_type == "IVF_PQ":
        p = ivf_pq_params(rows, dim)
        return IvfPq(
            distance_type="l2", target_partition_size=p["target_partition_size"], num_sub_vectors=p["num_sub_vectors"]
        )
    if index_type == "IVF_HNSW_SQ":
        return HnswSq(distance_type="l2", target_partition_size=ivf_hnsw_sq_params(rows, dim)["target_partition_size"])
    raise ValueError(f"index_type must be one of {ANN_INDEX_TYPES}, got {index_type!r}")


def _scalar_config(kind: str) -> Any:
    from lancedb.index import Bitmap, BTree

    return Bitmap() if kind.upper() == "BITMAP" else BTree()


def _indexes_by_column(tbl: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cfg in tbl.list_indices():
        if len(cfg.columns) == 1:
            out[cfg.columns[0]] = cfg
    return out


def _ann_layout(tbl: Any, name: str) -> tuple[int | None, int]:
    """(partitions of the largest segment, number of segments) of the vector index; (None, 0) if unknown."""
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "false")  # Lance's future default; stats stay small
    try:
        stats = tbl.to_lance().stats.index_stats(name)
        segments = stats.get("indices") or []
        biggest = max(segments, key=lambda s: sum(p.get("size", 0) for p in s.get("partitions", [])))
        return int(biggest["num_partitions"]), len(segments)
    except Exception as exc:  # noqa: BLE001 - statistics are advisory
        logger.debug("could not read the layout of index %s: %s", name, exc)
        return None, 0


def _maintain_indexes(
    tbl: Any,
    rows: int,
    dim: int,
    exact_threshold: int,
    index_type: str,
    scalar_columns: Mapping[str, str],
) -> tuple[str, bool]:
    """Create missing scalar indexes, build/retrain/merge/drop the ANN index per policy. Returns (type, rebuilt)."""
    existing = _indexes_by_column(tbl)
    if rows > 0:
        for column, kind in scalar_columns.items():
            if column not in existing:
                tbl.create_index(column, config=_scalar_config(kind), replace=True)
                logger.info("created %s index on %s", kind, column)
    vec = existing.get(VECTOR_COLUMN)
    current = _INDEX_TYPE_NAMES.get(vec.index_type, vec.index_type) if vec is not None else "none"
    if rows < exact_threshold:
        if vec is not None and rows < _DROP_BELOW * exact_threshold:
            tbl.drop_index(vec.name)
            logger.info("dropped %s index (%d rows < %.0f): exact search", current, rows, _DROP_BELOW * exact_threshold)
            return "none", False
        return current, False
    rebuild = vec is None or current != index_type
    segments = 0
    if not rebuild:
        have, segments = _ann_layout(tbl, vec.name)
        if index_type in ("IVF_PQ", "IVF_SQ"):
            params = ivf_pq_params if index_type == "IVF_PQ" else ivf_sq_params
            want = params(rows, dim)["num_partitions"]
            # unknown layout (statistics unreadable): keep the index rather than retrain on every sync
            rebuild = have is not None and not (want / 2 <= have <= want * 2)
    if rebuild:
        if vec is not None and vec.name != ANN_INDEX_NAME:
            tbl.drop_index(vec.name)
        tbl.create_index(VECTOR_COLUMN, config=_ann_config(index_type, rows, dim), replace=True, name=ANN_INDEX_NAME)
        logger.info("built %s index over %d rows (dim %d)", index_type, rows, dim)
        return index_type, True
    if segments > _MAX_ANN_SEGMENTS:
        # optimize() appends a delta segment per write; every query searches each one: fold them together.
        tbl.to_lance().optimize.optimize_indices(index_names=[vec.name], num_indices_to_merge=segments)
        tbl.checkout_latest()
        logger.info("merged %d segments of the %s index", segments, current)
    return current, False


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


def sync_vectors(
    uri: str | os.PathLike[str],
    table: pa.Table | list[dict],
    dim: int,
    table_name: str = VECTOR_TABLE,
    exact_threshold: int | None = None,
    cleanup_older_than: timedelta | None = timedelta(hours=1),
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
        Versions older than this are removed by ``optimize`` after a write (``None``: LanceDB's default,
        7 days). Too short an age can break readers still on an older version.
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
            tbl.optimize(cleanup_older_than=cleanup_older_than)
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


# ------------------------------------------------------------------------------------------------ search


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


_DATASETS: dict[tuple[str, str], Any] = {}
_DATASETS_LOCK = threading.Lock()
_VECTOR_INDEX_TYPES: dict[tuple[str, str, int], str] = {}


def _search_dataset(uri: str | os.PathLike[str], table_name: str, version: int | None) -> Any:
    """The pylance dataset :func:`find_similar` searches: the latest version, or ``version``.

    Kept per process and table, so Lance's index and metadata caches survive between searches; each call
    checks for a newer version (``latest_version``: a listing of the versions folder, ~10 µs locally) and
    moves to it, so a search always sees the last committed write, as opening the table would.
    """
    key = (_uri_str(uri), table_name)
    with _DATASETS_LOCK:
        ds = _DATASETS.get(key)
    latest = None
    if ds is not None:
        try:
            latest = int(ds.latest_version)
        except Exception as exc:  # noqa: BLE001 - the table was removed: reopen (and raise FileNotFoundError)
            logger.debug("cached dataset of %s at %s is gone: %s", table_name, key[0], exc)
            ds = None
    if ds is None:
        ds = _require_table(uri, table_name).to_lance()
        latest = int(ds.version)
    elif latest != ds.version:
        ds = ds.checkout_version(latest)
    with _DATASETS_LOCK:
        _DATASETS[key] = ds
    if version is None or int(version) == ds.version:
        return ds
    try:
        return ds.checkout_version(int(version))
    except Exception:  # noqa: BLE001 - let _checked_out raise its explanation (available versions)
        return _checked_out(uri, table_name, version).to_lance()


def _vector_index_type(ds: Any, key: tuple[str, str]) -> str:
    """``"none"`` or the type of the index on the vector column at the dataset's version (cached per version)."""
    vkey = (*key, int(ds.version))
    found = _VECTOR_INDEX_TYPES.get(vkey)
    if found is None:
        found = "none"
        for idx in ds.describe_indices():
            if list(idx.field_names) == [VECTOR_COLUMN]:
                found = _INDEX_TYPE_NAMES.get(str(idx.index_type), str(idx.index_type))
        if len(_VECTOR_INDEX_TYPES) > 4096:  # one entry per table version searched: keep it bounded
            _VECTOR_INDEX_TYPES.clear()
        _VECTOR_INDEX_TYPES[vkey] = found
    return found


def _lookup_vector(ds: Any, lesion_id: str) -> np.ndarray:
    found = ds.to_table(columns=[VECTOR_COLUMN], filter=f"lesion_id = {sql_string(lesion_id)}", limit=2)
    if found.num_rows == 0:
        raise KeyError(f"lesion {lesion_id!r} is not in the vector table (version {ds.version})")
    return _vectors_numpy(found[VECTOR_COLUMN])[0]


def find_similar(
    uri: str | os.PathLike[str],
    query: str | np.ndarray | Sequence[float],
    k: int = 10,
    where: str | None = None,
    filters: Mapping[str, Any] | None = None,
    table_name: str = VECTOR_TABLE,
    version: int | None = None,
    nprobes: int | None = None,
    refine_factor: int | str | None = "auto",
    exclude_self: bool = True,
    include_vector: bool = False,
) -> list[dict[str, Any]]:
    """The ``k`` lesions nearest to a lesion or a vector.

    Parameters
    ----------
    uri, table_name
        Where the table lives (:func:`open_db`).
    query
        A ``lesion_id`` (its stored vector is the query; with ``exclude_self`` the lesion itself is left
        out) or a scaled vector (:meth:`~imaging_assets.features.scaling.Scaler.transform` of raw
        features).
    k
        Number of neighbours.
    where
        A trusted SQL filter (Lance/DataFusion syntax), ANDed with ``filters``.
    filters
        Structured filters, validated and quoted by :func:`filters_to_where` (use these for user input).
        Filters are applied before the vector search (prefilter): ``k`` results whenever ``k`` rows match.
    version
        Search an older table version (time travel; read-only).
    nprobes, refine_factor
        ANN knobs (ignored by exact search): IVF partitions to probe (default per index type,
        :data:`DEFAULT_NPROBES`), and how many times ``k`` candidates are re-ranked by exact distance
        (``"auto"``: per index type, :data:`DEFAULT_REFINE`; ``None``: quantized distances only).
    include_vector
        Also return each neighbour's vector.

    Returns
    -------
    list of dict
        ``lesion_id``, ``_distance`` (Euclidean distance between standardised vectors) and the metadata
        columns, nearest first (ties by ``lesion_id``). Exact when the table has no ANN index.

    Raises
    ------
    KeyError
        ``query`` is a lesion id that is not in the table (at that version).
    ValueError
        Bad ``k``, vector dimension, or filters (unknown column, wrong type).
    FileNotFoundError
        No such table.

    Notes
    -----
    The search goes through the table's pylance dataset (kept open per process, see
    :func:`_search_dataset`) rather than LanceDB's query builder: the same Lance scan, ~1.5 ms less per
    query (measured at 1M rows, ``benchmarks/search.py``).
    """
    if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    ds = _search_dataset(uri, table_name, version)
    schema = ds.schema
    clauses: list[str] = []
    structured = filters_to_where(filters or {}, schema)
    if structured:
        clauses.append(structured)
    if where:
        clauses.append(f"({where})")
    if isinstance(query, str):
        vec = _lookup_vector(ds, query)
        if exclude_self:
            clauses.append(f"lesion_id <> {sql_string(query)}")
    else:
        vec = np.asarray(query, dtype=np.float32).reshape(-1)
        dim = _schema_dim(schema)
        if dim is not None and vec.shape != (dim,):
            raise ValueError(f"query vector has {vec.size} values, the table stores dimension {dim}")
        if not np.all(np.isfinite(vec)):
            raise ValueError("query vector contains NaN/inf (use Scaler.transform, which maps them to 0)")
    columns = [c for c in schema.names if include_vector or c != VECTOR_COLUMN]
    nearest: dict[str, Any] = {"column": VECTOR_COLUMN, "q": vec, "k": int(k), "metric": "l2"}
    index = _vector_index_type(ds, (_uri_str(uri), table_name))
    if index != "none":
        nearest["nprobes"] = int(nprobes) if nprobes is not None else DEFAULT_NPROBES.get(index, 20)
        refine = DEFAULT_REFINE.get(index, 10) if refine_factor == "auto" else refine_factor
        if refine is not None:
            nearest["refine_factor"] = int(refine)
    where_sql = " AND ".join(clauses) if clauses else None
    result = ds.to_table(
        columns=[*columns, "_distance"], nearest=nearest, filter=where_sql, prefilter=where_sql is not None
    )
    # column-wise conversion: ~1 ms less than Table.to_pylist() for 10 rows of 11 columns
    data = {name: result.column(name).to_pylist() for name in result.column_names}
    dists = [math.sqrt(max(float(d), 0.0)) for d in data["_distance"]]  # Lance's l2 is squared
    data["_distance"] = dists
    if include_vector and VECTOR_COLUMN in data:
        data[VECTOR_COLUMN] = [None if v is None else np.asarray(v, dtype=np.float32) for v in data[VECTOR_COLUMN]]
    order = ["lesion_id", "_distance"] + [c for c in columns if c != "lesion_id"]
    ids = data["lesion_id"]
    ranked = sorted(range(result.num_rows), key=lambda i: (dists[i], ids[i]))
    return [{c: data[c][i] for c in order} for i in ranked]


# ------------------------------------------------------------------------------------------------ DuckDB


def lance_dataset(uri: str | os.PathLike[str], table_name: str = VECTOR_TABLE, version: int | None = None) -> Any:
    """The pylance ``LanceDataset`` behind a table (latest or ``version``), with the connection's storage options."""
    return _checked_out(uri, table_name, version).to_lance()


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
