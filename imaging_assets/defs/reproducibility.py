"""Reproducibility stage: perturbation and test-retest ICC per feature, Great Expectations checks on the
feature table, and the versioned robust feature set that gates what goes into the vector tables."""

import tempfile
from pathlib import Path

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import picture, table_definition, table_metadata
from imaging_assets.defs.radiomics import radiomics_features
from imaging_assets.defs.resources import WarehouseResource
from imaging_assets.progress import ProgressReporter

GROUP = "features"
OWNERS = ["team:imaging"]


class RobustnessConfig(dg.Config):
    """Perturbation analysis settings (Zwanenburg et al. 2019 style chain)."""

    max_lesions: int = Field(default=48, description="Stratified sample size (by modality and ROI, spread "
                             "over volume); all lesions when the cohort is smaller.")
    n_perturbations: int = Field(default=6, description="Perturbed copies per lesion (raters of the ICC).")
    seed: int = Field(default=0, description="Seed of the sample and of every perturbation.")
    params_yaml: str | None = Field(default=None, description="Same as radiomics_features' params_yaml.")
    workers: int = Field(default=0, description="Extraction processes; 0 = one per CPU core.")


class RobustSetConfig(dg.Config):
    """Gate settings."""

    icc_threshold: float = Field(default=0.75, description="Minimum lower 95% bound of ICC(3,1).")
    spearman_rho: float = Field(default=0.95, description="|Spearman| at or above which two robust "
                                "features count as duplicates (the one with the higher ICC bound stays).")


@dg.asset(metadata=table_definition("feature_robustness"),
          deps=[radiomics_features], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
          pool="duckdb_writer")
def feature_robustness(context: dg.AssetExecutionContext, config: RobustnessConfig,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    """ICC(3,1) with 95% CI per feature (DuckDB table `feature_robustness`): across a stratified sample of
    lesions x perturbed copies (image noise at the image's own level, small rotation and translation,
    mask growth/shrinkage, contour randomisation), extracted through the same code as
    `radiomics_features`; and across test-retest pairs (second series of the same lesion in the same
    study, paired by position) where the cohort has them. Perturbed extractions are cached.
    """
    from imaging_assets.analysis.plots import icc_plot_png
    from imaging_assets.features.perturb import PerturbationSpec
    from imaging_assets.stages import reproducibility

    spec = PerturbationSpec(n_perturbations=config.n_perturbations, seed=config.seed)
    r = reproducibility.compute_robustness(
        warehouse.get_warehouse(), spec=spec, max_lesions=config.max_lesions, params_override=config.params_yaml,
        workers=config.workers or None, progress=ProgressReporter("perturbed extractions", context.log.info),
    )
    context.log.info(f"ICC on {r.lesions_in_icc} lesions x {r.perturbations} perturbations, "
                     f"{r.pairs} test-retest pairs; {r.extracted} extracted, {r.failed} failed")
    wh = warehouse.get_warehouse()
    with tempfile.TemporaryDirectory() as tmp:
        plot = picture(wh, "feature_robustness", icc_plot_png(r.rows, Path(tmp) / "icc.png"), "ICC lower bounds")
    worst = sorted((row for row in r.rows if row["analysis"] == "perturbation" and row["ci_low"] is not None),
                   key=lambda row: row["ci_low"])[:10]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(r.rows),
        "lesions_sampled": r.sampled,
        "lesions_eligible": r.eligible,
        "lesions_in_icc": r.lesions_in_icc,
        "perturbations_per_lesion": r.perturbations,
        "test_retest_pairs": r.pairs,
        "extracted_this_run": r.extracted,
        "failed_this_run": r.failed,
        "lesions_reused_from_cache": r.reused_lesions,
        "features_with_ci_low_ge_0.75": r.robust_perturbation,
        "perturbation_spec": dg.MetadataValue.json(r.spec),
        "by_space": table_metadata(r.spaces, ["space", "eligible", "incomplete", "sampled",
                                                            "lesions_in_icc", "pairs", "robust_perturbation"]),
        "icc_plot": plot,
        "least_reproducible": table_metadata(
            [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()} for row in worst],
            ["feature", "icc", "ci_low", "ci_high"]),
        "elapsed_s": r.elapsed_s,
    })


@dg.asset(deps=[feature_robustness], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
          pool="duckdb_writer")
