"""Honest statistics (issue 15, point 9): minimum sizes before clustering and survival models.

Each case reproduces a situation that used to give absurd numbers with no warning: a Cox model on 6
patients and 3 events (HR 526, CI 0.0124-22,354,930, notes: none), a log-rank test across a cluster of
two patients, k chosen by silhouette with clusters of one lesion.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from imaging_assets.analysis.clustering import (
    MIN_CLUSTER_LESIONS,
    MIN_CLUSTER_SHARE,
    cluster_vectors,
    min_cluster_size_for,
)
from imaging_assets.analysis.survival import (
    MIN_EVENTS_PER_VARIABLE,
    MIN_GROUP_PATIENTS,
    MIN_LOGRANK_EVENTS,
    analyse_survival,
)


def _patients(sizes: dict[int, int], events: dict[int, int], seed: int = 0) -> pd.DataFrame:
    """``sizes[c]`` patients in cluster c, the first ``events[c]`` of them with an event."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in sizes.items():
        for i in range(n):
            rows.append({"patient_key": f"pk_{c}_{i}", "cluster": c, "time_months": float(rng.uniform(1, 60)),
                         "event": int(i < events[c]), "age": float(rng.normal(65, 8)),
                         "stage": ["I", "II", "III", "IV"][int(rng.integers(0, 4))]})
    return pd.DataFrame(rows)


def test_the_issue_case_six_patients_three_events_gives_no_model_and_says_why():
    df = _patients({0: 3, 1: 3}, {0: 1, 1: 2})
    res = analyse_survival(df)
    assert res.cox == [] and res.logrank["p_value"] is None
    assert not res.adequate and res.inadequate
    text = " ".join(res.notes + [res.cox_note or ""])
    assert f"fewer than {MIN_GROUP_PATIENTS} patients" in text and "MIN_GROUP_PATIENTS" in text
    # the table row carries the reason too (cluster_logrank.note)
    assert "fewer than" in res.as_rows()["cluster_logrank"][0]["note"]
    # the per-cluster Kaplan-Meier summaries stay (descriptive)
    assert [r["patients"] for r in res.per_cluster] == [3, 3]


def test_cox_needs_ten_events_per_term():
    # 2 clusters of 20 patients, 12 events; cluster + age + stage = 3 terms -> 30 events needed
    df = _patients({0: 20, 1: 20}, {0: 6, 1: 6}, seed=1)
    res = analyse_survival(df, covariates=("age", "stage"))
    assert res.cox == []
    assert "12 event(s) for 3 term(s)" in res.cox_note and "MIN_EVENTS_PER_VARIABLE" in res.cox_note
    assert "4.0 events per term" in res.cox_note and f"{3 * MIN_EVENTS_PER_VARIABLE} events needed" in res.cox_note
    assert res.logrank["p_value"] is not None  # 12 events, 20 per group: the log-rank test is fine
    assert not res.adequate and any("no Cox model" in r for r in res.inadequate)
    # without covariates one term: 12 events >= 10 -> a Cox row, and the analysis is adequate
    alone = analyse_survival(df, covariates=())
    assert [r["term"] for r in alone.cox] == ["cluster_1"] and alone.adequate, alone.inadequate


def test_small_clusters_are_left_out_of_the_comparison_and_few_events_give_no_logrank():
    df = _patients({0: 30, 1: 25, 2: 3}, {0: 15, 1: 12, 2: 2}, seed=2)
    res = analyse_survival(df, covariates=())
    assert res.compared_clusters == [0, 1]
    assert res.logrank["df"] == 1  # two compared clusters, not three
    assert {r["term"] for r in res.cox} == {"cluster_1"}
    assert any("cluster(s) 2 (3 patients)" in n for n in res.notes)
    assert [r["cluster"] for r in res.per_cluster] == [0, 1, 2]  # still described
    assert not res.adequate

    few = _patients({0: 10, 1: 10}, {0: 2, 1: 2}, seed=3)
    r2 = analyse_survival(few, covariates=())
    assert r2.logrank["p_value"] is None and r2.cox == []
    assert any(f"fewer than {MIN_LOGRANK_EVENTS} (MIN_LOGRANK_EVENTS)" in n for n in r2.notes)


def test_an_adequate_cohort_is_reported_adequate():
    df = _patients({0: 60, 1: 60}, {0: 30, 1: 40}, seed=4)
    res = analyse_survival(df)
    assert res.adequate and res.inadequate == [] and len(res.cox) == 3


def _blobs_with_outliers(seed: int = 0) -> np.ndarray:
    """17 lesions: three tight blobs of 5 and two far outliers (silhouette prefers to isolate them)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]])
    blobs = [rng.normal(c, 0.6, (5, 3)) for c in centres]
    outliers = np.array([[12.0, 12, 0], [-6, -6, 6]])
    return np.vstack(blobs + [outliers])


def test_silhouette_does_not_choose_k_with_clusters_below_the_minimum():
    x = _blobs_with_outliers()
    assert min_cluster_size_for(17) == MIN_CLUSTER_LESIONS == 5
    assert min_cluster_size_for(400) == int(np.ceil(MIN_CLUSTER_SHARE * 400)) == 20
    # without the rule the outliers are clusters of their own (what the issue saw)
    free = cluster_vectors(x, min_size=1)
    assert free.k == 5 and free.sizes == [5, 5, 5, 1, 1]
    res = cluster_vectors(x)
    assert res.k == 3 and res.sizes == [6, 6, 5] and res.min_size == 5 and res.adequate
    assert res.ineligible and all(size < 5 for size in res.ineligible.values())
    assert free.k in res.ineligible
    assert res.k not in res.ineligible and res.note is None


def test_a_configured_k_below_the_minimum_is_reported():
    x = _blobs_with_outliers()
    res = cluster_vectors(x, k=6)
    assert res.k == 6 and not res.adequate
    assert "configured k=6" in res.note and "below the minimum of 5 lesions" in res.note


def test_no_qualifying_k_keeps_the_least_unbalanced_and_says_so():
    x = np.vstack([np.random.default_rng(5).normal(0, 1, (12, 4)), [[50.0, 50, 50, 50]]])
    res = cluster_vectors(x)
    assert not res.adequate and res.k >= 2
    assert "no k in 2.." in res.note and "too small to be a phenotype" in res.note


@pytest.mark.parametrize("mcs, adequate", [(None, True), (2, False)])
def test_hdbscan_default_is_the_same_minimum(mcs, adequate):
    rng = np.random.default_rng(6)
    x = np.vstack([rng.normal(0, 0.3, (40, 3)), rng.normal(8, 0.3, (40, 3)), rng.normal(-8, 0.05, (3, 3))])
    res = cluster_vectors(x, method="hdbscan", min_cluster_size=mcs)
    assert res.min_size == min_cluster_size_for(83)
    assert res.adequate is adequate
