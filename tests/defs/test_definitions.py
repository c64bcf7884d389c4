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
    schedule = repo.get_schedule_def("nightly_refresh_schedule")
    assert schedule.job_name == "refresh_job" and schedule.cron_schedule == "0 2 * * *"
    job = defs.resolve_job_def("ingest_job")
    assert job is not None
    graph = repo.asset_graph
    assert graph.get(dg.AssetKey("imaging_series")).parent_keys == {dg.AssetKey("dicom_files")}
    assert graph.get(dg.AssetKey("lesions")).parent_keys == {dg.AssetKey("segmentations")}
    assert graph.get(dg.AssetKey("radiomics_features")).parent_keys == {dg.AssetKey("lesions"),
                                                                        dg.AssetKey("radiomics_batches")}
    batches = graph.get(dg.AssetKey("radiomics_batches"))
    assert batches.parent_keys == {dg.AssetKey("lesions")} and batches.partitions_def.name == "series_batches"
    for name in ("extraction_job", "extraction_celery_job"):
        assert defs.resolve_job_def(name).partitions_def.name == "series_batches"
    groups = {"dicom_files": "ingest", "imaging_series": "ingest", "segmentations": "ingest",
              "lesions": "features", "radiomics_features": "features"}
    for key, group in groups.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group
        assert "duckdb" in node.kinds
        assert node.description and len(node.description) > 40


def test_delta_tables_asset_in_the_lakehouse_group_and_the_refresh_job():
    defs = _defs()
    graph = defs.get_repository_def().asset_graph
    node = graph.get(dg.AssetKey("delta_tables"))
    assert node.group_name == "lakehouse" and "deltalake" in node.kinds
    assert {"lesions", "radiomics_features", "feature_robustness", "robust_feature_set", "lesion_vectors",
            "phenotype_clusters", "cluster_outcomes"} <= {k.to_user_string() for k in node.parent_keys}
    assert node.description and "Delta" in node.description
    job = defs.resolve_job_def("refresh_job")  # `make demo` runs it: the demo writes the Delta tables
    assert "delta_tables" in {k.to_user_string() for k in job.asset_layer.selected_asset_keys}


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

    con = duckdb.connect(str(warehouse.get_warehouse().duckdb_path), read_only=True)
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
    from imaging_assets.defs.reproducibility import RobustnessConfig
    from imaging_assets.defs.resources import OutcomeSourcesResource

    defs = _defs()
    everything = [a for a in defs.assets if a.partitions_def is None] + list(defs.asset_checks)
    resources = {
        "warehouse": WarehouseResource(root=str(tmp_path / "wh")),
        "dicom_sources": DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2),
        "outcome_sources": OutcomeSourcesResource(path=str(small_cohort.outcomes_csv)),
    }
    from imaging_assets.defs.radiomics import LesionConfig, RadiomicsConfig

    # one process per step: a 6-patient cohort is faster without pools (pools are tested elsewhere)
    run_config = dg.RunConfig(ops={
        "lesions": LesionConfig(workers=1),
        "radiomics_features": RadiomicsConfig(workers=1),
        "feature_robustness": RobustnessConfig(n_perturbations=3, workers=1),
    })
    with dg.instance_for_test() as instance:
        result = dg.materialize(everything, instance=instance, resources=resources, run_config=run_config)
        assert result.success
        meta = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        graph = defs.get_repository_def().asset_graph
        assert set(meta) == {k.to_user_string() for k in graph.get_all_asset_keys()
                             if graph.get(k).partitions_def is None}  # cohorts: partitions of their own
        assert meta["lesion_thumbnails"]["dagster/row_count"].value == meta["lesions"]["extractable"].value
        assert graph.get(dg.AssetKey("lesions")).metadata["dagster/column_schema"].columns
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        for name in ("radiomics_failure_share", "lesions_decodable", "radiomics_expectations",
                     "robust_set_not_collapsed", "vectors_integrity", "robustness_sample_size", "outcomes_coverage"):
            assert checks[name].passed, (name, checks[name].metadata)
        n_lesions = meta["lesions"]["extractable"].value
        assert n_lesions >= small_cohort.n_patients
        assert meta["radiomics_features"]["lesions_with_features"].value == n_lesions
        assert meta["lesion_vectors"]["dagster/row_count"].value == n_lesions
        assert meta["cluster_outcomes"]["kaplan_meier"].value.startswith("![")
        assert meta["phenotype_clusters"]["projection"].value.startswith("![")
        assert meta["feature_robustness"]["icc_plot"].value.startswith("![")
        version = meta["lesion_vectors"]["table_version"].value

        # a second materialization reads nothing new, extracts nothing and leaves the vectors' version
        again = dg.materialize(everything, instance=instance, resources=resources, run_config=run_config)
        meta2 = {
            e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in again.get_asset_materialization_events()
        }
        assert meta2["dicom_files"]["files_read"].value == 0
        assert meta2["lesions"]["decoded_segmentations"].value == 0
        assert meta2["radiomics_features"]["extracted_this_run"].value == 0
        assert meta2["feature_robustness"]["extracted_this_run"].value == 0
        assert meta2["robust_feature_set"]["changed"].value is False
        # the first run's clusters fill the vectors' cluster column once; the content is otherwise equal
        assert meta2["lesion_vectors"]["dagster/row_count"].value == n_lesions
        assert meta2["lesion_vectors"]["table_version"].value >= version


