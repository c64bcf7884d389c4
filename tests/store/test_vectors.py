"""LanceDB vector store: idempotent sync with the merge_insert guard, search, ANN policy, DuckDB."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from imaging_assets.store import lance as V
from imaging_assets.store.lance import (
    METADATA_COLUMNS,
    VECTOR_TABLE,
    VectorStoreIntegrityError,
    filters_to_where,
    nearest,
    register_duckdb_views,
    sync_vectors,
    table_version,
    vector_schema,
)
from imaging_assets.store.lance import index as lance_index
from imaging_assets.store.lance import sync as lance_sync

DIM = 16
MODALITIES = ["CT", "MR", "PT"]
BODY_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK"]
ROIS = ["GTV", "GTV-N", "lung_nodule", "liver_met"]
NO_LESION_ID_INDEX = {c: k for c, k in V.DEFAULT_SCALAR_INDEXES.items() if c != "lesion_id"}


def cohort(n: int, dim: int = DIM, seed: int = 0, start: int = 0) -> pa.Table:
    """Random standardised vectors with realistic metadata (ids L{start}..L{start+n-1})."""
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    dates = [dt.date(2014, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 3650, n)]
    return pa.table(
        {
            "lesion_id": [f"L{i:06d}" for i in idx],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "patient_key": [f"P{i // 3:05d}" for i in idx],
            "study_date": pa.array(dates, pa.date32()),
            "modality": [MODALITIES[i % 3] for i in rng.integers(0, 3, n)],
            "body_part": [BODY_PARTS[i] for i in rng.integers(0, 5, n)],
            "roi_name": [ROIS[i] for i in rng.integers(0, 4, n)],
            "volume_mm3": rng.lognormal(7, 1.5, n),
            "series_instance_uid": [f"1.2.826.0.1.{i}" for i in idx],
            "feature_set_version": ["fs-v1"] * n,
        }
    )


def matrix(table: pa.Table) -> np.ndarray:
    return np.asarray(table["vector"].combine_chunks().flatten().to_numpy(), np.float32).reshape(table.num_rows, -1)


def stored(uri: Path, name: str = VECTOR_TABLE) -> pa.Table:
    return V.open_db(uri).open_table(name).to_lance().to_table().sort_by("lesion_id")


def brute_force(table: pa.Table, q: np.ndarray, k: int, mask: np.ndarray | None = None, skip: str | None = None):
    x = matrix(table).astype(np.float64)
    d = np.sqrt(((x - q.astype(np.float64)) ** 2).sum(axis=1))
    ids = np.asarray(table["lesion_id"].to_pylist())
    keep = np.ones(len(ids), bool) if mask is None else mask.copy()
    if skip is not None:
        keep &= ids != skip
    order = np.flatnonzero(keep)[np.argsort(d[keep], kind="stable")][:k]
    return ids[order].tolist(), d[order]


# ------------------------------------------------------------------------------------------------ schema


def test_vector_schema() -> None:
    schema = vector_schema(7)
    assert schema.names[:2] == ["lesion_id", "vector"]
    assert set(METADATA_COLUMNS) <= set(schema.names)
    assert not schema.field("lesion_id").nullable
    assert schema.field("vector").type == pa.list_(pa.float32(), 7)
    assert schema.field("study_date").type == pa.date32()
    assert schema.field("cluster").type == pa.int32()
    with pytest.raises(ValueError):
        vector_schema(0)


# -------------------------------------------------------------------------------------------------- sync


@pytest.mark.parametrize("scalar", [None, NO_LESION_ID_INDEX], ids=["lesion_id-index", "no-lesion_id-index"])
def test_sync_idempotent_upsert_delete(tmp_path: Path, scalar) -> None:
    uri = tmp_path / "lance"
    base = cohort(1000)
    first = sync_vectors(uri, base, DIM, scalar_index_columns=scalar)
    assert (first.inserted, first.updated, first.deleted, first.rows) == (1000, 0, 0, 1000)
    assert first.index == "none" and not first.fallback
    indexed = {c.columns[0] for c in V.open_db(uri).open_table(VECTOR_TABLE).list_indices()}
    assert ("lesion_id" in indexed) == (scalar is None)
    content = stored(uri)

    again = sync_vectors(uri, base, DIM, scalar_index_columns=scalar)
    assert (again.inserted, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 1000)
    assert again.version == first.version == table_version(uri)
    assert stored(uri).equals(content)

    # change 10 vectors, add 5, drop 7
    rows = base.to_pylist()
    dropped = {r["lesion_id"] for r in rows[:7]}
    kept = rows[7:]
    changed = {r["lesion_id"] for r in kept[:10]}
    for r in kept[:10]:
        r["vector"] = [v + 1.0 for v in r["vector"]]
    kept[10]["modality"] = kept[10]["modality"]  # untouched row stays untouched
    added = cohort(5, seed=9, start=50_000).to_pylist()
    new = pa.Table.from_pylist(kept + added, schema=base.schema)
    rep = sync_vectors(uri, new, DIM, scalar_index_columns=scalar)
    assert (rep.inserted, rep.updated, rep.deleted, rep.unchanged, rep.rows) == (5, 10, 7, 983, 998)
    assert rep.version > first.version and not rep.fallback

    after = stored(uri)
    ids = after["lesion_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 998
    assert not (dropped & set(ids))
    expected = new.sort_by("lesion_id")
    np.testing.assert_array_equal(matrix(after), matrix(expected))
    for col in ["patient_key", "study_date", "modality", "volume_mm3", "roi_name"]:
        assert after[col].to_pylist() == expected[col].to_pylist()
    old = {r["lesion_id"]: r["vector"] for r in content.to_pylist()}
    now = {r["lesion_id"]: r["vector"] for r in after.to_pylist()}
    assert {i for i in now if i in old and now[i] != old[i]} == changed

    # and that state is a fixed point again
    same = sync_vectors(uri, new, DIM, scalar_index_columns=scalar)
    assert (same.inserted, same.updated, same.deleted, same.version) == (0, 0, 0, rep.version)


def _changed_cohort(base: pa.Table) -> pa.Table:
    rows = base.to_pylist()[3:]
    for r in rows[:4]:
        r["vector"] = [v * -1.0 for v in r["vector"]]
    return pa.Table.from_pylist(rows + cohort(2, seed=5, start=90_000).to_pylist(), schema=base.schema)


@pytest.mark.parametrize("scalar", [None, NO_LESION_ID_INDEX], ids=["lesion_id-index", "no-lesion_id-index"])
def test_guard_falls_back_when_merge_insert_silently_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, scalar
) -> None:
    """The LanceDB bug (merge_insert on an indexed key updating 0 rows) is caught and repaired."""
    from lancedb.merge import LanceMergeInsertBuilder

    uri = tmp_path / "lance"
    base = cohort(300)
    sync_vectors(uri, base, DIM, scalar_index_columns=scalar)
    monkeypatch.setattr(LanceMergeInsertBuilder, "execute", lambda self, *a, **kw: None)
    new = _changed_cohort(base)
    with caplog.at_level(logging.WARNING, logger=lance_sync.__name__):
        rep = sync_vectors(uri, new, DIM, scalar_index_columns=scalar)
    assert rep.fallback
    assert "falling back to delete+add" in caplog.text
    assert (rep.inserted, rep.updated, rep.deleted, rep.rows) == (2, 4, 3, 299)
    after = stored(uri)
    expected = new.sort_by("lesion_id")
    assert after["lesion_id"].to_pylist() == expected["lesion_id"].to_pylist()
    np.testing.assert_array_equal(matrix(after), matrix(expected))
    monkeypatch.undo()
    assert sync_vectors(uri, new, DIM, scalar_index_columns=scalar).version == rep.version  # fixed point


def test_guard_raises_clear_error_when_fallback_fails_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lancedb.merge import LanceMergeInsertBuilder

    uri = tmp_path / "lance"
    base = cohort(100)
    sync_vectors(uri, base, DIM)
    table_cls = type(V.open_db(uri).open_table(VECTOR_TABLE))
    monkeypatch.setattr(LanceMergeInsertBuilder, "execute", lambda self, *a, **kw: None)
    monkeypatch.setattr(table_cls, "add", lambda self, *a, **kw: None)
    with pytest.raises(VectorStoreIntegrityError, match=r"delete\+add fallback.*missing"):
        sync_vectors(uri, _changed_cohort(base), DIM)


def test_cluster_column_owned_by_clustering(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    base = cohort(50)
    with_clusters = base.append_column("cluster", pa.array(np.arange(50) % 3, pa.int32()))
    sync_vectors(uri, with_clusters, DIM)
    rep = sync_vectors(uri, base, DIM)  # no cluster column: clusters of unchanged rows are kept
    assert (rep.updated, rep.inserted, rep.deleted) == (0, 0, 0)
    assert stored(uri)["cluster"].to_pylist() == (np.arange(50) % 3).tolist()
    rows = base.to_pylist()
    rows[0]["vector"] = [0.0] * DIM
    rep = sync_vectors(uri, pa.Table.from_pylist(rows, schema=base.schema), DIM)
    assert rep.updated == 1
    clusters = stored(uri)["cluster"].to_pylist()
    assert clusters[0] is None and clusters[1:] == (np.arange(1, 50) % 3).tolist()


def test_update_clusters_rewrites_only_changed_rows(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    base = cohort(60)
    sync_vectors(uri, base, DIM)
    ids = base["lesion_id"].to_pylist()
    rep = V.update_clusters(uri, {i: n % 4 for n, i in enumerate(ids[:40])} | {"ghost": 1})
    assert (rep.updated, rep.inserted, rep.deleted, rep.unchanged) == (40, 0, 0, 20)
    got = stored(uri)
    assert got["cluster"].to_pylist() == [n % 4 for n in range(40)] + [None] * 20
    np.testing.assert_array_equal(matrix(got), matrix(base))  # vectors untouched
    again = V.update_clusters(uri, {i: n % 4 for n, i in enumerate(ids[:40])})
    assert again.version == rep.version and again.updated == 0
    hits = nearest(uri, ids[0], k=60, filters={"cluster": [1, 2]})
    assert hits and {h["cluster"] for h in hits} == {1, 2}


def test_dimension_change_rewrites_table(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    sync_vectors(uri, cohort(40), DIM)
    rep = sync_vectors(uri, cohort(30, dim=8, seed=3), 8)
    assert rep.rewritten and (rep.inserted, rep.deleted, rep.rows) == (30, 40, 30)
    assert V.open_db(uri).open_table(VECTOR_TABLE).schema.field("vector").type == pa.list_(pa.float32(), 8)


def test_sync_accepts_dicts_and_iso_strings(tmp_path: Path) -> None:
    rows = [
        {"lesion_id": "a", "vector": np.ones(4), "study_date": "20200131", "modality": "CT"},
        {"lesion_id": "b", "vector": [0.0, 1.0, 2.0, 3.0], "study_date": "2021-02-03"},
    ]
    rep = sync_vectors(tmp_path / "lance", rows, 4)
    assert rep.rows == 2
    got = stored(tmp_path / "lance")
    assert got["study_date"].to_pylist() == [dt.date(2020, 1, 31), dt.date(2021, 2, 3)]
    assert got["body_part"].to_pylist() == [None, None]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: rows + [dict(rows[0])], "duplicated lesion_id"),
        (lambda rows: [{**rows[0], "vector": [np.nan] * DIM}] + rows[1:], "NaN"),
        (lambda rows: [{**r, "colour": "red"} for r in rows], "unknown column"),
        (lambda rows: [{**r, "vector": r["vector"][:3]} for r in rows], "dimension 3"),
    ],
    ids=["duplicate", "nan", "unknown-column", "dimension"],
)
def test_sync_rejects_bad_input(tmp_path: Path, mutate, message: str) -> None:
    rows = cohort(5).to_pylist()
    with pytest.raises(ValueError, match=message):
        sync_vectors(tmp_path / "lance", mutate(rows), DIM)
    assert table_version(tmp_path / "lance") is None


# ------------------------------------------------------------------------------------------------ search


@pytest.fixture(scope="module")
def searchable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    uri = tmp_path_factory.mktemp("search") / "lance"
    table = cohort(1500, seed=7)
    sync_vectors(uri, table, DIM)
    return uri, table


def test_exact_search_matches_numpy(searchable) -> None:
    uri, table = searchable
    rng = np.random.default_rng(3)
    for q in rng.normal(size=(5, DIM)).astype(np.float32):
        hits = nearest(uri, q, k=10)
        ids, dist = brute_force(table, q, 10)
        assert [h["lesion_id"] for h in hits] == ids
        np.testing.assert_allclose([h["_distance"] for h in hits], dist, rtol=1e-5, atol=1e-5)
    assert set(hits[0]) >= {"lesion_id", "_distance", *METADATA_COLUMNS} and "vector" not in hits[0]


def test_search_by_lesion_id_excludes_self(searchable) -> None:
    uri, table = searchable
    query_id = table["lesion_id"][42].as_py()
    q = matrix(table)[42]
    hits = nearest(uri, query_id, k=5)
    ids, dist = brute_force(table, q, 5, skip=query_id)
    assert [h["lesion_id"] for h in hits] == ids and query_id not in ids
    np.testing.assert_allclose([h["_distance"] for h in hits], dist, rtol=1e-5, atol=1e-5)
    with_self = nearest(uri, query_id, k=5, exclude_self=False)
    assert with_self[0]["lesion_id"] == query_id and with_self[0]["_distance"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KeyError, match="not in the vector table"):
        nearest(uri, "no-such-lesion")


def test_filtered_search_matches_numpy_subset(searchable) -> None:
    uri, table = searchable
    q = np.random.default_rng(11).normal(size=DIM).astype(np.float32)
    modality = np.asarray(table["modality"].to_pylist())
    dates = np.asarray(table["study_date"].to_pylist())
    volume = table["volume_mm3"].to_numpy()
    roi = np.asarray(table["roi_name"].to_pylist())
    cases = [
        ({"modality": ["CT", "PT"]}, np.isin(modality, ["CT", "PT"])),
        ({"study_date": ("2016-01-01", dt.date(2018, 6, 30))},
         (dates >= dt.date(2016, 1, 1)) & (dates <= dt.date(2018, 6, 30))),
        ({"volume_mm3": (500.0, 5000)}, (volume >= 500) & (volume <= 5000)),
        ({"roi_name": "GTV-N", "modality": "MR"}, (roi == "GTV-N") & (modality == "MR")),
        ({"volume_mm3": (None, 300)}, volume <= 300),
    ]
    for filters, mask in cases:
        hits = nearest(uri, q, k=8, filters=filters)
        ids, dist = brute_force(table, q, 8, mask=mask)
        assert [h["lesion_id"] for h in hits] == ids, filters
        np.testing.assert_allclose([h["_distance"] for h in hits], dist, rtol=1e-5, atol=1e-5)
    # a trusted where clause is ANDed with the filters
    hits = nearest(uri, q, k=8, where="volume_mm3 > 1000", filters={"modality": "CT"})
    ids, _ = brute_force(table, q, 8, mask=(volume > 1000) & (modality == "CT"))
    assert [h["lesion_id"] for h in hits] == ids


@pytest.mark.parametrize("value", ["CT' OR 1=1 --", "CT\\' OR 1=1 --", ["CT') OR (1=1"], "x' OR 'a'='a"])
def test_filter_values_cannot_inject(searchable, value) -> None:
    uri, _ = searchable
    assert nearest(uri, np.zeros(DIM, np.float32), k=10, filters={"modality": value}) == []


def test_filter_validation() -> None:
    with pytest.raises(ValueError, match="'modality; DROP'"):
        filters_to_where({"modality; DROP": "CT"})
    with pytest.raises(ValueError, match="unknown filter column 'vector'"):
        filters_to_where({"vector": 1})
    with pytest.raises(ValueError, match="ranges apply"):
        filters_to_where({"modality": ("A", "B")})
    with pytest.raises(ValueError, match="ISO date"):
        filters_to_where({"study_date": ("2020-13-01", None)})
    with pytest.raises(ValueError, match="integer"):
        filters_to_where({"cluster": True})
    with pytest.raises(ValueError, match="string"):
        filters_to_where({"modality": 3})
    assert filters_to_where({}) is None
    assert filters_to_where({"modality": []}) == "(false)"
    assert filters_to_where({"cluster": None, "study_date": dt.date(2020, 1, 2)}) == (
        "(cluster IS NULL) AND (study_date = date '2020-01-02')"
    )


def test_unknown_filter_column_raises_in_search(searchable) -> None:
    uri, _ = searchable
    with pytest.raises(ValueError, match="'colour'"):
        nearest(uri, np.zeros(DIM, np.float32), filters={"colour": "red"})
    with pytest.raises(ValueError, match="dimension"):
        nearest(uri, np.zeros(DIM + 1, np.float32))


def test_missing_table(tmp_path: Path) -> None:
    assert table_version(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="lesion_vectors"):
        nearest(tmp_path / "nothing", np.zeros(DIM, np.float32))


def test_time_travel_returns_old_neighbours(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    base = cohort(400, seed=2)
    v1 = sync_vectors(uri, base, DIM).version
    query_id = base["lesion_id"][0].as_py()
    before = [h["lesion_id"] for h in nearest(uri, query_id, k=5)]
    # move 5 other lesions right next to the query lesion
    rows = base.to_pylist()
    q = np.asarray(rows[0]["vector"], np.float32)
    for i, r in enumerate(rows[100:105]):
        r["vector"] = (q + 1e-3 * (i + 1)).tolist()
    moved = [r["lesion_id"] for r in rows[100:105]]
    v2 = sync_vectors(uri, pa.Table.from_pylist(rows, schema=base.schema), DIM).version
    assert v2 > v1
    assert [h["lesion_id"] for h in nearest(uri, query_id, k=5)] == moved
    assert [h["lesion_id"] for h in nearest(uri, query_id, k=5, version=v1)] == before
    assert set(before).isdisjoint(moved)
    with pytest.raises(ValueError, match="version 9999 .* not available"):
        nearest(uri, query_id, version=9999)
    # the DuckDB side can read the old version too
    assert V.lance_dataset(uri, version=v1).count_rows() == 400


# -------------------------------------------------------------------------------------------- ANN policy


@pytest.mark.slow
@pytest.mark.parametrize("index_type", ["IVF_SQ", "IVF_PQ", "IVF_HNSW_SQ"])
def test_ann_index_above_threshold_recall(tmp_path: Path, index_type: str) -> None:
    uri = tmp_path / "lance"
    dim = 32
    table = cohort(5000, dim=dim, seed=4)
    rep = sync_vectors(uri, table, dim, exact_threshold=2000, index_type=index_type)
    assert rep.index == index_type and rep.rebuilt_index
    indexes = {c.columns[0]: c.index_type for c in V.open_db(uri).open_table(VECTOR_TABLE).list_indices()}
    assert "vector" in indexes
    rng = np.random.default_rng(5)
    recalls = []
    for q in rng.normal(size=(30, dim)).astype(np.float32):
        hits = nearest(uri, q, k=10, refine_factor=10)
        ids, _ = brute_force(table, q, 10)
        recalls.append(len({h["lesion_id"] for h in hits} & set(ids)) / 10)
    assert np.mean(recalls) >= 0.9, recalls
    # a small change extends the index (optimize) instead of retraining; new rows are found
    extra = cohort(3, dim=dim, seed=6, start=70_000)
    rep2 = sync_vectors(uri, pa.concat_tables([table, extra]), dim, exact_threshold=2000, index_type=index_type)
    assert rep2.index == index_type and not rep2.rebuilt_index and rep2.inserted == 3
    q = matrix(extra)[0]
    assert nearest(uri, q, k=1)[0]["lesion_id"] == extra["lesion_id"][0].as_py()
    # filters still apply with the index
    hits = nearest(uri, q, k=10, filters={"modality": "MR"})
    assert hits and all(h["modality"] == "MR" for h in hits)


def test_ann_index_dropped_below_threshold(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    table = cohort(1200, seed=8)
    assert sync_vectors(uri, table, DIM, exact_threshold=1000).index == V.DEFAULT_INDEX_TYPE
    assert sync_vectors(uri, table.slice(0, 900), DIM, exact_threshold=1000).index == V.DEFAULT_INDEX_TYPE  # hysteresis
    rep = sync_vectors(uri, table.slice(0, 500), DIM, exact_threshold=1000)
    assert rep.index == "none" and rep.rows == 500
    q = matrix(table)[0]
    ids, _ = brute_force(table.slice(0, 500), q, 5)
    assert [h["lesion_id"] for h in nearest(uri, q, k=5)] == ids


def test_default_exact_threshold_follows_the_dimension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a flat scan costs rows x dim: the threshold keeps that product near EXACT_SCAN_BUDGET
    assert V.default_exact_threshold(128) == V.EXACT_SCAN_BUDGET // 128 == 27_343
    assert V.default_exact_threshold(8) == 100_000 and V.default_exact_threshold(4096) == 5_000
    assert V.default_exact_threshold(256) < V.default_exact_threshold(128)
    # sync_vectors without a threshold asks it (here made small): below it exact search, from it on ANN
    asked: list[int] = []
    monkeypatch.setattr(lance_sync, "default_exact_threshold", lambda dim: asked.append(dim) or 1000)
    uri = tmp_path / "lance"
    table = cohort(1200, seed=9)
    assert sync_vectors(uri, table.slice(0, 700), DIM).index == "none"
    assert sync_vectors(uri, table, DIM).index == V.DEFAULT_INDEX_TYPE
    assert asked == [DIM, DIM]


def test_ivf_pq_params() -> None:
    assert V.ivf_pq_params(1_000_000, 32) == {
        "num_partitions": 1000, "target_partition_size": 1000, "num_sub_vectors": 8
    }
    assert V.ivf_pq_params(5000, 32)["num_partitions"] == 19  # at least 256 rows per partition
    assert V.ivf_pq_params(200_000, 30)["num_sub_vectors"] in (6, 10)
    assert V.ivf_pq_params(100, 7) == {"num_partitions": 1, "target_partition_size": 256, "num_sub_vectors": 1}


def test_ann_index_keeps_partitions_and_merges_segments(tmp_path: Path) -> None:
    """optimize() after writes keeps the IVF layout; delta segments are folded beyond a few."""
    uri = tmp_path / "lance"
    table = cohort(6000, seed=12)
    sync_vectors(uri, table, DIM, exact_threshold=3000, index_type="IVF_PQ")
    tbl = V.open_db(uri).open_table(VECTOR_TABLE)
    parts0, segs0 = lance_index._ann_layout(tbl, V.ANN_INDEX_NAME)
    assert parts0 == V.ivf_pq_params(6000, DIM)["num_partitions"] and segs0 == 1
    for step in range(6):
        table = pa.concat_tables([table, cohort(20, seed=30 + step, start=100_000 + 100 * step)])
        rep = sync_vectors(uri, table, DIM, exact_threshold=3000, index_type="IVF_PQ")
        assert rep.inserted == 20 and not rep.rebuilt_index
        parts, segs = lance_index._ann_layout(V.open_db(uri).open_table(VECTOR_TABLE), V.ANN_INDEX_NAME)
        assert parts is not None and parts >= parts0 - 2 and segs <= lance_index._MAX_ANN_SEGMENTS + 1
    q = matrix(table)[-1]
    assert nearest(uri, q, k=1)[0]["lesion_id"] == table["lesion_id"][-1].as_py()


# ------------------------------------------------------------------------------------------------ DuckDB


def test_duckdb_views(searchable) -> None:
    uri, table = searchable
    con = duckdb.connect()
    assert register_duckdb_views(con, uri) == [VECTOR_TABLE]
    n, distinct, vmin, dim = con.execute(
        "SELECT count(*), count(DISTINCT lesion_id), min(volume_mm3), len(any_value(vector)) FROM lesion_vectors"
    ).fetchone()
    assert (n, distinct, dim) == (table.num_rows, table.num_rows, DIM)
    assert vmin == pytest.approx(float(np.min(table["volume_mm3"].to_numpy())))
    by_mod = dict(con.execute("SELECT modality, count(*) FROM lesion_vectors GROUP BY modality").fetchall())
    assert by_mod == {m: table["modality"].to_pylist().count(m) for m in set(table["modality"].to_pylist())}
    n_ct = con.execute(
        "SELECT count(*) FROM lesion_vectors WHERE modality = ? AND study_date >= ?", ["CT", dt.date(2018, 1, 1)]
    ).fetchone()[0]
    mask = (np.asarray(table["modality"].to_pylist()) == "CT") & (
        np.asarray(table["study_date"].to_pylist()) >= dt.date(2018, 1, 1)
    )
    assert n_ct == int(mask.sum())
    # join with a DuckDB-native table (e.g. clinical outcomes keyed by patient)
    con.execute("CREATE TABLE outcomes (patient_key VARCHAR, event BOOLEAN)")
    con.executemany("INSERT INTO outcomes VALUES (?, ?)", [("P00000", True), ("P00001", False)])
    joined = con.execute(
        "SELECT o.patient_key, count(*) FROM lesion_vectors v JOIN outcomes o USING (patient_key) "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    pk = table["patient_key"].to_pylist()
    assert joined == [(p, pk.count(p)) for p in ("P00000", "P00001") if pk.count(p)]
    with pytest.raises(ValueError):
        register_duckdb_views(con, uri, ["bad name; --"])
