"""Outcomes stage: clinical outcomes in DuckDB, phenotype clusters of the lesion vectors, survival per
cluster, and the DuckDB-backed sensor that re-runs the analysis when new outcomes arrive."""

import hashlib
import json
import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import picture, table_definition, table_metadata
from imaging_assets.defs.resources import OutcomeSourcesResource, WarehouseResource, pseudonym_secret
from imaging_assets.defs.vectors import lesion_vectors
from imaging_assets.errors import PseudonymKeyError

GROUP = "outcomes"
OWNERS = ["team:imaging"]


def _round(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def _warn(name: str, passed: bool, **metadata) -> dg.AssetCheckResult:
    """A WARN check result computed by the asset itself (observed value, threshold, reason in metadata)."""
    return dg.AssetCheckResult(check_name=name, passed=passed, severity=dg.AssetCheckSeverity.WARN,
                               metadata=metadata)


@dg.asset(metadata=table_definition("clinical_outcomes"),
          group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS, pool="duckdb_writer",
          check_specs=[dg.AssetCheckSpec(
              "outcomes_source_present", asset="clinical_outcomes",
              description="The configured outcome path exists and holds at least one outcome file (warns: a "
              "missing path or a typo leaves the outcome table empty instead of failing the run).")])
def clinical_outcomes(context: dg.AssetExecutionContext, warehouse: WarehouseResource,
                      outcome_sources: OutcomeSourcesResource) -> dg.MaterializeResult:
    """Outcome files (CSV / Parquet) from the configured folder in DuckDB `clinical_outcomes` (one row per
    patient key and source file; view `patient_outcomes`: one row per patient). Patient ids are
    pseudonymised with the same keyed HMAC as discovery, so outcomes join to lesions. Follow-up comes from
    `time_months` or from dates (diagnosis / baseline date to event or last follow-up date). A row whose
    patient id, time or event is invalid is dropped; a bad age, sex, stage or date only empties that field;
    each problem goes to `outcome_rejects` (field and kind, never the value). An unchanged file is
    skipped, a changed one is upserted in one transaction, and the rows of a file that left the configured
    source are removed. A missing source is a warning (check `outcomes_source_present`), not a failure.
    """
    from imaging_assets.stages import outcomes

    wh = warehouse.get_warehouse()
    try:
        s = outcomes.load_outcomes(wh, outcome_sources.path, secret=pseudonym_secret())
    except PseudonymKeyError as exc:  # another key than the warehouse's: nothing written
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    context.log.info(f"outcomes: {s.inserted} inserted, {s.updated} updated, {s.rejected} rows rejected, "
                     f"{s.fields_rejected} field(s) set to NULL, {s.files_gone} file(s) gone")
    if s.source_problem:
        context.log.warning(f"outcomes: {s.source_problem}")
    table = outcomes.outcome_table_report(wh)
    reasons = [{"reason": k, "rows": v} for k, v in s.rejects_by_reason.items()]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.patients,
        "source": outcome_sources.path,
        "source_problem": s.source_problem or "none",
        "files": s.files, "rows_read": s.rows_read, "inserted": s.inserted, "updated": s.updated,
        "unchanged": s.unchanged, "rejected": s.rejected, "fields_rejected": s.fields_rejected,
        "files_gone": s.files_gone, "rows_removed": s.rows_removed,
        "rejects_by_reason": table_metadata(reasons, ["reason", "rows"]),
        "by_stage": table_metadata(table.by_stage, ["stage", "patients", "events"]),
        "elapsed_s": s.elapsed_s,
    }, check_results=[_warn(
        "outcomes_source_present", s.source_present, observed_files=s.files,
        configured=dg.MetadataValue.json(s.sources), missing_paths=dg.MetadataValue.json(s.sources_missing),
        threshold="every configured path exists, >= 1 outcome file",
        reason=s.source_problem or "the outcome source is present")])


class ClusterConfig(dg.Config):
    """Clustering settings."""

    k: int | None = Field(default=None, description="Number of clusters; empty = best silhouette in k_min..k_max.")
    k_min: int = Field(default=2, description="Smallest k tried.")
    k_max: int = Field(default=8, description="Largest k tried.")
    method: str = Field(default="kmeans", description="kmeans or hdbscan.")
    seed: int = Field(default=0, description="Random seed.")


@dg.asset(metadata=table_definition("phenotype_clusters"),
          deps=[lesion_vectors, "lesion_thumbnails"], group_name=GROUP, kinds={"python", "duckdb", "lancedb"}, owners=OWNERS,
          pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
          check_specs=[dg.AssetCheckSpec(
              "clusters_adequate", asset="phenotype_clusters",
              description="Every feature space has at least two clusters and none below the minimum cluster "
              "size (max(5 lesions, 5 % of the space's lesions)); warns, e.g. for a configured k that splits "
              "off outliers.")])
