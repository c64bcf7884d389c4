"""Features stage: lesions from linked segmentations, pyradiomics features per lesion."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.discovery import segmentations
from imaging_assets.defs.metadata import md_table
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


@dg.asset(deps=[segmentations], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
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
    from imaging_assets.store.features import rebuild_lesions

    summary = rebuild_lesions(
        warehouse.database, split_components=config.split_components,
        fractional_threshold=config.fractional_threshold, workers=config.workers or None,
        progress=ProgressReporter("segmentations decoded", context.log.info),
    )
    context.log.info(f"{summary['lesions']} lesions ({summary['extractable']} extractable), "
                     f"{summary['decoded_segmentations']} segmentations decoded")
    with warehouse.get_connection(read_only=True) as con:
        preview = con.execute(
            "SELECT lesion_id, patient_key, modality, roi_name, raw_label, round(volume_mm3, 1) AS volume_mm3, "
            "status FROM lesions ORDER BY lesion_id LIMIT 10").fetchdf().to_dict("records")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": summary["lesions"],
        "extractable": summary["extractable"],
        "by_status": dg.MetadataValue.json(summary["by_status"]),
        "by_roi_name": dg.MetadataValue.json(summary["by_roi_name"]),
        "decoded_segmentations": summary["decoded_segmentations"],
        "features_dropped_for_removed_lesions": summary["removed"],
        "not_extractable": dg.MetadataValue.md(md_table(summary["problem_rows"], ["lesion_id", "status", "reason"])),
        "preview": dg.MetadataValue.md(md_table(preview, list(preview[0]) if preview else ["lesion_id"])),
        "elapsed_s": summary["elapsed_s"],
    })


@dg.asset(deps=[lesions], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS,
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
    from imaging_assets.store.features import extract_features

    summary = extract_features(
        warehouse.database, params_override=config.params_yaml, workers=config.workers or None,
        retry_failed=config.retry_failed, progress=ProgressReporter("lesions extracted", context.log.info),
    )
    context.log.info(f"extracted {summary['extracted']}, failed {summary['failed']}, "
                     f"unchanged {summary['skipped_current']} in {summary['elapsed_s']} s")
    with warehouse.get_connection(read_only=True) as con:
        n_rows = con.execute("SELECT count(*) FROM radiomics_features").fetchone()[0]
        n_lesions = con.execute("SELECT count(*) FROM radiomics_provenance").fetchone()[0]
        per_class = con.execute(
            "SELECT image_type, count(DISTINCT feature_class || feature) AS features FROM radiomics_features "
            "GROUP BY 1 ORDER BY 1").fetchdf().to_dict("records")
        timing = con.execute("SELECT avg(elapsed_s), max(elapsed_s) FROM radiomics_provenance").fetchone()
        versions = [r[0] for r in con.execute(
            "SELECT DISTINCT params_hash FROM radiomics_provenance ORDER BY 1").fetchall()]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": int(n_rows),
        "lesions_with_features": int(n_lesions),
        "features_per_lesion": summary["features_per_lesion"],
        "extracted_this_run": summary["extracted"],
        "failed_this_run": summary["failed"],
        "unchanged_skipped": summary["skipped_current"],
        "known_failures_skipped": summary["skipped_failed"],
        "errors": dg.MetadataValue.md(md_table(summary["errors"], ["lesion_id", "message"])),
        "features_by_image_type": dg.MetadataValue.md(md_table(per_class, ["image_type", "features"], 40)),
        "mean_s_per_lesion": round(float(timing[0] or 0.0), 3),
        "max_s_per_lesion": round(float(timing[1] or 0.0), 3),
        "lesions_per_s": summary["lesions_per_s"] or 0.0,
        "params_hashes": dg.MetadataValue.json(versions),
        "elapsed_s": summary["elapsed_s"],
    })


@dg.asset_check(asset=radiomics_features, pool="duckdb_writer", blocking=True,
                description="Share of extractable lesions without features stays below 5 %.")
def radiomics_failure_share(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Failed extractions over extractable lesions, with the failing lesions and messages."""
    threshold = 0.05
    with warehouse.get_connection(read_only=True) as con:
        total = con.execute("SELECT count(*) FROM lesions WHERE extractable").fetchone()[0]
        failed = con.execute(
            "SELECT e.lesion_id, e.message FROM radiomics_errors e JOIN lesions l USING (lesion_id) "
            "WHERE l.extractable ORDER BY 1").fetchall()
    share = len(failed) / total if total else 0.0
    return dg.AssetCheckResult(
        passed=share <= threshold,
        metadata={
            "observed_share": round(share, 4), "failed": len(failed), "extractable": int(total),
            "threshold": threshold,
            "reason": "many failures mean a systematic problem (params, decoder, geometry)",
            "failures": dg.MetadataValue.md(md_table([{"lesion_id": a, "message": b} for a, b in failed],
                                                ["lesion_id", "message"])),
        },
    )


@dg.asset_check(asset=lesions, pool="duckdb_writer", description="Every lesion decodes to a usable mask (warns otherwise).")
def lesions_decodable(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Lesions whose status is not ok, by status, with reasons."""
    with warehouse.get_connection(read_only=True) as con:
        rows = con.execute("SELECT lesion_id, status, reason FROM lesions WHERE status <> 'ok' ORDER BY 1").fetchall()
        total = con.execute("SELECT count(*) FROM lesions").fetchone()[0]
    return dg.AssetCheckResult(
        passed=not rows,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_not_ok": len(rows), "lesions": int(total), "threshold": 0,
            "reason": "empty, one-voxel, off-image or flagged-series lesions yield no features",
            "lesions_not_ok": dg.MetadataValue.md(md_table([{"lesion_id": a, "status": b, "reason": c} for a, b, c in rows],
                                                      ["lesion_id", "status", "reason"])),
        },
    )
