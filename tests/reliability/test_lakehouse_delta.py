"""The Delta Lake export (stages.lakehouse) on the materialized demo warehouse of the reliability suite.

Read back with deltalake and polars and compared with DuckDB / Lance row for row; a re-run adds one
version per table and changes nothing; governance (properties, comments, lineage) readable; no PHI, path
or raw DICOM UID in any Delta table; ``run_sql`` joins ``delta_lesions`` with a DuckDB table; the asset
materializes in-process. Uses the session's ``clean_chain`` warehouse (a private copy of it).
"""

from __future__ import annotations

import json
import shutil

import duckdb
import polars as pl
import pytest
import reliability_helpers as rh
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from imaging_assets.stages.cohorts import discover_cohort
from imaging_assets.stages.lakehouse import DROPPED, SOURCES, export_delta_tables, project_version
from imaging_assets.store import delta
from imaging_assets.store.lance import open_dataset
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.sql import run_sql
from imaging_assets.store.warehouse import Warehouse

pytestmark = pytest.mark.slow

FORBIDDEN_COLUMNS = {"series_instance_uid", "study_instance_uid", "raw_label", "reason", "path", "files",
                     "thumbnail", "query", "image_path", "source_file", "source_fingerprint"}


@pytest.fixture(scope="module")
def lake(clean_chain, tmp_path_factory):
    """A copy of the clean warehouse with one cohort, exported twice (run-1, run-2)."""
    root = tmp_path_factory.mktemp("lake") / "wh"
    shutil.copytree(clean_chain["wh"], root)
    wh = Warehouse(root)
    with wh.connect(read_only=True) as con:
        lid = con.execute("SELECT lesion_id FROM lesions WHERE extractable ORDER BY lesion_id LIMIT 1").fetchall()[0][0]
    discover_cohort(wh, "lake_probe", reference_lesion_id=lid, k=4)
    first = export_delta_tables(wh, run_id="run-1")
    second = export_delta_tables(wh, run_id="run-2")
    return {"wh": wh, "first": first, "second": second, "chain": clean_chain}


def _naive(df: pl.DataFrame) -> pl.DataFrame:
    """UTC timestamps back to naive (as DuckDB keeps them); fixed-size arrays as lists."""
    out = []
    for name, dtype in df.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
            col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        elif isinstance(dtype, pl.Array):
            col = col.arr.to_list()
        out.append(col)
    return df.select(out)


def _expected(wh: Warehouse, name: str, columns: list[str]) -> pl.DataFrame:
    spec = next((s for s in SOURCES if s.name == name), None)
    if spec is not None and spec.lance:
        return pl.from_arrow(open_dataset(wh.lance_uri, name).to_table()).select(columns)
    sql = spec.sql if spec is not None and spec.sql else f"SELECT * FROM {name}"
    with wh.connect(read_only=True) as con:
        return pl.from_arrow(con.sql(sql).to_arrow_table()).select(columns)


def test_delta_every_table_exported_and_equal_to_its_source(lake):
    wh, second = lake["wh"], lake["second"]
    names = {t.table for t in second.tables}
    assert {"lesions", "radiomics_features", "feature_robustness", "robust_feature_sets", "phenotype_clusters",
            "cluster_survival", "lesion_vectors", "lesion_embeddings", "cohorts", "cohort_lake_probe"} <= names
    assert second.skipped == {}
    assert delta.list_tables(wh.delta_uri) == sorted(names)
    for t in second.tables:
        uri = f"{wh.delta_uri}/{t.table}"
        got = _naive(pl.read_delta(uri))
        keys = list(next((s.keys for s in SOURCES if s.name == t.table), ("lesion_id",)))
        expected = _naive(_expected(wh, t.table, got.columns))
        assert got.height == t.rows == expected.height, t.table
        assert_frame_equal(got.sort(keys), expected.sort(keys), check_dtypes=False, check_exact=True)
        assert DeltaTable(uri).to_pyarrow_table().num_rows == t.rows  # deltalake reads the same rows
    assert lake["second"].table("radiomics_features").rows > 1000


