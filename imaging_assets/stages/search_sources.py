"""Where a similar-case search reads and writes (:func:`~imaging_assets.stages.similar.find_similar`): the
files (one DuckDB connection, the Lance tables ``lesion_vectors`` and ``lesion_embeddings``, each pinned at one
version) or a server's memory (:class:`~imaging_assets.stages.serving.WarmSearch`). Both give the search the
same calls, so there is one search (:func:`~imaging_assets.stages.similar._search`) over either.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imaging_assets.store import audit
from imaging_assets.store.warehouse import Warehouse


class StoreTable:
    """One Lance table of the files, pinned at one version."""

    def __init__(self, wh: Warehouse, table: str, version: int | None) -> None:
        from imaging_assets.store import lance

        self.wh, self.lance, self.table = wh, lance, table
        # pin the table version first: the audit names exactly the version that was searched
        self.version = version if version is not None else lance.table_version(wh.lance_uri, table)
        self._ds: Any = None

    @property
    def present(self) -> bool:
        return self.version is not None

    @property
    def ds(self) -> Any:
        if self._ds is None:
            self._ds = self.lance.lance_dataset(self.wh.lance_uri, self.table, version=self.version)
        return self._ds

    def lesion(self, lesion_id: str) -> dict[str, Any] | None:
        if not self.present:
            return None
        row = self.ds.to_table(columns=["patient_key", "space"],
                               filter=f"lesion_id = {self.lance.sql_string(lesion_id)}").to_pylist()
        return row[0] if row else None

    def spaces(self) -> list[str]:
        return sorted({s for s in self.ds.to_table(columns=["space"]).column("space").to_pylist() if s})

    def nearest(self, query: Any, k: int, filters: dict[str, Any] | None, exclude_self: bool,
                patient: str | None) -> list[dict[str, Any]]:
        extra = self.ds.count_rows(filter=f"patient_key = {self.lance.sql_string(patient)}") if patient else 0
        rows = self.lance.nearest(self.wh.lance_uri, query, k=k + extra, filters=filters, table_name=self.table,
                                  version=self.version, exclude_self=exclude_self)
        return [r for r in rows if patient is None or r.get("patient_key") != patient]

    def rows_of(self, ids: list[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """``lesion_id -> (vector, metadata row)`` of those in the table."""
        from imaging_assets.store.lance.schema import _vectors_numpy
        from imaging_assets.store.lance.search import _in_list

        if not ids or not self.present:
            return {}
        found = self.ds.to_table(filter=_in_list("lesion_id", sorted(set(ids))))
        mat = _vectors_numpy(found["vector"])
        meta = found.drop(["vector"]).to_pylist()
        return {r["lesion_id"]: (mat[i], r) for i, r in enumerate(meta)}


class StoreSources:
    """What a search reads and writes, from the files (one DuckDB connection, the Lance tables)."""

    def __init__(self, wh: Warehouse, con: Any, version: int | None) -> None:
        from imaging_assets.store.lance import EMBEDDING_TABLE, VECTOR_TABLE

        self.con = con
        self.tables = {"radiomics": StoreTable(wh, VECTOR_TABLE, version),
                       "deep": StoreTable(wh, EMBEDDING_TABLE, None)}

    def robust_version(self, space: str) -> str | None:
        from imaging_assets.stages.reproducibility import current_robust_set

        return current_robust_set(self.con, space)[0]

    def record(self, action: str, params: dict[str, Any], versions: dict[str, Any], n_rows: int, status: str,
               user: str | None) -> None:
        audit.record_on(self.con, action, "find_similar", params, versions, n_rows, status=status, user=user)

    def meta(self, ids: list[str]) -> dict[str, tuple[Any, Any]]:
        return {r[0]: r[1:] for r in self.con.execute(
            "SELECT lesion_id, segment_number, raw_label FROM lesions WHERE list_contains(?, lesion_id)",
            [ids]).fetchall()}


class WarmTable:
    """One table from a server's memory (a :class:`~imaging_assets.store.lance.memory.MemoryIndex`)."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.version = index.version if index is not None else None

    @property
    def present(self) -> bool:
        return self.index is not None

    def lesion(self, lesion_id: str) -> dict[str, Any] | None:
        return self.index.row(lesion_id) if self.index is not None else None

    def spaces(self) -> list[str]:
        return [str(s) for s in self.index.distinct("space") if s]

    def nearest(self, query: Any, k: int, filters: dict[str, Any] | None, exclude_self: bool,
                patient: str | None) -> list[dict[str, Any]]:
        return self.index.search(query, k=k, filters=filters, exclude_self=exclude_self, exclude_patient=patient)

    def rows_of(self, ids: list[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        if self.index is None:
            return {}
        vectors = self.index.vectors_of(ids)
        return {i: (v, self.index.row(i)) for i, v in vectors.items()}


class WarmSources:
    """The same reads and writes from a server's memory (:class:`~imaging_assets.stages.serving.WarmSearch`)."""

    def __init__(self, warm: Any) -> None:
        self.warm, self.tables_ = warm, warm.tables
        self.tables = {"radiomics": WarmTable(warm.index), "deep": WarmTable(warm.deep_index)}

    def robust_version(self, space: str) -> str | None:
        return self.tables_.robust.get(space, (None, []))[0]

    def record(self, action: str, params: dict[str, Any], versions: dict[str, Any], n_rows: int, status: str,
               user: str | None) -> None:
        self.warm.journal.record(action, "find_similar", params, versions, n_rows, status=status, user=user)

    def meta(self, ids: list[str]) -> dict[str, tuple[Any, Any]]:
        lesions = self.tables_.lesions
        return {i: (lesions[i]["segment_number"], lesions[i]["raw_label"]) for i in ids if i in lesions}