def phenotype_clusters(context: dg.AssetExecutionContext, config: ClusterConfig,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Phenotype clusters of the lesion vectors (DuckDB `phenotype_clusters`, profiles in
    `cluster_profiles`): k-means with k by silhouette (or configured; HDBSCAN optional), labels made
    stable across reruns (ordered by size, then centroid), top distinguishing robust features per
    cluster with Cohen's d, and a PCA projection coloured by cluster. A k whose smallest cluster is below
    max(5 lesions, 5 % of the lesions) is not chosen by silhouette; when none qualifies, or a configured k
    violates it, the check `clusters_adequate` warns. Re-runs by itself (eager automation) when
    `lesion_vectors` changes. The reference picker (metadata) lists the largest lesions of each cluster
    with their pictures: copy a lesion_id from it into a cohort's config.
    """
    from imaging_assets.stages.cohorts import reference_candidates
    from imaging_assets.stages.outcomes import build_clusters
    from imaging_assets.stages.thumbnails import montage_png

    wh = warehouse.get_warehouse()
    with tempfile.TemporaryDirectory() as tmp:
        s = build_clusters(wh, k=config.k, k_range=(config.k_min, config.k_max),
                           method=config.method, seed=config.seed, png_path=Path(tmp) / "clusters.png")
        plot = picture(wh, "phenotype_clusters", s.png, "PCA projection by cluster")
    context.log.info(f"{s.lesions} lesions in {s.k} clusters, sizes {s.sizes}")
    picks = reference_candidates(wh)
    firsts = [r for i, r in enumerate(picks) if i == 0 or (r["space"], r["cluster"]) != (picks[i - 1]["space"],
                                                                                            picks[i - 1]["cluster"])]
    tiles = [{"lesion_id": r["lesion_id"], "caption": [f"cluster {r['cluster']} ({r['space']}): largest lesion",
                                                       f"{r['lesion_id']}  {(r['volume_mm3'] or 0) / 1000:.1f} cm3"]}
             for r in firsts[:8]]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": s.lesions,
        "k": s.k, "method": s.method,
        "sizes": dg.MetadataValue.json(s.sizes),
        "silhouette_by_k": dg.MetadataValue.json({str(a): b for a, b in s.silhouette_by_k.items()}),
        "feature_set_version": s.feature_set_version,
        "projection": plot,
        "reference_picker": table_metadata(picks, ["space", "cluster", "lesion_id", "patient_key", "roi_name",
                                                   "volume_mm3", "time_months", "event", "thumbnail"], 40),
        "largest_lesion_per_cluster": picture(wh, "phenotype_clusters_references",
                                              montage_png(wh, tiles, columns=1) if tiles else None,
                                              "largest lesion of each cluster"),
        "profile": table_metadata(_round(s.profile), ["cluster", "rank", "feature",
                                                                    "effect_size", "size"], 40),
        "elapsed_s": s.elapsed_s,
        "adequate": not s.inadequate,
        "inadequate_reasons": "; ".join(s.inadequate) or "none",
    }, check_results=[_warn(
        "clusters_adequate", not s.inadequate, observed_sizes=dg.MetadataValue.json(s.sizes),
        spaces=dg.MetadataValue.json([{k: v for k, v in r.items() if k != "note"} for r in s.spaces]),
        threshold="k >= 2 and every cluster >= min_size (per space, in `spaces`)",
        reason="; ".join(s.inadequate) or "every space has clusters of the minimum size")])


class SurvivalConfig(dg.Config):
    """Survival model settings."""

    covariates: list[str] = Field(default=["age", "stage"], description="Cox covariates besides cluster.")


@dg.asset(metadata=table_definition("cluster_survival"),
          deps=[phenotype_clusters, clinical_outcomes], group_name=GROUP, kinds={"python", "duckdb"},
          owners=OWNERS, pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
          check_specs=[dg.AssetCheckSpec(
              "survival_model_adequate", asset="cluster_outcomes",
              description="The log-rank test and the Cox model ran on enough data: outcomes present, >= 5 "
              "patients per compared cluster, >= 5 events, >= 10 events per Cox term, a converged fit "
              "(warns instead of showing absurd hazard ratios).")])
def cluster_outcomes(context: dg.AssetExecutionContext, config: SurvivalConfig,
                     warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Survival per phenotype cluster (DuckDB `cluster_survival`, `cluster_cox`, `cluster_logrank`,
    `cluster_patients`): patients, lesions, events, median survival with CI, Kaplan-Meier curves, the
    log-rank test across clusters and a Cox model of cluster membership adjusted for the covariates
    (hazard ratios with CIs). A patient with several lesions counts once, with the cluster of the
    largest lesion. Clusters with fewer than 5 patients are left out of the comparison, the log-rank test
    needs 5 events and the Cox model 10 events per term; where a minimum is not met there is no p-value or
    no Cox row, the notes say why and the check `survival_model_adequate` warns.
    """
    from imaging_assets.stages.outcomes import analyse_cluster_outcomes

    wh = warehouse.get_warehouse()
    with tempfile.TemporaryDirectory() as tmp:
        s = analyse_cluster_outcomes(wh, covariates=config.covariates, png_path=Path(tmp) / "km.png")
        plot = picture(wh, "cluster_outcomes", s.png, "Kaplan-Meier by cluster")
    lr = s.logrank or {}
    context.log.info(f"{s.n_patients} patients; log-rank p = {lr.get('p_value')}")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(s.per_cluster),
        "patients": s.n_patients,
        "patients_without_outcomes": s.patients_without_outcomes,
        "logrank_p": float(lr["p_value"]) if lr.get("p_value") is not None else -1.0,
        "logrank_statistic": float(lr["statistic"]) if lr.get("statistic") is not None else -1.0,
        "kaplan_meier": plot,
        "per_cluster": table_metadata(_round(s.per_cluster), [
            "cluster", "patients", "lesions", "events", "median_months", "median_ci_low", "median_ci_high"]),
        "cox": table_metadata(_round(s.cox), ["term", "hr", "ci_low", "ci_high", "p_value"]),
        "survival_by_space": table_metadata(s.spaces, ["space", "patients", "events", "logrank_p",
                                                                        "adequate"]),
        "notes": "; ".join(n for n in s.notes if n) or "none",
        "events": s.events,
        "compared_clusters": dg.MetadataValue.json(s.compared_clusters),
        "adequate": s.adequate,
        "inadequate_reasons": "; ".join(s.inadequate) or "none",
        "elapsed_s": s.elapsed_s,
    }, check_results=[_warn(
        "survival_model_adequate", s.adequate, observed_patients=s.n_patients, observed_events=s.events,
        compared_clusters=dg.MetadataValue.json(s.compared_clusters),
        threshold=s.thresholds,
        reason="; ".join(s.inadequate) or "enough patients and events for the log-rank test and the Cox model")])


