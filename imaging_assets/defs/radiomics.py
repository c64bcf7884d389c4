"""Features stage: lesions from linked segmentations, pyradiomics features per lesion."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.discovery import segmentations
from imaging_assets.defs.metadata import table_definition, table_metadata
from imaging_assets.defs.resources import WarehouseResource
from imaging_assets.progress import ProgressReporter

GROUP = "features"
OWNERS = ["team:imaging"]


class LesionConfig(dg.Config):
    """How segments become lesions."""

    split_components: bool = Field(default=False, description="One lesion per connected component.")
    fractional_threshold: float = Field(
        default=0.5, description="FRACTIONAL SEG: voxel in the lesion when value >= this x maximum.")
    workers: int = Field(default=0, description="Decoding processes; 0 = one per CPU core.")


class RadiomicsConfig(dg.Config):
    """Extraction settings."""

    params_yaml: str | None = Field(
        default=None, description="A pyradiomics YAML used for every modality instead of the presets "
        "in data/params (ct.yaml, mr.yaml, pet.yaml, default.yaml).")
    workers: int = Field(default=0, description="Extraction processes; 0 = one per CPU core.")
    retry_failed: bool = Field(default=False, description="Retry lesions that failed with the same inputs.")


@dg.asset(metadata=table_definition("lesions"),
          deps=[segmentations], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
          pool="duckdb_writer")
def lesions(context: dg.AssetExecutionContext, config: LesionConfig,
            warehouse: WarehouseResource) -> dg.MaterializeResult:
    """One row per lesion (DuckDB table `lesions`): each segment / ROI / label of every linked
    segmentation, decoded onto its image series' voxel grid (highdicom for SEG, contour rasterisation
    for RTSTRUCT, NIfTI/NRRD resampled only when grids differ). ROI names are harmonised (raw name
    kept); lesion ids are stable hashes of series, segmentation and segment. Empty, one-voxel or
    off-image lesions, and lesions of series that failed geometry QC, are rows with a reason and are not
    extracted. Unchanged segmentations are not decoded again.
    """
    from imaging_assets.stages import radiomics

    wh = warehouse.get_warehouse()
    r = radiomics.rebuild_lesions(
        wh, split_components=config.split_components, fractional_threshold=config.fractional_threshold,
        workers=config.workers or None, progress=ProgressReporter("segmentations decoded", context.log.info),
    )
    context.log.info(f"{r.lesions} lesions ({r.extractable} extractable), "
                     f"{r.decoded_segmentations} segmentations decoded")
    preview = radiomics.lesions_preview(wh)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": r.lesions,
        "extractable": r.extractable,
        "by_status": dg.MetadataValue.json(r.by_status),
        "by_roi_name": dg.MetadataValue.json(r.by_roi_name),
        "decoded_segmentations": r.decoded_segmentations,
        "features_dropped_for_removed_lesions": r.removed,
        "not_extractable": table_metadata(r.problem_rows, ["lesion_id", "status", "reason"]),
        "preview": table_metadata(preview, list(preview[0]) if preview else ["lesion_id"]),
        "elapsed_s": r.elapsed_s,
    })


@dg.asset(metadata=table_definition("radiomics_features"),
          deps=[lesions], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
          pool="duckdb_writer")
def radiomics_features(context: dg.AssetExecutionContext, config: RadiomicsConfig,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    """pyradiomics features per extractable lesion: DuckDB long table `radiomics_features`
    (lesion_id, image_type, feature_class, feature, value), wide view `radiomics_features_wide`,
    provenance per lesion in `radiomics_provenance` (pyradiomics version, params hash, image and mask
    content hashes, crop, elapsed time) and failures in `radiomics_errors`.

    Parameters come from the modality's preset in data/params (Original + LoG + Wavelet, all feature
    classes) unless a YAML is configured. Each lesion is extracted from its bounding box plus the margin
    the filters need (same values as the full image, much faster), in a process pool; lesions already
    extracted with the same inputs and parameters are skipped.
    """
    from imaging_assets.stages import radiomics

    wh = warehouse.get_warehouse()
    r = radiomics.extract_features(
        wh, params_override=config.params_yaml, workers=config.workers or None,
        retry_failed=config.retry_failed, progress=ProgressReporter("lesions extracted", context.log.info),
    )
    context.log.info(f"extracted {r.extracted}, failed {r.failed}, unchanged {r.skipped_current} in {r.elapsed_s} s")
    table = radiomics.feature_table_report(wh)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": table.rows,
        "lesions_with_features": table.lesions_with_features,
        "features_per_lesion": r.features_per_lesion,
        "extracted_this_run": r.extracted,
        "failed_this_run": r.failed,
        "unchanged_skipped": r.skipped_current,
        "known_failures_skipped": r.skipped_failed,
        "errors": table_metadata(r.errors, ["lesion_id", "message"]),
        "features_by_image_type": table_metadata(table.features_by_image_type,
                                                               ["image_type", "features"], 40),
        "mean_s_per_lesion": table.mean_s_per_lesion,
        "max_s_per_lesion": table.max_s_per_lesion,
        "lesions_per_s": r.lesions_per_s or 0.0,
        "params_hashes": dg.MetadataValue.json(table.params_hashes),
        "feature_spaces": table_metadata(table.spaces, ["space", "modality", "source", "lesions",
                                                                      "features", "incomplete"]),
        "elapsed_s": r.elapsed_s,
    })


@dg.asset_check(asset=radiomics_features, pool="duckdb_writer", blocking=True,
                description="Share of extractable lesions without features stays below 5 %.")
def radiomics_failure_share(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Failed extractions over extractable lesions, with the failing lesions and messages."""
    from imaging_assets.stages import radiomics

    threshold = 0.05
    fs = radiomics.failure_share(warehouse.get_warehouse())
    return dg.AssetCheckResult(
        passed=fs.share <= threshold,
        metadata={
            "observed_share": round(fs.share, 4), "failed": len(fs.failures), "extractable": fs.extractable,
            "threshold": threshold,
            "reason": "many failures mean a systematic problem (params, decoder, geometry)",
            "failures": table_metadata(fs.failures, ["lesion_id", "message"]),
        },
    )


@dg.asset_check(asset=lesions, pool="duckdb_writer", description="Every lesion decodes to a usable mask (warns otherwise).")
def lesions_decodable(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Lesions whose status is not ok, by status, with reasons."""
    from imaging_assets.stages import radiomics

    report = radiomics.lesion_status_report(warehouse.get_warehouse())
    return dg.AssetCheckResult(
        passed=not report.not_ok,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_not_ok": len(report.not_ok), "lesions": report.lesions, "threshold": 0,
            "reason": "empty, one-voxel, off-image or flagged-series lesions yield no features",
            "lesions_not_ok": table_metadata(report.not_ok, ["lesion_id", "status", "reason"]),
        },
    )
