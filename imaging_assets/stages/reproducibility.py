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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, insert_rows, table_rows

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
    #: per feature space: space, eligible, sampled, incomplete (left out), lesions_in_icc, pairs, robust
    spaces: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RobustSetResult:
    """One space's robust set after a selection: version, whether it changed, features, pruned, history."""

    space: str
    version: str
    previous_version: str | None
    changed: bool
    features: list[str]
    n_candidates: int
    pruned: list[dict[str, Any]]
    history: list[dict[str, Any]]
    elapsed_s: float
    #: fewer than MIN_PRUNE_LESIONS lesions: not pruned, capped at PROVISIONAL_MAX_FEATURES (a WARN check)
    provisional: bool = False
    #: lesions of the space with every candidate feature (the pruning's sample)
    lesions: int = 0


@dataclass(frozen=True)
class RobustSelection:
    """The robust sets of every feature space after one selection."""

    by_space: dict[str, RobustSetResult]
    elapsed_s: float

    @property
    def changed(self) -> bool:
        """Whether any space got a new version."""
        return any(r.changed for r in self.by_space.values())

    def single(self) -> RobustSetResult:
        """The one space's result (a single-modality archive); raises when there are several or none."""
        if len(self.by_space) != 1:
            raise ValueError(f"{len(self.by_space)} feature spaces: {sorted(self.by_space)}; pick one by name")
        return next(iter(self.by_space.values()))


@dataclass(frozen=True)
class ExpectationReport:
    """The Great Expectations suite on the per-lesion feature table (``radiomics_expectations`` check), run
    per feature space: each space's lesions against that space's features and robust set. Lesions that
    lack image types pyradiomics skipped for them (recorded in ``missing_image_types``) are listed as
    incomplete, not failed."""

    outcomes: list[Any]
    lesions_validated: int
    lesions_with_provenance: int
    expected_features: int
    robust_checked: int | None
    #: per space: space, lesions, expected_features, incomplete, robust_checked, failed
    spaces: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[dict[str, Any]] = field(default_factory=list)

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
    """Lesions and raters behind the perturbation ICC, and test-retest pairs (``robustness_sample_size``):
    the smallest over the feature spaces, and each space's figures."""

    lesions: int
    perturbations: int
    test_retest_pairs: int
    spaces: list[dict[str, Any]] = field(default_factory=list)


def ensure_robustness_schema(con: Any) -> None:
    """Create the robustness tables when missing (they are part of the one warehouse schema)."""
    ensure_schema(con)


def spec_hash(spec: Any) -> str:
    """Hash of a PerturbationSpec (part of the cache key)."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str).encode()).hexdigest()[:16]


def feature_matrix(con: Any, lesion_ids: Sequence[str] | None = None, space: str | None = None) -> pd.DataFrame:
    """Wide per-lesion feature matrix from ``radiomics_features`` (index lesion_id, pyradiomics names);
    with ``space``, only that feature space's lesions (and so only its features)."""
    if space is None:
        df = con.execute(
            "SELECT lesion_id, image_type || '_' || feature_class || '_' || feature AS name, value "
            "FROM radiomics_features").fetchdf()
    else:
        df = con.execute(
            "SELECT f.lesion_id, f.image_type || '_' || f.feature_class || '_' || f.feature AS name, f.value "
            "FROM radiomics_features f JOIN radiomics_provenance p USING (lesion_id) WHERE p.space = ?",
            [space]).fetchdf()
    if lesion_ids is not None:
        df = df[df["lesion_id"].isin(set(lesion_ids))]
    if df.empty:
        return pd.DataFrame()
    return df.pivot(index="lesion_id", columns="name", values="value").sort_index().sort_index(axis=1)


def lesion_spaces(con: Any) -> dict[str, dict[str, Any]]:
    """``lesion_id -> {space, missing_image_types}`` of every lesion with features."""
    return {r[0]: {"space": r[1], "missing_image_types": list(r[2]) if r[2] else []} for r in con.execute(
        "SELECT lesion_id, space, missing_image_types FROM radiomics_provenance").fetchall()}


def _split(name: str) -> tuple[str, str]:
    parts = name.split("_", 2)
    return parts[0], parts[1] if len(parts) > 1 else ""


