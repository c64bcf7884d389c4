"""A warm in-memory mirror of one version of the vector table, for low-latency search in a long-running process.

Lance stays the store of record; a :class:`MemoryIndex` is a read-only copy of one table version held by a
process serving many searches (the web server): the vectors as one float32 matrix, the metadata as pyarrow /
numpy arrays and, from ``exact_threshold`` rows, an HNSW graph (faiss ``IndexHNSWFlat``).

Search (:meth:`MemoryIndex.search`)
    The results of :func:`~imaging_assets.store.lance.search.nearest` (same row dicts, ``_distance`` Euclidean,
    nearest first, ties by ``lesion_id``) for the same structured ``filters`` (validated by
    :func:`~imaging_assets.store.lance.search.filters_to_where`: the same errors), evaluated as numpy masks:

    * below ``exact_threshold`` rows (:func:`default_exact_threshold`: 25,000 at 128 dimensions) no graph:
      exact scans, by faiss's single-threaded SIMD kernel (numpy for small ones), re-ranked in float64;
    * a filter keeping every row (``{"space": [the only space]}``) is no filter (rows per value are known);
    * unfiltered: the graph (``efSearch`` :data:`DEFAULT_EF_SEARCH`), candidates re-ranked exactly;
    * filtered, at most ``filtered_exact_rows`` kept (:func:`default_filtered_exact_rows`): exact over them;
    * filtered, more kept: the graph restricted to them (``IDSelectorBitmap``), ``efSearch`` scaled by
      ``1 / sqrt(share kept)``; exact over them when it finds fewer than ``k``.

    Exclusions (the query lesion, ``exclude_ids``, ``exclude_patient``) are masked out of exact scans and
    over-fetched (``k`` + as many) from the graph. Masks are cached per distinct filter (``filter_cache_size``).

Versions (:attr:`~MemoryIndex.version`, :meth:`~MemoryIndex.is_stale`, :meth:`~MemoryIndex.refresh`)
    ``is_stale`` compares the mirrored version with the table's latest (a listing, ~20 µs); ``refresh`` reloads.
    A reload finding the same ``(lesion_id, vector)`` pairs (a metadata-only write: ``update_clusters``) keeps
    the graph; finding them plus new lesions, it extends a copy of the graph; otherwise it rebuilds it.

Graph cache (``cache_dir``)
    Building the graph is the slow part of a load (minutes at 1M rows). With ``cache_dir`` a built graph is
    written there, named by a hash of its content (ids in row order, vectors bit for bit, graph parameters,
    faiss version); another process (a second worker, a restart) loading the same content maps the file
    instead (``mmap``: one copy of vectors and links in the page cache for every process). Files are only
    replaced (written aside, renamed) or removed, never rewritten in place: truncating a mapped file would
    crash the processes mapping it (SIGBUS).

Threads
    A search reads one immutable snapshot (``_State``), replaced whole by ``refresh``: concurrent searches are
    safe, also during a refresh (they finish on their version). The shared mutable parts (filter cache,
    columns decoded on first use) are behind a lock; faiss's wrappers release the GIL.

No DICOM, feature, analysis, demo or stage imports, no Dagster; ``faiss`` is imported on first use.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imaging_assets.store.lance.connection import _uri_str
from imaging_assets.store.lance.schema import VECTOR_COLUMN, VECTOR_TABLE, _schema_dim
from imaging_assets.store.lance.search import _search_dataset, filters_to_where, plain_filters

logger = logging.getLogger(__name__)

#: Float32 values (rows x dimensions) below which a table gets no graph: 25,000 rows at 128 dimensions (an
#: exact scan of them takes ~0.6 ms on one core, benchmarks/memory_index.py).
FLAT_SCAN_BUDGET = 3_200_000
#: Float32 values (kept rows x dimensions) up to which a filtered search is exact: 12,000 rows at 128 (at 1M
#: rows the gather + scan beats the graph with a selector below ~12k kept rows, benchmarks/memory_index.py).
FILTERED_SCAN_BUDGET = 1_536_000
#: HNSW graph degree (faiss ``M``: ``2 M`` links per vector at level 0, 128 B per vector at 16).
DEFAULT_HNSW_M = 16
#: Candidate list size while building the graph.
DEFAULT_EF_CONSTRUCTION = 40
#: Candidate list size while searching (unfiltered; filtered searches scale it by ``1 / sqrt(share kept)``).
DEFAULT_EF_SEARCH = 64
#: Largest ``efSearch`` of a filtered graph search.
MAX_EF_SEARCH = 2048
_SIMD_SCAN_MIN = 65_536  # float32 values from which a scan uses faiss's single-threaded kernel, not BLAS
_MAX_OVERFETCH = 1024  # exclusions beyond which they are folded into the filter mask instead of over-fetched
_EPOCH = dt.date(1970, 1, 1)


def default_exact_threshold(dim: int) -> int:
    """Rows from which a graph is built: ``FLAT_SCAN_BUDGET / dim``, clipped to [5,000, 50,000]."""
    return int(min(50_000, max(5_000, FLAT_SCAN_BUDGET // max(1, int(dim)))))


def default_filtered_exact_rows(dim: int) -> int:
    """Kept rows up to which a filtered search is exact: ``FILTERED_SCAN_BUDGET / dim``, in [2,000, 50,000]."""
    return int(min(50_000, max(2_000, FILTERED_SCAN_BUDGET // max(1, int(dim)))))


_FAISS: list[Any] = []


def _faiss() -> Any:
    """faiss (imported on first use), or None where it is not installed (exact numpy search only)."""
    if not _FAISS:
        try:
            import faiss
        except ImportError:  # pragma: no cover - a declared dependency
            faiss = None
        _FAISS.append(faiss)
    return _FAISS[0]


# ------------------------------------------------------------------------------------------------ columns


@dataclass
class _Codes:
    """A string column as codes into its sorted distinct values (UTF-8 bytes: byte order = code point order)."""

    codes: np.ndarray  # int8 / int16 / int32 per row (the narrowest that fits), -1 for null
    uniques: np.ndarray  # sorted distinct values: numpy bytes ('S'), or Python bytes beyond 64 bytes
    counts: np.ndarray  # rows per code
    nulls: int
    _rows: np.ndarray | None = None  # rows ordered by code, delimited by _starts (made on first use)
    _starts: np.ndarray | None = None

    @classmethod
    def build(cls, col: pa.ChunkedArray | pa.Array) -> _Codes:
        arr = (col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col).cast(pa.string())
        distinct = pc.unique(arr).drop_null()
        distinct = distinct.take(pc.sort_indices(distinct))
        width = np.int8 if len(distinct) < 127 else np.int16 if len(distinct) < 32_767 else np.int32
        codes = pc.index_in(arr, value_set=distinct).fill_null(-1).to_numpy(zero_copy_only=False).astype(width)
        raw = distinct.cast(pa.binary()).to_numpy(zero_copy_only=False)
        longest = max((len(b) for b in raw), default=1)
        uniques = np.asarray(raw, dtype=f"S{max(1, longest)}") if longest <= 64 else raw
        counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
        return cls(codes=codes, uniques=uniques, counts=counts, nulls=int(arr.null_count))

    def code(self, value: str) -> int:
        """Code of ``value``, -1 when no row has it."""
        key = value.encode("utf-8")
        pos = int(np.searchsorted(self.uniques, key)) if len(self.uniques) else 0
        return pos if pos < len(self.uniques) and self.uniques[pos] == key else -1

    def rows_of(self, code: int) -> np.ndarray:
        """Rows holding ``code`` (ascending)."""
        if self._rows is None:
            order = np.argsort(self.codes, kind="stable")
            self._starts = np.searchsorted(self.codes[order].astype(np.int64), np.arange(len(self.uniques) + 1))
            self._rows = order
        return self._rows[self._starts[code] : self._starts[code + 1]]


def _numbers(col: pa.ChunkedArray, typ: pa.DataType) -> tuple[np.ndarray, np.ndarray | None]:
    """A date (days since 1970), integer, boolean or float column as numpy values and validity (None: no nulls)."""
    arr = col.combine_chunks()
    if pa.types.is_date(typ):
        arr, fill = arr.cast(pa.date32()).cast(pa.int32()), 0
    elif pa.types.is_integer(typ) or pa.types.is_boolean(typ):
        arr, fill = arr.cast(pa.int64()), 0
    else:
        arr, fill = arr.cast(pa.float64()), math.nan
    valid = pc.is_valid(arr).to_numpy(zero_copy_only=False) if arr.null_count else None
    return np.asarray(arr.fill_null(fill).to_numpy(zero_copy_only=False)), valid


def _scalar(typ: pa.DataType, value: Any) -> Any:
    """A filter value that filters_to_where accepted, as the number its numpy column holds."""
    if pa.types.is_date(typ):
        if isinstance(value, dt.datetime):
            value = value.date()
        elif isinstance(value, str):
            value = dt.date.fromisoformat(value.strip())
        elif isinstance(value, np.datetime64):
            value = value.astype("datetime64[D]").item()
        return (value - _EPOCH).days
    return int(value) if pa.types.is_integer(typ) or pa.types.is_boolean(typ) else float(value)


class _Selection:
    """Rows kept by a filter: mask and count; the row list and faiss bitmap made on first use."""

    __slots__ = ("mask", "count", "_rows", "_bits")

    def __init__(self, mask: np.ndarray, count: int | None = None) -> None:
        self.mask = mask
        self.count = int(np.count_nonzero(mask)) if count is None else int(count)
        self._rows: np.ndarray | None = None
        self._bits: np.ndarray | None = None

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = np.flatnonzero(self.mask)
        return self._rows

    @property
    def bits(self) -> np.ndarray:
        if self._bits is None:
            self._bits = np.packbits(self.mask, bitorder="little")
        return self._bits

    def nbytes(self) -> int:
        return self.mask.nbytes + sum(a.nbytes for a in (self._rows, self._bits) if a is not None)


_ALL, _NONE = object(), object()  # a clause or filter keeping every row / no row


def _filter_key(filters: Mapping[str, Any]) -> tuple:
    def freeze(spec: Any) -> Any:
        if isinstance(spec, list | set | frozenset | np.ndarray):
            return ("in", tuple(sorted({repr(v) for v in spec})))
        return ("range", *map(repr, spec)) if isinstance(spec, tuple) else ("eq", repr(spec))

    return tuple(sorted((name, freeze(spec)) for name, spec in filters.items()))


# ------------------------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class _Config:
    exact_threshold: int | None
    filtered_exact_rows: int | None
    hnsw_m: int
    ef_construction: int
    ef_search: int
    filter_cache_size: int
    build_threads: int | None
    cache_dir: str | None = None
    mmap: bool = True


@dataclass
class _State:
    """One immutable snapshot: a table version in memory (replaced whole by a refresh)."""

    uri: str
    table_name: str
    version: int
    dataset: Any  # the pylance dataset at that version (for the staleness check)
    schema: pa.Schema
    meta: pa.Table  # every column but the vector, in row order
    vectors: np.ndarray  # (n, dim) float32 (read-only view of the graph's storage when there is a graph)
    sq_norms: np.ndarray  # (n,) float32
    ids: _Codes
    hnsw: Any  # faiss.IndexHNSWFlat or None; its labels are the row numbers
    config: _Config
    load_s: float = 0.0
    build_s: float = 0.0
    graph_source: str = "none"  # none (exact only) | built | cache (cache_dir) | kept | extended (previous version's)
    _columns: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cache: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.n, self.dim = (int(v) for v in self.vectors.shape)
        self.sq_max = float(self.sq_norms.max(initial=0.0))  # the rounding margin of exact scans
        c = self.config.filtered_exact_rows
        self.filtered_exact_rows = default_filtered_exact_rows(self.dim) if c is None else int(c)

    def column(self, name: str) -> Any:
        """The filter view of a metadata column: _Codes or (values, validity), decoded on first use."""
        if name == "lesion_id":
            return self.ids
        col = self._columns.get(name)
        if col is None:
            with self._lock:
                col = self._columns.get(name)
                if col is None:
                    typ = self.schema.field(name).type
                    string = pa.types.is_string(typ) or pa.types.is_large_string(typ)
                    col = self._columns[name] = _Codes.build(self.meta[name]) if string else _numbers(self.meta[name], typ)
        return col

    def row_of(self, lesion_id: str) -> int | None:
        code = self.ids.code(lesion_id)
        return None if code < 0 else int(self.ids.rows_of(code)[0])

    def _clause(self, name: str, spec: Any) -> Any:
        """_ALL, _NONE or the _Selection of one validated filter clause."""
        typ, col = self.schema.field(name).type, self.column(name)
        if isinstance(col, _Codes):
            if spec is None:
                return _NONE if not col.nulls else _ALL if col.nulls == self.n else _Selection(col.codes == -1, col.nulls)
            values = list(spec) if isinstance(spec, list | set | frozenset | np.ndarray) else [spec]
            codes = sorted({c for c in map(col.code, values) if c >= 0})
            count = int(col.counts[codes].sum()) if codes else 0
            if count in (0, self.n):
                return _NONE if count == 0 else _ALL
            if len(codes) <= 4:
                mask = col.codes == codes[0]
                for c in codes[1:]:
                    mask |= col.codes == c
            else:  # a lookup table: 1.2 ms at 1M rows, np.isin 8-12 ms
                lut = np.zeros(len(col.uniques) + 1, bool)  # the last entry answers code -1 (null)
                lut[codes] = True
                mask = lut.take(col.codes)
            return _Selection(mask, count)
        vals, valid = col
        if spec is None:
            return _NONE if valid is None else _Selection(~valid)
        if isinstance(spec, tuple):
            lo, hi = spec
            if lo is None and hi is None:
                return _ALL  # filters_to_where writes no clause either
            mask = vals >= _scalar(typ, lo) if lo is not None else None
            if hi is not None:
                mask = vals <= _scalar(typ, hi) if mask is None else mask & (vals <= _scalar(typ, hi))
        elif isinstance(spec, list | set | frozenset | np.ndarray):
            wanted = sorted({_scalar(typ, v) for v in spec})
            if not wanted:
                return _NONE
            lo, hi = wanted[0], wanted[-1]
            if vals.dtype.kind == "i" and len(wanted) > 4 and hi - lo <= 1 << 20:  # a lookup table (see above)
                lut = np.zeros(hi - lo + 2, bool)  # the last entry answers every value out of [lo, hi]
                lut[np.asarray(wanted, np.int64) - lo] = True
                mask = lut.take(np.clip(vals - lo, -1, hi - lo + 1))
            else:
                mask = np.isin(vals, np.asarray(wanted, dtype=vals.dtype))
        else:
            mask = vals == _scalar(typ, spec)
        return _Selection(mask if valid is None else mask & valid)

    def selection(self, filters: Mapping[str, Any] | None, use_cache: bool = True) -> Any:
        """_ALL, _NONE or the _Selection of validated ``filters`` (cached per distinct filter)."""
        if not filters:
            return _ALL
        filters = plain_filters(filters)  # values only: a subclass's __repr__/__eq__ cannot alias a cached mask
        key, size = _filter_key(filters), (self.config.filter_cache_size if use_cache else 0)
        if size:
            with self._lock:
                if (hit := self._cache.get(key)) is not None:
                    self._cache.move_to_end(key)
                    return hit
        result: Any = _ALL
        for name, spec in filters.items():
            part = self._clause(name, spec)
            if part is _NONE:
                result = _NONE
                break
            if part is not _ALL:
                result = part if result is _ALL else _Selection(result.mask & part.mask)
        if isinstance(result, _Selection) and result.count in (0, self.n):
            result = _NONE if result.count == 0 else _ALL
        if size:
            with self._lock:
                self._cache[key] = result
                while len(self._cache) > size:
                    self._cache.popitem(last=False)
        return result

    def memory_bytes(self) -> int:
        """Approximate bytes held: vectors, graph links, metadata, decoded columns, cached masks."""
        total = self.vectors.nbytes + self.sq_norms.nbytes + self.meta.nbytes + self.ids.codes.nbytes
        if self.hnsw is not None:
            h = self.hnsw.hnsw
            total += h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        for col in [self.ids, *self._columns.values()]:
            parts = (col.codes, col.uniques, col.counts) if isinstance(col, _Codes) else col
            total += sum(a.nbytes for a in parts if a is not None)
        with self._lock:
            total += sum(s.nbytes() for s in self._cache.values() if isinstance(s, _Selection))
        return int(total)


# ------------------------------------------------------------------------------------------------ loading


def _read_version(uri: str | os.PathLike[str], table_name: str, version: int | None) -> tuple[Any, pa.Table, np.ndarray]:
    """The dataset at ``version`` (latest when None), its metadata columns and its vectors (one scan)."""
    ds = _search_dataset(uri, table_name, version)
    dim = _schema_dim(ds.schema)
    if dim is None:
        raise ValueError(f"{table_name} at {_uri_str(uri)} has no fixed-size vector column")
    n, names = int(ds.count_rows()), [c for c in ds.schema.names if c != VECTOR_COLUMN]
    vectors, batches, pos = np.empty((n, dim), np.float32), [], 0
    for batch in ds.to_batches(columns=ds.schema.names):
        m, col = batch.num_rows, batch.column(VECTOR_COLUMN)
        if col.null_count:
            raise ValueError(f"{table_name} at {_uri_str(uri)}: {col.null_count} null vector(s)")
        vectors[pos : pos + m] = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(m, dim)
        batches.append(batch.select(names))
        pos += m
    if pos != n:
        raise RuntimeError(f"{table_name} at {_uri_str(uri)} v{ds.version}: read {pos} rows, expected {n}")
    meta = pa.Table.from_batches(batches, schema=pa.schema([ds.schema.field(c) for c in names])).combine_chunks()
    return ds, meta, vectors


def _build_hnsw(vectors: np.ndarray, config: _Config, base: Any = None) -> Any:
    """An ``IndexHNSWFlat`` over ``vectors`` (faiss keeps its own copy as storage); with ``base``, a copy of
    that graph extended by ``vectors`` (``base`` untouched)."""
    faiss = _faiss()
    if base is None:
        index = faiss.IndexHNSWFlat(vectors.shape[1], int(config.hnsw_m))
    else:  # a deep, owned copy: clone_index of a mapped graph keeps views, and adding to views aborts the process
        index = faiss.deserialize_index(faiss.serialize_index(base))
    index.hnsw.efConstruction, index.hnsw.efSearch = int(config.ef_construction), int(config.ef_search)
    before = faiss.omp_get_max_threads()
    if config.build_threads:
        faiss.omp_set_num_threads(int(config.build_threads))
    try:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(before)
    return index


def _storage_view(index: Any) -> np.ndarray:
    """The graph's ``(n, dim)`` float32 vectors, without a copy (valid while the index lives)."""
    faiss = _faiss()
    n, dim = int(index.ntotal), int(index.d)
    view = faiss.rev_swig_ptr(faiss.downcast_index(index.storage).get_xb(), n * dim).reshape(n, dim)
    view.flags.writeable = False  # possibly a read-only mapping of a cache file
    return view


