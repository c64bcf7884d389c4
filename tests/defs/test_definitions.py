"""The code location loads, and the ingest assets materialize in-process on a temporary instance."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest

from imaging_assets.defs.resources import DicomSourcesResource, WarehouseResource


def _defs() -> dg.Definitions:
    from imaging_assets.definitions import defs

    return defs() if callable(defs) and not isinstance(defs, dg.Definitions) else defs


def test_definitions_load_with_expected_graph():
    defs = _defs()
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"dicom_files", "imaging_series", "segmentations", "lesions", "radiomics_features"} <= keys
    assert repo.get_sensor_def("new_dicom_sensor") is not None
    assert repo.get_schedule_def("nightly_ingest_schedule") is not None
    job = defs.resolve_job_def("ingest_job")
    assert job is not None
    graph = repo.asset_graph
    assert graph.get(dg.AssetKey("imaging_series")).parent_keys == {dg.AssetKey("dicom_files")}
    assert graph.get(dg.AssetKey("lesions")).parent_keys == {dg.AssetKey("segmentations")}
    assert graph.get(dg.AssetKey("radiomics_features")).parent_keys == {dg.AssetKey("lesions")}
    groups = {"dicom_files": "ingest", "imaging_series": "ingest", "segmentations": "ingest",
              "lesions": "features", "radiomics_features": "features"}
    for key, group in groups.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group
        assert "duckdb" in node.kinds
        assert node.description and len(node.description) > 40


def test_domain_packages_do_not_import_dagster():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "imaging_assets"
    offenders = []
    for pkg in ("dicom", "features", "store", "analysis", "demo"):
        for py in (root / pkg).rglob("*.py"):
            tree = ast.parse(py.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names):
                    offenders.append(str(py))
    assert offenders == []


@pytest.mark.slow
def test_ingest_materializes_in_process(small_cohort, tmp_path):
    from imaging_assets.defs.discovery import (
        dicom_files,
        imaging_series,
        segmentations,
        segmentations_linked,
        series_geometry,
    )

    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    sources = DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2)
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dicom_files, imaging_series, segmentations, series_geometry, segmentations_linked],
            instance=instance,
            resources={"warehouse": warehouse, "dicom_sources": sources},
        )
        assert result.success
        mats = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        assert mats["dicom_files"]["dagster/row_count"].value > 0
        assert mats["dicom_files"]["quarantined"].value >= 3  # truncated, not DICOM, no pixel data
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert {"series_geometry", "segmentations_linked"} <= set(checks)
        # the demo drops one slice from one series: the geometry check must see it
        assert not checks["series_geometry"].passed
        # the SEG drawn on that series references the dropped slice: reported unlinked, with its reason
        linked_check = checks["segmentations_linked"]
        assert not linked_check.passed
        assert linked_check.metadata["observed_unlinked"].value == 1

    con = duckdb.connect(warehouse.database, read_only=True)
    try:
        n_series = con.execute("SELECT count(*) FROM imaging_series").fetchone()[0]
        flagged = con.execute(
            "SELECT count(*) FROM imaging_series WHERE list_contains(flags, 'missing_slices')"
        ).fetchone()[0]
        linked = con.execute("SELECT count(*) FROM segmentations WHERE linked_series_key IS NOT NULL").fetchone()[0]
        n_segs = con.execute("SELECT count(*) FROM segmentations").fetchone()[0]
    finally:
        con.close()
    assert n_series >= small_cohort.n_patients
    assert flagged == 1
    assert linked == n_segs - 1 > 0


def test_new_dicom_sensor_skips_until_something_changes(tmp_path):
    from imaging_assets.defs.discovery import new_dicom_sensor

    root = tmp_path / "archive"
    root.mkdir()
    (root / "a.dcm").write_bytes(b"x" * 10)
    sources = DicomSourcesResource(roots=[str(root)])
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"dicom_sources": sources})
        first = new_dicom_sensor(ctx)
        assert isinstance(first, dg.RunRequest)
        cursor = ctx.cursor
        ctx2 = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"dicom_sources": sources})
        assert isinstance(new_dicom_sensor(ctx2), dg.SkipReason)
        (root / "b.dcm").write_bytes(b"y" * 10)
        ctx3 = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"dicom_sources": sources})
        third = new_dicom_sensor(ctx3)
        assert isinstance(third, dg.RunRequest)
        assert third.run_key != first.run_key


@pytest.mark.slow
def test_whole_graph_materializes_with_checks(small_cohort, tmp_path):
    from imaging_assets.defs import discovery, radiomics

    assets_and_checks = [
        discovery.dicom_files, discovery.imaging_series, discovery.segmentations,
        discovery.series_geometry, discovery.segmentations_linked,
        radiomics.lesions, radiomics.radiomics_features,
        radiomics.lesions_decodable, radiomics.radiomics_failure_share,
    ]
    resources = {
        "warehouse": WarehouseResource(root=str(tmp_path / "wh")),
        "dicom_sources": DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2),
    }
    with dg.instance_for_test() as instance:
        result = dg.materialize(assets_and_checks, instance=instance, resources=resources)
        assert result.success
        meta = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["radiomics_failure_share"].passed
        assert checks["lesions_decodable"].passed
        n_lesions = meta["lesions"]["extractable"].value
        assert n_lesions >= small_cohort.n_patients
        assert meta["radiomics_features"]["lesions_with_features"].value == n_lesions
        assert meta["radiomics_features"]["extracted_this_run"].value == n_lesions

        # a second materialization reads nothing new and extracts nothing
        again = dg.materialize(assets_and_checks, instance=instance, resources=resources)
        meta2 = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in again.get_asset_materialization_events()
        }
        assert meta2["dicom_files"]["files_read"].value == 0
        assert meta2["lesions"]["decoded_segmentations"].value == 0
        assert meta2["radiomics_features"]["extracted_this_run"].value == 0
        assert meta2["radiomics_features"]["lesions_with_features"].value == n_lesions