def test_delta_vectors_keep_their_values_as_float_arrays(lake):
    wh = lake["wh"]
    got = DeltaTable(f"{wh.delta_uri}/lesion_vectors").to_pyarrow_table().sort_by("lesion_id")
    lance = open_dataset(wh.lance_uri, "lesion_vectors").to_table().sort_by("lesion_id")
    assert str(got.schema.field("vector").type) in ("list<element: float>", "list<item: float>")
    assert got.column("vector").to_pylist() == lance.column("vector").to_pylist()


def test_delta_rerun_adds_one_version_and_rewrites_nothing(lake):
    first, second = lake["first"], lake["second"]
    for a, b in zip(first.tables, second.tables):
        assert a.table == b.table and a.created
        assert b.version == a.version + 1 and b.versions_added == 1, b
        assert (b.inserted, b.updated, b.deleted, b.files_added, b.files_removed) == (0, 0, 0, 0, 0), b
        last = delta.history(b.uri, 1)[0]
        assert last["imaging_assets.run_id"] == "run-2" and last["imaging_assets.asset_key"] == "delta_tables"


def test_delta_changes_in_duckdb_arrive_as_one_merge(lake, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(lake["wh"].root, root)
    wh = Warehouse(root)
    with wh.connect() as con:
        gone, changed = [r[0] for r in con.execute("SELECT lesion_id FROM lesions ORDER BY lesion_id LIMIT 2").fetchall()]
        con.execute("DELETE FROM lesions WHERE lesion_id = ?", [gone])
        con.execute("UPDATE lesions SET volume_mm3 = volume_mm3 + 1 WHERE lesion_id = ?", [changed])
    before = DeltaTable(f"{wh.delta_uri}/lesions").version()
    r = export_delta_tables(wh, run_id="run-3", tables=["lesions"])
    t = r.table("lesions")
    assert (t.inserted, t.updated, t.deleted) == (0, 1, 1) and t.version == before + 1
    rows = {x["lesion_id"]: x for x in DeltaTable(f"{wh.delta_uri}/lesions").to_pyarrow_table().to_pylist()}
    assert gone not in rows and changed in rows
    old = {x["lesion_id"]: x for x in DeltaTable(f"{wh.delta_uri}/lesions", version=before).to_pyarrow_table().to_pylist()}
    assert rows[changed]["volume_mm3"] == pytest.approx(old[changed]["volume_mm3"] + 1)


def test_delta_governance_properties_comments_lineage(lake):
    wh = lake["wh"]
    with wh.connect(read_only=True) as con:
        spaces = dict(con.execute("SELECT space, params_hash FROM feature_spaces").fetchall())
        active = dict(con.execute("SELECT DISTINCT space, version FROM active_robust_features").fetchall())
    assert spaces and active
    for name in ("lesions", "radiomics_features", "lesion_vectors"):
        uri = f"{wh.delta_uri}/{name}"
        props = delta.table_properties(uri)
        assert props["imaging_assets.project_version"] == project_version()
        for space, params_hash in spaces.items():
            assert props[f"imaging_assets.params_hash.{space}"] == params_hash
        for space, version in active.items():
            assert props[f"imaging_assets.robust_set.{space}"] == version
        comments = delta.column_comments(uri)
        assert "pseudonym" in comments["lesion_id"] and "space" in comments
        if name != "radiomics_features":
            assert "HMAC" in comments["patient_key"]
        meta = DeltaTable(uri).metadata()
        assert meta.name == name and len(meta.description) > 20
        hist = delta.history(uri)
        assert [json.loads(h["userMetadata"])["run_id"] for h in hist[:2]] == ["run-2", "run-1"]
    assert DeltaTable(f"{wh.delta_uri}/radiomics_features").metadata().partition_columns == ["space"]
    vec_hist = delta.history(f"{wh.delta_uri}/lesion_vectors", 1)[0]
    assert int(vec_hist["imaging_assets.source_version"]) == lake["second"].table("lesion_vectors").source_version


def test_delta_tables_hold_no_phi_paths_or_dicom_uids(lake):
    wh, chain = lake["wh"], lake["chain"]
    cohort = chain["cohort"]
    needles = rh.phi_needles([cohort.dicom_dir], [cohort.outcomes_csv])
    with wh.connect(read_only=True) as con:
        uids = {r[0] for r in con.execute("SELECT series_instance_uid FROM imaging_series UNION "
                                          "SELECT study_instance_uid FROM imaging_series").fetchall() if r[0]}
    needles_all = needles | uids | {str(cohort.dicom_dir), str(wh.root)}
    pattern = rh._pattern(needles_all)
    hits = set()
    for name in delta.list_tables(wh.delta_uri):
        uri = f"{wh.delta_uri}/{name}"
        for version in range(DeltaTable(uri).version() + 1):
            tbl = DeltaTable(uri, version=version).to_pyarrow_table()
            assert not FORBIDDEN_COLUMNS & set(tbl.column_names), (name, FORBIDDEN_COLUMNS & set(tbl.column_names))
            rows = zip(*[tbl.column(c).to_pylist() for c in tbl.column_names]) if tbl.num_rows else []
            hits |= rh._scan_rows(f"delta:{name}@{version}", tbl.column_names, rows, pattern, needles_all)
    assert hits == set()
    assert rh.scan_files(wh.root / "delta", needles | uids) == []
    # the raw values were there to find: the scan is not vacuous
    assert {k for k in DROPPED} >= {"lesions", "lesion_vectors", "cohorts"} and uids


def test_delta_lesions_queryable_with_run_sql_joined_to_duckdb(lake, monkeypatch):
    wh = lake["wh"]
    monkeypatch.setenv("IMAGING_ASSETS_USER", "delta-tester")
    df = run_sql(wh, "SELECT d.space, count(*) AS n, count(pc.cluster) AS clustered FROM delta_lesions d "
                 "JOIN phenotype_clusters pc USING (lesion_id) GROUP BY d.space")
    with wh.connect(read_only=True) as con:
        n = con.execute("SELECT count(*) FROM lesions l JOIN phenotype_clusters USING (lesion_id)").fetchall()[0][0]
        audit = con.execute("SELECT table_versions FROM audit_log WHERE \"user\" = 'delta-tester' "
                            "ORDER BY logged_at DESC LIMIT 1").fetchall()[0][0]
    assert int(df["n"].sum()) == n > 0
    versions = json.loads(audit)
    assert versions["delta_lesions"] == lake["second"].table("lesions").version
    assert "lesion_vectors" in versions  # the Lance views as before
    same = run_sql(wh, "SELECT count(*) AS n FROM lesions")  # the DuckDB table is not shadowed
    assert int(same["n"][0]) >= n


def test_delta_missing_upstream_tables_are_skipped(tmp_path):
    bare = Warehouse(tmp_path / "bare")
    bare.root.mkdir(parents=True)
    duckdb.connect(str(bare.duckdb_path)).close()
    r = export_delta_tables(bare, run_id="r")
    assert r.tables == [] and {"lesions", "radiomics_features", "lesion_vectors", "cohorts"} <= set(r.skipped)
    fresh = Warehouse(tmp_path / "fresh")
    with fresh.connect() as con:
        ensure_schema(con)
    r = export_delta_tables(fresh, run_id="r")
    assert r.table("lesions").rows == 0 and r.table("lesions").created
    assert set(r.skipped) == {"lesion_vectors", "lesion_embeddings"}


def test_delta_tables_asset_materializes_in_process(lake, tmp_path):
    import dagster as dg

    from imaging_assets.defs.lakehouse import delta_tables
    from imaging_assets.defs.resources import WarehouseResource

    root = tmp_path / "wh"
    shutil.copytree(lake["wh"].root, root)
    before = {t.table: t.version for t in lake["second"].tables}
    with dg.instance_for_test() as instance:
        result = dg.materialize([delta_tables], instance=instance,
                                resources={"warehouse": WarehouseResource(root=str(root))})
        assert result.success
        meta = result.get_asset_materialization_events()[0].step_materialization_data.materialization.metadata
        run_id = result.run_id
    versions = meta["versions"].value
    assert versions == {k: v + 1 for k, v in before.items()}
    assert meta["inserted"].value == meta["updated"].value == meta["deleted"].value == 0
    assert meta["delta_uri"].value == str(root / "delta")
    assert delta.history(str(root / "delta" / "lesions"), 1)[0]["imaging_assets.run_id"] == run_id