def _sq_norms(vectors: np.ndarray) -> np.ndarray:
    n, dim = vectors.shape
    faiss = _faiss() if n * dim >= _SIMD_SCAN_MIN else None
    if faiss is None:
        return np.einsum("ij,ij->i", vectors, vectors).astype(np.float32)
    out = np.empty(n, np.float32)  # faiss's kernel is also fast on a mapped file's (unaligned) floats
    faiss.fvec_norms_L2sqr(faiss.swig_ptr(out), faiss.swig_ptr(vectors), dim, n)
    return out


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equality of two float32 matrices (as bytes: a mapped file's floats may be unaligned)."""
    return a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def _cache_path(config: _Config, uri: str, table_name: str, ids: _Codes, vectors: np.ndarray) -> Path:
    """``<cache_dir>/<table>-<uri hash>-<content hash>.faiss`` (ids in row order, vectors, graph parameters)."""
    h = hashlib.blake2b(f"{vectors.shape}|M{config.hnsw_m}|efc{config.ef_construction}|{_faiss().__version__}|".encode(),
                        digest_size=16)
    h.update(ids.uniques.tobytes() if ids.uniques.dtype.kind == "S" else b"\x00".join(ids.uniques.tolist()))
    h.update(ids.codes.tobytes())
    h.update(memoryview(np.ascontiguousarray(vectors)).cast("B"))
    where = hashlib.blake2b(uri.encode(), digest_size=4).hexdigest()
    return Path(config.cache_dir) / f"{table_name}-{where}-{h.hexdigest()}.faiss"


def _cached_graph(path: Path, vectors: np.ndarray, mmap: bool) -> Any:
    """The graph stored at ``path`` when it holds exactly ``vectors`` (else None)."""
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except Exception as exc:  # noqa: BLE001 - removed meanwhile, truncated or foreign: a miss
        logger.info("MemoryIndex: graph cache %s unreadable (%s): rebuilding", path, exc)
        return None
    ok = isinstance(index, faiss.IndexHNSWFlat) and _same_bits(_storage_view(index), vectors)
    return index if ok else None


def _store_graph(path: Path, index: Any, keep: int = 2) -> None:
    """Write the graph to ``path`` (aside, then renamed); keep the ``keep`` newest graphs of the table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _faiss().write_index(index, str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        logger.warning("MemoryIndex: could not write the graph cache %s: %s", path, exc)
        tmp.unlink(missing_ok=True)
        return
    older = sorted((p for p in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.faiss") if p != path),
                   key=lambda p: p.stat().st_mtime)
    for old in older[: max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)  # processes mapping it keep their pages until they let go


def _reuse_order(prev: _State, ids: _Codes, vectors: np.ndarray) -> np.ndarray | None:
    """When the new rows hold every ``(lesion_id, vector)`` pair of ``prev``: the order of the new rows putting
    ``prev``'s first, in its order (its graph labels stay valid), then the added ones; else None."""
    n_new = len(ids.codes)
    if prev.hnsw is None or prev.dim != vectors.shape[1] or n_new < prev.n or not prev.n:
        return None
    pos = np.searchsorted(ids.uniques, prev.ids.uniques)  # new code of each previous id
    if pos[-1] >= len(ids.uniques) or not np.array_equal(ids.uniques[pos], prev.ids.uniques):
        return None  # a lesion was removed
    new_row_of_code = np.empty(n_new, np.int64)
    new_row_of_code[ids.codes] = np.arange(n_new)
    kept = new_row_of_code[pos[prev.ids.codes]]  # row in the new table of each previous row
    for s in range(0, len(kept), 100_000):
        if not _same_bits(vectors[kept[s : s + 100_000]], prev.vectors[s : s + 100_000]):
            return None  # a vector changed
    added = np.ones(n_new, bool)
    added[kept] = False
    return np.concatenate([kept, np.flatnonzero(added)])


def _load_state(uri: str | os.PathLike[str], table_name: str, version: int | None, config: _Config,
                previous: _State | None = None) -> _State:
    t0 = time.perf_counter()
    ds, meta, vectors = _read_version(uri, table_name, version)
    ids = _Codes.build(meta["lesion_id"])
    n, dim = vectors.shape
    if ids.nulls or len(ids.uniques) != n:
        raise ValueError(f"{table_name} at {_uri_str(uri)} v{ds.version}: lesion_id is null or not unique")
    load_s, t1 = time.perf_counter() - t0, time.perf_counter()
    threshold = default_exact_threshold(dim) if config.exact_threshold is None else int(config.exact_threshold)
    hnsw, source, sq = None, "none", None
    if n >= max(1, threshold):
        order = _reuse_order(previous, ids, vectors) if previous is not None and previous.config == config else None
        if order is not None:  # no vector changed or removed: keep the graph, or extend a copy by the new lesions
            meta = meta.take(pa.array(order))
            ids = _Codes.build(meta["lesion_id"])
            if len(order) == previous.n:
                hnsw, vectors, sq, source = previous.hnsw, previous.vectors, previous.sq_norms, "kept"
            else:
                hnsw, source = _build_hnsw(vectors[order[previous.n :]], config, base=previous.hnsw), "extended"
                vectors = _storage_view(hnsw)
                sq = np.concatenate([previous.sq_norms, _sq_norms(vectors[previous.n :])])
        else:
            path = None if config.cache_dir is None else _cache_path(config, _uri_str(uri), table_name, ids, vectors)
            if path is not None and path.exists():
                hnsw, source = _cached_graph(path, vectors, config.mmap), "cache"
            if hnsw is None:
                hnsw, source = _build_hnsw(vectors, config), "built"
                if path is not None:
                    _store_graph(path, hnsw)
                    mapped = _cached_graph(path, vectors, True) if config.mmap else None
                    hnsw = hnsw if mapped is None else mapped  # share the file's pages with the other processes
            vectors = _storage_view(hnsw)  # one copy of the vectors: the graph's own
    state = _State(
        uri=_uri_str(uri), table_name=table_name, version=int(ds.version), dataset=ds, schema=ds.schema, meta=meta,
        vectors=vectors, sq_norms=_sq_norms(vectors) if sq is None else sq, ids=ids, hnsw=hnsw, config=config,
        load_s=load_s, build_s=time.perf_counter() - t1 if hnsw is not None else 0.0, graph_source=source,
    )
    for name in ("patient_key", "space", "modality"):  # the columns every web search uses
        if name in meta.column_names:
            state.column(name)
    logger.info("MemoryIndex %s v%d: %d x %d, read %.1f s, graph %s %.1f s", table_name, state.version, n, dim,
                load_s, source, state.build_s)
    return state


# ------------------------------------------------------------------------------------------------ index


class MemoryIndex:
    """Read-only in-memory copy of one version of the vector table, searched like :func:`nearest`.

    :meth:`load` it, :meth:`search` it, keep it current with :meth:`is_stale` / :meth:`refresh`.
    """

    def __init__(self, state: _State) -> None:
        self._state = state
        self._refresh_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        uri: str | os.PathLike[str],
        table_name: str = VECTOR_TABLE,
        version: int | None = None,
        *,
        exact_threshold: int | None = None,
        filtered_exact_rows: int | None = None,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        filter_cache_size: int = 32,
        build_threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        mmap: bool = True,
    ) -> MemoryIndex:
        """Read the table at ``version`` (default: the latest) into memory and build its search structures.

        Parameters
        ----------
        uri, table_name, version
            The vector table (:func:`~imaging_assets.store.lance.connection.open_db`) and the version to mirror.
        exact_threshold
            Rows from which a graph is built (default :func:`default_exact_threshold`: 25,000 at 128 dimensions).
        filtered_exact_rows
            Filtered searches keeping at most this many rows are exact (default
            :func:`default_filtered_exact_rows`: 12,000 at 128 dimensions).
        hnsw_m, ef_construction, ef_search
            Graph degree, build and search candidate list sizes.
        filter_cache_size
            Distinct filters whose masks are kept (0: none).
        build_threads
            OpenMP threads building the graph (default: every core; set process-wide while building).
        cache_dir, mmap
            Folder of built graphs, named by their content: a process loading the same content reads (``mmap``:
            maps, sharing the pages with the other processes) the graph instead of building it. The two newest
            graphs per table are kept.

        Raises
        ------
        FileNotFoundError
            No such table.
        ValueError
            No such version; no fixed-size vector column or unique ``lesion_id``; bad parameters.
        """
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            if not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        config = _Config(
            exact_threshold=exact_threshold, filtered_exact_rows=filtered_exact_rows, hnsw_m=int(hnsw_m),
            ef_construction=int(ef_construction), ef_search=int(ef_search), filter_cache_size=max(0, int(filter_cache_size)),
            build_threads=build_threads, cache_dir=None if cache_dir is None else os.fspath(cache_dir), mmap=bool(mmap),
        )
        return cls(_load_state(uri, table_name, version, config))

    @property
    def version(self) -> int:
        """The Lance table version this index mirrors."""
        return self._state.version

    @property
    def dim(self) -> int:
        return self._state.dim

    @property
    def kind(self) -> str:
        """``"hnsw"`` (a graph) or ``"exact"``."""
        return "exact" if self._state.hnsw is None else "hnsw"

    def __len__(self) -> int:
        return self._state.n

    def __repr__(self) -> str:
        st = self._state
        return f"MemoryIndex({st.table_name!r} v{st.version} at {st.uri}: {st.n} x {st.dim}, {self.kind})"

    def is_stale(self) -> bool:
        """Whether the table has moved on from :attr:`version` (or can no longer be read)."""
        try:
            return int(self._state.dataset.latest_version) != self._state.version
        except Exception as exc:  # noqa: BLE001 - removed or unreadable: refresh() will say how
            logger.debug("MemoryIndex staleness check of %s failed: %s", self._state.table_name, exc)
            return True

    def refresh(self, version: int | None = None) -> bool:
        """Mirror ``version`` (default: the latest) when it differs from :attr:`version`; whether it reloaded.

        Searches meanwhile run on the old snapshot, replaced when the new one is complete (refresh from a
        background thread to keep serving). The graph is kept when no vector changed, a copy extended when
        lesions were only added, rebuilt (or read from ``cache_dir``) otherwise.
        """
        with self._refresh_lock:
            st = self._state
            target = _search_dataset(st.uri, st.table_name, None).version if version is None else int(version)
            if int(target) == st.version:
                return False
            self._state = _load_state(st.uri, st.table_name, int(target), st.config, previous=st)
            return True

    def row(self, lesion_id: str) -> dict[str, Any] | None:
        """A lesion's metadata columns (no vector) at :attr:`version`, or None when it is not in the table."""
        st = self._state
        r = st.row_of(str(lesion_id))
        return None if r is None else st.meta.slice(r, 1).to_pylist()[0]

    def distinct(self, column: str) -> list[str]:
        """The distinct non-null values of a string metadata column, sorted."""
        col = self._state.column(column)
        if not isinstance(col, _Codes):
            raise ValueError(f"distinct() reads string columns; {column!r} is not one")
        return [bytes(u).decode("utf-8") for u in col.uniques]

    def vectors_of(self, lesion_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """``lesion_id -> vector`` (copies) of the given lesions in the table (others are absent), as
        :func:`~imaging_assets.store.lance.vectors_of` reads them from the Lance files."""
        st = self._state
        out: dict[str, np.ndarray] = {}
        for lid in lesion_ids:
            if (r := st.row_of(str(lid))) is not None:
                out[str(lid)] = np.array(st.vectors[r], dtype=np.float32)
        return out

    def stats(self) -> dict[str, Any]:
        """Version, size, kind, read / graph seconds, where the graph came from, approximate memory."""
        st = self._state
        return {"version": st.version, "rows": st.n, "dim": st.dim, "kind": self.kind, "load_s": round(st.load_s, 3),
                "build_s": round(st.build_s, 3), "graph": st.graph_source, "memory_bytes": st.memory_bytes(),
                "filtered_exact_rows": st.filtered_exact_rows}

    def search(
        self,
        query: str | np.ndarray | Sequence[float],
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        exclude_ids: Iterable[str] = (),
        exclude_patient: str | None = None,
        *,
        exclude_self: bool = True,
        include_vector: bool = False,
        ef_search: int | None = None,
        strategy: str = "auto",
        cache_filter: bool = True,
    ) -> list[dict[str, Any]]:
        """The ``k`` lesions nearest to a lesion or a vector, as :func:`nearest` returns them.

        Parameters
        ----------
        query
            A ``lesion_id`` (its vector; with ``exclude_self`` the lesion itself is left out) or a scaled vector.
        k
            Number of neighbours.
        filters
            Structured filters as :func:`filters_to_where` takes them (``{column: value | [values] | (lo, hi) |
            None}``), validated the same way (no raw SQL).
        exclude_ids, exclude_patient
            Lesions, and every lesion of a ``patient_key``, left out.
        include_vector
            Also return each neighbour's vector (a copy).
        ef_search
            Graph candidate list size for this query (default: the index's; scaled for filtered searches).
        strategy
            ``"auto"``; ``"exact"`` / ``"hnsw"`` force a path (``"hnsw"`` is exact on a table without a graph).
        cache_filter
            Keep and reuse this filter's mask (``False`` for one-off filters).

        Returns
        -------
        list of dict
            ``lesion_id``, ``_distance`` (Euclidean) and the metadata columns, nearest first, ties by id.

        Raises
        ------
        KeyError
            ``query`` is a lesion id not in this version.
        ValueError
            Bad ``k``, vector or filters (unknown column, wrong type).
        """
        st = self._state  # one snapshot for the whole query
        if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if strategy not in ("auto", "exact", "hnsw"):
            raise ValueError(f"strategy must be 'auto', 'exact' or 'hnsw', got {strategy!r}")
        if filters:
            filters_to_where(filters, st.schema)  # validation: nearest()'s errors
        excluded: list[int] = []
        if isinstance(query, str):
            row = st.row_of(query)
            if row is None:
                raise KeyError(f"lesion {query!r} is not in the vector table (version {st.version})")
            vec = np.array(st.vectors[row], dtype=np.float32)
            excluded += [row] if exclude_self else []
        else:
            vec = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(-1))
            if vec.shape != (st.dim,):
                raise ValueError(f"query vector has {vec.size} values, the table stores dimension {st.dim}")
            if not np.all(np.isfinite(vec)):
                raise ValueError("query vector contains NaN/inf (use Scaler.transform, which maps them to 0)")
        for lid in [exclude_ids] if isinstance(exclude_ids, str) else exclude_ids:
            if (row := st.row_of(str(lid))) is not None:
                excluded.append(row)
        if exclude_patient is not None and "patient_key" in st.schema.names:
            pcol = st.column("patient_key")
            if (code := pcol.code(str(exclude_patient))) >= 0:
                excluded.extend(pcol.rows_of(code).tolist())
        excl = np.unique(np.asarray(excluded, np.int64))
        sel = st.selection(filters, cache_filter)
        if sel is _NONE:
            return []
        if excl.size > _MAX_OVERFETCH:  # many exclusions: fold them into the mask
            mask = np.ones(st.n, bool) if sel is _ALL else sel.mask.copy()
            mask[excl] = False
            sel, excl = _Selection(mask), excl[:0]
            if sel.count == 0:
                return []
        rows, d2 = _candidates(st, vec, int(k), sel, excl, ef_search, strategy)
        if rows.size == 0:
            return []
        taken = st.meta.take(pa.array(rows))
        data = {name: taken.column(name).to_pylist() for name in taken.column_names}
        data["_distance"] = np.sqrt(np.maximum(d2, 0.0)).tolist()
        if include_vector:
            data[VECTOR_COLUMN] = [np.array(st.vectors[r], dtype=np.float32) for r in rows]
        order = ["lesion_id", "_distance"] + [c for c in st.schema.names if c != "lesion_id" and c in data]
        return [{c: data[c][i] for c in order} for i in range(rows.size)]


