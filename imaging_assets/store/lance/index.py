"""Index policy of the vector table (see ``benchmarks/search.py`` for the measurements behind it).

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
* ``optimize()`` after every write: compaction and index update, no version removed; old versions go by
  the retention policy of :mod:`~imaging_assets.store.lance.retention` (pinned versions and the last N
  days stay), which the vectors stage applies.

:func:`_maintain_indexes` applies the policy after each write of
:func:`~imaging_assets.store.lance.sync.sync_vectors`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

from imaging_assets.store.lance.schema import VECTOR_COLUMN

logger = logging.getLogger(__name__)

ANN_INDEX_NAME = "vector_idx"
ANN_INDEX_TYPES = ("IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ")
DEFAULT_INDEX_TYPE = "IVF_SQ"
#: Rows per IVF partition of IVF_SQ / IVF_PQ indexes (the number of partitions is ``rows // 4096``).
IVF_PARTITION_SIZE = 4096
#: IVF partitions probed per search when ``nearest`` is not told otherwise (IVF_PQ / IVF_HNSW_SQ:
#: LanceDB's default, 20).
DEFAULT_NPROBES = {"IVF_SQ": 10, "IVF_PQ": 20, "IVF_HNSW_SQ": 20}
#: Re-ranking by exact distance when ``nearest`` is not told otherwise (``refine_factor="auto"``):
#: 8-bit scalar quantization keeps distances nearly exact, product quantization does not.
DEFAULT_REFINE = {"IVF_SQ": 2, "IVF_PQ": 10, "IVF_HNSW_SQ": 2, "none": None}
#: Lance file format of new tables. 2.2 (Lance 14's default) reads a few rows of a column holding a
#: single value (``feature_set_version``) by decoding the whole page: 1.7 ms per search at 1M rows, against
#: 0.2 ms with 2.1 (measured, ``benchmarks/search.py``).
DATA_STORAGE_VERSION = "2.1"

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
    "space": "BITMAP",
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

_DROP_BELOW = 0.8  # drop the ANN index when rows < 0.8 x exact_threshold (hysteresis)
#: Float32 values (rows x dimensions) a flat scan covers in about 10 ms on 2 cores (benchmarks/search.py).
EXACT_SCAN_BUDGET = 3_500_000
_MAX_ANN_SEGMENTS = 4  # merge the ANN index's delta segments beyond this many


def default_exact_threshold(dim: int) -> int:
    """Row count from which an ANN index is kept: ``EXACT_SCAN_BUDGET / dim``, clipped to [5,000, 100,000]."""
    return int(min(100_000, max(5_000, EXACT_SCAN_BUDGET // max(1, int(dim)))))


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
