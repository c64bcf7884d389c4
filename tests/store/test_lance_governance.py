"""Lance filters and versions under a careless or hostile caller (issue 18, finding 9): a ``str`` (or date,
or number) subclass cannot write filter code, a repeated ``--where`` column is never silently dropped, and
old table versions go by a retention policy that keeps pinned and recent versions."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imaging_assets.cli import _parse_filters
from imaging_assets.store import audit
from imaging_assets.store.lance import VECTOR_TABLE, filters_to_where, nearest, open_dataset, sql_string, sync_vectors
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse

DIM = 8


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(n, DIM)).astype(np.float32)
    return pa.table({
        "lesion_id": [f"L{i:04d}" for i in range(n)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), DIM),
        "patient_key": [f"P{i // 2:03d}" for i in range(n)],
        "study_date": pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=i) for i in range(n)], pa.date32()),
        "modality": ["CT" if i % 2 else "MR" for i in range(n)],
        "volume_mm3": rng.uniform(100, 1000, n),
        "space": ["CT-1" if i % 2 else "MR-1" for i in range(n)],
    })


@pytest.fixture()
def uri(tmp_path) -> Path:
    path = tmp_path / "lance"
    sync_vectors(path, _table(60), DIM)
    return path


class Sneaky(str):
    """Formats, concatenates and escapes itself as filter code, and equals any column name."""

    def replace(self, *args):  # the old escaping called value.replace
        return str.__str__(self)

    def __format__(self, spec):
        return "modality) OR (true"

    def __radd__(self, other):
        return other + "' OR true OR '"

    def __eq__(self, other):
        return True

    def __hash__(self):
        return hash("modality")

    def strip(self, *args):
        return self


class SneakyDate(dt.date):
    def isoformat(self):
        return "2000-01-01' OR true OR date '2000-01-01"


def test_a_str_subclass_cannot_inject_lance_filter_code(uri):
    q = np.zeros(DIM, np.float32)
    # the value "XX' OR true OR modality = 'x" matches no modality: a literal with the same characters finds nothing
    assert nearest(uri, q, k=100, filters={"modality": Sneaky("XX' OR true OR modality = 'x")}) == []
    assert nearest(uri, q, k=100, filters={"modality": [Sneaky("XX') OR (true")]}) == []
    assert sql_string(Sneaky("a'b")) == "'a''b'"
    # the column name written is the schema's own, whatever the object says of itself
    assert filters_to_where({Sneaky("modality"): "CT"}) == "(modality = 'CT')"
    # a date subclass is written as its day, never by its own isoformat()
    hits = nearest(uri, q, k=100, filters={"study_date": (SneakyDate(2020, 2, 1), None)})
    assert hits and all(h["study_date"] >= dt.date(2020, 2, 1) for h in hits)
    # the space restriction that callers add cannot be escaped either
    hits = nearest(uri, q, k=100, filters={"modality": Sneaky("CT"), "space": ["CT-1"]})
    assert hits and {h["space"] for h in hits} == {"CT-1"}


def test_a_repeated_where_column_adds_values_and_a_second_range_is_an_error():
    assert _parse_filters(["modality=CT", "modality=MR"]) == {"modality": ["CT", "MR"]}
    assert _parse_filters(["cluster=1", "cluster=2,1"]) == {"cluster": [1, 2]}
    assert _parse_filters(["modality=CT", "study_date=2020-01-01..2021-01-01"]) == {
        "modality": ["CT"], "study_date": ("2020-01-01", "2021-01-01")}
    with pytest.raises(ValueError, match="volume_mm3 is filtered twice"):
        _parse_filters(["volume_mm3=1..10", "volume_mm3=100..200"])
    with pytest.raises(ValueError, match="already has a range"):
        _parse_filters(["volume_mm3=1..10", "volume_mm3=5"])


@pytest.fixture()
def R():
    """The retention module (imported here: the injection and --where tests run without it)."""
    from imaging_assets.store.lance import retention

    return retention


def _versions(uri) -> list[int]:
    return [int(v["version"]) for v in open_dataset(uri, VECTOR_TABLE).versions()]


def _many_versions(uri, n: int = 6) -> None:
    for seed in range(1, n):
        sync_vectors(uri, _table(60, seed=seed), DIM)


def test_retention_keeps_pinned_and_latest_versions_and_removes_the_rest(uri, monkeypatch, R):
    _many_versions(uri)
    before = _versions(uri)
    assert len(before) >= 6
    pinned = before[2]
    monkeypatch.setattr(R, "MIN_VERSION_AGE", dt.timedelta(0))  # pretend every version is old enough
    report = R.apply_retention(uri, [pinned], dt.timedelta(0))
    after = _versions(uri)
    assert after == [pinned, before[-1]]
    assert report.removed == len(before) - 2 and report.kept_pinned == 1 and report.bytes_removed > 0
    # the pinned version still answers time travel
    assert nearest(uri, "L0001", k=3, version=pinned)


def test_retention_never_removes_a_version_younger_than_an_hour(uri, R):
    _many_versions(uri, 4)
    before = _versions(uri)
    report = R.apply_retention(uri, [], dt.timedelta(0))  # keep 0 days: the hour floor still holds
    assert _versions(uri) == before and report.removed == 0 and report.kept_recent == len(before) - 1


def test_the_vectors_stage_keeps_the_versions_audit_rows_and_cohorts_name(tmp_path, monkeypatch, R):
    from imaging_assets.stages.vectors import apply_version_retention, pinned_lance_versions

    wh = Warehouse(tmp_path / "wh")
    sync_vectors(wh.lance_uri, _table(60), DIM)
    _many_versions(wh.lance_uri)
    before = _versions(wh.lance_uri)
    with wh.connect() as con:
        ensure_schema(con)
    audit.record(wh.duckdb_path, "search", "find_similar", {}, {"lesion_vectors": before[1]})
    audit.record(wh.duckdb_path, "sql", "SELECT 1", {}, {"lesion_vectors": before[3], "robust_feature_set": "x"})
    with wh.connect(read_only=True) as con:
        assert pinned_lance_versions(con) == {before[1], before[3]}
    monkeypatch.setattr(R, "MIN_VERSION_AGE", dt.timedelta(0))
    report = apply_version_retention(wh, keep_days=0)
    assert _versions(wh.lance_uri) == [before[1], before[3], before[-1]]
    assert report["removed"] == len(before) - 3 and report["kept_pinned"] == 2


def test_sync_no_longer_removes_versions_by_age(uri, monkeypatch):
    """sync_vectors used to run optimize(cleanup_older_than=1 h): every version older than an hour went,
    pinned or not. Its optimize now removes nothing; the retention policy decides."""
    import lancedb.table

    seen = []
    original = lancedb.table.LanceTable.optimize

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("cleanup_older_than"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", spy)
    sync_vectors(uri, _table(60, seed=9), DIM)
    assert seen and all(age is not None and age >= dt.timedelta(days=3650) for age in seen), seen


class Aliased(str):
    """A value whose repr claims to be another value."""

    def __repr__(self):
        return "'MR'"


def test_a_str_subclass_cannot_alias_a_cached_filter_of_the_memory_index(uri):
    """The server's in-memory index caches filter masks by their values' repr: a subclass must not plant
    the CT mask under the key of MR for every later (honest) query."""
    from imaging_assets.store.lance.memory import MemoryIndex

    index = MemoryIndex.load(uri)
    q = np.zeros(DIM, np.float32)
    ct = index.search(q, k=100, filters={"modality": Aliased("CT")})
    assert ct and {r["modality"] for r in ct} == {"CT"}
    mr = index.search(q, k=100, filters={"modality": "MR"})
    assert mr and {r["modality"] for r in mr} == {"MR"}
