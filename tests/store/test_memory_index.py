"""MemoryIndex: the in-memory mirror of the vector table gives nearest()'s results, follows versions, and its
HNSW path keeps recall@10 >= 0.95 (filtered or not)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imaging_assets.store.lance import (
    VECTOR_TABLE,
    memory,
    nearest,
    open_db,
    sync_vectors,
    table_version,
    update_clusters,
)
from imaging_assets.store.lance.memory import MemoryIndex, default_exact_threshold

DIM = 16
MODALITIES = ["CT", "MR", "PT"]
BODY_PARTS = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK"]


def cohort(n: int, dim: int = DIM, seed: int = 0, start: int = 0, clusters: int = 0, space: str | None = "CT-v1",
           ) -> pa.Table:
    """Standardised vectors (a Gaussian mixture when ``clusters``) with metadata, ids L{start}..."""
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    if clusters:
        centres = rng.normal(0.0, 2.0, (clusters, dim))
        vectors = (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    else:
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
    cluster = rng.integers(0, 10, n).astype(np.int32)
    return pa.table(
        {
            "lesion_id": [f"L{i:06d}" for i in idx],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "patient_key": [f"P{i // 3:05d}" for i in idx],
            "study_date": pa.array([dt.date(2014, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 3650, n)],
                                   pa.date32()),
            "modality": [MODALITIES[i] for i in rng.integers(0, 3, n)],
            "body_part": [BODY_PARTS[i] for i in rng.integers(0, 5, n)],
            "roi_name": ["GTV"] * n,
            "volume_mm3": [None if i % 17 == 0 else float(v) for i, v in zip(idx, rng.lognormal(7, 1.5, n))],
            "series_instance_uid": [f"1.2.826.0.1.{i}" for i in idx],
            "feature_set_version": ["fs-v1"] * n,
            "cluster": pa.array([None if i % 11 == 0 else int(c) for i, c in zip(idx, cluster)], pa.int32()),
            "space": [space] * n,
        }
    )


def stored(uri: Path) -> pa.Table:
    return open_db(uri).open_table(VECTOR_TABLE).to_lance().to_table()


def matrix(table: pa.Table) -> np.ndarray:
    return np.asarray(table["vector"].combine_chunks().flatten().to_numpy(), np.float32).reshape(table.num_rows, -1)


def ids_of(hits: list[dict]) -> list[str]:
    return [h["lesion_id"] for h in hits]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert ids_of(got) == ids_of(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        assert g["_distance"] == pytest.approx(w["_distance"], rel=1e-5, abs=1e-5)
        assert {c: v for c, v in g.items() if c != "_distance"} == {c: v for c, v in w.items() if c != "_distance"}


def brute_force(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None) -> list[str]:
    """Exact ids in float64 (``x`` may be float64 already, to save the conversion per query)."""
    x = x if x.dtype == np.float64 else x.astype(np.float64)
    d = np.einsum("ij,ij->i", x, x) - 2.0 * (x @ q.astype(np.float64))
    keep = np.flatnonzero(np.ones(len(ids), bool) if mask is None else mask)
    return ids[keep[np.argsort(d[keep], kind="stable")[:k]]].tolist()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table, MemoryIndex]:
    uri = tmp_path_factory.mktemp("memory") / "lance"
    table = cohort(600)
    sync_vectors(uri, table, DIM)
    return uri, table, MemoryIndex.load(uri)


FILTERS = [
    None,
    {"modality": "CT"},
    {"modality": ["MR", "PT"], "body_part": "HEAD"},
    {"study_date": ("2016-01-01", "2018-06-30")},
    {"study_date": (dt.date(2017, 1, 1), None), "modality": "CT"},
    {"volume_mm3": (500.0, 5000.0)},
    {"volume_mm3": None},
    {"cluster": [1, 2, 3]},
    {"cluster": None},
    {"cluster": (7, None)},
    {"cluster": [0, 2, 4, 6, 8, 9, 99]},  # more than 4 values: a lookup table
    {"patient_key": [f"P{i:05d}" for i in range(0, 200, 7)], "cluster": [1, 2, 3, 4, 5]},
    {"space": ["CT-v1"]},  # keeps every row
    {"space": "CT-v1", "patient_key": ["P00001", "P00002", "P00100"]},
    {"lesion_id": ["L000005", "L000006", "L000007"]},
    {"feature_set_version": "fs-v1", "roi_name": ["GTV", "GTV-N"]},
]


@pytest.mark.parametrize("filters", FILTERS, ids=[str(f) for f in FILTERS])
def test_small_table_equals_nearest(small, filters) -> None:
    uri, _, index = small
    assert index.kind == "exact" and len(index) == 600
    rng = np.random.default_rng(5)
    for q in rng.normal(size=(4, DIM)).astype(np.float32):
        assert_same(index.search(q, 12, filters=filters), nearest(uri, q, k=12, filters=filters))
    for lid in ("L000000", "L000123", "L000599"):
        assert_same(index.search(lid, 8, filters=filters), nearest(uri, lid, k=8, filters=filters))


def test_matching_nothing_and_fewer_than_k(small) -> None:
    uri, _, index = small
    assert index._state.selection({"space": ["CT-v1"]}) is memory._ALL  # a single-space table: no filter at all
    assert index._state.selection({"space": "CT-v1", "feature_set_version": ["fs-v1"]}) is memory._ALL
    assert index.search(np.zeros(DIM), 5, filters={"modality": []}) == []
    assert index.search(np.zeros(DIM), 5, filters={"modality": "US"}) == []
    assert index.search(np.zeros(DIM), 5, filters={"space": "other"}) == []
    few = {"lesion_id": ["L000001", "L000002", "L000003"]}
    assert_same(index.search(np.zeros(DIM), 10, filters=few), nearest(uri, np.zeros(DIM), k=10, filters=few))
    assert len(index.search("L000002", 10, filters=few)) == 2


def test_long_lesion_ids(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    table = cohort(200, seed=2)
    long_ids = [f"{'ü' * 40}-{i:04d}" for i in range(200)]  # > 64 UTF-8 bytes: kept as Python bytes
    table = table.set_column(0, "lesion_id", pa.array(long_ids))
    sync_vectors(uri, table, DIM)
    index = MemoryIndex.load(uri)
    assert index._state.ids.uniques.dtype == object
    for lid in long_ids[:3]:
        assert_same(index.search(lid, 5), nearest(uri, lid, k=5))
    few = {"lesion_id": long_ids[10:20]}
    assert_same(index.search(np.zeros(DIM), 5, filters=few), nearest(uri, np.zeros(DIM), k=5, filters=few))


def test_exclusions(small) -> None:
    uri, table, index = small
    q = "L000010"  # patient P00003 holds L000009..L000011
    got = index.search(q, 10, exclude_patient="P00003")
    assert_same(got, nearest(uri, q, k=10, where="patient_key <> 'P00003'"))
    assert not {"L000009", "L000011"} & set(ids_of(got))
    near = ids_of(index.search(q, 5))
    skipped = index.search(q, 5, exclude_ids=near[:2])
    assert ids_of(skipped)[:3] == near[2:]
    with_self = index.search(q, 3, exclude_self=False)
    assert with_self[0]["lesion_id"] == q and with_self[0]["_distance"] == pytest.approx(0.0, abs=1e-6)
    vec = matrix(table)[10]
    assert ids_of(index.search(vec, 3, exclude_ids=["L000010"])) == ids_of(index.search(q, 3))
    hit = index.search(q, 2, include_vector=True)[0]
    assert list(hit)[:3] == ["lesion_id", "_distance", "vector"]
    assert np.array_equal(hit["vector"], matrix(table)[int(hit["lesion_id"][1:])])


def test_errors(small) -> None:
    _, _, index = small
    with pytest.raises(ValueError, match="unknown filter column"):
        index.search(np.zeros(DIM), 5, filters={"nope": 1})
    with pytest.raises(ValueError, match="expected a string"):
        index.search(np.zeros(DIM), 5, filters={"modality": 3})
    with pytest.raises(ValueError, match="ranges apply"):
        index.search(np.zeros(DIM), 5, filters={"modality": ("A", "B")})
    with pytest.raises(ValueError, match="ISO date"):
        index.search(np.zeros(DIM), 5, filters={"study_date": ("yesterday", None)})
    with pytest.raises(KeyError):
        index.search("L999999", 5)
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros(DIM + 1), 5)
    with pytest.raises(ValueError, match="NaN"):
        index.search(np.full(DIM, np.nan), 5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.zeros(DIM), 0)
    with pytest.raises(FileNotFoundError):
        MemoryIndex.load(Path(index._state.uri).parent / "missing")


def test_staleness_and_refresh(tmp_path: Path) -> None:
    uri = tmp_path / "lance"
    base = cohort(300)
    sync_vectors(uri, base, DIM)
    index = MemoryIndex.load(uri)
    v1 = index.version
    assert v1 == table_version(uri) and not index.is_stale() and index.refresh() is False

    added = cohort(1, seed=3, start=5000)
    q = matrix(added)[0]
    sync_vectors(uri, pa.concat_tables([base, added]), DIM)
    assert index.is_stale()
    assert index.version == v1 and "L005000" not in ids_of(index.search(q, 3))  # still the old snapshot
    assert index.refresh() is True
    assert index.version == table_version(uri) and not index.is_stale() and len(index) == 301
    assert ids_of(index.search(q, 3))[0] == "L005000"
    assert_same(index.search(q, 10), nearest(uri, q, k=10))

    pinned = MemoryIndex.load(uri, version=v1)  # time travel
    assert pinned.version == v1 and len(pinned) == 300 and pinned.is_stale()
    assert pinned.refresh(v1) is False and pinned.refresh() is True and len(pinned) == 301


def test_module_is_storage_only() -> None:
    code = (
        "import sys, imaging_assets.store.lance.memory\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('dagster', 'faiss') or m.startswith(tuple("
        "'imaging_assets.' + p for p in ('dicom', 'features', 'analysis', 'demo', 'stages', 'defs')))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------------ HNSW


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory):
    """60,000 x 32 clustered vectors, above the exact threshold (a graph is built), in two feature spaces: 70 % CT-v1
    (32 features), 30 % MR-v1 (20 features, zero-padded to 32, another mixture)."""
    pytest.importorskip("faiss")
    n, dim = 60_000, 32
    uri = tmp_path_factory.mktemp("memory-hnsw") / "lance"
    table = cohort(n, dim=dim, seed=1, clusters=48)
    mr = np.arange(n) % 10 < 3
    x = matrix(table).copy()
    x[mr] = 0.0
    x[mr, :20] = matrix(cohort(int(mr.sum()), dim=20, seed=8, clusters=24))
    table = table.set_column(1, "vector", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim))
    table = table.set_column(table.schema.get_field_index("space"), "space", pa.array(np.where(mr, "MR-v1", "CT-v1")))
    sync_vectors(uri, table, dim)
    assert n >= default_exact_threshold(dim)
    index = MemoryIndex.load(uri, filtered_exact_rows=5_000)
    return uri, table, index


@pytest.mark.slow
def test_hnsw_recall_unfiltered_and_filtered(large) -> None:
    uri, table, index = large
    assert index.kind == "hnsw" and index.stats()["build_s"] > 0
    x, ids = matrix(table), np.asarray(table["lesion_id"].to_pylist())
    modality = np.asarray(table["modality"].to_pylist())
    body = np.asarray(table["body_part"].to_pylist())
    space = np.asarray(table["space"].to_pylist())
    rng = np.random.default_rng(2)
    qidx = rng.choice(len(ids), 100, replace=False)
    queries = (x[qidx] + 0.05 * rng.standard_normal((100, x.shape[1]))).astype(np.float32)
    queries[space[qidx] == "MR-v1", 20:] = 0.0  # an MR query has MR's zero padding
    cases = [
        (None, None),  # graph
        ({"space": ["CT-v1", "MR-v1"]}, None),  # every row kept: the unfiltered graph search
        ({"space": "MR-v1"}, space == "MR-v1"),  # 30 %: graph with a selector
        ({"space": "CT-v1", "modality": "CT"}, (space == "CT-v1") & (modality == "CT")),  # ~23 %: graph + selector
        ({"modality": "MR", "body_part": "HEAD"}, (modality == "MR") & (body == "HEAD")),  # ~7 %, 4k rows: exact
    ]
    x64 = x.astype(np.float64)
    for filters, mask in cases:
        wanted = filters.get("space") if filters else None
        # a search stays in the query's own space: space-filtered cases use queries of that space
        qs = queries if not isinstance(wanted, str) else queries[space[qidx] == wanted]
        truth = [brute_force(x64, ids, q, 10, mask) for q in qs]
        got = [ids_of(index.search(q, 10, filters=filters)) for q in qs]
        recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth)])
        print(f"recall@10 {filters}: {recall:.3f}")
        assert recall >= 0.95, (filters, recall)
        if mask is not None and mask.sum() <= 5_000:
            assert got == truth  # the exact path
    # distances and metadata as nearest (exact here: 60k rows at dim 32 have no Lance ANN index)
    for q in queries[:5]:
        got, want = index.search(q, 10), nearest(uri, q, k=10)
        assert sum(g["lesion_id"] == w["lesion_id"] for g, w in zip(got, want)) >= 9
        for g in got:
            assert g["_distance"] == pytest.approx(float(np.linalg.norm(x[int(g["lesion_id"][1:])] - q)), rel=1e-5)
    # forced exact equals brute force; the graph with exclusions never returns them
    assert ids_of(index.search(queries[0], 10, strategy="exact")) == brute_force(x, ids, queries[0], 10)
    lid = str(ids[qidx[0]])
    hits = index.search(lid, 10, exclude_patient=str(table["patient_key"][int(qidx[0])]))
    assert lid not in ids_of(hits) and len(hits) == 10
    assert len({h["patient_key"] for h in hits} & {table["patient_key"][int(qidx[0])].as_py()}) == 0


@pytest.mark.slow
def test_concurrent_searches(large) -> None:
    _, table, index = large
    x = matrix(table)
    rng = np.random.default_rng(9)
    queries = x[rng.choice(len(x), 120, replace=False)] + 0.01
    filters = [None, {"modality": "PT"}, {"cluster": [1, 2]}]
    jobs = [(q, filters[i % 3]) for i, q in enumerate(queries)]
    serial = [ids_of(index.search(q, 10, filters=f)) for q, f in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: ids_of(index.search(job[0], 10, filters=job[1])), jobs))
    assert parallel == serial


def test_metadata_only_write_keeps_the_graph(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    uri = tmp_path / "lance"
    table = cohort(3_000, seed=4, clusters=8)
    sync_vectors(uri, table, DIM)
    index = MemoryIndex.load(uri, exact_threshold=1_000)
    graph = index._state.hnsw
    assert index.kind == "hnsw"
    q = matrix(table)[17]
    before = ids_of(index.search(q, 10))
    update_clusters(uri, {f"L{i:06d}": 42 for i in range(0, 3_000, 2)})
    assert index.is_stale() and index.refresh()
    assert index._state.hnsw is graph and index.stats()["graph"] == "kept"
    assert ids_of(index.search(q, 10)) == before
    assert_same(index.search(q, 10, filters={"cluster": 42}, strategy="exact"), nearest(uri, q, k=10, filters={"cluster": 42}))
    hits = index.search(q, 10, filters={"cluster": 42})
    assert all(h["cluster"] == 42 for h in hits)
    # new lesions only: a copy of the graph, extended; the old snapshot keeps working
    old_state = index._state
    current = stored(uri)
    added = cohort(500, seed=12, start=10_000, clusters=8)
    sync_vectors(uri, pa.concat_tables([current, added.select(current.column_names).cast(current.schema)]), DIM)
    assert index.refresh() and index.stats()["graph"] == "extended" and index._state.hnsw is not graph
    assert len(index) == 3_500 and old_state.hnsw.ntotal == 3_000
    new_q = matrix(added)[7]
    assert ids_of(index.search(new_q, 1, exclude_self=False))[0] == "L010007"
    assert_same(index.search(new_q, 10, strategy="exact"), nearest(uri, new_q, k=10))
    assert len(set(ids_of(index.search(new_q, 10))) & set(ids_of(nearest(uri, new_q, k=10)))) >= 9
    assert ids_of(index.search(q, 10, filters={"cluster": 42}, strategy="exact")) == ids_of(
        nearest(uri, q, k=10, filters={"cluster": 42}))
    # a vector change (or a removal) rebuilds it
    moved = table.set_column(1, "vector", pa.FixedSizeListArray.from_arrays(pa.array((matrix(table) + 1).reshape(-1)), DIM))
    sync_vectors(uri, moved, DIM)
    assert index.refresh() and index.stats()["graph"] == "built" and len(index) == 3_000
    assert len(set(ids_of(index.search(q + 1, 10))) & set(before)) >= 9


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_graph_cache_is_shared_between_loads(tmp_path: Path, mmap: bool) -> None:
    pytest.importorskip("faiss")
    uri, cache = tmp_path / "lance", tmp_path / "graphs"
    table = cohort(2_500, seed=6, clusters=8)
    sync_vectors(uri, table, DIM)
    first = MemoryIndex.load(uri, exact_threshold=1_000, cache_dir=cache, mmap=mmap)
    second = MemoryIndex.load(uri, exact_threshold=1_000, cache_dir=cache, mmap=mmap)
    assert (first.stats()["graph"], second.stats()["graph"]) == ("built", "cache")
    assert len(list(cache.glob("*.faiss"))) == 1
    q = matrix(table)[3] + 0.1
    assert first.search(q, 10, filters={"modality": "CT"}, strategy="hnsw") == second.search(
        q, 10, filters={"modality": "CT"}, strategy="hnsw")
    other = MemoryIndex.load(uri, exact_threshold=1_000, cache_dir=cache, hnsw_m=8)  # other parameters: a miss
    assert other.stats()["graph"] == "built" and len(list(cache.glob("*.faiss"))) == 2
    current = stored(uri)  # new lesions: the mapped graph is copied, then extended (never added to in place)
    more = cohort(50, seed=13, start=20_000, clusters=8).select(current.column_names).cast(current.schema)
    sync_vectors(uri, pa.concat_tables([current, more]), DIM)
    assert first.refresh() and first.stats()["graph"] == "extended" and len(first) == 2_550
    assert ids_of(first.search("L020003", 1, exclude_self=False)) == ["L020003"]
    moved = table.set_column(1, "vector", pa.FixedSizeListArray.from_arrays(pa.array((matrix(table) * 2).reshape(-1)), DIM))
    sync_vectors(uri, moved, DIM)
    assert first.refresh() and first.stats()["graph"] == "built"  # new content: built, the oldest file removed
    assert len(list(cache.glob("*.faiss"))) == 2
    assert ids_of(first.search(2 * q, 5)) == ids_of(second.search(q, 5))
    (cache / "junk.faiss").write_bytes(b"not an index")
    for f in cache.glob("lesion_vectors-*.faiss"):  # replaced, never rewritten in place (mapped files: SIGBUS)
        tmp = f.with_suffix(".tmp")
        tmp.write_bytes(b"truncated")
        os.replace(tmp, f)
    again = MemoryIndex.load(uri, exact_threshold=1_000, cache_dir=cache, mmap=mmap)  # unreadable: rebuilt
    assert again.stats()["graph"] == "built" and ids_of(again.search(2 * q, 5)) == ids_of(first.search(2 * q, 5))


def test_searches_during_refresh(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    uri = tmp_path / "lance"
    table = cohort(1_500, seed=14, clusters=6)
    sync_vectors(uri, table, DIM)
    index = MemoryIndex.load(uri, exact_threshold=1_000)
    x = matrix(table)
    stop, errors, counts = False, [], []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop:
            try:
                hits = index.search(x[rng.integers(0, len(x))], 10, filters={"modality": ["CT", "MR"]})
                assert len(hits) == 10 and all(h["modality"] in ("CT", "MR") for h in hits)
                counts.append(1)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(reader, s) for s in range(3)]
        for step in range(3):
            more = cohort(100, seed=20 + step, start=50_000 + 100 * step, clusters=6)
            current = stored(uri)
            sync_vectors(uri, pa.concat_tables([current, more.select(current.column_names).cast(current.schema)]), DIM)
            assert index.refresh()
        stop = True
        for f in futures:
            f.result()
    assert not errors, errors[:3]
    assert len(index) == 1_800 and len(counts) > 0