@pytest.mark.slow
def test_cohort_assets_one_partition_per_cohort(small_cohort, tmp_path):
    """A cohort is a partition of `cohort` + `cohort_outcomes`: pictures, explanations, one row per patient,
    the reference patient left out, its stored query re-run when no reference is given."""
    import json
    from pathlib import Path

    from imaging_assets.defs.reproducibility import RobustnessConfig
    from imaging_assets.defs.resources import OutcomeSourcesResource

    defs = _defs()
    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    resources = {
        "warehouse": warehouse,
        "dicom_sources": DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2),
        "outcome_sources": OutcomeSourcesResource(path=str(small_cohort.outcomes_csv)),
    }
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("cohort")).parent_keys}
    assert {"lesion_vectors", "phenotype_clusters", "lesion_thumbnails"} <= parents
    assert dg.AssetKey("cohort") in graph.get(dg.AssetKey("cohort_outcomes")).parent_keys
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            [a for a in defs.assets if a.partitions_def is None], instance=instance, resources=resources,
            run_config=dg.RunConfig(ops={"feature_robustness": RobustnessConfig(n_perturbations=3)}),
        ).success
        con = duckdb.connect(str(warehouse.get_warehouse().duckdb_path), read_only=True)
        lid, patient = con.execute("SELECT lesion_id, patient_key FROM lesions WHERE extractable "
                                   "ORDER BY volume_mm3 DESC, lesion_id LIMIT 1").fetchone()
        con.close()
        job = defs.resolve_job_def("cohort_discovery")
        instance.add_dynamic_partitions("cohorts", ["first"])
        result = job.execute_in_process(
            instance=instance, resources=resources, partition_key="first",
            run_config={"ops": {"cohort": {"config": {"reference_lesion_id": lid, "k": 3, "modality": ["CT"]}}}})
        assert result.success
        meta = result.asset_materializations_for_node("cohort")[0].metadata
        assert meta["dagster/row_count"].value == 3
        assert meta["reference_and_neighbours"].value.startswith("![reference and neighbours](data:image/png")
        explanations = meta["explanations"].value
        assert len(explanations) == 3
        assert all(abs(sum(e["groups"].values()) - 1) < 1e-3 for e in explanations)
        assert all(e["agree"] and e["differ"] and e["agree"][0]["name"] for e in explanations)
        assert meta["reference"].value["lesion_id"] == lid
        km = result.asset_materializations_for_node("cohort_outcomes")[0].metadata
        assert km["kaplan_meier"].value.startswith("![")
        assert km["cohort_patients"].value == 3
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        # 3 patients cannot be compared honestly: the check warns, the run succeeds
        assert checks["cohort_comparison_adequate"].passed is False

        con = duckdb.connect(str(warehouse.get_warehouse().duckdb_path), read_only=True)
        try:
            rows = con.execute("SELECT rank, lesion_id, patient_key, explanation, thumbnail, why FROM cohort_first "
                               "ORDER BY rank").fetchall()
            registry = con.execute("SELECT reference_lesion_id, reference_patient_key, patients, audit_id "
                                   "FROM cohorts WHERE name = 'first'").fetchone()
            assert con.execute("SELECT count(*) FROM audit_log WHERE action = 'cohort'").fetchone()[0] == 1
        finally:
            con.close()
        assert [r[0] for r in rows] == [1, 2, 3]
        patients = [r[2] for r in rows]
        assert len(set(patients)) == 3 and patient not in patients  # one row per patient, reference left out
        assert lid not in {r[1] for r in rows}
        assert all(Path(r[4]).is_file() and r[4].endswith(f"{r[1]}.png") for r in rows)
        assert all(json.loads(r[3])["groups"] and r[5] for r in rows)
        assert registry[:3] == (lid, patient, 3) and registry[3]

        # no reference in the config: the stored query of this name runs again
        again = job.execute_in_process(instance=instance, resources=resources, partition_key="first")
        assert again.success
        con = duckdb.connect(str(warehouse.get_warehouse().duckdb_path), read_only=True)
        try:
            assert [r[0] for r in con.execute("SELECT lesion_id FROM cohort_first ORDER BY rank").fetchall()] == [
                r[1] for r in rows]
        finally:
            con.close()
        # a new name without a reference fails and says what to give
        instance.add_dynamic_partitions("cohorts", ["empty"])
        failed = job.execute_in_process(instance=instance, resources=resources, partition_key="empty",
                                        raise_on_error=False)
        assert not failed.success
        errors = [ev.step_failure_data.error.message for ev in failed.all_events if ev.is_step_failure]
        assert any("reference_lesion_id" in e for e in errors), errors


