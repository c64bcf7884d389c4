"""Reproducibility, vectors, cohorts, SQL guard, clusters and survival on a small demo cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from imaging_assets.errors import QueryRefused
from imaging_assets.features.perturb import PerturbationSpec
from imaging_assets.stages import ChainSettings, run_chain
from imaging_assets.stages.cohorts import cohort_table_name, discover_cohort
from imaging_assets.stages.outcomes import build_clusters
from imaging_assets.stages.reproducibility import (
    compute_robustness,
    current_robust_set,
    feature_matrix,
    select_robust_set,
)
from imaging_assets.stages.similar import find_similar
from imaging_assets.stages.vectors import build_lesion_vectors, load_scaler, vectors_frame
from imaging_assets.store.sql import run_sql
from imaging_assets.store.warehouse import Warehouse, connect

SPEC = PerturbationSpec(n_perturbations=4, seed=0)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(small_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("wh")
    wh = Warehouse(root)
    out = run_chain(wh, ChainSettings(dicom_roots=[small_cohort.dicom_dir], outcomes=small_cohort.outcomes_csv,
                                      workers=2, spec=SPEC, max_lesions=40, png_dir=root))
    return {"db": wh.duckdb_path, "lance": wh.lance_uri, "wh": wh, "robustness": out["feature_robustness"],
            "robust": out["robust_feature_set"].single(), "vectors": out["lesion_vectors"],
            "clusters": out["phenotype_clusters"], "survival": out["cluster_outcomes"]}


def _q(db, sql, params=()):
    with connect(db, read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_robustness_covers_every_feature_and_the_retest_pairs(chain):
    db, r = chain["db"], chain["robustness"]
    n_lesions = _q(db, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    assert r.lesions_in_icc == n_lesions and r.failed == 0
    assert r.extracted == n_lesions * SPEC.n_perturbations
    per = _q(db, "SELECT analysis, count(*), min(n_targets), max(k_raters) FROM feature_robustness GROUP BY 1 ORDER BY 1")
    assert per[0][0] == "perturbation" and per[0][1] > 1000 and per[0][2] == n_lesions and per[0][3] == SPEC.n_perturbations
    assert per[1][0] == "test_retest" and per[1][2] >= 1 and per[1][3] == 2
    # retest pairs are the demo's retest series of the same lesion: same patient, nearby
    pairs = _q(db, "SELECT a.patient_key = b.patient_key, a.series_key <> b.series_key, p.distance_mm "
                   "FROM test_retest_pairs p JOIN lesions a ON a.lesion_id = p.lesion_a "
                   "JOIN lesions b ON b.lesion_id = p.lesion_b")
    assert pairs and all(same and other and d < 20 for same, other, d in pairs)
    # shape volume is robust, and ICC bounds are ordered
    vol = _q(db, "SELECT icc, ci_low, ci_high FROM feature_robustness WHERE feature = 'original_shape_VoxelVolume' "
                 "AND analysis = 'perturbation'")[0]
    assert vol[1] <= vol[0] <= vol[2] and vol[1] > 0.75


def test_perturbations_are_cached(chain):
    again = compute_robustness(chain["wh"], spec=SPEC, max_lesions=40, workers=2)
    assert again.extracted == 0 and again.lesions_in_icc == chain["robustness"].lesions_in_icc


def test_robust_set_is_versioned_pruned_and_stable(chain):
    db, wh, s = chain["db"], chain["wh"], chain["robust"]
    assert len(s.features) >= 10 and s.changed and s.previous_version is None
    again = select_robust_set(wh).single()
    assert again.version == s.version and not again.changed
    assert _q(db, "SELECT count(*) FROM robust_feature_set_history")[0][0] == 1
    with connect(db, read_only=True) as con:
        version, feats = current_robust_set(con)
        wide = feature_matrix(con)
    assert version == s.version and feats == s.features
    rho = np.abs(spearmanr(wide[feats].to_numpy(float)).statistic)
    np.fill_diagonal(rho, 0)
    assert np.nanmax(rho) < 0.95
    # every kept feature passed both analyses
    low = dict(_q(db, "SELECT feature, min(ci_low) FROM feature_robustness GROUP BY 1"))
    assert all(low[f] >= 0.75 for f in feats)
    # a stricter threshold makes a new version, visible in the history
    stricter = select_robust_set(wh, threshold=0.9).single()
    assert stricter.changed and stricter.version != s.version
    back = select_robust_set(wh).single()
    assert back.version == s.version and back.changed
    assert _q(db, "SELECT count(*) FROM robust_feature_set_history")[0][0] == 3


def test_ge_suite_passes_on_real_features_and_catches_planted_problems(chain):
    from imaging_assets.features.quality import validate_features

    with connect(chain["db"], read_only=True) as con:
        wide = feature_matrix(con).reset_index()
    n = wide.shape[1] - 1
    wide["n_features"] = n
    assert all(o.success for o in validate_features(wide, robust=chain["robust"].features, expected_features=n))
    bad = wide.copy()
    victim = bad.loc[0, "lesion_id"]
    bad.loc[0, "original_shape_Sphericity"] = 1.5
    bad.loc[1, chain["robust"].features[0]] = np.inf
    entropy = next(c for c in bad.columns if c.endswith("Entropy"))
    bad.loc[3, entropy] = -0.5
    bad = pd.concat([bad, bad.iloc[[2]]], ignore_index=True)
    failed = {(o.expectation, o.column): o for o in validate_features(bad, robust=chain["robust"].features,
                                                                        expected_features=n) if not o.success}
    assert victim in failed[("expect_column_values_to_be_between", "original_shape_Sphericity")].failing_lesions
    nonfinite = failed[("expect_column_values_to_be_between", "nonfinite_features")]
    assert chain["robust"].features[0] in nonfinite.detail and bad.loc[1, "lesion_id"] in nonfinite.failing_lesions
    assert ("expect_column_values_to_be_unique", "lesion_id") in failed
    neg = failed[("expect_column_values_to_be_between", "min_entropy")]
    assert entropy in neg.detail and bad.loc[3, "lesion_id"] in neg.failing_lesions


def test_vectors_are_standardised_idempotent_and_scaler_is_stored(chain):
    db, lance, wh, v = chain["db"], chain["lance"], chain["wh"], chain["vectors"]
    n = _q(db, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    assert v.rows == n and v.dim == len(chain["robust"].features)
    tbl, mat = vectors_frame(lance)
    assert mat.dtype == np.float32 and mat.shape == (n, v.dim)
    assert np.allclose(mat.mean(axis=0), 0, atol=1e-4)
    again = build_lesion_vectors(wh)
    # clusters now exist, so the cluster column fills in once; after that nothing changes
    third = build_lesion_vectors(wh)
    assert third.table_version == again.table_version and third.unchanged == n
    with connect(db, read_only=True) as con:
        scaler = load_scaler(con)
    assert scaler.feature_names == chain["robust"].features


def test_search_cohort_and_audit(chain):
    db, wh = chain["db"], chain["wh"]
    lid = _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY lesion_id LIMIT 1")[0][0]
    before = _q(db, "SELECT count(*) FROM audit_log")[0][0] if _q(
        db, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'audit_log'")[0][0] else 0
    rows = find_similar(lid, k=3, where={"modality": ["CT"]}, warehouse=wh).to_dicts()
    assert len(rows) == 3 and lid not in {r["lesion_id"] for r in rows}
    assert [r["distance"] for r in rows] == sorted(r["distance"] for r in rows)
    out = discover_cohort(wh, "near_first", reference_lesion_id=lid, k=4)
    got = _q(db, "SELECT rank, lesion_id, cluster, time_months FROM cohort_near_first ORDER BY rank")
    assert [g[0] for g in got] == [1, 2, 3, 4] and all(g[2] is not None and g[3] is not None for g in got)
    assert _q(db, "SELECT name, table_name, n_rows FROM cohorts") == [("near_first", "cohort_near_first", 4)]
    run_sql(wh, "SELECT count(*) FROM lesion_vectors")
    actions = [a for (a,) in _q(db, "SELECT action FROM audit_log ORDER BY logged_at")][before:]
    assert actions == ["search", "cohort", "sql"]
    assert out.rows == 4
    with pytest.raises(ValueError, match="not valid"):
        cohort_table_name("Robert'); DROP TABLE lesions;--")


@pytest.mark.parametrize("sql", [
    "COPY lesions TO '/tmp/leak.csv'", "ATTACH '/tmp/other.duckdb'", "INSTALL httpfs", "LOAD httpfs",
    "CREATE TABLE x AS SELECT 1", "DELETE FROM lesions", "UPDATE lesions SET roi_name = 'x'",
    "SET enable_external_access = true", "SELECT 1; DROP TABLE lesions",
])
def test_sql_refuses_writes_and_escapes(chain, sql):
    with pytest.raises(QueryRefused):
        run_sql(chain["wh"], sql)
    assert _q(chain["db"], "SELECT count(*) FROM lesions")[0][0] > 0
    status = _q(chain["db"], "SELECT status FROM audit_log WHERE query = ? ORDER BY logged_at DESC LIMIT 1", [sql])
    assert status and status[0][0].startswith("refused")


def test_sql_cannot_read_files_outside_the_warehouse(chain):
    import duckdb

    with pytest.raises(duckdb.Error, match="(?i)disabled|permission"):
        run_sql(chain["wh"], "SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(duckdb.Error):
        run_sql(chain["wh"], "SELECT * FROM read_parquet('/tmp/*.parquet')")


def test_clusters_and_survival_tables(chain):
    db, c, s = chain["db"], chain["clusters"], chain["survival"]
    n = _q(db, "SELECT count(*) FROM lesions WHERE extractable")[0][0]
    assert sum(c.sizes) == n and c.k >= 2 and c.png.stat().st_size > 1000
    labels = _q(db, "SELECT lesion_id, cluster FROM phenotype_clusters ORDER BY 1")
    build_clusters(chain["wh"])
    assert _q(db, "SELECT lesion_id, cluster FROM phenotype_clusters ORDER BY 1") == labels
    patients = _q(db, "SELECT count(*), count(DISTINCT patient_key) FROM cluster_patients")[0]
    assert patients[0] == patients[1] == s.n_patients > 0
    assert sum(r["patients"] for r in s.per_cluster) == s.n_patients
    assert _q(db, "SELECT count(*) FROM cluster_logrank")[0][0] == 1
    assert s.png is not None and s.png.stat().st_size > 1000


def test_same_seed_gives_the_same_iccs(chain, tmp_path):
    """Determinism: the cache emptied, the same spec re-extracts identical perturbations and ICCs."""
    import shutil
    wh = Warehouse(tmp_path / "wh")
    db = wh.duckdb_path
    db.parent.mkdir()
    shutil.copyfile(chain["db"], db)
    before = _q(db, "SELECT feature, analysis, icc, ci_low, ci_high FROM feature_robustness ORDER BY 1, 2")
    with connect(db) as con:
        con.execute("DELETE FROM perturbation_features")
    again = compute_robustness(wh, spec=SPEC, max_lesions=40, workers=2)
    assert again.extracted == chain["robustness"].extracted
    after = _q(db, "SELECT feature, analysis, icc, ci_low, ci_high FROM feature_robustness ORDER BY 1, 2")
    assert after == before


def test_find_similar_returns_a_ranked_polars_frame_without_the_same_patient(chain):
    import polars as pl

    from imaging_assets.stages.similar import find_similar

    db, wh = chain["db"], chain["wh"]
    lid, patient = _q(db, "SELECT lesion_id, patient_key FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0]
    df = find_similar(lid, k=3, warehouse=wh)
    assert isinstance(df, pl.DataFrame) and df.height == 3
    assert {"lesion_id", "distance", "patient_key", "series_instance_uid", "segment_number", "raw_label",
            "modality", "volume_mm3"} <= set(df.columns)
    assert patient not in df["patient_key"].to_list()
    assert df["distance"].to_list() == sorted(df["distance"].to_list()) and df["rank"].to_list() == [1, 2, 3]
    mine = find_similar(lid, k=2, exclude_same_patient=False, warehouse=wh)
    assert mine["lesion_id"][0] == lid and mine["distance"][0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KeyError):
        find_similar("no-such-lesion", warehouse=wh)


def test_find_similar_honours_the_lance_uri_setting(chain, tmp_path, monkeypatch):
    """The Lance tables somewhere else than <warehouse>/lance: the Python API finds them through the setting."""
    import shutil

    root = tmp_path / "wh"
    root.mkdir()
    shutil.copyfile(chain["db"], root / "warehouse.duckdb")
    shutil.copytree(chain["lance"], tmp_path / "elsewhere")
    lid = _q(chain["db"], "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    monkeypatch.setenv("IMAGING_ASSETS_WAREHOUSE", str(root))
    monkeypatch.setenv("IMAGING_ASSETS_LANCE_URI", str(tmp_path / "elsewhere"))
    assert not (root / "lance").exists()
    assert find_similar(lid, k=3).height == 3
    assert find_similar(lid, k=3, warehouse=root).height == 3