# ------------------------------------------------------------------------------------------------ search paths

_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.float64))


def _candidates(st: _State, q: np.ndarray, k: int, sel: Any, excl: np.ndarray, ef: int | None,
                strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows and squared distances of the ``k`` nearest kept, non-excluded rows, by the path the query calls for."""
    rows = None if sel is _ALL else sel
    use_graph = st.hnsw is not None and strategy != "exact"
    if use_graph and rows is not None and strategy == "auto" and sel.count <= st.filtered_exact_rows:
        use_graph = False
    if not use_graph:
        return _exact(st, q, k, None if rows is None else rows.rows, excl)
    available = (st.n if rows is None else sel.count) - int(np.count_nonzero(
        np.ones(excl.size, bool) if rows is None else sel.mask[excl]))
    want = min(k, available)
    if want <= 0:
        return _EMPTY
    found, d2 = _graph(st, q, k + excl.size, rows, excl, ef)
    if found.size < want:  # the graph found too few kept rows: exact over them
        logger.debug("MemoryIndex: graph search found %d of %d, exact fallback", found.size, want)
        return _exact(st, q, k, None if rows is None else rows.rows, excl)
    return found[:k], d2[:k]


def _rank_exact(st: _State, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``cand`` re-ranked by float64 squared distance, ties by lesion_id (its code is its rank): the first ``k``."""
    if cand.size == 0:
        return _EMPTY
    diff = st.vectors[cand].astype(np.float64)
    diff -= q.astype(np.float64)
    d2 = np.einsum("ij,ij->i", diff, diff)
    order = np.lexsort((st.ids.codes[cand], d2))[:k]
    return cand[order], d2[order]


def _sq_distances(st: _State, q: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """Float32 squared distances from ``q`` to ``rows`` (all when None).

    Large scans use faiss's single-threaded SIMD kernel, not numpy's BLAS product: BLAS spreads one product over
    every core, and with other work on them (concurrent requests) 20,000 x 128 took 8 ms instead of 0.5 ms.
    Rows are gathered by fancy indexing: ``np.take`` of a mapped graph's vectors was 100x slower.
    """
    block = st.vectors if rows is None else st.vectors[rows]
    m = block.shape[0]
    faiss = _faiss() if m * st.dim >= _SIMD_SCAN_MIN else None
    if faiss is None:
        sq = st.sq_norms if rows is None else st.sq_norms[rows]
        return sq - 2.0 * (block @ q) + np.float32(q @ q)
    out = np.empty(m, np.float32)
    faiss.fvec_L2sqr_ny(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(block), st.dim, m)
    return out


def _exact(st: _State, q: np.ndarray, k: int, rows: np.ndarray | None, excl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest over ``rows`` (all when None) minus ``excl``; every row tied with the k-th is re-ranked."""
    if rows is not None and rows.size == 0:
        return _EMPTY
    d = _sq_distances(st, q, rows)
    if excl.size:
        if rows is None:
            d[excl] = np.inf
        else:
            pos = np.searchsorted(rows, excl)
            pos = pos[pos < rows.size]
            d[pos[rows[pos] == excl[: pos.size]]] = np.inf  # excl is sorted: pos aligns with its first pos.size
    kk = min(k, d.size - (int(np.count_nonzero(np.isinf(d))) if excl.size else 0))
    if kk <= 0:
        return _EMPTY
    kth = float(d[np.argpartition(d, kk - 1)[:kk]].max()) if kk < d.size else float(d[np.isfinite(d)].max())
    # float32 distances lose ~1e-7 of |x|² + |q|²: every row within a margin of the k-th is re-ranked in float64
    cand = np.flatnonzero(d <= kth + 1e-5 * (st.sq_max + float(q @ q)) + 1e-12)
    return _rank_exact(st, q, (cand if rows is None else rows[cand]).astype(np.int64), kk)


def _graph(st: _State, q: np.ndarray, want: int, sel: _Selection | None, excl: np.ndarray,
           ef: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Graph candidates (restricted to ``sel``) minus ``excl``, re-ranked exactly."""
    faiss = _faiss()
    base, want = int(ef) if ef is not None else st.config.ef_search, min(int(want), st.n)
    params = faiss.SearchParametersHNSW()
    bits = None
    if sel is None:
        params.efSearch = max(base, want)
    else:
        params.efSearch = int(min(MAX_EF_SEARCH, max(want, math.ceil(base / math.sqrt(max(sel.count / st.n, 1e-6))))))
        bits = sel.bits  # referenced until the search returns
        params.sel = faiss.IDSelectorBitmap(st.n, faiss.swig_ptr(bits))
    _, labels = st.hnsw.search(q.reshape(1, -1), want, params=params)
    del bits
    found = labels[0][labels[0] >= 0]
    if excl.size:
        found = found[~np.isin(found, excl)]
    return _rank_exact(st, q, found.astype(np.int64), want)


__all__ = [
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_HNSW_M",
    "FILTERED_SCAN_BUDGET",
    "FLAT_SCAN_BUDGET",
    "MAX_EF_SEARCH",
    "MemoryIndex",
    "default_exact_threshold",
    "default_filtered_exact_rows",
]
