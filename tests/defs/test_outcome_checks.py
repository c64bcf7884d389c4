"""The outcome assets' WARN checks (issue 15): a missing outcome source, clusters below the minimum size and
an inadequate survival model are warnings with a reason, never a failed run nor silently green."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest

from imaging_assets.defs.resources import OutcomeSourcesResource, WarehouseResource
from imaging_assets.dicom.pseudonym import patient_key
from imaging_assets.stages.keys import check_key
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import insert_rows


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def _meta(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    return {e.asset_key.to_user_string(): e.step_materialization_data.materialization.metadata
            for e in result.get_asset_materialization_events()}[asset]


def test_missing_outcome_source_warns_instead_of_failing_the_run(tmp_path):
    from imaging_assets.defs.outcomes import clinical_outcomes

    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    with dg.instance_for_test() as instance:
        for path, expect in ((tmp_path / "no_such_folder", "do not exist"),  # a typo in the root
                             (tmp_path, "no outcome file")):  # a folder without outcome files
            result = dg.materialize([clinical_outcomes], instance=instance, resources={
                "warehouse": warehouse, "outcome_sources": OutcomeSourcesResource(path=str(path))})
            assert result.success
            check = _checks(result)["outcomes_source_present"]
            assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
            assert expect in check.metadata["reason"].value
            assert _meta(result, "clinical_outcomes")["dagster/row_count"].value == 0

        (tmp_path / "o.csv").write_text("patient_id,time_months,event\nP1,10,1\n")
        ok = dg.materialize([clinical_outcomes], instance=instance, resources={
            "warehouse": warehouse, "outcome_sources": OutcomeSourcesResource(path=str(tmp_path))})
        assert ok.success and _checks(ok)["outcomes_source_present"].passed


def _clustered_warehouse(wh, sizes: dict[int, int], events: dict[int, int]) -> str:
    """Lesions and clusters in the warehouse for ``sizes[c]`` patients per cluster (one lesion each); returns
    their outcome CSV (the first ``events[c]`` patients of each cluster with an event)."""
    lesions, clusters, lines = [], [], ["patient_id,time_months,event,age,stage"]
    for c, n in sizes.items():
        for i in range(n):
            pid = f"P{c}_{i}"
            key = patient_key(pid)
            lesions.append({"lesion_id": f"L{c}_{i}", "patient_key": key, "volume_mm3": 100.0,
                            "extractable": True, "status": "ok"})
            clusters.append({"lesion_id": f"L{c}_{i}", "patient_key": key, "cluster": c, "k": len(sizes),
                             "method": "kmeans", "space": "CT"})
            lines.append(f"{pid},{3 + 2 * i + c},{int(i < events[c])},{60 + i},{['I', 'II', 'III'][i % 3]}")
    check_key(wh)  # as a pipeline step does first: the warehouse records the key its patient keys use
    with wh.connect() as con:
        ensure_schema(con)
        insert_rows(con, "lesions", lesions)
        insert_rows(con, "phenotype_clusters", clusters)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("with_outcomes", [True, False])
def test_inadequate_survival_model_is_a_warning_with_the_reason(tmp_path, with_outcomes):
    from imaging_assets.defs.outcomes import clinical_outcomes, cluster_outcomes

    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    csv = _clustered_warehouse(warehouse.get_warehouse(), {0: 3, 1: 3}, {0: 1, 1: 2})  # the case
    folder = tmp_path / "outcomes"
    folder.mkdir()
    if with_outcomes:
        (folder / "o.csv").write_text(csv)
    resources = {"warehouse": warehouse, "outcome_sources": OutcomeSourcesResource(path=str(folder))}
    with dg.instance_for_test() as instance:
        result = dg.materialize([clinical_outcomes, cluster_outcomes], instance=instance, resources=resources)
    assert result.success
    check = _checks(result)["survival_model_adequate"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    meta = _meta(result, "cluster_outcomes")
    assert meta["adequate"].value is False and meta["logrank_p"].value == -1.0
    assert meta["cox"].value.records == []  # no Cox row, rather than HR 526 (0.0124-22,354,930)
    if with_outcomes:
        assert "fewer than 5 patients" in check.metadata["reason"].value
        assert "fewer than 5 patients" in meta["notes"].value
    else:
        assert check.metadata["reason"].value.startswith("no outcomes")
        assert meta["notes"].value.startswith("no outcomes")
        assert not _checks(result)["outcomes_source_present"].passed


def test_clusters_below_the_minimum_size_warn(tmp_path):
    from imaging_assets.defs.outcomes import ClusterConfig, phenotype_clusters
    from imaging_assets.store.lance import sync_vectors

    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    x = np.vstack([rng.normal(c, 0.6, (5, 3)) for c in centres] + [np.array([[12.0, 12, 0], [-6, -6, 6]])])
    rows = [{"lesion_id": f"L{i:02d}", "patient_key": f"pk_{i:02d}", "vector": v.astype(np.float32).tolist(),
             "feature_set_version": "v1", "space": "CT", "modality": "CT"} for i, v in enumerate(x)]
    sync_vectors(warehouse.get_warehouse().lance_uri, rows, dim=3)
    with warehouse.get_warehouse().connect() as con:
        ensure_schema(con)
    resources = {"warehouse": warehouse}
    with dg.instance_for_test() as instance:
        chosen = dg.materialize([phenotype_clusters], instance=instance, resources=resources)
        assert chosen.success
        assert _checks(chosen)["clusters_adequate"].passed  # silhouette among k with clusters >= 5
        assert min(_meta(chosen, "phenotype_clusters")["sizes"].value) >= 5
        forced = dg.materialize([phenotype_clusters], instance=instance, resources=resources,
                                run_config=dg.RunConfig(ops={"phenotype_clusters": ClusterConfig(k=5)}))
    assert forced.success
    check = _checks(forced)["clusters_adequate"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert "configured k=5" in check.metadata["reason"].value
    assert "below the minimum of 5 lesions" in _meta(forced, "phenotype_clusters")["inadequate_reasons"].value
