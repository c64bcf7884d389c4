"""The real mixed CT/MR/PET archive of ../shared/data/dicom, materialized with the default settings: every
asset and every blocking check succeeds, each modality gets its own feature space with vectors, and a
similar-case search on an MR lesion returns MR lesions only."""

from __future__ import annotations

import csv

import dagster as dg
import duckdb
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _patient_ids(root) -> list[str]:
    import pydicom

    ids = set()
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except Exception:  # noqa: BLE001 - odd files are part of the archive; the catalog quarantines them
            continue
        if getattr(ds, "PatientID", None):
            ids.add(str(ds.PatientID))
    return sorted(ids)


def test_mixed_archive_runs_end_to_end_with_default_settings(shared_data, tmp_path):
    from imaging_assets.definitions import defs as load_defs
    from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource, WarehouseResource
    from imaging_assets.stages.similar import find_similar

    dicom = shared_data / "dicom"
    outcomes = tmp_path / "outcomes.csv"
    with open(outcomes, "w", newline="") as fh:  # the raw ids, as a hospital export has them
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "time_months", "event", "age", "sex", "stage"])
        for i, pid in enumerate(_patient_ids(dicom)):
            writer.writerow([pid, 6 + 3 * i, i % 2, 50 + i, "MF"[i % 2], ["I", "II", "III"][i % 3]])
    warehouse = WarehouseResource(root=str(tmp_path / "wh"))
    resources = {"warehouse": warehouse,
                 "dicom_sources": DicomSourcesResource(roots=[str(dicom)], workers=2),
                 "outcome_sources": OutcomeSourcesResource(path=str(outcomes))}
    defs = load_defs()
    with dg.instance_for_test() as instance:
        result = dg.materialize([a for a in defs.assets if a.partitions_def is None] + list(defs.asset_checks), instance=instance,
                                resources=resources, raise_on_error=False)
        failed_steps = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert result.success, failed_steps
        checks = {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}
        blocking = {spec.name for cdef in defs.asset_checks for spec in cdef.check_specs if spec.blocking}
        assert {"radiomics_expectations", "robust_set_not_collapsed", "vectors_integrity"} <= blocking
        for name in blocking:
            assert checks[name].passed, (name, checks[name].metadata)
        assert checks["radiomics_expectations"].passed
        assert checks["vectors_integrity"].passed and checks["robust_set_not_collapsed"].passed
    wh = warehouse.get_warehouse()
    con = duckdb.connect(str(wh.duckdb_path), read_only=True)
    try:
        spaces = dict(con.execute("SELECT space, modality FROM feature_spaces").fetchall())
        assert set(spaces.values()) >= {"CT", "MR", "PT"}
        mr = con.execute("SELECT p.lesion_id FROM radiomics_provenance p JOIN lesions l USING (lesion_id) "
                         "WHERE l.modality = 'MR' ORDER BY 1 LIMIT 1").fetchone()[0]
    finally:
        con.close()
    from imaging_assets.store.lance import lance_dataset

    in_vectors = lance_dataset(wh.lance_uri).to_table(columns=["space"]).column("space").to_pylist()
    assert {spaces[s] for s in in_vectors} >= {"CT", "MR", "PT"}
    hits = find_similar(mr, k=10, warehouse=wh, exclude_same_patient=False)
    assert hits.height >= 2 and set(hits["modality"]) == {"MR"}
    # the deep embeddings too: every extractable CT, MR and PET lesion has a crop and an embedding, the checks
    # pass, and a deep or hybrid search of an MR lesion stays in its feature space
    assert checks["embeddings_integrity"].passed and checks["crops_complete"].passed, checks["crops_complete"].metadata
    con = duckdb.connect(str(wh.duckdb_path), read_only=True)
    try:
        per_modality = dict(con.execute(
            "SELECT l.modality, count(*) FILTER (WHERE c.status = 'ok') = count(*) FROM lesions l "
            "LEFT JOIN lesion_crops c USING (lesion_id) WHERE l.extractable GROUP BY 1").fetchall())
    finally:
        con.close()
    assert set(per_modality) >= {"CT", "MR", "PT"} and all(per_modality.values()), per_modality
    for space in ("deep", "hybrid"):
        found = find_similar(mr, k=5, warehouse=wh, exclude_same_patient=False, space=space)
        assert found.height >= 2 and set(found["modality"]) == {"MR"} and set(found["search_space"]) == {space}
