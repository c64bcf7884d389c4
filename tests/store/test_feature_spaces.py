"""Feature spaces on a mixed CT/MR/PET cohort, settings validated before anything is stored, failed
extractions that keep the last good features, and a new lesion extracted with its space's settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml

from imaging_assets.features.params import PRESETS_DIR
from imaging_assets.features.perturb import PerturbationSpec
from imaging_assets.stages import ChainSettings, run_chain
from imaging_assets.stages.radiomics import extract_features
from imaging_assets.stages.reproducibility import validate_feature_table
from imaging_assets.stages.similar import feature_spaces, find_similar, query_vector
from imaging_assets.stages.vectors import vector_integrity
from imaging_assets.store.warehouse import Warehouse

pytestmark = pytest.mark.slow
SPEC = PerturbationSpec(n_perturbations=3, seed=0)


def _q(wh: Warehouse, sql: str, params=()):
    con = duckdb.connect(str(wh.duckdb_path), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A 6-patient CT + MR + PET demo cohort, the whole chain run on it without Dagster."""
    from imaging_assets.demo.generator import generate_cohort

    root = tmp_path_factory.mktemp("mixed")
    cohort = generate_cohort(root / "demo", n_patients=6, seed=11, workers=2, modalities=("CT", "MR", "PT"))
    wh = Warehouse(root / "wh")
    out = run_chain(wh, ChainSettings(dicom_roots=[cohort.dicom_dir], outcomes=cohort.outcomes_csv, workers=2,
                                      spec=SPEC, max_lesions=12))
    return {"wh": wh, "cohort": cohort, "out": out}


def test_every_modality_is_its_own_space_end_to_end(mixed):
    wh, out = mixed["wh"], mixed["out"]
    spaces = {r[0]: r[1] for r in _q(wh, "SELECT space, modality FROM feature_spaces")}
    assert sorted(spaces.values()) == ["CT", "MR", "PT"]
    # each lesion's features carry the space of its modality, and the presets differ per modality
    assert _q(wh, "SELECT count(*) FROM radiomics_provenance p JOIN lesions l USING (lesion_id) "
                  "JOIN feature_spaces s USING (space) WHERE s.modality <> l.modality") == [(0,)]
    assert len({r[0] for r in _q(wh, "SELECT params_hash FROM feature_spaces")}) == 3
    # robustness, robust sets and vectors per space
    assert {r["space"] for r in mixed["out"]["feature_robustness"].spaces} == set(spaces)
    assert set(out["robust_feature_set"].by_space) == set(spaces)
    assert {r["space"] for r in out["lesion_vectors"].spaces if r["rows"]} == set(spaces)
    assert vector_integrity(wh).problems == []
    # the Great Expectations suite runs per space: the union of the presets' columns is no longer "non-finite"
    report = validate_feature_table(wh)
    assert report.passed, [(o.expectation, o.detail) for o in report.failed]
    assert {r["space"] for r in report.spaces} == set(spaces)
    # clusters never mix spaces
    mixed_clusters = _q(wh, "SELECT cluster FROM phenotype_clusters GROUP BY 1 HAVING count(DISTINCT space) > 1")
    assert mixed_clusters == []


@pytest.mark.parametrize("modality", ["MR", "PT", "CT"])
def test_a_lesion_is_only_compared_with_its_own_space(mixed, modality):
    wh = mixed["wh"]
    lid, space = _q(wh, "SELECT lesion_id, p.space FROM lesions l JOIN radiomics_provenance p USING (lesion_id) "
                        "WHERE l.modality = ? ORDER BY 1 LIMIT 1", [modality])[0]
    df = find_similar(lid, k=50, warehouse=wh, exclude_same_patient=False)
    assert df.height >= 2 and set(df["modality"]) == {modality} and set(df["space"]) == {space}
    with pytest.raises(ValueError, match="feature spaces"):
        find_similar(vector=np.zeros(3, np.float32), k=3, warehouse=wh)  # a bare vector must name its space


def test_test_retest_pairs_never_cross_modalities(mixed):
    """The CT, MR and PET of one patient share a study (and the PET the CT's frame of reference)."""
    wh = mixed["wh"]
    crossing = _q(wh, "SELECT count(*) FROM test_retest_pairs t JOIN lesions a ON a.lesion_id = t.lesion_a "
                      "JOIN lesions b ON b.lesion_id = t.lesion_b WHERE a.modality <> b.modality")
    assert crossing == [(0,)]


