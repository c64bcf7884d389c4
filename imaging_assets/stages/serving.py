"""What a search server keeps warm, so an answer costs milliseconds: :class:`WarmSearch`.

A similar-case answer needs the vectors (the Lance table), the robust-set version of the lesion's space,
the lesions' metadata, the scaler and quantiles of the space (explanations), the raw values of the robust
features (explanations), the outcomes (the neighbours' survival) and an audit row. Read from the files for
every request that is 200-300 ms, most of it opening the DuckDB file (and a search would need the write
lock the pipeline may hold). :class:`WarmSearch` keeps:

* the vectors in a :class:`~imaging_assets.store.lance.memory.MemoryIndex` (exact, or HNSW at scale);
* the small tables in one immutable :class:`WarmTables` snapshot, read with one short read-only open;
* an :class:`~imaging_assets.store.audit.AuditJournal` for the audit rows (durable at once, copied into
  ``audit_log`` in the background).

A background thread (:meth:`WarmSearch.start`) checks about twice a second whether the Lance table moved
on or the DuckDB file changed (its and its WAL's size and mtime) and reloads what changed off the request
path: requests keep answering from the previous snapshot meanwhile, so an answer is at most one check
interval plus one reload behind the pipeline. When the pipeline holds the DuckDB file, the reload waits
for the next check and searches go on. No Dagster here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.store.audit import AuditJournal
from imaging_assets.store.warehouse import Warehouse, connect

logger = logging.getLogger(__name__)

#: Raw feature values kept in memory at most (lesions x robust features; 8 bytes each): above it the
#: values of an answer's lesions are read from the DuckDB file per request.
MAX_CACHED_VALUES = 20_000_000


def file_token(database: str | Path) -> tuple:
    """What changes when a DuckDB file is written: size and mtime of the file and of its WAL."""
    out = []
    for p in (Path(database), Path(f"{database}.wal")):
        try:
            st = p.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class WarmTables:
    """One snapshot of the DuckDB tables a search reads (replaced whole by a reload)."""

    token: tuple
    #: space -> (robust feature-set version, features)
    robust: dict[str, tuple[str, list[str]]]
    #: feature-set version -> Scaler, and its (101, n) quantiles (or None)
    scalers: dict[str, Any]
    quantiles: dict[str, Any]
    #: lesion_id -> lesion_id, patient_key, modality, body_part, roi_name, raw_label, segment_number,
    #: volume_mm3, study_date (ISO), cluster, space
    lesions: dict[str, dict[str, Any]]
    #: patient_key -> (time_months, event) of ``patient_outcomes``
    outcomes: dict[str, tuple[float, int]]
    #: raw robust-feature values: lesion row and feature column of ``values`` (None: not cached, too many)
    value_rows: dict[str, int] | None = None
    value_names: dict[str, int] = field(default_factory=dict)
    values: np.ndarray | None = None
    load_s: float = 0.0

    def raw_values(self, wh: Warehouse, lesion_ids: list[str], names: list[str]) -> dict[str, dict[str, float]]:
        """``lesion_id -> {feature: raw value}`` of the given lesions (stored values, from memory when cached)."""
        if self.value_rows is not None and self.values is not None:
            wanted = frozenset(names)
            return {lid: _ValueRow(self.values[r], self.value_names, wanted) for lid in lesion_ids
                    if (r := self.value_rows.get(lid)) is not None}
        with wh.connect(read_only=True) as con:
            return raw_feature_values(con, lesion_ids, names)


class _ValueRow(Mapping):
    """One lesion's cached raw values as a read-only mapping, decoded only for the features asked for (an
    explanation reads the ten it shows, not all of the robust set)."""

    __slots__ = ("_row", "_index", "_names")

    def __init__(self, row: np.ndarray, index: dict[str, int], names: frozenset[str]) -> None:
        self._row, self._index, self._names = row, index, names

    def __getitem__(self, name: str) -> float:
        i = self._index.get(name) if name in self._names else None
        if i is None or np.isnan(self._row[i]):
            raise KeyError(name)
        return float(self._row[i])

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._names if n in self._index and not np.isnan(self._row[self._index[n]]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def raw_feature_values(con: Any, lesion_ids: list[str] | None, names: list[str]) -> dict[str, dict[str, float]]:
    """``lesion_id -> {feature: value}`` from ``radiomics_features`` (pyradiomics names; every lesion when
    ``lesion_ids`` is None)."""
    raw: dict[str, dict[str, float]] = {}
    if not names:
        return raw
    # IN (SELECT unnest(?)): a hash semi-join, ~4x faster than list_contains per row on the long table
    sql = ("SELECT lesion_id, image_type || '_' || feature_class || '_' || feature AS name, value "
           "FROM radiomics_features WHERE name IN (SELECT unnest(?))")
    params: list[Any] = [names]
    if lesion_ids is not None:
        sql += " AND lesion_id IN (SELECT unnest(?))"
        params.append(list(lesion_ids))
    for lid, name, value in con.execute(sql, params).fetchall():
        raw.setdefault(lid, {})[name] = value
    return raw


def _has(con: Any, table: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0])


def load_tables(wh: Warehouse, max_cached_values: int = MAX_CACHED_VALUES) -> WarmTables:
    """Read the :class:`WarmTables` of a warehouse with one read-only open (empty before the first run)."""
    from imaging_assets.stages.reproducibility import current_robust_sets
    from imaging_assets.stages.vectors import load_quantiles, load_scaler

    t0 = time.perf_counter()
    token = file_token(wh.duckdb_path)
    if not wh.duckdb_path.exists():
        return WarmTables(token, {}, {}, {}, {}, {}, load_s=0.0)
    # few tries: a reload of a busy warehouse waits for the next look instead of holding the thread
    with connect(wh.duckdb_path, read_only=True, retries=3) as con:
        robust = current_robust_sets(con)
        versions = sorted({v for v, _ in robust.values()})
        scalers = {v: load_scaler(con, version=v) for v in versions}
        quantiles = {v: load_quantiles(con, v) for v in versions}
        lesions: dict[str, dict[str, Any]] = {}
        if _has(con, "lesions"):
            clusters = _has(con, "phenotype_clusters")
            cur = con.execute(
                "SELECT l.lesion_id, l.patient_key, l.modality, l.body_part, l.roi_name, l.raw_label, "
                "l.segment_number, l.volume_mm3, CAST(l.study_date AS VARCHAR) AS study_date, "
                + ("pc.cluster" if clusters else "CAST(NULL AS INTEGER) AS cluster") + ", p.space FROM lesions l "
                + ("LEFT JOIN phenotype_clusters pc USING (lesion_id) " if clusters else "")
                + "LEFT JOIN radiomics_provenance p USING (lesion_id)")
            names = [d[0] for d in cur.description]
            for row in cur.fetchall():
                rec = dict(zip(names, row))
                lesions[rec["lesion_id"]] = rec
        outcomes: dict[str, tuple[float, int]] = {}
        if _has(con, "clinical_outcomes"):
            for key, months, event in con.execute(
                    "SELECT patient_key, time_months, event FROM patient_outcomes "
                    "WHERE time_months IS NOT NULL AND event IS NOT NULL").fetchall():
                outcomes[key] = (float(months), int(event))
        feature_names = sorted({f for sc in scalers.values() if sc is not None for f in sc.feature_names})
        value_rows, value_names, values = None, {n: i for i, n in enumerate(feature_names)}, None
        if feature_names and len(lesions) * len(feature_names) <= max_cached_values and _has(con, "radiomics_features"):
            raw = raw_feature_values(con, None, feature_names)
            value_rows = {lid: i for i, lid in enumerate(sorted(raw))}
            values = np.full((len(value_rows), len(feature_names)), np.nan)
            for lid, vals in raw.items():
                row = values[value_rows[lid]]
                for n, v in vals.items():
                    if v is not None:
                        row[value_names[n]] = v
    return WarmTables(token, robust, scalers, quantiles, lesions, outcomes, value_rows, value_names, values,
                      load_s=time.perf_counter() - t0)


class WarmSearch:
    """The vectors, tables and audit journal a server keeps for :func:`~imaging_assets.stages.similar.find_similar`
    (``warm=``); see the module docstring.

    Parameters
    ----------
    wh
        The warehouse.
    interval_s
        How often the background thread looks for changes and flushes the audit journal.
    index_options
        Keyword arguments of :meth:`~imaging_assets.store.lance.memory.MemoryIndex.load`.
    """

    def __init__(self, wh: Warehouse, interval_s: float = 0.5, max_cached_values: int = MAX_CACHED_VALUES,
                 index_options: dict[str, Any] | None = None, quiet_s: float = 1.0, max_stale_s: float = 30.0) -> None:
        self.wh = wh
        self.interval_s = float(interval_s)
        self.quiet_s, self.max_stale_s = float(quiet_s), float(max_stale_s)
        self._seen: tuple | None = None  # the last file token seen changed, and since when
        self._seen_at = 0.0
        self._stale_since: float | None = None
        self.max_cached_values = int(max_cached_values)
        self.index_options = dict(index_options or {})
        self.journal = AuditJournal(wh.duckdb_path)
        self._tables: WarmTables | None = None
        self._index: Any = None
        self._deep: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0

    # -------------------------------------------------------------------------------------------- state
    @property
    def tables(self) -> WarmTables:
        """The current snapshot (read on first use)."""
        if self._tables is None:
            with self._lock:
                if self._tables is None:
                    self._tables = load_tables(self.wh, self.max_cached_values)
        return self._tables

    @property
    def index(self) -> Any:
        """The :class:`~imaging_assets.store.lance.memory.MemoryIndex`, or None while there is no vector table."""
        if self._index is None:
            from imaging_assets.store.lance.memory import MemoryIndex

            try:
                self._index = MemoryIndex.load(self.wh.lance_uri, **self.index_options)
            except (FileNotFoundError, ValueError, OSError) as exc:  # no vector table yet: searches say so
                logger.debug("no vector table to keep warm at %s: %s", self.wh.lance_uri, exc)
                return None
        return self._index

    @property
    def deep_index(self) -> Any:
        """The :class:`~imaging_assets.store.lance.memory.MemoryIndex` of ``lesion_embeddings``, or None while
        there is none."""
        if self._deep is None:
            from imaging_assets.store.lance import EMBEDDING_TABLE
            from imaging_assets.store.lance.memory import MemoryIndex

            try:
                self._deep = MemoryIndex.load(self.wh.lance_uri, EMBEDDING_TABLE, **self.index_options)
            except (FileNotFoundError, ValueError, OSError) as exc:  # no embeddings yet: radiomics searches only
                logger.debug("no embedding table to keep warm at %s: %s", self.wh.lance_uri, exc)
                return None
        return self._deep

    def refresh(self) -> dict[str, bool]:
        """Reload what changed since the last look: ``{"vectors", "embeddings", "tables"}`` -> reloaded?

        A DuckDB file locked by the pipeline is tried again at the next look (the old snapshot stays); while
        it keeps changing, the tables wait ``quiet_s`` of calm (at most ``max_stale_s``)."""
        changed = {"vectors": False, "embeddings": False, "tables": False}
        for key, held, load in (("vectors", self._index, lambda: self.index),
                                ("embeddings", self._deep, lambda: self.deep_index)):
            if held is None:
                changed[key] = load() is not None
            elif held.is_stale():
                try:
                    changed[key] = bool(held.refresh())
                except Exception as exc:  # noqa: BLE001 - a half-written version: next look
                    logger.warning("could not refresh the %s of %s: %s", key, self.wh.lance_uri, exc)
        current = self._tables
        token = file_token(self.wh.duckdb_path)
        if current is not None and token == current.token:
            self._stale_since = None
            return changed
        now = time.monotonic()
        if token != self._seen:
            self._seen, self._seen_at = token, now
        self._stale_since = self._stale_since or now
        # while the pipeline is writing, wait until the file has been quiet a moment (each reload takes the
        # file's lock for ~0.1-0.3 s and would delay its writer), unless the snapshot grows too old
        if current is not None and now - self._seen_at < self.quiet_s and now - self._stale_since < self.max_stale_s:
            return changed
        try:
            fresh = load_tables(self.wh, self.max_cached_values)
        except Exception as exc:  # noqa: BLE001 - locked by a writer, or not readable yet: keep the old snapshot
            logger.info("warehouse tables not reloaded (next look in %.1f s): %s", self.interval_s, exc)
            return changed
        with self._lock:
            self._tables = fresh
        self.reloads += 1
        changed["tables"] = True
        return changed

    def flush_audit(self) -> int:
        """Copy the journal's audit rows into ``audit_log`` (0 when none, or the file stays locked).

        The snapshot's file token is moved past the server's own write when nothing else changed the file
        meanwhile, so an audit flush does not reload the tables."""
        if not self.journal.pending():
            return 0
        before = file_token(self.wh.duckdb_path)
        try:
            n = self.journal.flush(retries=2)
        except RuntimeError as exc:  # the pipeline holds the file: the rows wait in the journal
            logger.info("audit rows kept in the journal: %s", exc)
            return 0
        with self._lock:
            t = self._tables
            if t is not None and t.token == before:
                self._tables = WarmTables(file_token(self.wh.duckdb_path), *(getattr(t, f) for f in (
                    "robust", "scalers", "quantiles", "lesions", "outcomes", "value_rows", "value_names", "values",
                    "load_s")))
        return n

    # -------------------------------------------------------------------------------------------- thread
    def start(self) -> WarmSearch:
        """Load everything now and keep it fresh from a background thread (until :meth:`stop`)."""
        try:
            self.flush_audit()  # rows a previous server left behind
            _ = self.tables, self.index, self.deep_index
        except Exception as exc:  # noqa: BLE001 - an unreadable warehouse: serve, searches say why, retry later
            logger.warning("the warehouse %s cannot be read yet (%s): searches fail until it can", self.wh.root, exc)
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="warm-search", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and copy the last audit rows into ``audit_log``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.journal.flush()
        except RuntimeError as exc:
            logger.warning("audit rows left in %s (they land with the next audited action): %s", self.journal.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush_audit()
                self.refresh()
            except Exception:  # noqa: BLE001 - keep serving; the log says why
                logger.exception("warm search refresh failed")
