"""Survival by cluster: one row per patient, Kaplan-Meier, log-rank, Cox against a known truth."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from imaging_assets.analysis.survival import analyse_survival, one_row_per_patient

BASE_RATE = 0.05  # per month, cluster 0
TRUE_HR = 2.0  # cluster 1 vs cluster 0


def _cohort(n: int = 400, seed: int = 0, hr: float = TRUE_HR, stage_hr: float = 1.0) -> pd.DataFrame:
    """Exponential survival, uniform censoring; cluster 1 has hazard ``hr`` times cluster 0."""
    rng = np.random.default_rng(seed)
    extra = n // 20
    cluster = np.r_[np.zeros(n - n // 2 - extra, int), np.ones(n // 2 + extra, int)]  # 1 is the larger
    stage_num = rng.integers(1, 5, n)
    rate = BASE_RATE * np.where(cluster == 1, hr, 1.0) * stage_hr ** (stage_num - 1)
    t = rng.exponential(1 / rate)
    c = rng.uniform(0, 120, n)
    return pd.DataFrame({
        "patient_key": [f"pk_{i:04d}" for i in range(n)],
        "cluster": cluster,
        "time_months": np.minimum(t, c),
        "event": (t <= c).astype(int),
        "age": rng.normal(65, 10, n),
        "stage": np.array(["I", "II", "III", "IV"])[stage_num - 1],
        "lesions": rng.integers(1, 4, n),
    })


def test_known_hazard_ratio_logrank_and_medians(tmp_path):
    df = _cohort()
    res = analyse_survival(df, png_path=tmp_path / "km.png", reference_cluster=0)
    assert res.n_patients == 400 and res.reference_cluster == 0
    assert res.logrank["df"] == 1 and res.logrank["p_value"] < 0.01

    by_term = {r["term"]: r for r in res.cox}
    assert set(by_term) == {"age", "stage", "cluster_1"}
    hr = by_term["cluster_1"]
    assert hr["ci_low"] <= TRUE_HR <= hr["ci_high"]
    assert abs(math.log(hr["hr"]) - math.log(TRUE_HR)) < 0.3
    assert hr["p_value"] < 0.01
    assert by_term["age"]["ci_low"] <= 1.0 <= by_term["age"]["ci_high"]  # no true age effect

    per = {r["cluster"]: r for r in res.per_cluster}
    assert per[0]["patients"] + per[1]["patients"] == 400
    assert per[0]["lesions"] == int(df.loc[df.cluster == 0, "lesions"].sum())
    assert per[1]["events"] == int(df.loc[df.cluster == 1, "event"].sum())
    for c, rate in ((0, BASE_RATE), (1, BASE_RATE * TRUE_HR)):
        truth = math.log(2) / rate
        assert per[c]["median_ci_low"] <= per[c]["median_months"] <= per[c]["median_ci_high"]
        assert abs(per[c]["median_months"] - truth) / truth < 0.25
        assert per[c]["median_ci_low"] <= truth * 1.1 and per[c]["median_ci_high"] >= truth * 0.9

    png = res.km_png
    assert png is not None and png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000

    tables = res.as_rows()
    assert len(tables["cluster_survival"]) == 2 and len(tables["cluster_logrank"]) == 1
    assert all(r["reference_cluster"] == 0 for r in tables["cluster_cox"])


def test_default_reference_is_largest_cluster_and_stage_is_ordinal():
    df = _cohort(seed=3, stage_hr=1.5)
    res = analyse_survival(df)
    assert res.reference_cluster == 1  # the larger cluster
    by_term = {r["term"]: r for r in res.cox}
    assert "cluster_0" in by_term
    # cluster 0 vs 1: HR 1/2
    assert by_term["cluster_0"]["ci_low"] <= 1 / TRUE_HR <= by_term["cluster_0"]["ci_high"]
    # one term per stage step, true HR 1.5
    assert by_term["stage"]["ci_low"] <= 1.5 <= by_term["stage"]["ci_high"]
    assert res.covariates_used == ["age", "stage"]


def test_text_covariate_one_hot_and_all_null_dropped():
    df = _cohort(seed=4)
    df["sex"] = np.where(np.arange(len(df)) % 3 == 0, "F", "M")
    df["age"] = np.nan
    res = analyse_survival(df, covariates=("age", "stage", "sex", "bmi"))
    terms = {r["term"] for r in res.cox}
    assert "sex_F" in terms and "age" not in terms and "bmi" not in terms
    assert "all null" in (res.cox_note or "") and "absent" in (res.cox_note or "")


def test_missing_covariates_are_complete_case_for_cox_only():
    df = _cohort(seed=5)
    df.loc[:9, "age"] = np.nan
    res = analyse_survival(df)
    assert res.n_patients == 400 and res.n_cox == 390
    assert "10 patient(s) with missing covariates" in res.cox_note


@pytest.mark.parametrize(
    "case, expect",
    [
        ("empty", "no patients"),
        ("one_cluster", "one cluster"),
        ("no_events", "no events"),
        ("tiny", "fewer than 5"),
    ],
)
def test_degenerate_inputs_give_notes_not_exceptions(tmp_path, case, expect):
    df = _cohort(n=60, seed=1)
    if case == "empty":
        df = df.iloc[:0]
    elif case == "one_cluster":
        df["cluster"] = 2
    elif case == "no_events":
        df["event"] = 0
    elif case == "tiny":
        df = df.iloc[[0, 1, -1, -2]]
    res = analyse_survival(df, png_path=tmp_path / "km.png")
    text = " ".join(res.notes + [res.cox_note or ""])
    assert expect in text
    assert res.cox == []
    assert res.km_png is not None and res.km_png.exists()
    if case == "no_events":
        assert all(r["median_months"] is None and r["events"] == 0 for r in res.per_cluster)
        assert res.logrank["p_value"] is None
    if case == "one_cluster":
        assert [r["cluster"] for r in res.per_cluster] == [2]
        assert res.logrank["statistic"] is None


def test_cluster_without_events_stays_finite():
    df = _cohort(n=200, seed=2)
    df.loc[df.cluster == 0, "event"] = 0
    res = analyse_survival(df)
    hr = {r["term"]: r for r in res.cox}["cluster_0"]
    assert hr["hr"] is not None and hr["hr"] < 0.2


def test_invalid_rows_and_noise_left_out_with_notes():
    df = _cohort(n=100, seed=6)
    df.loc[0, "time_months"] = -1
    df.loc[1, "event"] = 2
    df.loc[2, "cluster"] = -1
    res = analyse_survival(df)
    assert res.n_patients == 97
    assert any("2 patient(s) without a valid" in n for n in res.notes)
    assert any("noise" in n for n in res.notes)


def test_duplicate_patients_raise():
    df = _cohort(n=20)
    df.loc[1, "patient_key"] = df.loc[0, "patient_key"]
    with pytest.raises(ValueError, match="one_row_per_patient"):
        analyse_survival(df)


def test_one_row_per_patient_largest_rule():
    lesions = pd.DataFrame([
        # patient a: largest lesion L2 (cluster 1)
        ("a", "L1", 100.0, 0), ("a", "L2", 900.0, 1), ("a", "L3", 500.0, 0),
        # patient b: tie on volume -> smallest lesion_id (B1, cluster 2)
        ("b", "B2", 50.0, 0), ("b", "B1", 50.0, 2),
        # patient c: one lesion with unknown volume, one known -> the known one
        ("c", "C1", np.nan, 3), ("c", "C2", 1.0, 0),
        # patient d: single lesion
        ("d", "D1", 10.0, 4),
    ], columns=["patient_key", "lesion_id", "volume_mm3", "cluster"])
    out = one_row_per_patient(lesions)
    assert list(out["patient_key"]) == ["a", "b", "c", "d"]
    assert list(out["cluster"]) == [1, 2, 0, 4]
    assert list(out["lesion_id"]) == ["L2", "B1", "C2", "D1"]
    assert list(out["lesions"]) == [3, 2, 2, 1]

    maj = one_row_per_patient(lesions, rule="majority")
    assert list(maj["cluster"]) == [0, 2, 0, 4]  # a: two lesions in cluster 0 (largest of them L3)
    assert maj.loc[0, "lesion_id"] == "L3"
    # b: tie 1-1 -> cluster of the largest lesion (volumes tie -> smallest id B1)

    with pytest.raises(ValueError, match="unknown rule"):
        one_row_per_patient(lesions, rule="smallest")
    with pytest.raises(ValueError, match="lacks"):
        one_row_per_patient(lesions.drop(columns="volume_mm3"))
    assert one_row_per_patient(lesions.iloc[:0]).empty


def test_one_row_per_patient_feeds_analysis():
    rng = np.random.default_rng(9)
    pats = _cohort(n=120, seed=9)
    rows = []
    for _, p in pats.iterrows():
        for j in range(int(p["lesions"])):
            big = j == 0
            rows.append({"patient_key": p["patient_key"], "lesion_id": f"{p['patient_key']}_{j}",
                         "volume_mm3": 1000.0 if big else float(rng.uniform(1, 500)),
                         "cluster": int(p["cluster"]) if big else int(rng.integers(0, 2))})
    per_patient = one_row_per_patient(pd.DataFrame(rows))
    assert (per_patient.set_index("patient_key")["cluster"] == pats.set_index("patient_key")["cluster"]).all()
    merged = per_patient[["patient_key", "cluster", "lesions"]].merge(
        pats.drop(columns=["cluster", "lesions"]), on="patient_key")
    res = analyse_survival(merged)
    assert res.n_patients == 120
    assert sum(r["lesions"] for r in res.per_cluster) == int(pats["lesions"].sum())
