"""The LanceDB side of the warehouse: the lesion vector tables (storage only, no domain imports).

The DuckDB side is :mod:`imaging_assets.store.warehouse`; the stages (:mod:`imaging_assets.stages`) fill
this table and search it. Nothing here imports the DICOM, feature, analysis, demo or stage code, nor
Dagster; ``lancedb`` is imported when first used. One concept per module:

* :mod:`~imaging_assets.store.lance.schema` -- the table layout (:func:`vector_schema`,
  :data:`VECTOR_TABLE`, :data:`EMBEDDING_TABLE`, :data:`METADATA_COLUMNS`) and the shaping of inputs into it;
* :mod:`~imaging_assets.store.lance.connection` -- connections cached per URI and opening tables
  (:func:`open_db`, :func:`open_dataset`, :func:`table_version`, :func:`table_names`);
* :mod:`~imaging_assets.store.lance.sync` -- verified idempotent writes (:func:`sync_vectors`,
  :func:`update_clusters`, :class:`SyncReport`, :class:`VectorStoreIntegrityError`);
* :mod:`~imaging_assets.store.lance.index` -- the measured index policy (exact search below
  :func:`default_exact_threshold` rows, IVF_SQ at or above it; scalar indexes on the filter columns);
* :mod:`~imaging_assets.store.lance.search` -- filters quoted for Lance SQL (:func:`filters_to_where`,
  :func:`sql_string`) and the one search primitive, :func:`nearest`;
* :mod:`~imaging_assets.store.lance.duckdb` -- the tables as DuckDB views (:func:`register_duckdb_views`,
  :func:`lance_dataset`).
"""

from __future__ import annotations

from imaging_assets.store.lance.connection import open_dataset, open_db, table_names, table_version
from imaging_assets.store.lance.duckdb import lance_dataset, register_duckdb_views
from imaging_assets.store.lance.index import (
    ANN_INDEX_NAME,
    ANN_INDEX_TYPES,
    DATA_STORAGE_VERSION,
    DEFAULT_INDEX_TYPE,
    DEFAULT_NPROBES,
    DEFAULT_REFINE,
    DEFAULT_SCALAR_INDEXES,
    EXACT_SCAN_BUDGET,
    IVF_PARTITION_SIZE,
    default_exact_threshold,
    ivf_hnsw_sq_params,
    ivf_pq_params,
    ivf_sq_params,
)
from imaging_assets.store.lance.schema import (
    EMBEDDING_TABLE,
    METADATA_COLUMNS,
    METADATA_TYPES,
    VECTOR_COLUMN,
    VECTOR_TABLE,
    vector_schema,
)
from imaging_assets.store.lance.search import filters_to_where, nearest, sql_string, vectors_of
from imaging_assets.store.lance.sync import SyncReport, VectorStoreIntegrityError, sync_vectors, update_clusters

__all__ = [
    "ANN_INDEX_NAME",
    "ANN_INDEX_TYPES",
    "DATA_STORAGE_VERSION",
    "DEFAULT_INDEX_TYPE",
    "DEFAULT_NPROBES",
    "DEFAULT_REFINE",
    "DEFAULT_SCALAR_INDEXES",
    "EMBEDDING_TABLE",
    "EXACT_SCAN_BUDGET",
    "IVF_PARTITION_SIZE",
    "METADATA_COLUMNS",
    "METADATA_TYPES",
    "VECTOR_COLUMN",
    "VECTOR_TABLE",
    "SyncReport",
    "VectorStoreIntegrityError",
    "default_exact_threshold",
    "filters_to_where",
    "ivf_hnsw_sq_params",
    "ivf_pq_params",
    "ivf_sq_params",
    "lance_dataset",
    "nearest",
    "open_dataset",
    "open_db",
    "register_duckdb_views",
    "sql_string",
    "sync_vectors",
    "table_names",
    "table_version",
    "update_clusters",
    "vector_schema",
    "vectors_of",
]