def test_outcomes_sensor_reads_duckdb_state_and_folder(tmp_path):
    from imaging_assets.defs.outcomes import outcomes_sensor
    from imaging_assets.defs.resources import OutcomeSourcesResource
    from imaging_assets.stages.outcomes import load_outcomes

    folder = tmp_path / "outcomes"
    folder.mkdir()
    csv = folder / "a.csv"
    csv.write_text("patient_id,time_months,event,age,sex,stage\nP1,10,1,60,M,II\nP2,5,0,70,F,III\n")
    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    load_outcomes(warehouse.get_warehouse(), folder)
    resources = {"warehouse": warehouse, "outcome_sources": OutcomeSourcesResource(path=str(folder))}
    with dg.instance_for_test() as instance:
        first = outcomes_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(first, dg.RunRequest) and first.run_key.startswith("outcomes-")
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        outcomes_sensor(ctx)
        cursor = ctx.cursor
        quiet = outcomes_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
        assert isinstance(quiet, dg.SkipReason)
        # a new file in the folder wakes it up; loading it changes the DuckDB state: another run key
        (folder / "b.csv").write_text("patient_id,time_months,event\nP3,7,1\n")
        woke = outcomes_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
        assert isinstance(woke, dg.RunRequest)
        load_outcomes(warehouse.get_warehouse(), folder)
        after = outcomes_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources))
        assert isinstance(after, dg.RunRequest) and after.run_key != woke.run_key


def test_automation_reruns_clusters_when_vectors_change():
    defs = _defs()
    graph = defs.get_repository_def().asset_graph
    for key in ("phenotype_clusters", "cluster_outcomes"):
        assert graph.get(dg.AssetKey(key)).automation_condition is not None
    assert dg.AssetKey("lesion_vectors") in graph.get(dg.AssetKey("phenotype_clusters")).parent_keys


@pytest.mark.slow
def test_blocking_expectations_stop_the_downstream_assets(small_cohort, tmp_path):
    """A planted NaN in the feature table fails the GX check, and nothing downstream materializes."""
    from imaging_assets.defs import discovery, radiomics, reproducibility
    from imaging_assets.defs.radiomics import LesionConfig, RadiomicsConfig

    resources = {
        "warehouse": WarehouseResource(root=str(tmp_path / "wh")),
        "dicom_sources": DicomSourcesResource(roots=[str(small_cohort.dicom_dir)], workers=2),
    }
    upstream = [discovery.dicom_files, discovery.imaging_series, discovery.segmentations, radiomics.lesions,
                radiomics.radiomics_features]
    config = dg.RunConfig(ops={"lesions": LesionConfig(workers=1), "radiomics_features": RadiomicsConfig(workers=1)})
    with dg.instance_for_test() as instance:
        assert dg.materialize(upstream, instance=instance, resources=resources, run_config=config).success
        con = duckdb.connect(str(resources["warehouse"].get_warehouse().duckdb_path))
        con.execute("UPDATE radiomics_features SET value = 'NaN'::DOUBLE WHERE rowid = (SELECT min(rowid) "
                    "FROM radiomics_features WHERE feature = 'Mean')")
        con.close()
        result = dg.materialize(
            [radiomics.radiomics_features, reproducibility.radiomics_expectations,
             reproducibility.feature_robustness, reproducibility.robust_feature_set],
            instance=instance, resources=resources, raise_on_error=False,
            run_config=dg.RunConfig(ops={"radiomics_features": RadiomicsConfig(workers=1)}),
        )
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert not checks["radiomics_expectations"].passed
        done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert "feature_robustness" not in done and "robust_feature_set" not in done
        assert not result.success
