"""Reproducibility: the steps behind ``feature_robustness`` and ``robust_feature_set``, and the queries of
the feature-table checks (Great Expectations suite, flagged series, sample size, collapsed set).

Perturbed extractions go through exactly the extraction code of ``radiomics_features`` (the same
``ExtractionJob`` loaders, wrapped by :class:`~imaging_assets.features.perturb.PerturbedLoader`) and are
cached per (lesion, perturbation, spec, params, source fingerprint) in ``perturbation_features``, so a
rerun on unchanged data extracts nothing. ICCs are recomputed from the cache each time (cheap).

Tables (declared in :mod:`imaging_assets.store.schema`): ``perturbation_features``, ``perturbation_errors``,
``feature_robustness`` (ICC and CI per feature and analysis), ``test_retest_pairs``, ``robust_feature_sets``,
``robust_feature_set_history`` (a row each time the active set changes), ``robust_feature_pruned``
(near-duplicates dropped from the current set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, table_rows, transaction

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]



@dataclass(frozen=True)
class RobustnessResult:
    """One robustness run: sample, extractions, ICC inputs, and the ``feature_robustness`` rows."""

    sampled: int
    eligible: int
    extracted: int
    failed: int
    reused_lesions: int
    known_failures: int
    lesions_in_icc: int
    perturbations: int
    pairs: int
    features: int
    robust_perturbation: int
    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    elapsed_s: float


@dataclass(frozen=True)
class RobustSetResult:
    """The robust set after a selection: version, whether it changed, features, pruned pairs, history."""

    version: str
    previous_version: str | None
    changed: bool
    features: list[str]
    n_candidates: int
    pruned: list[dict[str, Any]]
    history: list[dict[str, Any]]
    elapsed_s: float


@dataclass(frozen=True)
class ExpectationReport:
    """The Great Expectations suite on the per-lesion feature table (``radiomics_expectations`` check)."""

    outcomes: list[Any]
    lesions_validated: int
    lesions_with_provenance: int
    expected_features: int
    robust_checked: int | None

    @property
    def failed(self) -> list[Any]:
        """Expectations that failed."""
        return [o for o in self.outcomes if not o.success]

    @property
    def passed(self) -> bool:
        """Every expectation met and every lesion with provenance validated."""
        return not self.failed and self.lesions_validated == self.lesions_with_provenance


@dataclass(frozen=True)
class SampleReport:
    """Lesions and raters behind the perturbation ICC, and test-retest pairs (``robustness_sample_size``)."""

    lesions: int
    perturbations: int
    test_retest_pairs: int


def ensure_robustness_schema(con: Any) -> None:
    """Create the robustness tables when missing (they are part of the one warehouse schema)."""
    ensure_schema(con)


def spec_hash(spec: Any) -> str:
    """Hash of a PerturbationSpec (part of the cache key)."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_matrix(con: Any, lesion_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Wide per-lesion feature matrix from ``radiomics_features`` (index lesion_id, pyradiomics names)."""
    df = con.execute(
        "SELECT lesion_id, image_type || '_' || feature_class || '_' || feature AS name, value "
        "FROM radiomics_features"
    ).fetchdf()
    if lesion_ids is not None:
        df = df[df["lesion_id"].isin(set(lesion_ids))]
    if df.empty:
        return pd.DataFrame()
    return df.pivot(index="lesion_id", columns="name", values="value").sort_index().sort_index(axis=1)


def _split(name: str) -> tuple[str, str]:
    parts = name.split("_", 2)
    return parts[0], parts[1] if len(parts) > 1 else ""


def _icc_rows(x: np.ndarray, names: list[str], analysis: str) -> list[dict[str, Any]]:
    from imaging_assets.features.icc import icc

    values, lo, hi = icc(x, kind="ICC3")
    rows = []
    for i, name in enumerate(names):
        image_type, feature_class = _split(name)
        rows.append({"feature": name, "image_type": image_type, "feature_class": feature_class,
                     "analysis": analysis, "icc": _f(values[i]), "ci_low": _f(lo[i]), "ci_high": _f(hi[i]),
                     "n_targets": int(x.shape[0]), "k_raters": int(x.shape[1])})
    return rows


