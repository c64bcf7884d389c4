"""The generic Delta Lake writer and readers (imaging_assets.store.delta), locally and on a real S3 server."""

from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from imaging_assets.store import delta
from imaging_assets.store import objects as objstore

COMMENTS = {"id": "the natural key", "value": "a measured value", "vec": "a small vector"}


def _table(ids, values, groups=None, vectors=None) -> pa.Table:
    n = len(ids)
    groups = groups or ["a"] * n
    vectors = vectors if vectors is not None else [[float(i), 1.0] for i in range(n)]
    flat = pa.array(np.asarray(vectors, np.float32).reshape(-1))
    return pa.table({"id": pa.array(ids, pa.string()), "value": pa.array(values, pa.float64()),
                     "grp": pa.array(groups, pa.string()),
                     "vec": pa.FixedSizeListArray.from_arrays(flat, 2),
                     "tags": pa.array([[g] for g in groups], pa.list_(pa.string()))})


def _write(uri, table, run="r1", **kw):
    kw.setdefault("partition_by", ["grp"])
    return delta.merge_table(uri, table, ["id"], description="a test table", column_comments=COMMENTS,
                             properties={"project_version": "0.1.0", "params_hash": "abc"},
                             lineage={"asset_key": "delta_tables", "run_id": run}, **kw)


def _rows(uri) -> list[dict]:
    return sorted(DeltaTable(uri, storage_options=objstore.storage_options(uri)).to_pyarrow_table().to_pylist(),
                  key=lambda r: r["id"])


def test_delta_create_then_merge_update_insert_delete(tmp_path):
    uri = str(tmp_path / "t")
    first = _write(uri, _table(["a", "b", "c"], [1.0, 2.0, 3.0], ["x", "x", "y"]))
    assert first.created and first.inserted == 3 and first.rows == 3
    v0 = first.version
    assert first.versions_added == 2 and v0 == 1  # the WRITE, then SET TBLPROPERTIES (custom keys)

    second = _write(uri, _table(["a", "b", "d"], [1.0, 5.0, 4.0], ["x", "x", "y"]), run="r2")
    assert not second.created
    assert (second.inserted, second.updated, second.deleted) == (1, 1, 1)
    assert second.version == v0 + 1 and second.versions_added == 1
    rows = _rows(uri)
    assert [r["id"] for r in rows] == ["a", "b", "d"]
    assert [r["value"] for r in rows] == [1.0, 5.0, 4.0]
    assert rows[0]["vec"] == [0.0, 1.0] and rows[0]["tags"] == ["x"]


def test_delta_unchanged_run_rewrites_no_file_and_adds_one_version(tmp_path):
    uri = str(tmp_path / "t")
    data = _table(["a", "b", "c", "d"], [1.0, math.nan, None, 4.0], ["x", "x", "y", "y"])
    _write(uri, data)
    files = set(DeltaTable(uri).file_uris())
    before = DeltaTable(uri).version()
    for i in range(2):
        again = _write(uri, data, run=f"again-{i}")
        assert (again.inserted, again.updated, again.deleted) == (0, 0, 0)
        assert (again.files_added, again.files_removed) == (0, 0)  # NaN and NULL compare equal
        assert again.version == before + i + 1 and again.versions_added == 1 and not again.changed
    assert set(DeltaTable(uri).file_uris()) == files
    last = DeltaTable(uri).history(1)[0]
    assert last["operation"] == "WRITE" and last["operationMetrics"]["num_added_files"] == 0
    assert last["imaging_assets.run_id"] == "again-1"


