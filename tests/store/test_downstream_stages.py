"""Reproducibility, vectors, cohorts, SQL guard, clusters and survival on a small demo cohort."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def test_one_row_per_patient_keeps_each_patients_closest_lesion(chain):
    db, wh = chain["db"], chain["wh"]
    lid = _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    everyone = find_similar(lid, k=200, warehouse=wh).to_dicts()
    closest: dict[str, dict] = {}
    for r in everyone:
        closest.setdefault(r["patient_key"], r)
    per_patient = find_similar(lid, k=3, warehouse=wh, one_per_patient=True).to_dicts()
    assert len({r["patient_key"] for r in per_patient}) == len(per_patient) == min(3, len(closest))
    assert [r["lesion_id"] for r in per_patient] == [r["lesion_id"] for r in list(closest.values())[:3]]


def test_explanations_of_the_search_are_exact(chain):
    """explain_similar: shares of the squared distance sum to 1 and match the vectors; raw values are the
    stored features; percentiles in [0, 100]; a planted shape difference shows up as the Shape share."""
    from imaging_assets.features.explain import explain, feature_group
    from imaging_assets.stages.similar import explain_similar
    from imaging_assets.store.lance import vectors_of

    db, wh = chain["db"], chain["wh"]
    lid = _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    found = find_similar(lid, k=3, warehouse=wh)
    explanations = explain_similar(wh, found, reference_lesion_id=lid)
    assert len(explanations) == 3
    with connect(db, read_only=True) as con:
        names = load_scaler(con).feature_names
    vecs = vectors_of(wh.lance_uri, [lid, *found["lesion_id"].to_list()])
    for row, e in zip(found.to_dicts(), explanations):
        assert sum(e.groups.values()) == pytest.approx(1.0)
        assert e.distance == pytest.approx(row["distance"], rel=1e-4)
        terms = (vecs[lid][: len(names)] - vecs[row["lesion_id"]][: len(names)]) ** 2
        for group, share in e.groups.items():
            mine = sum(t for n, t in zip(names, terms) if feature_group(n) == group) / terms.sum()
            assert share == pytest.approx(mine, abs=1e-6)
        for c in e.agree + e.differ:
            stored = _q(db, "SELECT value FROM radiomics_features WHERE lesion_id = ? AND "
                            "image_type || '_' || feature_class || '_' || feature = ?", [row["lesion_id"], c.feature])
            assert c.neighbour_value == pytest.approx(stored[0][0])
            assert 0 <= c.reference_percentile <= 100 and 0 <= c.neighbour_percentile <= 100
    shape = [i for i, n in enumerate(names) if feature_group(n) == "Shape"]
    if shape:
        planted = vecs[lid].copy()
        planted[shape] += 4.0
        assert explain(vecs[lid], planted, names).groups["Shape"] == pytest.approx(1.0)


def test_cli_similar_explain_json(chain, capsys):
    import json

    from imaging_assets.cli import main

    db, wh = chain["db"], chain["wh"]
    lid = _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
    assert main(["similar", lid, "-k", "2", "--explain", "--json", "--warehouse", str(wh.root)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    for r in rows:
        ex = r["explanation"]
        assert set(ex) >= {"groups", "agree", "differ"}
        assert sum(ex["groups"].values()) == pytest.approx(1.0, abs=1e-3)
        assert ex["agree"][0]["name"] and ex["differ"][0]["reference_percentile"] is not None
    assert main(["similar", lid, "-k", "2", "--explain", "--warehouse", str(wh.root)]) == 0
    text = capsys.readouterr().out
    assert "why:" in text and "agree" in text and "differ" in text and "percentile" in text


def test_thumbnails_are_incremental_and_follow_the_lesions(chain, tmp_path):
    """One PNG per extractable lesion, named by its id; unchanged lesions are not drawn again, a changed one
    is, and the picture of a removed lesion goes with it."""
    import shutil

    from PIL import Image

    from imaging_assets.stages.thumbnails import render_lesion_thumbnails, thumbnail_uri

    src = chain["wh"]
    root = tmp_path / "wh"
    shutil.copytree(src.root, root)
    wh = Warehouse(root)
    ids = [r[0] for r in _q(wh.duckdb_path, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1")]
    assert ids and all(Path(thumbnail_uri(wh, i)).is_file() for i in ids)  # drawn by the chain
    with Image.open(Path(thumbnail_uri(wh, ids[0]))) as im:
        assert im.format == "PNG" and im.width > 2.5 * im.height  # axial, coronal, sagittal side by side
    again = render_lesion_thumbnails(wh, workers=1)
    assert (again.rendered, again.unchanged, again.removed, again.failed) == (0, len(ids), 0, [])
    before = Path(thumbnail_uri(wh, ids[1])).stat().st_mtime_ns
    with connect(wh.duckdb_path) as con:
        con.execute("UPDATE lesions SET source_fingerprint = 'changed' WHERE lesion_id = ?", [ids[0]])
        con.execute("DELETE FROM lesions WHERE lesion_id = ?", [ids[-1]])
    third = render_lesion_thumbnails(wh, workers=1)
    assert (third.rendered, third.unchanged, third.removed) == (1, len(ids) - 2, 1)
    assert not Path(thumbnail_uri(wh, ids[-1])).exists()
    assert Path(thumbnail_uri(wh, ids[1])).stat().st_mtime_ns == before
    assert _q(wh.duckdb_path, "SELECT count(*) FROM lesion_thumbnails")[0][0] == len(ids) - 1


def test_cli_cohort_materializes_the_partition(chain, tmp_path, monkeypatch, capsys):
    """`imaging-assets cohort NAME --largest` adds the partition in DAGSTER_HOME and materializes `cohort` and
    `cohort_outcomes` for it; without a reference it re-runs the stored query; a bad name is refused."""
    import shutil

    import dagster as dg

    from imaging_assets.cli import main

    root = tmp_path / "wh"
    shutil.copytree(chain["wh"].root, root)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("IMAGING_ASSETS_PICTURES_URL", raising=False)
    assert main(["cohort", "cli_made", "--largest", "-k", "2", "--warehouse", str(root)]) == 0
    assert "cohort_cli_made" in capsys.readouterr().out
    first = _q(root / "warehouse.duckdb", "SELECT lesion_id FROM cohort_cli_made ORDER BY rank")
    assert len(first) == 2
    with dg.DagsterInstance.get() as instance:
        assert instance.has_dynamic_partition("cohorts", "cli_made")
        assert instance.get_latest_materialization_event(dg.AssetKey("cohort_outcomes")) is not None
    assert main(["cohort", "cli_made", "--warehouse", str(root)]) == 0  # the stored query again
    assert _q(root / "warehouse.duckdb", "SELECT lesion_id FROM cohort_cli_made ORDER BY rank") == first
    assert main(["cohort", "Bad Name", "--largest", "--warehouse", str(root)]) == 2
    assert "not valid" in capsys.readouterr().err


def test_api_similar_answers_with_explanations_pictures_and_the_user(chain, tmp_path):
    """`/api/similar/{lesion_id}` through Starlette's test client: 401 without a token, the answer's shape,
    signed picture links that open, and the audit row carrying the user's name."""
    import json

    from starlette.testclient import TestClient

    from imaging_assets.access import add_user
    from imaging_assets.web import create_app

    db, wh = chain["db"], chain["wh"]
    users = tmp_path / "users.json"
    token = add_user("dr.who", "viewer", path=users)
    lid, patient = _q(db, "SELECT lesion_id, patient_key FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0]
    with TestClient(create_app(wh, users=users)) as client:  # the lifespan starts and stops the warm state
        assert client.get(f"/api/similar/{lid}").status_code == 401
        r = client.get(f"/api/similar/{lid}?k=3&modality=CT&outcomes=1", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["reference"]["lesion_id"] == lid and answer["reference"]["patient_key"] == patient
        results = answer["results"]
        assert len(results) == 3 and len({x["patient_key"] for x in results}) == 3 and patient not in {
            x["patient_key"] for x in results}
        for x in results:
            assert {"lesion_id", "patient_key", "distance", "modality", "explanation", "thumbnail_url"} <= set(x)
            assert sum(x["explanation"]["groups"].values()) == pytest.approx(1.0, abs=1e-3)
            picture = client.get(x["thumbnail_url"].replace("http://testserver", ""))  # signed: no token needed
            assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        near = answer["outcomes"]["neighbours"]
        assert near["patients"] == len({x["patient_key"] for x in results} & _patients_with_outcomes(db))
        assert answer["outcomes"]["rest"]["patients"] >= 1 and all(0 <= s <= 1 for _, s in near["km"])
        auth = {"Authorization": f"Bearer {token}"}
        assert client.get("/api/similar/no-such-lesion", headers=auth).status_code == 404
        assert client.get(f"/api/similar/{lid}?k=0", headers=auth).status_code == 400
        assert client.get(f"/api/similar/{lid}?min_volume=big", headers=auth).status_code == 400
        page = client.get(f"/?lesion_id={lid}&k=2", cookies={"ia_token": token})
        assert page.status_code == 200 and "closest patients" in page.text and "agree" in page.text
        assert "<svg class='km'" in page.text and "Save as cohort" not in page.text  # a viewer cannot save
    # the server's audit journal is copied into audit_log (at the latest when the server stops)
    rows = _q(db, "SELECT action, params, status FROM audit_log WHERE \"user\" = 'dr.who' ORDER BY logged_at")
    searched = [json.loads(p).get("lesion_id") for a, p, st in rows if a == "search" and st == "ok"]
    assert searched.count(lid) == 2  # the API and the page
    failed = [st for _, _, st in rows if st != "ok"]
    assert len(failed) == 3 and any("no-such-lesion" in st for st in failed)  # refused and failing ones too


def _patients_with_outcomes(db) -> set:
    return {r[0] for r in _q(db, "SELECT patient_key FROM patient_outcomes WHERE time_months IS NOT NULL "
                                 "AND event IS NOT NULL")}


def test_warm_answers_equal_answers_from_the_files(chain):
    """The server's in-memory answer (WarmSearch) is the answer read from the files: same lesions, order,
    explanations and raw values; distances equal to float32 rounding."""
    from imaging_assets.stages.serving import WarmSearch
    from imaging_assets.web import similar_answer

    db, wh = chain["db"], chain["wh"]
    warm = WarmSearch(wh)
    try:
        for (lid,) in _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY volume_mm3 DESC LIMIT 4"):
            for filters in ({}, {"modality": ["CT"], "volume_mm3": (100.0, None)}):
                cold = similar_answer(wh, lid, 5, filters, "t", "http://x/pictures")
                hot = similar_answer(wh, lid, 5, filters, "t", "http://x/pictures", warm=warm)
                assert cold["reference"] == hot["reference"]
                assert [r["lesion_id"] for r in cold["results"]] == [r["lesion_id"] for r in hot["results"]]
                for c, h in zip(cold["results"], hot["results"]):
                    assert h["distance"] == pytest.approx(c["distance"], rel=1e-5)
                    assert {k: v for k, v in c.items() if k not in ("distance", "explanation")} == {
                        k: v for k, v in h.items() if k not in ("distance", "explanation")}
                    for key in ("agree", "differ"):
                        assert [(x["feature"], x["reference_value"], x["neighbour_value"], x["reference_percentile"])
                                for x in c["explanation"][key]] == [
                            (x["feature"], x["reference_value"], x["neighbour_value"], x["reference_percentile"])
                            for x in h["explanation"][key]]
    finally:
        warm.stop()


def test_warm_search_follows_the_pipeline(chain, tmp_path):
    """A change of the DuckDB tables or of the Lance table reaches the warm state at the next look; the
    server's own audit flushes do not reload the tables."""
    import shutil

    from imaging_assets.stages.serving import WarmSearch
    from imaging_assets.stages.similar import similar_rows
    from imaging_assets.store.lance import lance_dataset

    root = tmp_path / "wh"
    shutil.copytree(chain["wh"].root, root)
    wh = Warehouse(root)
    warm = WarmSearch(wh, quiet_s=0.5)
    try:
        lid = _q(wh.duckdb_path, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
        first = similar_rows(lid, k=3, warehouse=wh, warm=warm)
        assert warm.flush_audit() == 1
        assert warm.refresh() == {"vectors": False, "embeddings": False, "tables": False}
        with wh.transaction() as con:
            con.execute("UPDATE lesions SET roi_name = 'renamed' WHERE lesion_id = ?", [lid])
        assert not warm.refresh()["tables"]  # a file still being written waits for calm ...
        time.sleep(0.6)
        assert warm.refresh()["tables"] and warm.tables.lesions[lid]["roi_name"] == "renamed"  # ... then reloads
        gone = first[0]["lesion_id"]
        lance_dataset(wh.lance_uri).delete(f"lesion_id = '{gone}'")
        assert warm.refresh()["vectors"]
        assert gone not in {r["lesion_id"] for r in similar_rows(lid, k=10, warehouse=wh, warm=warm, space="radiomics")}
        deep = similar_rows(lid, k=3, warehouse=wh, warm=warm, space="deep")[0]["lesion_id"]
        lance_dataset(wh.lance_uri, "lesion_embeddings").delete(f"lesion_id = '{deep}'")
        assert warm.refresh()["embeddings"]
        assert deep not in {r["lesion_id"] for r in similar_rows(lid, k=10, warehouse=wh, warm=warm, space="deep")}
    finally:
        warm.stop()


def test_the_page_saves_cohorts_for_analysts_and_sql_reads_only(chain, tmp_path, monkeypatch):
    """An analyst saves a cohort from the page (a Dagster run of the `cohort` partition, audited under their
    name) and reads it with SQL; a viewer gets 403 for both; SQL that writes is refused."""
    import shutil

    import dagster as dg
    from starlette.testclient import TestClient

    from imaging_assets.access import add_user
    from imaging_assets.web import create_app

    root = tmp_path / "wh"
    shutil.copytree(chain["wh"].root, root)
    wh = Warehouse(root)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("IMAGING_ASSETS_PICTURES_URL", raising=False)
    users = tmp_path / "users.json"
    analyst, viewer = add_user("ana", "analyst", path=users), add_user("vic", "viewer", path=users)
    lid = _q(wh.duckdb_path, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY volume_mm3 DESC LIMIT 1")[0][0]
    with TestClient(create_app(wh, users=users)) as client:
        page = client.get(f"/?lesion_id={lid}&k=3", cookies={"ia_token": analyst})
        assert "Save as cohort" in page.text
        denied = client.post("/cohorts", data={"name": "from_page", "reference_lesion_id": lid},
                             cookies={"ia_token": viewer})
        assert denied.status_code == 403
        assert client.post("/api/sql", json={"sql": "SELECT 1"}, headers={"Authorization": f"Bearer {viewer}"}
                           ).status_code == 403
        bad = client.post("/cohorts", data={"name": "Bad Name", "reference_lesion_id": lid}, cookies={"ia_token": analyst})
        assert bad.status_code == 400 and "not valid" in bad.text
        saved = client.post("/cohorts", data={"name": "from_page", "reference_lesion_id": lid, "k": "3"},
                            cookies={"ia_token": analyst})
        assert saved.status_code == 201, saved.text
        assert "cohort_from_page" in saved.text
        auth = {"Authorization": f"Bearer {analyst}"}
        api = client.post("/api/sql", json={"sql": "SELECT rank, lesion_id FROM cohort_from_page ORDER BY rank"},
                          headers=auth)
        assert api.status_code == 200 and api.json()["columns"] == ["rank", "lesion_id"]
        assert [r[0] for r in api.json()["rows"]] == [1, 2, 3]
        write = client.post("/api/sql", json={"sql": "DELETE FROM lesions"}, headers=auth)
        assert write.status_code == 400 and "read-only" in write.json()["error"]
        sql_page = client.post("/sql", data={"sql": "SELECT count(*) AS n FROM cohort_from_page"},
                               cookies={"ia_token": analyst})
        assert sql_page.status_code == 200 and "<th>n</th>" in sql_page.text
        made = client.post("/api/cohorts", json={"name": "from_api", "reference_lesion_id": lid, "k": 2}, headers=auth)
        assert made.status_code == 201 and made.json()["table"] == "cohort_from_api"
        again = client.post("/api/cohorts", json={"name": "from_api", "reference_lesion_id": lid, "k": 1}, headers=auth)
        assert again.status_code == 400 and "exists already" in again.json()["error"]  # nothing replaced
        assert len(_q(wh.duckdb_path, "SELECT * FROM cohort_from_api")) == 2
    with dg.DagsterInstance.get() as instance:
        assert instance.has_dynamic_partition("cohorts", "from_page")
        runs = [instance.get_run_by_id(e.run_id) for e in instance.fetch_materializations(
            dg.AssetKey("cohort"), limit=10).records]
        assert {r.tags.get("imaging_assets/user") for r in runs} == {"ana"}
    assert _q(wh.duckdb_path, "SELECT \"user\", reference_lesion_id FROM cohorts WHERE name = 'from_page'") == [
        ("ana", lid)]
    audit_rows = _q(wh.duckdb_path, "SELECT action, status FROM audit_log WHERE \"user\" = 'ana'")
    assert ("cohort", "ok") in audit_rows and ("sql", "ok") in audit_rows
    assert any(a == "sql" and s.startswith("refused") for a, s in audit_rows)


def _reference_with_seg(db) -> tuple:
    return _q(db, "SELECT l.lesion_id, i.files, s.path, l.segment_number FROM lesions l JOIN imaging_series i "
                  "USING (series_key) JOIN segmentations s USING (seg_key) WHERE l.extractable AND s.kind = 'seg' "
                  "ORDER BY l.volume_mm3 DESC LIMIT 1")[0]


def test_a_new_lesion_is_searched_by_path_or_upload(chain, small_cohort, tmp_path):
    """POST /api/similar with the paths of a lesion's own series and SEG (under the archive roots) finds that
    lesion at distance ~0 when its patient is kept; a path outside the roots is refused (403); NIfTI uploads
    are searched too; the page shows the answer."""
    import numpy as np
    import SimpleITK as sitk
    from starlette.testclient import TestClient

    from imaging_assets.access import add_user
    from imaging_assets.web import create_app

    db, wh = chain["db"], chain["wh"]
    users = tmp_path / "users.json"
    token = add_user("dr.new", "viewer", path=users)
    auth = {"Authorization": f"Bearer {token}"}
    lid, files, seg_path, label = _reference_with_seg(db)
    image = str(Path(files[0]).parent)
    with TestClient(create_app(wh, users=users, roots=[str(small_cohort.dicom_dir)])) as client:
        r = client.post("/api/similar", json={"image": image, "mask": seg_path, "label": label, "k": 3,
                                              "filters": {"lesion_id": [lid]}}, headers=auth)
        assert r.status_code == 200, r.text
        assert [x["lesion_id"] for x in r.json()["results"]] == [lid]
        assert r.json()["results"][0]["distance"] < 1e-3 and r.json()["reference"]["lesion_id"] is None
        outside = client.post("/api/similar", json={"image": str(tmp_path), "mask": seg_path}, headers=auth)
        assert outside.status_code == 403 and "archive roots" in outside.json()["error"]
        # a NIfTI image + mask (a bright sphere in noise), uploaded
        rng = np.random.default_rng(0)
        zz, yy, xx = np.mgrid[:40, :64, :64]
        sphere = ((zz - 20) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2) <= 8 ** 2
        arr = rng.normal(40, 15, sphere.shape) + sphere * 60
        img, msk = sitk.GetImageFromArray(arr.astype(np.int16)), sitk.GetImageFromArray(sphere.astype(np.uint8))
        for x in (img, msk):
            x.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(img, str(tmp_path / "image.nii.gz"))
        sitk.WriteImage(msk, str(tmp_path / "mask.nii.gz"))
        with (tmp_path / "image.nii.gz").open("rb") as fi, (tmp_path / "mask.nii.gz").open("rb") as fm:
            up = client.post("/api/similar", files={"image": ("image.nii.gz", fi), "mask": ("mask.nii.gz", fm)},
                             data={"modality": "CT", "k": "2"}, headers=auth)
        assert up.status_code == 200, up.text
        assert len(up.json()["results"]) == 2 and up.json()["results"][0]["explanation"]["agree"]
        with (tmp_path / "image.nii.gz").open("rb") as fi:
            one = client.post("/api/similar", files={"image": ("image.nii.gz", fi)}, headers=auth)
        assert one.status_code == 400 and "both" in one.json()["error"]
        page = client.post("/", data={"image_path": image, "mask_path": seg_path, "label": str(label), "k": "2"},
                           cookies={"ia_token": token})
        assert page.status_code == 200 and "the new lesion" in page.text and "closest patients" in page.text


def test_cli_similar_asks_a_running_server(chain, tmp_path, monkeypatch, capsys):
    """With IMAGING_ASSETS_SERVER_URL and a token, `similar <id>` is answered by the server (same rows as in
    process, audited under the token's user); with the server down it searches in process."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from imaging_assets.access import add_user
    from imaging_assets.cli import main

    db, wh = chain["db"], chain["wh"]
    users = tmp_path / "users.json"
    token = add_user("cli.user", "viewer", path=users)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "IMAGING_ASSETS_USERS": str(users)}
    proc = subprocess.Popen([sys.executable, "-m", "imaging_assets.cli", "serve", "--port", str(port), "--warehouse",
                             str(wh.root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        lid = _q(db, "SELECT lesion_id FROM lesions WHERE extractable ORDER BY 1 LIMIT 1")[0][0]
        args = ["similar", lid, "-k", "4", "--where", "modality=CT", "--explain", "--json", "--warehouse", str(wh.root)]
        assert main(args) == 0
        local = json.loads(capsys.readouterr().out)
        monkeypatch.setenv("IMAGING_ASSETS_SERVER_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("IMAGING_ASSETS_TOKEN", token)
        assert main(args) == 0
        remote = json.loads(capsys.readouterr().out)
        assert [r["lesion_id"] for r in remote] == [r["lesion_id"] for r in local]
        assert [r["explanation"]["agree"][0]["feature"] for r in remote] == [
            r["explanation"]["agree"][0]["feature"] for r in local]
        assert main(["similar", lid, "-k", "2", "--warehouse", str(wh.root)]) == 0
        assert "via the server" in capsys.readouterr().out
        monkeypatch.setenv("IMAGING_ASSETS_TOKEN", "ia_wrong")
        assert main(["similar", lid, "--warehouse", str(wh.root)]) == 2
        assert "401" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert _q(db, "SELECT count(*) FROM audit_log WHERE \"user\" = 'cli.user' AND status = 'ok'")[0][0] == 2
    monkeypatch.setenv("IMAGING_ASSETS_TOKEN", token)  # the server is gone: in process again
    assert main(["similar", lid, "-k", "2", "--warehouse", str(wh.root)]) == 0
    assert "including audit" in capsys.readouterr().out