def _f(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def compute_robustness(
    wh: Warehouse,
    spec: Any = None,
    max_lesions: int = 48,
    params_override: str | Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> RobustnessResult:
    """Perturbation ICC(3,1) on a stratified sample of lesions, test-retest ICC(3,1) on paired lesions;
    ``robust_perturbation`` counts the features with a lower bound >= 0.75."""
    from imaging_assets.features.extract import extract_many
    from imaging_assets.features.perturb import (
        PerturbationSpec,
        perturbation_jobs,
        split_perturbation_id,
        stratified_sample,
    )
    from imaging_assets.features.pipeline import extraction_jobs
    from imaging_assets.features.robust import pair_test_retest

    t0 = time.perf_counter()
    spec = spec or PerturbationSpec()
    shash = spec_hash(spec)
    with wh.connect() as con:
        ensure_robustness_schema(con)
        lesions = table_rows(con, "lesions")
        series = table_rows(con, "imaging_series")
        segs = table_rows(con, "segmentations")
        with_features = {r[0] for r in con.execute("SELECT lesion_id FROM radiomics_provenance").fetchall()}
        cached = con.execute(
            "SELECT lesion_id, perturbation, params_hash, source_fingerprint FROM perturbation_features "
            "WHERE spec_hash = ? GROUP BY ALL", [shash]).fetchall()
        failed_before = {(r[0], r[1]) for r in con.execute(
            "SELECT lesion_id, perturbation FROM perturbation_errors WHERE spec_hash = ?", [shash]).fetchall()}
    eligible = [r for r in lesions if r["extractable"] and r["lesion_id"] in with_features]
    sample = stratified_sample(eligible, max_lesions, seed=spec.seed)
    fingerprints = {r["lesion_id"]: r["source_fingerprint"] for r in sample}
    base = extraction_jobs(sample, series, segs, params_override)
    phash_of = {job.lesion_id: phash for job, phash in base}
    have: dict[str, set[int]] = {}
    for lid, k, ph, fp in cached:
        if ph == phash_of.get(lid) and fp == fingerprints.get(lid):
            have.setdefault(lid, set()).add(int(k))
    todo_base = [job for job, _ in base if len(have.get(job.lesion_id, set())) < spec.n_perturbations]
    jobs = []
    for j in perturbation_jobs(todo_base, spec):
        lid, k = split_perturbation_id(j.lesion_id)
        if k not in have.get(lid, set()):
            jobs.append(j)
    reused = sum(1 for job, _ in base if job not in todo_base)
    n_ok = n_err = 0
    buffer: list[Any] = []

    def flush() -> None:
        if not buffer:
            return
        feats, errs = [], []
        keys = [split_perturbation_id(o.lesion_id) for o in buffer]
        for o, (lid, k) in zip(buffer, keys):
            key = dict(lesion_id=lid, perturbation=int(k), spec_hash=shash, params_hash=phash_of[lid],
                       source_fingerprint=fingerprints[lid])
            if o.ok:
                feats.extend({**key, "feature": n, "value": float(v)} for n, v in o.features.items())
            else:
                errs.append({**key, "message": o.error})
        with wh.connect() as con:
            with transaction(con):
                ids = pa.table({"lesion_id": [lid for lid, _ in keys], "perturbation": [int(k) for _, k in keys]})
                con.register("_done", ids)
                for t in ("perturbation_features", "perturbation_errors"):
                    con.execute(f"DELETE FROM {t} WHERE EXISTS (SELECT 1 FROM _done d WHERE "
                                f"d.lesion_id = {t}.lesion_id AND d.perturbation = {t}.perturbation)")
                con.unregister("_done")
                if feats:
                    con.register("_f", pa.Table.from_pylist(feats))
                    con.execute("INSERT INTO perturbation_features SELECT lesion_id, perturbation, spec_hash, "
                                "params_hash, source_fingerprint, feature, value FROM _f")
                    con.unregister("_f")
                if errs:
                    con.register("_e", pa.Table.from_pylist(errs))
                    con.execute("INSERT INTO perturbation_errors SELECT lesion_id, perturbation, spec_hash, "
                                "params_hash, source_fingerprint, message FROM _e")
                    con.unregister("_e")
        buffer.clear()

    for outcome in extract_many(jobs, workers=workers, progress=progress):
        buffer.append(outcome)
        n_ok += outcome.ok
        n_err += not outcome.ok
        if len(buffer) >= 32:
            flush()
    flush()

    sample_ids = sorted(fingerprints)
    with wh.connect() as con:
        pf = con.execute(
            "SELECT lesion_id, perturbation, feature, value FROM perturbation_features WHERE spec_hash = ? "
            "AND list_contains(?, lesion_id)", [shash, sample_ids]).fetchdf()
        complete = pf.groupby("lesion_id")["perturbation"].nunique()
        complete_ids = sorted(complete[complete == spec.n_perturbations].index)
        pairs = pair_test_retest(eligible)
        wide = feature_matrix(con)
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    if complete_ids:
        pf = pf[pf["lesion_id"].isin(complete_ids)]
        cube = pf.pivot_table(index=["lesion_id", "perturbation"], columns="feature", values="value",
                              aggfunc="first").sort_index().sort_index(axis=1)
        names = list(cube.columns)
        x = cube.to_numpy(dtype=float).reshape(len(complete_ids), spec.n_perturbations, len(names))
        rows.extend(_icc_rows(x, names, "perturbation"))
    pair_rows = []
    if pairs and not wide.empty:
        a = [p[0] for p in pairs if p[0] in wide.index and p[1] in wide.index]
        b = [p[1] for p in pairs if p[0] in wide.index and p[1] in wide.index]
        if len(a) >= 2:
            cols = list(wide.columns)
            x = np.stack([wide.loc[a, cols].to_numpy(float), wide.loc[b, cols].to_numpy(float)], axis=1)
            rows.extend(_icc_rows(x, cols, "test_retest"))
        centroid = {r["lesion_id"]: r.get("centroid_mm") for r in eligible}
        for la, lb in pairs:
            ca, cb = centroid.get(la), centroid.get(lb)
            dist = float(np.linalg.norm(np.subtract(ca, cb))) if ca and cb else None
            pair_rows.append({"lesion_a": la, "lesion_b": lb, "distance_mm": dist})
    with wh.connect() as con:
        with transaction(con):
            con.execute("DELETE FROM feature_robustness")
            if rows:
                con.register("_r", pa.Table.from_pylist(rows))
                con.execute("INSERT INTO feature_robustness SELECT feature, image_type, feature_class, analysis, "
                            "icc, ci_low, ci_high, n_targets, k_raters, (now() AT TIME ZONE 'UTC') FROM _r")
                con.unregister("_r")
            con.execute("DELETE FROM test_retest_pairs")
            if pair_rows:
                con.register("_p", pa.Table.from_pylist(pair_rows, schema=pa.schema(
                    [("lesion_a", pa.string()), ("lesion_b", pa.string()), ("distance_mm", pa.float64())])))
                con.execute("INSERT INTO test_retest_pairs SELECT * FROM _p")
                con.unregister("_p")
    perturb_rows = [r for r in rows if r["analysis"] == "perturbation"]
    return RobustnessResult(
        sampled=len(sample),
        eligible=len(eligible),
        extracted=n_ok,
        failed=n_err,
        reused_lesions=reused,
        known_failures=len(failed_before),
        lesions_in_icc=len(complete_ids),
        perturbations=spec.n_perturbations,
        pairs=len(pairs),
        features=len(names),
        robust_perturbation=sum(1 for r in perturb_rows if (r["ci_low"] or -1) >= 0.75),
        spec=dataclasses.asdict(spec),
        rows=rows,
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def feature_class_totals(wh: Warehouse) -> dict[str, int]:
    """Features per feature class in ``feature_robustness`` (what the robust-set plot compares against)."""
    with wh.connect(read_only=True) as con:
        return dict(con.execute("SELECT feature_class, count(DISTINCT feature) FROM feature_robustness "
                                "GROUP BY 1 ORDER BY 1").fetchall())


def select_robust_set(wh: Warehouse, threshold: float = 0.75, rho: float = 0.95) -> RobustSetResult:
    """Robust features (ICC lower bound >= threshold in perturbation and, where present, test-retest),
    pruned of near-duplicates (|Spearman| >= rho); a new version is recorded when the set changes."""
    from imaging_assets.features.robust import prune_correlated, select_robust

    t0 = time.perf_counter()
    with wh.connect() as con:
        ensure_robustness_schema(con)
        rob = con.execute("SELECT feature, analysis, icc, ci_low, ci_high FROM feature_robustness").fetchdf()
        wide = feature_matrix(con)
        prev = con.execute("SELECT version FROM robust_feature_set_history ORDER BY activated_at DESC LIMIT 1").fetchone()
    pert = rob[rob["analysis"] == "perturbation"].to_dict("records")
    trt = rob[rob["analysis"] == "test_retest"].to_dict("records")
    candidates = select_robust(pert, trt or None, threshold=threshold)
    priority = {r["feature"]: r["ci_low"] for r in pert if r["ci_low"] is not None}
    cols = [c for c in candidates if c in wide.columns]
    if cols and len(wide) >= 3:
        kept, dropped = prune_correlated(wide[cols].to_numpy(float), cols, cols, rho=rho, priority=priority)
    else:
        kept, dropped = cols, []
    kept = sorted(kept)
    version = hashlib.sha1(json.dumps([kept, threshold, rho]).encode()).hexdigest()[:12]
    previous = prev[0] if prev else None
    changed = version != previous
    with wh.connect() as con:
        with transaction(con):
            if not con.execute("SELECT count(*) FROM robust_feature_sets WHERE version = ?", [version]).fetchone()[0]:
                con.execute("INSERT INTO robust_feature_sets VALUES (?, ?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                            [version, kept, len(kept), threshold, rho, len(candidates)])
            if changed:
                con.execute("INSERT INTO robust_feature_set_history VALUES (?, (now() AT TIME ZONE 'UTC'))", [version])
            con.execute("DELETE FROM robust_feature_pruned")
            for d in dropped:
                con.execute("INSERT INTO robust_feature_pruned VALUES (?, ?, ?)",
                            [d["feature"], d["correlated_with"], float(d["rho"])])
        history = con.execute("SELECT version, activated_at FROM robust_feature_set_history "
                              "ORDER BY activated_at DESC LIMIT 10").fetchall()
    return RobustSetResult(
        version=version,
        previous_version=previous,
        changed=changed,
        features=kept,
        n_candidates=len(candidates),
        pruned=dropped,
        history=[{"version": v, "activated_at": str(t)} for v, t in history],
        elapsed_s=round(time.perf_counter() - t0, 3),
    )


def current_robust_set(con: Any) -> tuple[str | None, list[str]]:
    """(version, features) of the active robust feature set, or (None, []) before the first one."""
    if not _has_table(con, "robust_feature_set_history"):
        return None, []
    row = con.execute(
        "SELECT s.version, s.features FROM robust_feature_set_history h JOIN robust_feature_sets s USING (version) "
        "ORDER BY h.activated_at DESC LIMIT 1").fetchone()
    return (row[0], list(row[1])) if row else (None, [])


def _has_table(con: Any, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def active_robust_set(wh: Warehouse) -> tuple[str | None, list[str]]:
    """(version, features) of the active robust feature set (read-only connection)."""
    with wh.connect(read_only=True) as con:
        return current_robust_set(con)


def validate_feature_table(wh: Warehouse) -> ExpectationReport | None:
    """Run the Great Expectations suite of :mod:`imaging_assets.features.quality` on the per-lesion feature
    table (None when there are no features yet)."""
    from imaging_assets.features.quality import validate_features

    with wh.connect(read_only=True) as con:
        wide = feature_matrix(con)
        counts = con.execute("SELECT lesion_id, count(*) FROM radiomics_features GROUP BY 1").fetchall()
        n_extractable = con.execute(
            "SELECT count(*) FROM lesions l JOIN radiomics_provenance p USING (lesion_id)").fetchone()[0]
        _, robust = current_robust_set(con)
    if wide.empty:
        return None
    wide = wide.reset_index()
    per = dict(counts)
    wide["n_features"] = wide["lesion_id"].map(per)
    expected = max(per.values())
    outcomes = validate_features(wide, robust=robust or None, expected_features=expected)
    return ExpectationReport(outcomes=list(outcomes), lesions_validated=len(wide),
                             lesions_with_provenance=int(n_extractable), expected_features=int(expected),
                             robust_checked=len(robust) if robust else None)


def features_of_flagged_series(wh: Warehouse) -> tuple[list[dict[str, Any]], int]:
    """Lesions with features whose series failed geometry QC (must be none), and the flagged series count."""
    with wh.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT p.lesion_id, s.series_instance_uid, s.flags FROM radiomics_provenance p "
            "JOIN lesions l USING (lesion_id) JOIN imaging_series s USING (series_key) WHERE NOT s.usable "
            "ORDER BY 1").fetchall()
        flagged = con.execute("SELECT count(*) FROM imaging_series WHERE NOT usable").fetchone()[0]
    return [{"lesion_id": a, "series": b, "flags": c} for a, b, c in rows], int(flagged)


def sample_report(wh: Warehouse) -> SampleReport:
    """Targets and raters of the perturbation ICC, and the test-retest pairs behind its ICC."""
    with wh.connect(read_only=True) as con:
        row = con.execute("SELECT max(n_targets), max(k_raters) FROM feature_robustness "
                          "WHERE analysis = 'perturbation'").fetchone()
        pairs = con.execute("SELECT max(n_targets) FROM feature_robustness WHERE analysis = 'test_retest'").fetchone()[0]
    return SampleReport(int(row[0] or 0), int(row[1] or 0), int(pairs or 0))
