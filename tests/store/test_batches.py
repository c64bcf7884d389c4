"""Batches of series, the partitions of the extraction: result files committed by a manifest, stable batch
membership, one batch extracted anywhere without DuckDB, one loader, and the Dagster partitions."""

from __future__ import annotations

import json
import shutil

import duckdb
import pyarrow as pa
import pytest

from imaging_assets.stages import ChainSettings, run_chain
from imaging_assets.stages.batches import batch_files, extract_batch
from imaging_assets.stages.radiomics import extract_features, rebuild_lesions
from imaging_assets.store.partfiles import PartitionFiles
from imaging_assets.store.warehouse import Warehouse

KEY = "imaging-assets-demo-key-for-synthetic-data-only"


def _q(wh: Warehouse, sql: str, params=()):
    con = duckdb.connect(str(wh.duckdb_path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def _check_commits(files: PartitionFiles) -> None:
    assert files.current("b1") is None and files.keys() == []
    v1 = files.commit("b1", {"t": pa.table({"x": [1, 2]})}, {"n": 2})
    files.commit("b2", {"t": pa.table({"x": [9]})}, {"n": 1})
    # a writer that died before its manifest write: its files are there, the partition is still v1
    buf = pa.BufferOutputStream()
    pa.parquet.write_table(pa.table({"x": [7, 7, 7]}), buf)
    files.store.write_bytes(f"{files.prefix}/b1/t-deadbeef.parquet", buf.getvalue().to_pybytes())
    files.store.write_bytes(f"{files.prefix}/b1/.t-x.parquet.tmp", b"torn")
    assert files.current("b1").token == v1.token and files.current("b1").read("t")["x"].to_pylist() == [1, 2]
    v2 = files.commit("b1", {"t": pa.table({"x": [3]})}, {"n": 1})
    assert files.current("b1").read("t")["x"].to_pylist() == [3] and v2.token != v1.token
    assert files.names("b1") == ["_manifest.json", f"t-{v2.token}.parquet"]
    assert files.current("b2").read("t")["x"].to_pylist() == [9]  # the other partition is untouched
    assert files.keys() == ["b1", "b2"] == files.folders()
    with pytest.raises(ValueError, match="only letters"):
        files.folder("../escape")
    files.store.write_bytes(f"{files.prefix}/b2/_manifest.json", b"{not json")
    with pytest.raises(ValueError, match="b2.*_manifest.json"):
        files.current("b2")
    assert files.write_inputs("b1", {"a": 1}) and not files.write_inputs("b1", {"a": 1})
    assert files.read_inputs("b1") == {"a": 1}


def test_s3_partition_commits_on_object_storage(s3_server):
    """The same commit protocol on a real S3 server: the manifest PUT is the commit."""
    from imaging_assets.store.objects import ObjectStore

    _check_commits(PartitionFiles(ObjectStore(s3_server.bucket("partfiles") + "/wh", s3_server.options),
                                  "partitions/radiomics"))


def test_a_commit_is_all_or_nothing_and_replaces_exactly_its_partition(tmp_path):
    files = PartitionFiles(str(tmp_path), "p")
    _check_commits(files)
    assert sorted(p.name for p in (tmp_path / "p" / "b1").iterdir()) == sorted(files.names("b1"))
    with pytest.raises(FileNotFoundError, match="materialize `lesions` first"):
        files.read_inputs("b9")


@pytest.fixture(scope="module")
def batched(small_cohort, tmp_path_factory):
    """The small cohort up to lesions, one series per batch, then extracted batch by batch as a worker
    would (no DuckDB), then loaded."""
    wh = Warehouse(tmp_path_factory.mktemp("batched") / "wh")
    run_chain(wh, ChainSettings(dicom_roots=[small_cohort.dicom_dir], secret=KEY, batch_size=1, workers=2),
              until="lesions")
    pristine = tmp_path_factory.mktemp("pristine") / "wh"
    shutil.copytree(wh.root, pristine)
    files = batch_files(wh)
    batches = [r[0] for r in _q(wh, "SELECT DISTINCT batch_id FROM series_batches ORDER BY 1")]
    results = {b: extract_batch(wh, b, worker={"host": "test", "pid": 1}) for b in batches}
    loaded = extract_features(wh, workers=2)
    return {"wh": wh, "files": files, "batches": batches, "results": results, "loaded": loaded,
            "pristine": Warehouse(pristine)}


def test_batches_hold_whole_series_and_never_change_membership(batched, tmp_path):
    wh, files = batched["wh"], batched["files"]
    series = _q(wh, "SELECT count(DISTINCT series_key) FROM lesions WHERE extractable")[0][0]
    assert len(batched["batches"]) == series >= 4  # one series per batch
    for b in batched["batches"]:
        inputs = files.read_inputs(b)
        assert len({r["series_key"] for r in inputs["lesions"]}) == 1 and inputs["series"]
        assert {r["seg_key"] for r in inputs["lesions"]} == {r["seg_key"] for r in inputs["segmentations"]}
    # a rerun of lesions with another batch size keeps every assigned series where it is
    root = tmp_path / "wh"
    shutil.copytree(wh.root, root)
    before = _q(Warehouse(root), "SELECT series_key, batch_id FROM series_batches ORDER BY 1")
    r = rebuild_lesions(Warehouse(root), series_per_batch=50)
    assert r.new_batches == () and r.changed_batches == ()
    assert _q(Warehouse(root), "SELECT series_key, batch_id FROM series_batches ORDER BY 1") == before


def test_a_batch_is_extracted_without_duckdb_and_a_rerun_writes_nothing(batched, monkeypatch):
    wh, files = batched["wh"], batched["files"]
    assert all(r.committed and r.failed == 0 for r in batched["results"].values())
    assert sum(r.extracted for r in batched["results"].values()) == \
        _q(wh, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    # the load step only loaded: every batch was current
    assert batched["loaded"].extracted == 0 and batched["loaded"].batches_extracted == 0
    assert batched["loaded"].batches_loaded == len(batched["batches"])
    b = batched["batches"][0]
    assert files.current(b).meta["worker"] == {"host": "test", "pid": 1}

    def no_duckdb(*a, **k):
        raise AssertionError("a batch opened the DuckDB file")

    monkeypatch.setattr(Warehouse, "connect", no_duckdb)
    token = files.current(b).token
    again = extract_batch(wh, b)
    assert not again.committed and again.extracted == 0 and files.current(b).token == token


def test_the_load_step_swaps_in_exactly_a_changed_batch(batched, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(batched["wh"].root, root)
    wh = Warehouse(root)
    files = batch_files(wh)
    b = max(batched["batches"], key=lambda k: len(files.read_inputs(k)["lesions"]))
    before = _q(wh, "SELECT lesion_id, feature, value FROM radiomics_features ORDER BY ALL")
    victim = files.read_inputs(b)["lesions"][0]["lesion_id"]
    # the batch's files lose one lesion (as after re-extraction of changed inputs): reload drops exactly it
    version = files.current(b)
    tables = {n: version.read(n).filter(pa.compute.not_equal(version.read(n)["lesion_id"], victim))
              for n in ("features", "provenance", "errors")}
    files.commit(b, tables, version.meta)
    r = extract_features(wh, workers=1)
    assert r.batches_loaded == 1 and r.extracted == 1  # the inputs still hold it: re-extracted, then loaded
    assert _q(wh, "SELECT lesion_id, feature, value FROM radiomics_features ORDER BY ALL") == before
    dup = _q(wh, "SELECT count(*) FROM (SELECT lesion_id, feature, image_type, feature_class FROM radiomics_features "
                 "GROUP BY ALL HAVING count(*) > 1)")[0][0]
    assert dup == 0


def test_a_warehouse_from_before_batches_carries_its_features_over(batched, tmp_path):
    """Features stored before batch files existed are written into the batch files, not extracted again."""
    root = tmp_path / "wh"
    shutil.copytree(batched["wh"].root, root)
    shutil.rmtree(root / "partitions" / "radiomics")
    wh = Warehouse(root)
    con = duckdb.connect(str(wh.duckdb_path))
    con.execute("DELETE FROM series_batches")
    con.execute("DELETE FROM batch_loads")
    con.close()
    before = _q(wh, "SELECT lesion_id, feature, value FROM radiomics_features ORDER BY ALL")
    rebuild_lesions(wh)  # assigns batches and writes their inputs again
    r = extract_features(wh, workers=1)
    assert r.extracted == 0 and r.skipped_current > 0 and r.batches_extracted == r.batches
    assert _q(wh, "SELECT lesion_id, feature, value FROM radiomics_features ORDER BY ALL") == before


def test_inputs_name_the_lesion_options(batched):
    inputs = batched["files"].read_inputs(batched["batches"][0])
    assert inputs["options"] == {"split_components": False, "fractional_threshold": 0.5, "roi_mapping": None}
    assert json.loads(json.dumps(inputs)) == inputs and len(inputs["digest"]) == 64


def test_dagster_partitions_come_from_lesions_and_a_partition_materializes(batched, tmp_path):
    import dagster as dg

    from imaging_assets.defs.discovery import refresh_job
    from imaging_assets.defs.radiomics import lesions, radiomics_batches, series_batches
    from imaging_assets.defs.resources import WarehouseResource

    root = tmp_path / "wh"
    shutil.copytree(batched["pristine"].root, root)
    resources = {"warehouse": WarehouseResource(root=str(root))}
    with dg.instance_for_test() as instance:
        res = dg.materialize([lesions], instance=instance, resources=resources)
        assert res.success
        keys = instance.get_dynamic_partitions(series_batches.name)
        assert keys == batched["batches"]
        res = dg.materialize([radiomics_batches], instance=instance, resources=resources, partition_key=keys[0])
        assert res.success
        meta = res.asset_materializations_for_node("radiomics_batches")[0].metadata
        assert meta["written"].value is True and meta["failed"].value == 0 and meta["worker_pid"].value > 0
        assert batch_files(Warehouse(root)).current(keys[0]) is not None
    from imaging_assets.definitions import defs

    job = defs().resolve_job_def(refresh_job.name)
    assert dg.AssetKey("radiomics_batches") not in job.asset_layer.selected_asset_keys
    assert dg.AssetKey("radiomics_features") in job.asset_layer.selected_asset_keys