@dg.asset_check(asset=cluster_outcomes, pool="duckdb_writer",
                description="Every clustered patient has an outcome row (warns on missing outcomes).")
def outcomes_coverage(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Clustered patients without outcomes, and outcome rejects."""
    from imaging_assets.stages.outcomes import coverage_report

    c = coverage_report(warehouse.get_warehouse())
    return dg.AssetCheckResult(
        passed=c.patients_with_outcomes == c.clustered_patients,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"observed_patients_with_outcomes": c.patients_with_outcomes,
                  "clustered_patients": c.clustered_patients,
                  "outcome_rejects": c.outcome_rejects, "threshold": "all",
                  "reason": "patients without outcomes drop out of the survival analysis"},
    )


outcomes_job = dg.define_asset_job(
    "outcomes_job", selection=dg.AssetSelection.assets(clinical_outcomes, cluster_outcomes),
    description="Load new outcome files and re-run the survival analysis per cluster.")


@dg.sensor(job=outcomes_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="DuckDB outcomes sensor: reads the outcome table's state (rows, latest load, checksum) "
           "read-only from DuckDB and fingerprints the outcome folder; when either changed it runs "
           "clinical_outcomes -> cluster_outcomes once per state (run_key). Off by default: turn it on in "
           "Automation once the pipeline has run.")
def outcomes_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource,
                    outcome_sources: OutcomeSourcesResource):
    """Run the outcomes job when the outcomes table or the outcome folder changed."""
    from imaging_assets.stages.outcomes import outcome_folder_digest, outcomes_state

    try:
        state = outcomes_state(warehouse.get_warehouse(), read_only=True)
    except Exception as exc:  # noqa: BLE001 - the writer holds the lock right now: try next tick
        return dg.SkipReason(f"warehouse busy or unreadable ({exc}); will look again")
    current = {"db": state, "folder": outcome_folder_digest(outcome_sources.path)}
    previous = json.loads(context.cursor) if context.cursor else None
    if previous == json.loads(json.dumps(current, default=str)):
        return dg.SkipReason(f"outcomes unchanged: {state.get('rows', 0)} rows, latest load {state.get('latest_load')}")
    context.update_cursor(json.dumps(current, default=str))
    key = hashlib.sha1(json.dumps(current, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return dg.RunRequest(run_key=f"outcomes-{key}", tags={"imaging_assets/trigger": "outcomes_sensor"})
