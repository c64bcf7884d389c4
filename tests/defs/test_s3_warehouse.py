"""The whole graph with the warehouse on a real S3-compatible server (moto, started by the tests on loopback):
everything but the DuckDB file lives in the bucket; search, SQL and an incremental re-run work on it.

``pytest -k s3_`` selects the object-store tests.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource, WarehouseResource

pytestmark = pytest.mark.slow


def _defs() -> dg.Definitions:
    from imaging_assets.definitions import defs

    return defs() if callable(defs) and not isinstance(defs, dg.Definitions) else defs


def _meta(result: dg.ExecuteInProcessResult) -> dict:
    return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()}


def test_s3_whole_graph_materializes_searches_and_reruns_incrementally(small_cohort, tmp_path, monkeypatch,
                                                                        s3_server):
    from imaging_assets.defs.radiomics import LesionConfig, RadiomicsConfig
    from imaging_assets.defs.reproducibility import RobustnessConfig
    from imaging_assets.stages.similar import find_similar
    from imaging_assets.store.sql import run_sql

    local = tmp_path / "duckdb"
    monkeypatch.setenv("IMAGING_ASSETS_DUCKDB_DIR", str(local))
    for var in ("AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)  # the resource's endpoint field must reach the server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.options.access_key_id)  # credentials: environment only
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.options.secret_access_key)
    bucket = s3_server.bucket("graph-warehouse")
    opts = s3_server.options
    warehouse = WarehouseResource(root=f"{bucket}/wh", s3_endpoint_url=opts.endpoint_url, s3_region=opts.region)
    wh = warehouse.get_warehouse()
    assert wh.remote and wh.files == f"{bucket}/wh" and wh.lance_uri == f"{bucket}/wh/lance"
    assert wh.root == local and wh.duckdb_path == local / "warehouse.duckdb"

    defs = _defs()
    everything = [a for a in defs.assets if a.partitions_def is None] + list(defs.asset_checks)
    resources = {
        "warehouse": warehouse,
        "dicom_sources": DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2),
        "outcome_sources": OutcomeSourcesResource(path=str(small_cohort.outcomes_csv)),
    }
    run_config = dg.RunConfig(ops={
        "lesions": LesionConfig(workers=2, series_per_batch=2),
        "radiomics_features": RadiomicsConfig(workers=2),
        "feature_robustness": RobustnessConfig(n_perturbations=3, workers=2),
    })
    with dg.instance_for_test() as instance:
        result = dg.materialize(everything, instance=instance, resources=resources, run_config=run_config)
        assert result.success
        meta = _meta(result)
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        failed = {n: c.metadata for n, c in checks.items() if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR}
        assert not failed, failed
        n = meta["lesions"]["extractable"].value
        assert meta["lesion_vectors"]["dagster/row_count"].value == n
        assert meta["lesion_thumbnails"]["dagster/row_count"].value == n

        # every file and table is in the bucket; the local folder holds DuckDB (and caches) only
        keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(
            Bucket="graph-warehouse", Prefix="wh/") for o in page.get("Contents", [])]
        tops = {k.split("/")[1] for k in keys}
        assert {"lance", "partitions", "thumbnails", "crops", "models", "plots", "delta"} <= tops, tops
        assert sum(k.startswith("wh/thumbnails/") and k.endswith(".png") for k in keys) == n
        assert sum(k.startswith("wh/crops/") and k.endswith(".npy") for k in keys) == n
        assert any(k.startswith("wh/partitions/radiomics/") and k.endswith("_manifest.json") for k in keys)
        assert any(k.startswith("wh/lance/lesion_vectors.lance/_versions/") for k in keys)
        made_locally = {p.relative_to(local).parts[0] for p in local.rglob("*") if p.is_file()}
        assert made_locally <= {"warehouse.duckdb", "warehouse.duckdb.wal", ".cache", ".pictures_key",
                                ".snapshots", "users.json"}, made_locally
        assert not (local / "lance").exists() and not (local / "thumbnails").exists()

        # the Delta copies are in the bucket, readable with deltalake and polars, equal to DuckDB
        import polars as pl

        from imaging_assets.store import delta
        from imaging_assets.store.objects import storage_options

        lesions_uri = f"{wh.delta_uri}/lesions"
        delta_v = delta.table_version(lesions_uri)
        lake = pl.read_delta(lesions_uri, storage_options=storage_options(lesions_uri))
        with wh.connect(read_only=True) as con:
            ids = [r[0] for r in con.execute("SELECT lesion_id FROM lesions ORDER BY 1").fetchall()]
        assert sorted(lake["lesion_id"].to_list()) == ids

        # search and SQL over the tables on S3
        with wh.connect(read_only=True) as con:
            lid = con.execute("SELECT lesion_id FROM lesions WHERE extractable ORDER BY volume_mm3 DESC "
                              "LIMIT 1").fetchone()[0]
        hits = find_similar(lid, k=3, warehouse=wh)
        assert hits.height == 3 and lid not in hits["lesion_id"].to_list()
        sql = run_sql(wh, "SELECT count(*) AS n FROM lesion_vectors v JOIN lesions l USING (lesion_id) "
                          "JOIN delta_lesions d USING (lesion_id)")
        assert int(sql["n"][0]) == n
        # the search server's pictures come from the bucket
        from imaging_assets.web import picture_file

        png = picture_file(wh, "thumbnails", f"{lid}.png")
        assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
        assert picture_file(wh, "thumbnails", "nope.png") is None

        # a second materialization reads nothing new, extracts nothing, redraws nothing
        version = meta["lesion_vectors"]["table_version"].value
        again = dg.materialize(everything, instance=instance, resources=resources, run_config=run_config)
        assert again.success
        meta2 = _meta(again)
        assert meta2["dicom_files"]["files_read"].value == 0
        assert meta2["radiomics_features"]["extracted_this_run"].value == 0
        assert meta2["lesion_thumbnails"]["rendered"].value == 0
        assert meta2["lesion_crops"]["made"].value == 0
        assert meta2["lesion_vectors"]["table_version"].value >= version
        assert find_similar(lid, k=3, warehouse=wh)["lesion_id"].to_list() == hits["lesion_id"].to_list()
        assert delta.table_version(lesions_uri) == delta_v + 1  # one version per run, nothing rewritten
        changed = [r for r in meta2["delta_tables"]["tables"].value.records
                   if r.data["inserted"] or r.data["updated"] or r.data["deleted"]]
        assert not changed, [r.data for r in changed]


def test_s3_settings_put_duckdb_locally_and_files_in_the_bucket(monkeypatch, tmp_path):
    from imaging_assets import settings
    from imaging_assets.store.warehouse import Warehouse

    monkeypatch.delenv("IMAGING_ASSETS_DUCKDB_DIR", raising=False)
    monkeypatch.delenv("IMAGING_ASSETS_LANCE_URI", raising=False)
    monkeypatch.setenv("IMAGING_ASSETS_DATA", str(tmp_path))
    monkeypatch.setenv("IMAGING_ASSETS_WAREHOUSE", "s3://bucket-x/team/wh")
    wh = Warehouse.from_settings()
    assert wh.files == "s3://bucket-x/team/wh" and wh.lance_uri == "s3://bucket-x/team/wh/lance"
    assert wh.delta_uri == "s3://bucket-x/team/wh/delta"
    assert wh.root == Path(tmp_path) / "duckdb" / "bucket-x" / "team" / "wh"
    monkeypatch.setenv("IMAGING_ASSETS_DUCKDB_DIR", str(tmp_path / "mine"))
    assert Warehouse.from_settings().duckdb_path == tmp_path / "mine" / "warehouse.duckdb"
    monkeypatch.delenv("IMAGING_ASSETS_DUCKDB_DIR")
    # a local warehouse keeps everything in its folder, as before
    local = Warehouse.from_settings(root=tmp_path / "here")
    assert local.root == tmp_path / "here" and local.files == str(tmp_path / "here") and not local.remote
    assert local.lance_uri == str(tmp_path / "here" / "lance")
    assert settings.is_remote("s3://a/b") and not settings.is_remote(tmp_path)


def test_s3_resource_reads_the_standard_aws_variables_through_envvar(monkeypatch):
    from imaging_assets.defs.resources import s3_env_vars

    for var in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    assert s3_env_vars() == {}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fields = s3_env_vars()
    assert fields == {"s3_endpoint_url": dg.EnvVar("AWS_ENDPOINT_URL")}
    res = WarehouseResource(root="s3://b/wh", **fields)
    with dg.build_resources({"warehouse": res}) as built:  # Dagster resolves the EnvVar fields
        wh = built.warehouse.get_warehouse()
    assert wh.s3.access_key_id == "id-1" and wh.s3.secret_access_key == "secret-1"
    assert "secret-1" not in repr(wh) and "id-1" not in repr(wh)
    from imaging_assets.store.objects import storage_options

    assert storage_options("s3://b/wh/lance")["aws_access_key_id"] == "id-1"
