"""Robust feature selection: ICC threshold truth table, near-duplicate pruning, test-retest pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imaging_assets.features.robust import pair_test_retest, prune_correlated, robust_feature_set, select_robust


def _rows(**ci_low: float) -> list[dict]:
    return [{"feature": k, "icc": (v + 1) / 2 if not math.isnan(v) else math.nan, "ci_low": v, "ci_high": 1.0}
            for k, v in ci_low.items()]


# ------------------------------------------------------------------------------------------ select_robust
@pytest.mark.parametrize(
    "pert,tr,expected",
    [
        (0.80, None, True),  # perturbation alone decides when there is no test-retest
        (0.75, None, True),  # the threshold is inclusive
        (0.7499, None, False),
        (math.nan, None, False),  # degenerate feature
        (0.90, 0.80, True),
        (0.90, 0.60, False),  # fails test-retest
        (0.60, 0.95, False),  # fails perturbation
        (0.90, math.nan, False),
        (0.90, "missing", False),  # test-retest rows given but this feature absent: not confirmed
    ],
)
def test_select_robust_truth_table(pert: float, tr: float | str | None, expected: bool) -> None:
    perturbation = _rows(f=pert, anchor=0.99)
    test_retest = None if tr is None else (_rows(anchor=0.99) if tr == "missing" else _rows(f=tr, anchor=0.99))
    got = select_robust(perturbation, test_retest, threshold=0.75)
    assert ("f" in got) is expected
    assert "anchor" in got


def test_select_robust_threshold_order_and_empty_test_retest() -> None:
    perturbation = _rows(c=0.9, a=0.8, b=0.7)
    assert select_robust(perturbation, None) == ["c", "a"]  # input order
    assert select_robust(perturbation, [], 0.75) == ["c", "a"]  # no pairs: like None
    assert select_robust(perturbation, None, threshold=0.85) == ["c"]
    assert select_robust(perturbation, None, threshold=0.5) == ["c", "a", "b"]
    assert select_robust([{"feature": "x", "ci_low": None}], None) == []


# ---------------------------------------------------------------------------------------- prune_correlated
def _values(n: int = 50, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=n)
    cols = {
        "a": a,
        "a_copy": a.copy(),  # identical
        "a_monotone": np.exp(a),  # Spearman 1
        "a_neg": -a**3,  # Spearman -1
        "u1": rng.normal(size=n),
        "u2": rng.normal(size=n),
    }
    names = list(cols)
    return np.column_stack([cols[k] for k in names]), names


def test_prune_keeps_higher_priority_of_identical_pair() -> None:
    values, names = _values()
    kept, dropped = prune_correlated(values, names, ["a", "a_copy", "u1"], priority={"a": 0.8, "a_copy": 0.9, "u1": 0.85})
    assert kept == ["a_copy", "u1"]
    assert dropped == [{"feature": "a", "correlated_with": "a_copy", "rho": pytest.approx(1.0)}]
    kept2, _ = prune_correlated(values, names, ["a", "a_copy", "u1"], priority={"a": 0.95, "a_copy": 0.9, "u1": 0.85})
    assert kept2 == ["a", "u1"]


def test_prune_monotone_and_negative_duplicates_uncorrelated_kept() -> None:
    values, names = _values()
    kept, dropped = prune_correlated(values, names, names)
    # no priority: by name; "a" comes first and absorbs its monotone transforms
    assert kept == ["a", "u1", "u2"]
    by_feature = {d["feature"]: d for d in dropped}
    assert set(by_feature) == {"a_copy", "a_monotone", "a_neg"}
    assert by_feature["a_neg"]["rho"] == pytest.approx(-1.0)
    assert all(d["correlated_with"] == "a" for d in dropped)


def test_prune_deterministic_whatever_the_order() -> None:
    values, names = _values(seed=3)
    prio = {"a": 0.8, "a_copy": 0.8, "a_monotone": 0.7, "a_neg": 0.9, "u1": 0.8, "u2": float("nan")}
    first = prune_correlated(values, names, names, priority=prio)
    perm = [4, 2, 0, 5, 1, 3]
    again = prune_correlated(values[:, perm], [names[i] for i in perm], list(reversed(names)), priority=prio)
    assert first == again
    assert first[0] == ["a_neg", "u1", "u2"]  # a_neg highest priority; NaN priority (u2) last


def test_prune_threshold_and_nan_handling() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.5, size=200)  # rho ~ 0.9
    values = np.column_stack([a, b])
    assert prune_correlated(values, ["a", "b"], ["a", "b"], rho=0.95)[0] == ["a", "b"]
    assert prune_correlated(values, ["a", "b"], ["a", "b"], rho=0.85)[0] == ["a"]
    with_nan = np.column_stack([a, a.copy()])
    with_nan[:10, 1] = np.nan  # pairwise-complete: still identical on the rest
    kept, dropped = prune_correlated(with_nan, ["a", "b"], ["a", "b"])
    assert kept == ["a"] and dropped[0]["rho"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not among"):
        prune_correlated(values, ["a", "b"], ["c"])


def test_robust_feature_set_combines_both_steps() -> None:
    values, names = _values()
    pert = _rows(a=0.80, a_copy=0.90, a_monotone=0.95, a_neg=0.5, u1=0.76, u2=float("nan"))
    result = robust_feature_set(pert, values, names, test_retest=None)
    assert result["robust"] == ["a", "a_copy", "a_monotone", "u1"]
    assert result["kept"] == ["a_monotone", "u1"]
    assert {d["feature"] for d in result["dropped"]} == {"a", "a_copy"}
    assert result["test_retest_used"] is False
    tr = _rows(a=0.9, a_copy=0.9, a_monotone=0.5, u1=0.9)
    result_tr = robust_feature_set(pert, values, names, test_retest=tr)
    assert result_tr["robust"] == ["a", "a_copy", "u1"] and result_tr["kept"] == ["a_copy", "u1"]


# ---------------------------------------------------------------------------------------- pair_test_retest
def _lesion(lid: str, patient: str, series: str, centroid, roi: str = "GTV", study_uid: str | None = "1.2.3",
            study_date: str | None = "20200101", **extra) -> dict:
    return {"lesion_id": lid, "patient_key": patient, "series_key": series, "study_instance_uid": study_uid,
            "study_date": study_date, "centroid_mm": list(centroid), "roi_name": roi, "status": "ok", **extra}


def test_pairs_two_series_of_one_study_shifted_3mm() -> None:
    rows = [
        _lesion("t1", "P1", "S1_test", (10, 20, 30)),
        _lesion("t2", "P1", "S1_test", (60, 20, 30)),
        _lesion("r2", "P1", "S2_retest", (60, 23, 30)),
        _lesion("r1", "P1", "S2_retest", (13, 20, 30)),
    ]
    assert pair_test_retest(rows) == [("t1", "r1"), ("t2", "r2")]
    assert pair_test_retest(list(reversed(rows))) == [("t1", "r1"), ("t2", "r2")]  # deterministic


def test_pairs_refused_beyond_distance_across_patients_studies_and_within_series() -> None:
    rows = [
        _lesion("a", "P1", "S1", (0, 0, 0)),
        _lesion("b", "P1", "S2", (25, 0, 0)),  # too far
        _lesion("c", "P2", "S3", (1, 0, 0)),  # other patient
        _lesion("d", "P1", "S1", (-1, 0, 0)),  # same series as a
        _lesion("e", "P1", "S4", (2, 0, 0), study_uid="9.9.9"),  # other study
    ]
    assert pair_test_retest(rows, max_distance_mm=20.0) == []
    assert pair_test_retest(rows, max_distance_mm=30.0) == [("a", "b")]  # a (25 mm) is nearer than d (26 mm)


def test_pairing_prefers_same_roi_and_nearest_each_lesion_once() -> None:
    rows = [
        _lesion("t_gtv", "P1", "S1", (0, 0, 0), roi="GTV"),
        _lesion("r_node", "P1", "S2", (1, 0, 0), roi="node"),
        _lesion("r_gtv", "P1", "S2", (5, 0, 0), roi="gtv"),
        _lesion("r_far", "P1", "S3", (2, 0, 0), roi="GTV"),
    ]
    pairs = pair_test_retest(rows)
    assert pairs == [("t_gtv", "r_far")]  # same ROI first, then the nearest; each lesion once
    # without the competing same-ROI candidate, the nearest same-ROI one wins over the nearer other ROI
    assert pair_test_retest(rows[:3]) == [("t_gtv", "r_gtv")]


def test_pairing_falls_back_to_study_date_and_skips_unusable_rows() -> None:
    rows = [
        _lesion("a", "P1", "S1", (0, 0, 0), study_uid=None),
        _lesion("b", "P1", "S2", (3, 0, 0), study_uid=None),
        _lesion("c", "P1", "S3", (1, 0, 0), study_uid=None, study_date="20200202"),
        _lesion("d", "P2", "S4", (0, 0, 0), study_uid=None, study_date=None),
        _lesion("e", "P2", "S5", (0, 0, 0), study_uid=None, study_date=None),
        _lesion("f", "P3", "S6", (0, 0, 0)),
        {**_lesion("g", "P3", "S7", (0, 0, 0)), "centroid_mm": None},
        _lesion("h", "P3", "S8", (0, 1, 0), status="empty"),
    ]
    assert pair_test_retest(rows) == [("a", "b")]