def _icc_rows(x: np.ndarray, names: list[str], analysis: str, space: str | None) -> list[dict[str, Any]]:
    from imaging_assets.features.icc import icc

    values, lo, hi = icc(x, kind="ICC3")
    rows = []
    for i, name in enumerate(names):
        image_type, feature_class = _split(name)
        rows.append({"space": space, "feature": name, "image_type": image_type, "feature_class": feature_class,
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
    """Perturbation ICC(3,1) on a stratified sample of each feature space's lesions, test-retest ICC(3,1)
    on paired lesions of the same space; ``robust_perturbation`` counts the features with a lower bound
    >= 0.75.

    Per space: at most ``max_lesions`` lesions are sampled (stratified by modality and ROI, spread over
    volume), among the complete ones (a lesion lacking an image type pyradiomics skipped for it is left
    out: it would leave holes in the ICC matrix).
    """
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
        ensure_schema(con)
        lesions = table_rows(con, "lesions")
        series = table_rows(con, "imaging_series")
        segs = table_rows(con, "segmentations")
        spaces_of = lesion_spaces(con)
        cached = con.execute(
            "SELECT lesion_id, perturbation, params_hash, source_fingerprint FROM perturbation_features "
            "WHERE spec_hash = ? GROUP BY ALL", [shash]).fetchall()
        failed_before = {(r[0], r[1]) for r in con.execute(
            "SELECT lesion_id, perturbation FROM perturbation_errors WHERE spec_hash = ?", [shash]).fetchall()}
    eligible_all = [{**r, "space": spaces_of[r["lesion_id"]]["space"]} for r in lesions
                    if r["extractable"] and r["lesion_id"] in spaces_of]
    by_space: dict[str, list[dict[str, Any]]] = {}
    for r in eligible_all:
        by_space.setdefault(r["space"], []).append(r)
    sample: list[dict[str, Any]] = []
    space_rows: dict[str, dict[str, Any]] = {}
    for space, members in sorted(by_space.items()):
        complete = [r for r in members if not spaces_of[r["lesion_id"]]["missing_image_types"]]
        chosen = stratified_sample(complete, max_lesions, seed=spec.seed)
        sample.extend(chosen)
        space_rows[space] = {"space": space, "eligible": len(members), "incomplete": len(members) - len(complete),
                             "sampled": len(chosen), "lesions_in_icc": 0, "pairs": 0, "robust_perturbation": 0}
    fingerprints = {r["lesion_id"]: r["source_fingerprint"] for r in sample}
    base = extraction_jobs(sample, series, segs, params_override)
    phash_of = {job.lesion_id: settings.params_hash for job, settings in base}
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
        with wh.transaction() as con:
            ids = pa.table({"lesion_id": [lid for lid, _ in keys], "perturbation": [int(k) for _, k in keys]})
            con.register("_done", ids)
            for t in ("perturbation_features", "perturbation_errors"):
                con.execute(f"DELETE FROM {t} WHERE EXISTS (SELECT 1 FROM _done d WHERE "
                            f"d.lesion_id = {t}.lesion_id AND d.perturbation = {t}.perturbation)")
            con.unregister("_done")
            insert_rows(con, "perturbation_features", feats)
            insert_rows(con, "perturbation_errors", errs)
        buffer.clear()

    for outcome in extract_many(jobs, workers=workers, progress=progress):
        buffer.append(outcome)
        n_ok += outcome.ok
        n_err += not outcome.ok
        if len(buffer) >= 32:
            flush()
    flush()

    rows: list[dict[str, Any]] = []
    pair_rows: list[dict[str, Any]] = []
    all_pairs = 0
    names_seen: set[str] = set()
    with wh.connect() as con:
        for space, members in sorted(by_space.items()):
            sample_ids = sorted(r["lesion_id"] for r in sample if r["space"] == space)
            pf = con.execute(
                "SELECT lesion_id, perturbation, feature, value FROM perturbation_features WHERE spec_hash = ? "
                "AND list_contains(?, lesion_id)", [shash, sample_ids]).fetchdf()
            complete = pf.groupby("lesion_id")["perturbation"].nunique()
            complete_ids = sorted(complete[complete == spec.n_perturbations].index)
            space_rows[space]["lesions_in_icc"] = len(complete_ids)
            if complete_ids:
                pf = pf[pf["lesion_id"].isin(complete_ids)]
                cube = pf.pivot_table(index=["lesion_id", "perturbation"], columns="feature", values="value",
                                      aggfunc="first").sort_index().sort_index(axis=1)
                names = list(cube.columns)
                names_seen.update(names)
                x = cube.to_numpy(dtype=float).reshape(len(complete_ids), spec.n_perturbations, len(names))
                space_icc = _icc_rows(x, names, "perturbation", space)
                rows.extend(space_icc)
                space_rows[space]["robust_perturbation"] = sum(1 for r in space_icc if (r["ci_low"] or -1) >= 0.75)
            pairs = pair_test_retest(members)
            space_rows[space]["pairs"] = len(pairs)
            all_pairs += len(pairs)
            wide = feature_matrix(con, space=space)
            if pairs and not wide.empty:
                a = [p[0] for p in pairs if p[0] in wide.index and p[1] in wide.index]
                b = [p[1] for p in pairs if p[0] in wide.index and p[1] in wide.index]
                if len(a) >= 2:
                    cols = [c for c in wide.columns if wide.loc[a + b, c].notna().all()]
                    x = np.stack([wide.loc[a, cols].to_numpy(float), wide.loc[b, cols].to_numpy(float)], axis=1)
                    rows.extend(_icc_rows(x, cols, "test_retest", space))
                centroid = {r["lesion_id"]: r.get("centroid_mm") for r in members}
                for la, lb in pairs:
                    ca, cb = centroid.get(la), centroid.get(lb)
                    dist = float(np.linalg.norm(np.subtract(ca, cb))) if ca and cb else None
                    pair_rows.append({"space": space, "lesion_a": la, "lesion_b": lb, "distance_mm": dist})
    with wh.transaction() as con:
        con.execute("DELETE FROM feature_robustness")
        insert_rows(con, "feature_robustness", rows, {"computed_at": "(now() AT TIME ZONE 'UTC')"})
        con.execute("DELETE FROM test_retest_pairs")
        insert_rows(con, "test_retest_pairs", pair_rows)
    perturb_rows = [r for r in rows if r["analysis"] == "perturbation"]
    return RobustnessResult(
        sampled=len(sample),
        eligible=len(eligible_all),
        extracted=n_ok,
        failed=n_err,
        reused_lesions=reused,
        known_failures=len(failed_before),
        lesions_in_icc=sum(r["lesions_in_icc"] for r in space_rows.values()),
        perturbations=spec.n_perturbations,
        pairs=all_pairs,
        features=len(names_seen),
        robust_perturbation=sum(1 for r in perturb_rows if (r["ci_low"] or -1) >= 0.75),
        spec=dataclasses.asdict(spec),
        rows=rows,
        elapsed_s=round(time.perf_counter() - t0, 3),
        spaces=list(space_rows.values()),
    )


def feature_class_totals(wh: Warehouse) -> dict[str, int]:
    """Features per feature class in ``feature_robustness`` (what the robust-set plot compares against)."""
    with wh.connect(read_only=True) as con:
        return dict(con.execute("SELECT feature_class, count(DISTINCT feature) FROM feature_robustness "
                                "GROUP BY 1 ORDER BY 1").fetchall())


#: A robust-set candidate must be present for at least this share of its space's lesions: a filter that
#: pyradiomics skips for most lesions (LoG on thin series) would otherwise leave most of them without a
#: vector; a lesion lacking a chosen feature is left out of the vectors with the reason.
MIN_FEATURE_COVERAGE = 0.9
#: Fewer lesions than this in a space, and the near-duplicate pruning cannot run (a Spearman correlation
#: over 3 lesions takes only the values 0.5 and 1, and prunes nearly everything): the set is *provisional*,
#: capped at :data:`PROVISIONAL_MAX_FEATURES` features, and the sample-size check warns.
MIN_PRUNE_LESIONS = 10
#: A provisional set keeps the features with the highest ICC lower bounds, at most this many: without
#: pruning, hundreds of mutually redundant features would pass and dominate the distances.
PROVISIONAL_MAX_FEATURES = 64


def select_robust_set(wh: Warehouse, threshold: float = 0.75, rho: float = 0.95) -> RobustSelection:
    """Per feature space: robust features (ICC lower bound >= threshold in perturbation and, where present,
    test-retest), pruned of near-duplicates (|Spearman| >= rho, on that space's lesions); a new version
    of a space's set is recorded when it changes."""
    from imaging_assets.features.robust import prune_correlated, select_robust

    t0 = time.perf_counter()
    out: dict[str, RobustSetResult] = {}
    with wh.connect() as con:
        ensure_schema(con)
        rob = con.execute("SELECT space, feature, analysis, icc, ci_low, ci_high FROM feature_robustness").fetchdf()
        spaces = sorted({s for s in rob["space"].tolist() if s is not None})
        prepared = []
        for space in spaces:
            wide = feature_matrix(con, space=space)
            prev = con.execute("SELECT version FROM robust_feature_set_history WHERE space = ? "
                               "ORDER BY activated_at DESC LIMIT 1", [space]).fetchone()
            prepared.append((space, wide, prev[0] if prev else None))
    for space, wide, previous in prepared:
        t1 = time.perf_counter()
        mine = rob[rob["space"] == space]
        pert = mine[mine["analysis"] == "perturbation"].to_dict("records")
        trt = mine[mine["analysis"] == "test_retest"].to_dict("records")
        candidates = select_robust(pert, trt or None, threshold=threshold)
        priority = {r["feature"]: r["ci_low"] for r in pert if r["ci_low"] is not None}
        # candidates (nearly) every lesion of the space has (an incomplete lesion lacks some image types)
        coverage = wide.notna().mean() if not wide.empty else pd.Series(dtype=float)
        cols = [c for c in candidates if c in wide.columns and coverage[c] >= MIN_FEATURE_COVERAGE]
        complete = wide.dropna(axis=0, how="any", subset=cols) if cols else wide
        provisional = len(complete) < MIN_PRUNE_LESIONS
        if cols and not provisional:
            kept, dropped = prune_correlated(complete[cols].to_numpy(float), cols, cols, rho=rho, priority=priority)
        else:
            ranked = sorted(cols, key=lambda c: (-(priority.get(c) if priority.get(c) is not None else -1.0), c))
            kept, dropped = ranked[:PROVISIONAL_MAX_FEATURES], []
        kept = sorted(kept)
        version = hashlib.sha1(json.dumps([space, kept, threshold, rho]).encode()).hexdigest()[:12]
        changed = version != previous
        with wh.transaction() as con:
            if not con.execute("SELECT count(*) FROM robust_feature_sets WHERE version = ?", [version]).fetchone()[0]:
                con.execute("INSERT INTO robust_feature_sets (version, features, n_features, threshold, rho, "
                            "n_candidates, space, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                            [version, kept, len(kept), threshold, rho, len(candidates), space])
            if changed:
                con.execute("INSERT INTO robust_feature_set_history (version, activated_at, space) "
                            "VALUES (?, (now() AT TIME ZONE 'UTC'), ?)", [version, space])
            con.execute("DELETE FROM robust_feature_pruned WHERE space = ? OR space IS NULL", [space])
            insert_rows(con, "robust_feature_pruned", [{"space": space, **d, "rho": float(d["rho"])} for d in dropped])
        with wh.connect(read_only=True) as con:
            history = con.execute("SELECT version, activated_at FROM robust_feature_set_history WHERE space = ? "
                                  "ORDER BY activated_at DESC LIMIT 10", [space]).fetchall()
        out[space] = RobustSetResult(
            space=space, version=version, previous_version=previous, changed=changed, features=kept,
            n_candidates=len(candidates), pruned=dropped, provisional=provisional, lesions=len(complete),
            history=[{"version": v, "activated_at": str(t)} for v, t in history],
            elapsed_s=round(time.perf_counter() - t1, 3))
    return RobustSelection(by_space=out, elapsed_s=round(time.perf_counter() - t0, 3))


def current_robust_sets(con: Any) -> dict[str, tuple[str, list[str]]]:
    """``space -> (version, features)`` of each space's active robust feature set ({} before the first)."""
    if not _has_table(con, "robust_feature_set_history"):
        return {}
    rows = con.execute(
        "SELECT h.space, s.version, s.features FROM robust_feature_set_history h JOIN robust_feature_sets s "
        "USING (version) QUALIFY row_number() OVER (PARTITION BY h.space ORDER BY h.activated_at DESC) = 1 "
        "ORDER BY h.space").fetchall()
    return {r[0]: (r[1], list(r[2])) for r in rows if r[0] is not None}


def current_robust_set(con: Any, space: str | None = None) -> tuple[str | None, list[str]]:
    """(version, features) of a space's active robust feature set, or (None, []) before the first one.

    Without ``space``: the only space's set (a single-modality archive); with several spaces that is
    ambiguous and raises ``ValueError`` naming them.
    """
    sets = current_robust_sets(con)
    if space is not None:
        return sets.get(space, (None, []))
    if not sets:
        return None, []
    if len(sets) > 1:
        raise ValueError(f"the warehouse has {len(sets)} feature spaces ({', '.join(sorted(sets))}): name one")
    return next(iter(sets.values()))


def _has_table(con: Any, name: str) -> bool:
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])


def active_robust_sets(wh: Warehouse) -> dict[str, tuple[str, list[str]]]:
    """``space -> (version, features)`` of the active robust sets (read-only connection)."""
    with wh.connect(read_only=True) as con:
        return current_robust_sets(con)


def validate_feature_table(wh: Warehouse) -> ExpectationReport | None:
    """Run the Great Expectations suite of :mod:`imaging_assets.features.quality` per feature space: each
    space's complete lesions against that space's feature count and robust set (None when there are no
    features yet). Incomplete lesions (image types pyradiomics skipped for them) are reported, and their
    present robust features must still be finite."""
    from imaging_assets.features.quality import validate_features

    with wh.connect(read_only=True) as con:
        per = dict(con.execute("SELECT lesion_id, count(*) FROM radiomics_features GROUP BY 1").fetchall())
        n_extractable = con.execute(
            "SELECT count(*) FROM lesions l JOIN radiomics_provenance p USING (lesion_id)").fetchone()[0]
        info = lesion_spaces(con)
        sets = current_robust_sets(con)
        spaces = sorted({v["space"] for v in info.values()}, key=str)
        wides = {space: feature_matrix(con, space=space) for space in spaces}
    if not per:
        return None
    outcomes: list[Any] = []
    space_rows, incomplete = [], []
    validated = 0
    for space in spaces:
        wide = wides[space]
        if wide.empty:
            continue
        wide = wide.reset_index()
        wide["n_features"] = wide["lesion_id"].map(per)
        lacking = {lid for lid in wide["lesion_id"] if info[lid]["missing_image_types"]}
        incomplete.extend({"lesion_id": lid, "space": space,
                           "missing_image_types": ", ".join(info[lid]["missing_image_types"])} for lid in sorted(lacking))
        complete = wide[~wide["lesion_id"].isin(lacking)]
        expected = int(complete["n_features"].max()) if len(complete) else int(wide["n_features"].max())
        robust = sets.get(space, (None, []))[1] or None
        mine = list(validate_features(complete if len(complete) else wide, robust=robust, expected_features=expected))
        if lacking and robust:  # an incomplete lesion's present robust features are finite too
            present = [c for c in robust if c in wide.columns]
            rest = wide[wide["lesion_id"].isin(lacking)].copy()
            for c in present:
                rest[c] = rest[c].fillna(0.0)  # absent (skipped filter), not non-finite: only real values count
            mine += [o for o in validate_features(rest, robust=present, expected_features=None)
                     if o.column == "nonfinite_features"]
        for o in mine:
            if not o.success:
                o.detail = f"[{space}] {o.detail or ''}".strip()
        outcomes.extend(mine)
        validated += len(wide)
        space_rows.append({"space": space, "lesions": len(wide), "expected_features": expected,
                           "incomplete": len(lacking), "robust_checked": len(robust) if robust else 0,
                           "failed": sum(1 for o in mine if not o.success)})
    return ExpectationReport(outcomes=outcomes, lesions_validated=validated,
                             lesions_with_provenance=int(n_extractable),
                             expected_features=max((r["expected_features"] for r in space_rows), default=0),
                             robust_checked=sum(r["robust_checked"] for r in space_rows) or None,
                             spaces=space_rows, incomplete=incomplete)


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
    """Targets and raters of each space's perturbation ICC and its test-retest pairs; the smallest space
    decides (every space needs enough lesions for a usable confidence interval)."""
    with wh.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT space, max(n_targets) FILTER (WHERE analysis = 'perturbation') AS lesions, "
            "max(k_raters) FILTER (WHERE analysis = 'perturbation') AS perturbations, "
            "coalesce(max(n_targets) FILTER (WHERE analysis = 'test_retest'), 0) AS test_retest_pairs "
            "FROM feature_robustness GROUP BY 1 ORDER BY 1").fetchdf().to_dict("records")
    rows = [{k: (int(v) if k != "space" and v == v and v is not None else v) for k, v in r.items()} for r in rows]
    if not rows:
        return SampleReport(0, 0, 0, [])
    worst = min(rows, key=lambda r: r["lesions"] or 0)
    return SampleReport(int(worst["lesions"] or 0), int(worst["perturbations"] or 0),
                        int(worst["test_retest_pairs"] or 0), rows)
