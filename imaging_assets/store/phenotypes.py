"""Phenotype clusters of the lesion vectors and their link to outcomes (no Dagster here).

Tables written (replaced atomically on each run)
-----------------------------------------------
phenotype_clusters   lesion_id, patient_key, cluster, feature_set_version, k, method, computed_at
cluster_profiles     cluster, rank, feature, effect_size (Cohen's d vs rest), mean_in, mean_out, size
cluster_survival     cluster, patients, lesions, events, median_months, median_ci_low, median_ci_high
cluster_cox          term, hr, ci_low, ci_high, p_value
cluster_logrank      statistic, p_value, df, n_patients, notes
cluster_patients     patient_key, cluster, lesion_id (the lesion that represents the patient), time_months, event

Patients with several lesions count once per analysis: the cluster of their largest lesion
(:func:`imaging_assets.analysis.survival.one_row_per_patient`, rule ``largest``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imaging_assets.store.warehouse import connect, transaction

logger = logging.getLogger(__name__)


_COLUMNS: dict[str, list[str]] = {
    "phenotype_clusters": ["lesion_id", "patient_key", "cluster", "feature_set_version", "k", "method",
                           "computed_at"],
    "cluster_profiles": ["cluster", "rank", "feature", "effect_size", "mean_in", "mean_out", "size"],
    "cluster_survival": ["cluster", "patients", "lesions", "events", "median_months", "median_ci_low",
                         "median_ci_high"],
    "cluster_cox": ["term", "hr", "ci_low", "ci_high", "p_value", "reference_cluster", "n_patients",
                    "penalizer"],
    "cluster_logrank": ["statistic", "p_value", "df", "n_patients", "n_clusters", "note"],
    "cluster_patients": ["patient_key", "cluster", "lesion_id", "lesions", "time_months", "event", "age",
                         "stage"],
}


def _replace(con: Any, table: str, rows: Any) -> None:
    """Replace a small result table (fixed column list) in the caller's transaction."""
    df = pd.DataFrame(rows).reindex(columns=_COLUMNS[table])
    con.register("_df", df)
    try:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _df")
    finally:
        con.unregister("_df")


def build_clusters(
    database: str | Path, lance_uri: str, k: int | None = None, k_range: tuple[int, int] = (2, 8),
    method: str = "kmeans", seed: int = 0, png_path: Path | None = None,
) -> dict[str, Any]:
    """Cluster the lesion vectors; store labels and per-cluster profiles; draw the 2-D projection.

    Returns
    -------
    dict
        ``k``, ``method``, ``sizes``, ``silhouette_by_k``, ``lesions``, ``profile`` rows, ``png`` (path or
        None), ``note``, ``elapsed_s``.
    """
    from imaging_assets.analysis.clustering import cluster_profile, cluster_vectors, projection_png
    from imaging_assets.store.embedding import load_scaler, vectors_frame

    t0 = time.perf_counter()
    tbl, vectors = vectors_frame(lance_uri)
    if tbl is None or len(tbl) < 3:
        raise RuntimeError(f"lesion_vectors at {lance_uri} holds {0 if tbl is None else len(tbl)} rows; "
                           "clustering needs at least 3")
    ids = tbl.column("lesion_id").to_pylist()
    versions = sorted(set(tbl.column("feature_set_version").to_pylist()))
    result = cluster_vectors(vectors.astype(float), k=k, k_range=k_range, method=method, seed=seed)
    with connect(database) as con:
        scaler = load_scaler(con, versions[-1])
    names = scaler.feature_names if scaler is not None else [f"f{i}" for i in range(vectors.shape[1])]
    profile = cluster_profile(vectors.astype(float), list(names), result.labels)
    clusters = pd.DataFrame({
        "lesion_id": ids, "patient_key": tbl.column("patient_key").to_pylist(),
        "cluster": result.labels.astype(int), "feature_set_version": tbl.column("feature_set_version").to_pylist(),
        "k": int(result.k), "method": result.method,
    })
    clusters["computed_at"] = pd.Timestamp.now(tz="UTC").tz_localize(None)
    with connect(database) as con:
        with transaction(con):
            _replace(con, "phenotype_clusters", clusters)
            _replace(con, "cluster_profiles", profile)
    # the Lance table's `cluster` column too, so `similar --filter cluster=...` works at once
    from imaging_assets.store.vectors import update_clusters

    update_clusters(lance_uri, dict(zip(ids, (int(c) for c in result.labels))))
    png = None
    if png_path is not None:
        png = projection_png(vectors.astype(float), result.labels, Path(png_path),
                             f"Lesion phenotypes (k={result.k}, {len(ids)} lesions)")
    return {
        "k": int(result.k), "method": result.method, "sizes": list(result.sizes),
        "silhouette_by_k": {int(a): (None if b is None else float(b)) for a, b in result.silhouette_by_k.items()},
        "lesions": len(ids), "feature_set_version": versions[-1], "profile": profile, "png": png,
        "note": getattr(result, "note", None), "elapsed_s": round(time.perf_counter() - t0, 3),
    }


def analyse_cluster_outcomes(
    database: str | Path, covariates: Sequence[str] = ("age", "stage"), png_path: Path | None = None,
) -> dict[str, Any]:
    """Kaplan-Meier, log-rank and Cox PH of cluster membership; results into DuckDB tables.

    Returns
    -------
    dict
        ``per_cluster``, ``logrank``, ``cox``, ``notes``, ``n_patients``, ``png``, ``elapsed_s``.
    """
    from imaging_assets.analysis.survival import analyse_survival, one_row_per_patient
    from imaging_assets.store.outcomes import ensure_outcome_schema

    t0 = time.perf_counter()
    with connect(database) as con:
        ensure_outcome_schema(con)
        lesions = con.execute(
            "SELECT c.lesion_id, c.patient_key, c.cluster, l.volume_mm3 FROM phenotype_clusters c "
            "JOIN lesions l USING (lesion_id)").fetchdf()
        outcomes = con.execute("SELECT * FROM patient_outcomes").fetchdf()
    per_patient = one_row_per_patient(lesions, rule="largest")
    patients = per_patient.merge(outcomes, on="patient_key", how="inner")
    result = analyse_survival(patients, covariates=list(covariates), png_path=png_path)
    rows = result.as_rows()
    with connect(database) as con:
        with transaction(con):
            _replace(con, "cluster_survival", rows["cluster_survival"])
            _replace(con, "cluster_cox", rows["cluster_cox"])
            _replace(con, "cluster_logrank", rows["cluster_logrank"])
            _replace(con, "cluster_patients", patients)
    return {
        "per_cluster": result.per_cluster, "logrank": result.logrank, "cox": result.cox,
        "notes": list(getattr(result, "notes", []) or []) + ([result.cox_note] if result.cox_note else []),
        "n_patients": result.n_patients, "patients_without_outcomes": int(len(per_patient) - len(patients)),
        "png": result.km_png, "elapsed_s": round(time.perf_counter() - t0, 3),
    }
