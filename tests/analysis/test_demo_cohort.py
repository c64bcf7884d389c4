"""Quality on the embedded demo cohort: the whole graph materialized through Dagster with its defaults.

The 100-patient demo (seed 0, exactly what ``make demo`` generates) is materialized once per module in
process (``dg.materialize`` of every asset and check, default run config, 2 workers), then:

* every lesion of every valid series has features, and a rebuild of ``lesions`` gives identical ids;
* similar-case search (the public :func:`~imaging_assets.stages.similar.find_similar`, other patients only)
  returns lesions of the query's ground-truth phenotype: precision@10 >= 0.9;
* the phenotype clusters separate survival (the demo plants a phenotype effect): log-rank p < 0.01, while
  with outcomes permuted across patients p >= 0.05 in at least 9 of 10 seeds.

``ground_truth.csv`` is read here only; the pipeline never sees it.
"""

from __future__ import annotations

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource, WarehouseResource

pytestmark = pytest.mark.slow

N_PATIENTS, SEED = 100, 0


def _defs() -> dg.Definitions:
    from imaging_assets.definitions import defs

    return defs() if callable(defs) and not isinstance(defs, dg.Definitions) else defs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from imaging_assets.demo.generator import generate_cohort

    root = tmp_path_factory.mktemp("demo100")
    cohort = generate_cohort(root / "demo", n_patients=N_PATIENTS, seed=SEED, workers=2)
    defs = _defs()
    resources = {
        "warehouse": WarehouseResource(root=str(root / "wh")),
        "dicom_sources": DicomSourcesResource(roots=[str(cohort.dicom_dir)], workers=2),
        "outcome_sources": OutcomeSourcesResource(path=str(cohort.outcomes_csv)),
    }
    everything = [a for a in defs.assets if a.partitions_def is None] + list(defs.asset_checks)
    with dg.instance_for_test() as instance:
        result = dg.materialize(everything, instance=instance, resources=resources)
        assert result.success
        first_ids = _lesion_ids(root / "wh")
        # a rebuild of the lesions asset alone (same inputs) must give the same ids
        lesions_key = dg.AssetKey("lesions")
        again = dg.materialize(everything, instance=instance, resources=resources,
                               selection=dg.AssetSelection.assets(lesions_key))
        assert again.success
    gt = pd.read_csv(cohort.ground_truth_csv)
    return {"root": root, "wh": root / "wh", "cohort": cohort, "gt": gt, "first_ids": first_ids}


def _db(wh):
    return duckdb.connect(str(wh / "warehouse.duckdb"), read_only=True)


def _lesion_ids(wh) -> list[str]:
    with _db(wh) as con:
        return [r[0] for r in con.execute("SELECT lesion_id FROM lesions ORDER BY lesion_id").fetchall()]


def _phenotypes(demo) -> pd.DataFrame:
    """lesion_id -> ground-truth phenotype and raw patient id (matched on series UID + segment number)."""
    with _db(demo["wh"]) as con:
        les = con.execute(
            "SELECT lesion_id, series_instance_uid, segment_number, patient_key FROM lesions "
            "WHERE extractable").fetchdf()
    gt = demo["gt"][["series_instance_uid", "segment_number", "phenotype", "patient_id"]]
    out = les.merge(gt, on=["series_instance_uid", "segment_number"], how="left")
    assert out["phenotype"].notna().all(), "every extractable lesion matches one ground-truth row"
    return out.set_index("lesion_id")


def test_every_lesion_of_every_valid_series_has_features_and_stable_ids(demo):
    with _db(demo["wh"]) as con:
        extractable = con.execute("SELECT count(*) FROM lesions WHERE extractable").fetchone()[0]
        with_features = con.execute(
            "SELECT count(DISTINCT lesion_id) FROM radiomics_features").fetchone()[0]
        errors = con.execute("SELECT count(*) FROM radiomics_errors").fetchone()[0]
        valid_series_without_lesions = con.execute(
            "SELECT count(*) FROM imaging_series s WHERE s.usable AND s.series_key IN "
            "(SELECT linked_series_key FROM segmentations) AND s.series_key NOT IN "
            "(SELECT series_key FROM lesions WHERE extractable)").fetchone()[0]
    truth = demo["gt"]
    # one ground-truth lesion per generated lesion; patient 3's series lacks a slice and is flagged
    assert extractable >= 0.95 * len(truth)
    assert with_features == extractable and errors == 0
    assert valid_series_without_lesions == 0
    assert _lesion_ids(demo["wh"]) == demo["first_ids"]


def test_similar_case_precision_at_10_of_the_ground_truth_phenotype(demo):
    from imaging_assets.stages.similar import find_similar

    truth = _phenotypes(demo)
    precisions = []
    for lesion_id, row in truth.iterrows():
        hits = find_similar(lesion_id=lesion_id, k=10, exclude_same_patient=True, warehouse=demo["wh"])
        assert len(hits) == 10
        assert row["patient_key"] not in set(hits["patient_key"].to_list())
        same = truth.loc[hits["lesion_id"].to_list(), "phenotype"] == row["phenotype"]
        precisions.append(float(same.mean()))
    precision = float(np.mean(precisions))
    by_phenotype = truth.assign(p=precisions).groupby("phenotype")["p"].mean().round(3).to_dict()
    print(f"precision@10 = {precision:.3f} over {len(truth)} lesions; by phenotype {by_phenotype}")
    assert precision >= 0.9, by_phenotype


def _logrank_p(patients: pd.DataFrame) -> float:
    from imaging_assets.analysis.survival import analyse_survival

    return float(analyse_survival(patients, covariates=["age", "stage"]).logrank["p_value"])


def test_clusters_separate_survival_and_permuted_outcomes_do_not(demo):
    with _db(demo["wh"]) as con:
        stored = con.execute("SELECT p_value, df FROM cluster_logrank").fetchone()
        patients = con.execute("SELECT * FROM cluster_patients").fetchdf()
        k = con.execute("SELECT count(DISTINCT cluster) FROM phenotype_clusters").fetchone()[0]
    assert k >= 2 and len(patients) >= 0.9 * N_PATIENTS
    print(f"log-rank across {k} clusters: p = {stored[0]:.2e} (df {stored[1]}), {len(patients)} patients")
    assert stored[0] < 0.01
    assert _logrank_p(patients) == pytest.approx(stored[0], rel=1e-9)  # the same analysis, recomputed

    permuted = []
    for seed in range(10):
        order = np.random.default_rng(seed).permutation(len(patients))
        shuffled = patients.copy()
        for col in ("time_months", "event"):  # outcomes move together, cluster and covariates stay
            shuffled[col] = patients[col].to_numpy()[order]
        permuted.append(_logrank_p(shuffled))
    print("permuted outcomes, log-rank p:", [round(p, 3) for p in permuted])
    assert sum(p >= 0.05 for p in permuted) >= 9
