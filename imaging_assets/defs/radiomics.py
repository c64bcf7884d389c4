"""Features stage: lesions from linked segmentations, pyradiomics features per lesion."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.discovery import segmentations
from imaging_assets.defs.metadata import table_definition, table_metadata
from imaging_assets.defs.resources import WarehouseResource
from imaging_assets.progress import ProgressReporter

GROUP = "features"
OWNERS = ["team:imaging"]

#: The extraction's partitions: batches of image series, added by `lesions` as series gain lesions
#: (imaging_assets.stages.batches). A batch's membership never changes, so its result files stay valid.
series_batches = dg.DynamicPartitionsDefinition(name="series_batches")
#: Tag of every run of the partitioned extraction (the PostgreSQL profile's tag concurrency limit).
STAGE_TAG = {"imaging_assets/stage": "extraction"}


class LesionConfig(dg.Config):
    """How segments become lesions."""

    split_components: bool = Field(default=False, description="One lesion per connected component.")
    fractional_threshold: float = Field(
        default=0.5, description="FRACTIONAL SEG: voxel in the lesion when value >= this x maximum.")
    workers: int = Field(default=0, description="Decoding processes; 0 = one per CPU core.")
    series_per_batch: int = Field(
        default=0, description="Series per batch (partition of the extraction) for series new in this run; "
        "0 = env IMAGING_ASSETS_SERIES_PER_BATCH, else 32 (about a minute of one core's work).")


class RadiomicsConfig(dg.Config):
    """Extraction settings (the same for the partitioned batches and the load step: a batch extracted with
    other settings is not current and is extracted again by `radiomics_features`)."""

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
        series_per_batch=config.series_per_batch or None,
    )
    known = set(context.instance.get_dynamic_partitions(series_batches.name))
    added = [b for b in r.batches if b not in known]
    if added:
        context.instance.add_dynamic_partitions(series_batches.name, added)
    context.log.info(f"{r.lesions} lesions ({r.extractable} extractable), "
                     f"{r.decoded_segmentations} segmentations decoded, {len(r.batches)} batches of series "
                     f"({len(added)} new partitions)")
    preview = radiomics.lesions_preview(wh)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": r.lesions,
        "extractable": r.extractable,
        "by_status": dg.MetadataValue.json(r.by_status),
        "by_roi_name": dg.MetadataValue.json(r.by_roi_name),
        "decoded_segmentations": r.decoded_segmentations,
        "features_dropped_for_removed_lesions": r.removed,
        "batches": len(r.batches),
        "partitions_added": dg.MetadataValue.json(added),
        "batches_with_new_inputs": dg.MetadataValue.json(list(r.changed_batches)),
        "series_per_batch": r.series_per_batch,
        "not_extractable": table_metadata(r.problem_rows, ["lesion_id", "status", "reason"]),
        "preview": table_metadata(preview, list(preview[0]) if preview else ["lesion_id"]),
        "elapsed_s": r.elapsed_s,
    })


class BatchConfig(RadiomicsConfig):
    """Extraction settings of one batch."""

    workers: int = Field(default=1, description="Extraction processes inside the step; 1 = in the step's own "
                         "process (one batch per core: a Celery worker or a pod per core), 0 = one per CPU core.")


@dg.asset(partitions_def=series_batches, deps=[lesions], group_name=GROUP, kinds={"python", "parquet"},
          owners=OWNERS, tags=STAGE_TAG)
def radiomics_batches(context: dg.AssetExecutionContext, config: BatchConfig,
                      warehouse: WarehouseResource) -> dg.MaterializeResult:
    """pyradiomics features of one batch of series (one partition), written as Parquet files under
    `<warehouse>/partitions/radiomics/<batch>/` and committed by a manifest: any process on any machine can
    run a batch (it reads the batch's input file, never the DuckDB file), re-running a batch replaces
    exactly its files, and a run killed midway leaves the previous version. Backfill every partition from
    the UI, `imaging-assets backfill`, or over Celery workers (`extraction_celery_job`); then
    `radiomics_features` loads the new files into the DuckDB tables.
    """
    import os
    import socket

    from imaging_assets.stages import batches

    worker = {"host": socket.gethostname(), "pid": os.getpid()}
    context.log.info(f"batch {context.partition_key} on {worker['host']} pid {worker['pid']}")
    r = batches.extract_batch(warehouse.get_warehouse(), context.partition_key, params_override=config.params_yaml,
                              workers=config.workers or None, retry_failed=config.retry_failed,
                              progress=ProgressReporter("lesions extracted", context.log.info), worker=worker)
    return dg.MaterializeResult(metadata={
        "lesions": r.lesions, "extracted": r.extracted, "failed": r.failed,
        "unchanged_skipped": r.skipped_current, "known_failures_skipped": r.skipped_failed,
        "written": r.committed, "version": r.token or "",
        "errors": table_metadata(r.errors, ["lesion_id", "message"]),
        "worker_host": worker["host"], "worker_pid": worker["pid"], "elapsed_s": r.elapsed_s,
    })


@dg.asset(metadata=table_definition("radiomics_features"),
          deps=[lesions, radiomics_batches], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
          pool="duckdb_writer")
def radiomics_features(context: dg.AssetExecutionContext, config: RadiomicsConfig,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    """pyradiomics features per extractable lesion: DuckDB long table `radiomics_features`
    (lesion_id, image_type, feature_class, feature, value), wide view `radiomics_features_wide`,
    provenance per lesion in `radiomics_provenance` (pyradiomics version, params hash, image and mask
    content hashes, crop, elapsed time) and failures in `radiomics_errors`.

    The one DuckDB writer of the extraction: batches of series whose files are current (from a
    `radiomics_batches` backfill on other workers, or an earlier run) are only loaded; the others are
    extracted here first, so a single machine needs nothing else.

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
    context.log.info(f"extracted {r.extracted}, failed {r.failed}, unchanged {r.skipped_current} in {r.elapsed_s} s; "
                     f"{r.batches_extracted} of {r.batches} batches extracted here, {r.batches_loaded} loaded")
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
        "batches": r.batches,
        "batches_extracted_here": r.batches_extracted,
        "batches_loaded": r.batches_loaded,
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


extraction_job = dg.define_asset_job(
    "extraction_job",
    selection=[radiomics_batches],
    tags=STAGE_TAG,
    description="The partitioned extraction, one run per batch of series, steps in local processes. "
    "Backfill it (UI: Jobs > extraction_job > Backfill, or `imaging-assets backfill`), then materialize "
    "`radiomics_features` to load the batches.",
)


def _celery_executor() -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor

    return celery_executor


extraction_celery_job = dg.define_asset_job(
    "extraction_celery_job",
    selection=[radiomics_batches],
    tags=STAGE_TAG,
    executor_def=_celery_executor(),
    config={"execution": {"config": {"broker": {"env": "DAGSTER_CELERY_BROKER_URL"},
                                     "backend": {"env": "DAGSTER_CELERY_BACKEND_URL"}}}},
    description="The partitioned extraction with its steps on Celery workers (`make workers`; broker and "
    "result backend from DAGSTER_CELERY_BROKER_URL / DAGSTER_CELERY_BACKEND_URL, e.g. Redis). Backfill it "
    "on the PostgreSQL instance (README: Running on a cluster).",
)
