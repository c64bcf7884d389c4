"""Robust feature selection: ICC thresholds, redundancy pruning, test-retest pairing (issue 5).

The robust feature set is built in two steps:

1. :func:`select_robust` -- a feature is *robust* when the lower bound of its ICC 95 % CI is at least the
   threshold (0.75: "good" reliability, Koo & Li 2016) in the perturbation analysis **and**, where the
   cohort has test-retest pairs, in the test-retest analysis. Requiring the *lower bound* (not the point
   estimate) means small cohorts cannot pass by luck.
2. :func:`prune_correlated` -- among robust features, near-duplicates (``|Spearman rho| >= 0.95`` across
   lesions) are pruned to one: candidates are visited in descending order of priority (default: their
   perturbation ICC lower bound), ties by name, and a feature is kept unless it correlates that strongly
   with a feature already kept. The result therefore depends only on the data, never on input order.

:func:`robust_feature_set` runs both; :func:`pair_test_retest` finds the test-retest pairs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

logger = logging.getLogger(__name__)


def _ci_low_by_feature(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        v = r.get("ci_low")
        try:
            fv = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            fv = math.nan
        out[str(r["feature"])] = fv
    return out


def select_robust(
    perturbation: Sequence[Mapping[str, Any]],
    test_retest: Sequence[Mapping[str, Any]] | None = None,
    threshold: float = 0.75,
) -> list[str]:
    """Features whose ICC lower 95 % bound reaches ``threshold`` in every analysis given.

    Parameters
    ----------
    perturbation : sequence of dict
        ICC rows ``{feature, ci_low, ...}`` of the perturbation analysis (:func:`~imaging_assets.features.icc.icc_table`).
    test_retest : sequence of dict, optional
        ICC rows of the test-retest analysis. ``None`` or empty (the cohort has no pairs): the
        perturbation analysis alone decides. When given, a feature must pass there too; a feature
        missing from these rows is not robust (it could not be confirmed).
    threshold : float
        Minimum lower CI bound (inclusive).

    Returns
    -------
    list of str
        Robust features, in the order of ``perturbation``. NaN bounds (degenerate features) never pass.
    """
    pert = _ci_low_by_feature(perturbation)
    tr = _ci_low_by_feature(test_retest) if test_retest else None
    out = []
    for name, low in pert.items():
        if not (low >= threshold):  # NaN fails
            continue
        if tr is not None and not (tr.get(name, math.nan) >= threshold):
            continue
        out.append(name)
    return out


def _rank_columns(v: np.ndarray) -> np.ndarray:
    return stats.rankdata(v, axis=0) if v.size else v


def _spearman_one_to_many(c: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Spearman rho of column ``c`` (n,) with each column of ``kept`` (n, m), pairwise-complete."""
    rhos = np.full(kept.shape[1], np.nan)
    c_ok = np.isfinite(c)
    if c_ok.all() and np.isfinite(kept).all():
        rc = stats.rankdata(c)
        rk = _rank_columns(kept)
        rc = rc - rc.mean()
        rk = rk - rk.mean(axis=0)
        denom = np.sqrt((rc**2).sum() * (rk**2).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            rhos = (rc @ rk) / denom
        return rhos
    for j in range(kept.shape[1]):
        ok = c_ok & np.isfinite(kept[:, j])
        if ok.sum() < 3:
            continue
        a, b = stats.rankdata(c[ok]), stats.rankdata(kept[ok, j])
        a, b = a - a.mean(), b - b.mean()
        denom = math.sqrt(float((a**2).sum() * (b**2).sum()))
        if denom > 0:
            rhos[j] = float(a @ b) / denom
    return rhos


def prune_correlated(
    values: np.ndarray,
    names: Sequence[str],
    candidates: Sequence[str],
    rho: float = 0.95,
    priority: Mapping[str, float] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep one feature of every group of near-duplicates.

    Rule (deterministic): candidates are visited in descending ``priority`` (missing or NaN priority
    last), ties broken by name; a candidate is kept unless its ``|Spearman rho|`` with a feature already
    kept is ``>= rho``, in which case it is dropped in favour of the kept feature it correlates with most
    strongly. Spearman is computed across lesions on the pairwise-complete values (NaNs left out per
    pair; fewer than 3 common lesions or a constant feature: no correlation, kept).

    Parameters
    ----------
    values : numpy.ndarray
        ``(n_lesions, n_features)`` feature values (one value per lesion, e.g. the unperturbed ones).
    names : sequence of str
        Column names of ``values``.
    candidates : sequence of str
        Features to prune (e.g. :func:`select_robust`'s output); each must be in ``names``.
    rho : float
        Absolute Spearman correlation at which two features count as duplicates.
    priority : mapping of str to float, optional
        Higher first (e.g. the perturbation ICC lower bound); default all equal (then by name).

    Returns
    -------
    kept, dropped
        The kept features (in visiting order) and one row ``{feature, correlated_with, rho}`` per dropped
        feature (``rho`` signed).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"prune_correlated: values of shape {values.shape} do not match {len(names)} names")
    col = {n: i for i, n in enumerate(names)}
    missing = [c for c in candidates if c not in col]
    if missing:
        raise ValueError(f"prune_correlated: candidates not among the names: {missing[:5]}")
    prio = dict(priority or {})

    def order(name: str) -> tuple[int, float, str]:
        p = prio.get(name)
        if p is None or (isinstance(p, float) and math.isnan(p)):
            return (1, 0.0, name)
        return (0, -float(p), name)

    kept: list[str] = []
    dropped: list[dict[str, Any]] = []
    for name in sorted(dict.fromkeys(candidates), key=order):
        if kept:
            r = _spearman_one_to_many(values[:, col[name]], values[:, [col[k] for k in kept]])
            absr = np.where(np.isfinite(r), np.abs(r), -1.0)
            j = int(np.argmax(absr))
            if absr[j] >= rho:
                dropped.append({"feature": name, "correlated_with": kept[j], "rho": float(r[j])})
                continue
        kept.append(name)
    return kept, dropped


def robust_feature_set(
    perturbation: Sequence[Mapping[str, Any]],
    values: np.ndarray,
    names: Sequence[str],
    test_retest: Sequence[Mapping[str, Any]] | None = None,
    threshold: float = 0.75,
    rho: float = 0.95,
) -> dict[str, Any]:
    """:func:`select_robust` then :func:`prune_correlated` (priority: perturbation ICC lower bound).

    Returns
    -------
    dict
        ``{"robust": [...], "kept": [...], "dropped": [...], "threshold", "rho", "test_retest_used"}``.
    """
    robust = select_robust(perturbation, test_retest, threshold)
    prio = _ci_low_by_feature(perturbation)
    usable = [f for f in robust if f in set(names)]
    if len(usable) < len(robust):
        logger.warning("robust_feature_set: %d robust features have no values to prune on; left out",
                       len(robust) - len(usable))
    kept, dropped = prune_correlated(values, names, usable, rho=rho, priority=prio)
    return {"robust": robust, "kept": kept, "dropped": dropped, "threshold": threshold, "rho": rho,
            "test_retest_used": bool(test_retest)}


def _study_key(row: Mapping[str, Any]) -> str | None:
    uid = row.get("study_instance_uid")
    if uid:
        return f"uid:{uid}"
    date = row.get("study_date")
    return f"date:{date}" if date else None


def _roi(row: Mapping[str, Any]) -> str:
    return str(row.get("roi_name") or "").strip().lower()


def pair_test_retest(lesions: Sequence[Mapping[str, Any]], max_distance_mm: float = 20.0) -> list[tuple[str, str]]:
    """Test-retest pairs of lesions: the same lesion seen in two series of one study.

    Rule: candidate pairs are two lesions with the same ``patient_key`` and study (``study_instance_uid``
    when present, else ``study_date``; a lesion with neither is never paired), the same ``modality`` and
    feature ``space`` where the rows carry them (a CT and the MR of one patient share a frame of reference
    but are not a re-scan: an ICC over CT-vs-MR values is meaningless), different ``series_key``, both with
    a ``centroid_mm`` and centroids at most ``max_distance_mm`` apart (the same lesion, overlapping extent). Candidates are taken
    greedily in the order (same harmonised ``roi_name`` first, then distance, then ids), skipping any
    whose lesion is already paired, so each lesion is in at most one pair and the nearest matches win.
    Lesions whose ``status`` is present and not ``"ok"`` are ignored.

    Returns
    -------
    list of (str, str)
        ``(test_id, retest_id)`` with the test lesion from the series that sorts first by
        ``(series_key, lesion_id)``; the list sorted.
    """
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for r in lesions:
        if r.get("status") not in (None, "ok"):
            continue
        study = _study_key(r)
        centroid = r.get("centroid_mm")
        if study is None or r.get("patient_key") is None or centroid is None or len(centroid) != 3:
            continue
        groups.setdefault((str(r["patient_key"]), study, str(r.get("modality") or "").upper(),
                           str(r.get("space") or "")), []).append(r)
    candidates = []
    for members in groups.values():
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                a, b = members[i], members[j]
                if a.get("series_key") == b.get("series_key"):
                    continue
                dist = float(np.linalg.norm(np.asarray(a["centroid_mm"], float) - np.asarray(b["centroid_mm"], float)))
                if not dist <= max_distance_mm:
                    continue
                first, second = sorted((a, b), key=lambda r: (str(r.get("series_key")), str(r["lesion_id"])))
                candidates.append((_roi(a) != _roi(b), dist, str(first["lesion_id"]), str(second["lesion_id"])))
    candidates.sort()
    used: set[str] = set()
    pairs = []
    for _, _, a_id, b_id in candidates:
        if a_id in used or b_id in used:
            continue
        used.update((a_id, b_id))
        pairs.append((a_id, b_id))
    return sorted(pairs)