def test_delta_volatile_bookkeeping_column_is_not_a_change(tmp_path):
    """A recomputed table whose rows differ only in ``computed_at`` rewrites nothing; a real change still
    updates its row, with the new time."""
    import datetime as dt

    uri = str(tmp_path / "t")

    def at(day: int, values) -> pa.Table:
        t = _table(["a", "b"], values)
        stamp = dt.datetime(2026, 1, day, tzinfo=dt.UTC)
        return t.append_column("computed_at", pa.array([stamp, stamp], pa.timestamp("us", tz="UTC")))

    _write(uri, at(1, [1.0, 2.0]), volatile=["computed_at"])
    again = _write(uri, at(2, [1.0, 2.0]), run="r2", volatile=["computed_at"])
    assert (again.updated, again.files_added, again.files_removed) == (0, 0, 0)
    assert {r["computed_at"].day for r in _rows(uri)} == {1}
    changed = _write(uri, at(3, [1.0, 5.0]), run="r3", volatile=["computed_at"])
    assert changed.updated == 1
    assert {r["id"]: r["computed_at"].day for r in _rows(uri)} == {"a": 1, "b": 3}
    assert _write(uri, at(4, [1.0, 5.0]), run="r4").updated == 2  # without it, the time alone is a change


def test_delta_changed_vector_element_updates_only_that_row(tmp_path):
    uri = str(tmp_path / "t")
    _write(uri, _table(["a", "b"], [1.0, 2.0], vectors=[[0, 1], [2, 3]]), partition_by=None)
    r = _write(uri, _table(["a", "b"], [1.0, 2.0], vectors=[[0, 1], [2, 4]]), partition_by=None)
    assert (r.inserted, r.updated, r.deleted) == (0, 1, 0)
    assert _rows(uri)[1]["vec"] == [2.0, 4.0]


def test_delta_governance_readable_back(tmp_path):
    uri = str(tmp_path / "t")
    _write(uri, _table(["a"], [1.0]))
    _write(uri, _table(["a", "b"], [1.0, 2.0]), run="r2")
    dt = DeltaTable(uri)
    meta = dt.metadata()
    assert meta.name == "t" and meta.description == "a test table"
    assert meta.partition_columns == ["grp"]
    assert delta.column_comments(uri) == COMMENTS
    fields = {f["name"]: f["metadata"] for f in json.loads(dt.schema().to_json())["fields"]}
    assert fields["id"] == {"comment": "the natural key"}  # where Spark reads COMMENT from
    props = delta.table_properties(uri)
    assert props["imaging_assets.project_version"] == "0.1.0" and props["imaging_assets.params_hash"] == "abc"
    hist = delta.history(uri)
    assert [h["version"] for h in hist] == [2, 1, 0]
    assert hist[0]["operation"] == "MERGE" and hist[0]["imaging_assets.run_id"] == "r2"
    assert json.loads(hist[0]["userMetadata"]) == {"asset_key": "delta_tables", "run_id": "r2"}
    assert all(h["imaging_assets.asset_key"] == "delta_tables" for h in hist)


def test_delta_properties_set_only_when_they_change(tmp_path):
    uri = str(tmp_path / "t")
    data = _table(["a"], [1.0])
    _write(uri, data)
    v = DeltaTable(uri).version()
    same = _write(uri, data, run="same")
    assert not same.properties_changed and same.version == v + 1
    moved = delta.merge_table(uri, data, ["id"], partition_by=["grp"], description="a test table",
                              column_comments=COMMENTS, properties={"project_version": "0.2.0"},
                              lineage={"run_id": "new-version"})
    # the property commit records the run when the data did not change: still one version
    assert moved.properties_changed and moved.versions_added == 1 and moved.version == v + 2
    assert delta.table_properties(uri)["imaging_assets.project_version"] == "0.2.0"
    both = delta.merge_table(uri, _table(["a"], [9.0]), ["id"], partition_by=["grp"], description="a test table",
                             column_comments=COMMENTS, properties={"project_version": "0.3.0"},
                             lineage={"run_id": "both"})
    assert both.properties_changed and both.updated == 1 and both.versions_added == 2  # documented


def test_delta_schema_change_rewrites_once(tmp_path):
    uri = str(tmp_path / "t")
    _write(uri, _table(["a", "b"], [1.0, 2.0]))
    v = DeltaTable(uri).version()
    wider = _table(["a", "b"], [1.0, 2.0]).append_column("extra", pa.array([1, 2], pa.int32()))
    r = _write(uri, wider, run="wider")
    assert r.rewritten and r.version == v + 1 and r.versions_added == 1
    assert "extra" in DeltaTable(uri).schema().to_arrow().names
    assert DeltaTable(uri, version=v).to_pyarrow_table().num_rows == 2  # time travel to the old schema
    assert delta.column_comments(uri) == COMMENTS