def robust_feature_set(context: dg.AssetExecutionContext, config: RobustSetConfig,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    """The versioned set of features that go on to the vector tables: ICC(3,1) lower 95% bound at or above
    the threshold in the perturbation analysis and in test-retest (where pairs exist), then pruned of
    near-duplicates (|Spearman| >= rho keeps the feature with the higher ICC bound). A change of the
    set gets a new version in `robust_feature_sets` / `robust_feature_set_history` (with its date).
    """
    from imaging_assets.analysis.plots import robust_set_plot_png
    from imaging_assets.stages import reproducibility

    wh = warehouse.get_warehouse()
    sel = reproducibility.select_robust_set(wh, threshold=config.icc_threshold, rho=config.spearman_rho)
    sets = list(sel.by_space.values())
    main = max(sets, key=lambda r: len(r.features)) if sets else None
    features = [f for r in sets for f in r.features]
    with tempfile.TemporaryDirectory() as tmp:
        png = robust_set_plot_png(reproducibility.feature_class_totals(wh), features, Path(tmp) / "classes.png")
        plot = picture(wh, "robust_feature_set", png, "robust features per class")
    for r in sets:
        context.log.info(f"robust set {r.space} {r.version}: {len(r.features)} features "
                         f"({'changed' if r.changed else 'unchanged'}; {r.n_candidates} before pruning)")
    per_space = [{"space": r.space, "version": r.version, "features": len(r.features), "changed": r.changed,
                  "candidates": r.n_candidates, "pruned": len(r.pruned), "lesions": r.lesions,
                  "provisional": r.provisional} for r in sets]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(features),
        "spaces": table_metadata(per_space, ["space", "version", "features", "changed", "candidates",
                                                           "pruned", "lesions", "provisional"]),
        "provisional_spaces": dg.MetadataValue.json([r.space for r in sets if r.provisional]),
        "version": main.version if main else "",
        "changed": sel.changed,
        "previous_version": (main.previous_version or "") if main else "",
        "candidates_before_pruning": sum(r.n_candidates for r in sets),
        "pruned_duplicates": sum(len(r.pruned) for r in sets),
        "features": table_metadata([{"space": r.space, "feature": f} for r in sets for f in r.features],
                                                 ["space", "feature"], 100),
        "by_feature_class": plot,
        "history": table_metadata([{"space": r.space, **h} for r in sets for h in r.history],
                                                ["space", "version", "activated_at"]),
        "elapsed_s": sel.elapsed_s,
    })


@dg.asset_check(asset=radiomics_features, pool="duckdb_writer", blocking=True,
                description="Great Expectations suite: one row per lesion, full feature vectors, no NaN/inf "
                "in robust features, volumes > 0, sphericity in (0, 1], entropies >= 0.")
def radiomics_expectations(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Runs the GX suite of `imaging_assets.features.quality` on the per-lesion feature table."""
    from imaging_assets.stages import reproducibility

    report = reproducibility.validate_feature_table(warehouse.get_warehouse())
    if report is None:
        return dg.AssetCheckResult(passed=True, metadata={"reason": "no features yet"})
    rows = [{"expectation": o.expectation, "column": o.column, "unexpected": o.observed,
             "lesions": ", ".join(o.failing_lesions[:5]), "detail": o.detail or ""} for o in report.failed]
    return dg.AssetCheckResult(
        passed=report.passed,
        metadata={
            "expectations": len(report.outcomes),
            "failed_expectations": len(report.failed),
            "lesions_validated": report.lesions_validated,
            "lesions_with_provenance": report.lesions_with_provenance,
            "expected_features_per_lesion": report.expected_features,
            "robust_features_checked_finite": report.robust_checked if report.robust_checked else "all",
            "failures": table_metadata(rows, ["expectation", "column", "unexpected", "lesions", "detail"]),
            "by_space": table_metadata(report.spaces, ["space", "lesions", "expected_features",
                                                                    "incomplete", "robust_checked", "failed"]),
            "incomplete_lesions": table_metadata(report.incomplete,
                                                               ["lesion_id", "space", "missing_image_types"]),
            "reason": "bad rows would poison the vectors: blocking (per feature space; a lesion lacking an image "
                      "type pyradiomics skipped for it is incomplete, not failed)",
        },
    )


@dg.asset_check(asset=radiomics_features, pool="duckdb_writer", blocking=True,
                description="No lesion of a series flagged by geometry QC has features.")
def flagged_series_excluded(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Lesions with features whose series failed geometry QC (must be none)."""
    from imaging_assets.stages import reproducibility

    rows, flagged = reproducibility.features_of_flagged_series(warehouse.get_warehouse())
    return dg.AssetCheckResult(
        passed=not rows,
        metadata={"observed_lesions_from_flagged_series": len(rows), "flagged_series": flagged,
                  "threshold": 0, "reason": "a series with gaps, tilt or duplicates gives wrong textures",
                  "offenders": table_metadata(rows, ["lesion_id", "series", "flags"])},
    )


@dg.asset_check(asset=robust_feature_set, pool="duckdb_writer", blocking=True,
                description="The robust set is not empty and has not collapsed (at least 10 features).")
def robust_set_not_collapsed(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Size of the active robust feature set against the minimum."""
    from imaging_assets.stages import reproducibility

    minimum = 10
    sets = reproducibility.active_robust_sets(warehouse.get_warehouse())
    sizes = {space: len(f) for space, (_, f) in sets.items()}
    smallest = min(sizes, key=sizes.get) if sizes else None
    return dg.AssetCheckResult(
        passed=bool(sizes) and min(sizes.values()) >= minimum,
        metadata={"observed_features": sizes.get(smallest, 0) if smallest else 0, "threshold": minimum,
                  "smallest_space": smallest or "", "features_by_space": dg.MetadataValue.json(sizes),
                  "version": sets[smallest][0] if smallest else "",
                  "reason": "too few robust features make similar-case search meaningless"},
    )


@dg.asset_check(asset=feature_robustness, pool="duckdb_writer",
                description="The ICC rests on enough lesions (>= 10) to have a usable confidence interval.")
def robustness_sample_size(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Lesions (targets) behind the perturbation ICC, and test-retest pairs."""
    from imaging_assets.stages import reproducibility

    report = reproducibility.sample_report(warehouse.get_warehouse())
    n = report.lesions
    return dg.AssetCheckResult(
        passed=n >= 10,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"observed_lesions": n, "perturbations": report.perturbations,
                  "test_retest_pairs": report.test_retest_pairs,
                  "threshold": 10, "reason": "with fewer lesions the ICC's lower bound is uninformative"},
    )
