"""Reruns: materializing the whole chain again on an unchanged cohort gives identical tables.

Every DuckDB table and every Lance table is fingerprinted (row count + SHA-256 over the sorted rows; columns
holding wall-clock times — created_at, loaded_at, updated_at, computed_at, logged_at, fitted_at,
activated_at, removed_at — and the timing column elapsed_s compared by nullness only). A fresh run in
another process giving the same fingerprints as the clean run is checked by the crash test
(``test_crash.py``), whose final warehouse is built from scratch.
"""

from __future__ import annotations

import shutil

import pytest
import reliability_helpers as rh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reruns(clean_chain, tmp_path_factory):
    """The clean warehouse copied, then the whole chain materialized on it twice more."""
    from imaging_assets.store.warehouse import duckdb_path

    wh = tmp_path_factory.mktemp("rerun") / "wh"
    shutil.copytree(clean_chain["wh"], wh)
    cohort = clean_chain["cohort"]
    db = duckdb_path(wh)
    second = rh.run_chain(wh, cohort.dicom_dir, cohort.outcomes_csv, workers=2)
    after_second = (rh.duckdb_table_hashes(db), rh.lance_table_hashes(wh / "lance"))
    third = rh.run_chain(wh, cohort.dicom_dir, cohort.outcomes_csv, workers=2)
    after_third = (rh.duckdb_table_hashes(db), rh.lance_table_hashes(wh / "lance"))
    return {"second": second, "third": third, "after_second": after_second, "after_third": after_third,
            "clean": (clean_chain["duckdb_hashes"], clean_chain["lance_hashes"])}


def test_rerun_reads_and_extracts_nothing(reruns):
    s = reruns["second"]
    assert s["dicom_files"].read == 0 and s["dicom_files"].removed == 0
    assert s["radiomics_features"].extracted == 0 and s["radiomics_features"].failed == 0
    assert s["feature_robustness"].extracted == 0
    assert not s["robust_feature_set"].changed
    assert s["clinical_outcomes"].files_skipped == 1 and s["clinical_outcomes"].inserted == 0


def test_rerun_leaves_every_duckdb_table_identical(reruns):
    clean_db, _ = reruns["clean"]
    assert len(clean_db) >= 20 and all(rows > 0 for t, (rows, _) in clean_db.items()
                                       if t not in {"radiomics_errors", "perturbation_errors", "outcome_rejects",
                                                    # no Cox model on 6 patients (too few events per variable)
                                                    "cluster_cox"})
    assert rh.diff_hashes(reruns["after_second"][0], clean_db) == {}
    assert rh.diff_hashes(reruns["after_third"][0], clean_db) == {}


def test_rerun_leaves_the_lance_table_identical(reruns):
    _, clean_lance = reruns["clean"]
    assert rh.diff_hashes(reruns["after_second"][1], clean_lance) == {}


def test_lance_table_converges_after_the_second_run(reruns):
    """What does hold today: the third materialization changes nothing (a fixed point one run late)."""
    assert reruns["third"]["lesion_vectors"].table_version == reruns["second"]["lesion_vectors"].table_version
    assert rh.diff_hashes(reruns["after_third"][1], reruns["after_second"][1]) == {}
    rows, _ = reruns["after_third"][1]["lesion_vectors"]
    assert rows == reruns["clean"][1]["lesion_vectors"][0]