def test_delta_empty_source_deletes_everything_and_empty_table_can_be_created(tmp_path):
    uri = str(tmp_path / "t")
    _write(uri, _table(["a", "b"], [1.0, 2.0]))
    r = _write(uri, _table([], []), run="empty")
    assert r.deleted == 2 and _rows(uri) == []
    fresh = _write(str(tmp_path / "e"), _table([], []))
    assert fresh.created and fresh.rows == 0 and DeltaTable(str(tmp_path / "e")).to_pyarrow_table().num_rows == 0


@pytest.mark.parametrize("ids, message", [(["a", "a"], "not unique"), (["a", None], "NULL")])
def test_delta_refuses_bad_keys(tmp_path, ids, message):
    with pytest.raises(ValueError, match=message):
        _write(str(tmp_path / "t"), _table(ids, [1.0, 2.0]))


def test_delta_refuses_comment_of_unknown_column(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        delta.merge_table(str(tmp_path / "t"), _table(["a"], [1.0]), ["id"], column_comments={"nope": "x"})


def test_delta_readers_duckdb_views_and_polars(tmp_path):
    root = tmp_path / "delta"
    _write(str(root / "alpha"), _table(["a", "b"], [1.0, 2.0], ["x", "y"]))
    _write(str(root / "beta"), _table(["c"], [3.0]))
    (root / "not_a_table").mkdir()
    assert delta.list_tables(str(root)) == ["alpha", "beta"]
    assert delta.table_version(str(root / "alpha")) == 1 and delta.table_version(str(root / "nope")) is None
    con = duckdb.connect()
    seen = delta.register_duckdb_views(con, str(root), prefix="delta_")
    assert seen == {"alpha": 1, "beta": 1}
    assert con.execute("SELECT id FROM delta_alpha WHERE grp = 'y'").fetchall() == [("b",)]
    assert con.execute("SELECT vec FROM delta_alpha WHERE id = 'b'").fetchall() == [([1.0, 1.0],)]
    _write(str(root / "alpha"), _table(["a"], [1.0]), run="shrink")
    pinned = delta.register_duckdb_views(con, str(root), names=["alpha"], prefix="old_", versions={"alpha": 1})
    assert pinned == {"alpha": 1} and con.execute("SELECT count(*) FROM old_alpha").fetchall() == [(2,)]
    assert pl.read_delta(str(root / "alpha")).height == 1


def test_s3_delta_merge_and_read_on_object_storage(s3_server):
    root = s3_server.bucket("delta-store") + "/wh/delta"
    objstore.configure(s3_server.bucket("delta-store") + "/wh", s3_server.options)
    uri = objstore.join(root, "items")
    assert objstore.storage_options(uri)["aws_conditional_put"] == "etag"
    first = _write(uri, _table(["a", "b"], [1.0, 2.0], ["x", "y"]))
    assert first.created
    second = _write(uri, _table(["a", "c"], [1.0, 3.0], ["x", "y"]), run="s3-2")
    assert (second.inserted, second.updated, second.deleted) == (1, 0, 1)
    same = _write(uri, _table(["a", "c"], [1.0, 3.0], ["x", "y"]), run="s3-3")
    assert same.version == second.version + 1 and (same.files_added, same.files_removed) == (0, 0)
    assert [r["id"] for r in _rows(uri)] == ["a", "c"]
    assert delta.history(uri, 1)[0]["imaging_assets.run_id"] == "s3-3"
    assert delta.column_comments(uri) == COMMENTS
    assert delta.list_tables(root) == ["items"]
    con = duckdb.connect()
    assert delta.register_duckdb_views(con, root, prefix="delta_") == {"items": same.version}
    assert con.execute("SELECT count(*) FROM delta_items").fetchall() == [(2,)]
    assert pl.read_delta(uri, storage_options=objstore.storage_options(uri)).height == 2
