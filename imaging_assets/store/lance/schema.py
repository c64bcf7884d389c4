"""Layout of the LanceDB vector table, and the shaping of inputs into it.

One row per lesion in the table :data:`VECTOR_TABLE` (``lesion_vectors``): the reproducible ("robust")
radiomics features, scaled by a :class:`~imaging_assets.features.scaling.Scaler` fitted on the cohort
and stored in DuckDB (so a new lesion is scaled exactly like the cohort), as a
``fixed_size_list<float32>[dim]`` column ``vector``, plus the metadata columns :data:`METADATA_COLUMNS`
used for filters and display.

``study_date``
    Stored as ``date32`` (filters and DuckDB see a real DATE); inputs may be dates, timestamps or
    ``YYYY-MM-DD`` / ``YYYYMMDD`` strings.

Input shaping (:func:`_conform`)
    What :func:`~imaging_assets.store.lance.sync.sync_vectors` is given (a pyarrow Table or RecordBatch,
    a list of dicts, a polars or pandas frame) becomes a table in :func:`vector_schema` layout: unknown
    columns, missing or duplicated ids and non-finite vectors are refused, missing metadata columns are
    null.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VECTOR_TABLE = "lesion_vectors"
#: The learned embeddings (stages.embeddings): the same layout and write / index / retention code as
#: :data:`VECTOR_TABLE`; its ``feature_set_version`` column holds the embedding model's version.
EMBEDDING_TABLE = "lesion_embeddings"
VECTOR_COLUMN = "vector"

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
    # the feature space (modality + extraction settings); a search never crosses spaces. Spaces with fewer
    # robust features than the table's dimension are zero-padded: L2 distances within a space are unchanged.
    "space": pa.string(),
}
METADATA_COLUMNS: list[str] = list(METADATA_TYPES)


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