def test_a_new_lesion_is_extracted_with_the_settings_of_its_space(mixed):
    """The reference's own image + mask, as a new lesion: the space's settings find it at distance ~0."""
    wh = mixed["wh"]
    lid, series_files, seg_path, label, space = _q(
        wh, "SELECT l.lesion_id, i.files, s.path, l.segment_number, p.space FROM lesions l "
            "JOIN imaging_series i USING (series_key) JOIN segmentations s USING (seg_key) "
            "JOIN radiomics_provenance p USING (lesion_id) WHERE l.modality = 'MR' AND s.kind = 'seg' "
            "AND l.component = 0 ORDER BY 1 LIMIT 1")[0]
    image = Path(series_files[0]).parent
    q = query_vector(wh, image, seg_path, label=label)
    assert q.space == space and q.params_hash.startswith(space.split("-")[1])
    df = find_similar(vector=q.vector, k=1, warehouse=wh, space=q.space)
    assert df["lesion_id"][0] == lid and df["distance"][0] < 1e-3
    # a parameter file the warehouse never used: no silent comparison across settings
    other = Path(mixed["wh"].root) / "other.yaml"
    params = yaml.safe_load((PRESETS_DIR / "mr.yaml").read_text())
    params.setdefault("setting", {})["binCount"] = 17
    other.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="no lesions extracted with these settings"):
        query_vector(wh, image, seg_path, label=label, params=other)


def test_a_params_typo_stops_before_anything_is_touched(mixed, tmp_path):
    """`binWidht` used to delete every stored feature before the failure-share check stopped the run."""
    root = tmp_path / "wh"
    shutil.copytree(mixed["wh"].root, root)
    wh = Warehouse(root)
    before = _q(wh, "SELECT count(*), sum(value) FROM radiomics_features")
    params = yaml.safe_load((PRESETS_DIR / "ct.yaml").read_text())
    params["setting"]["binWidht"] = params["setting"].pop("binWidth", 25)
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError) as err:
        extract_features(wh, params_override=bad, workers=1)
    assert str(bad) in str(err.value) and "binWidht" in str(err.value) and "binWidth" in str(err.value)
    assert _q(wh, "SELECT count(*), sum(value) FROM radiomics_features") == before
    assert _q(wh, "SELECT count(*) FROM radiomics_errors") == [(0,)]


def test_a_failed_reextraction_keeps_the_last_good_features(mixed, tmp_path):
    from imaging_assets.features.extract import ExtractionOutcome
    from imaging_assets.stages.batches import batch_files, commit_batch, load_batch, plan_batch

    root = tmp_path / "wh"
    shutil.copytree(mixed["wh"].root, root)
    wh = Warehouse(root)
    lid, fp = _q(wh, "SELECT lesion_id, source_fingerprint FROM radiomics_provenance ORDER BY 1 LIMIT 1")[0]
    (batch,) = _q(wh, "SELECT b.batch_id FROM series_batches b JOIN lesions l USING (series_key) "
                      "WHERE l.lesion_id = ?", [lid])[0]
    before = _q(wh, "SELECT count(*) FROM radiomics_features WHERE lesion_id = ?", [lid])
    failed = ExtractionOutcome(lesion_id=lid, features={}, error="decoder crashed", elapsed_s=0.1,
                               pyradiomics_version="3.0.1", params_hash="x")
    plan = plan_batch(batch_files(wh), batch)
    plan.fingerprints[lid] = fp + "-changed"
    plan.outcomes = [failed]
    with wh.connect() as con:
        load_batch(con, commit_batch(batch_files(wh), plan))
    assert _q(wh, "SELECT count(*) FROM radiomics_features WHERE lesion_id = ?", [lid]) == before
    assert _q(wh, "SELECT message FROM radiomics_errors WHERE lesion_id = ?", [lid]) == [("decoder crashed",)]
    assert _q(wh, "SELECT count(*) FROM radiomics_provenance WHERE lesion_id = ?", [lid]) == [(1,)]


def test_spaces_are_listed_with_their_settings(mixed):
    spaces = feature_spaces(mixed["wh"])
    assert {s["modality"] for s in spaces} == {"CT", "MR", "PT"}
    assert all(s["robust_features"] >= 10 and Path(s["source"]).name.endswith(".yaml") for s in spaces)
