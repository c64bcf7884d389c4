"""Ingest stage: catalog every DICOM file, assemble and geometry-check series, link segmentations."""

import json

import dagster as dg

from imaging_assets.defs.metadata import table_definition, table_metadata
from imaging_assets.defs.resources import DicomSourcesResource, WarehouseResource, pseudonym_secret
from imaging_assets.errors import DicomRootsMissingError, PseudonymKeyError
from imaging_assets.stages import discovery

GROUP = "ingest"
OWNERS = ["team:imaging"]


@dg.asset(metadata=table_definition("dicom_files"),
    group_name=GROUP,
    kinds={"python", "duckdb"},
    owners=OWNERS,
    pool="duckdb_writer",
)
def dicom_files(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, dicom_sources: DicomSourcesResource
) -> dg.MaterializeResult:
    """Catalog of every file under the DICOM roots (DuckDB tables `dicom_files` and `dicom_quarantine`).

    Incremental: only new or changed files (path, size, mtime) are read, in parallel, header only;
    files gone from disk are marked `removed`. The configured roots define the catalog: files under a
    root that is no longer configured are marked `out_of_roots` (kept as history; their lesions and
    features leave downstream). Byte-identical copies of a file at other paths are recorded
    (`duplicate_of` = the canonical path), counted once and never assembled or extracted twice. Files
    that cannot be used (not DICOM, truncated, missing tags, unsupported SOP class, undecodable pixels)
    go to `dicom_quarantine` with a reason. A missing root is reported by the `dicom_roots_present`
    check; when no root exists the asset fails and leaves the catalog untouched.
    Patient ids are pseudonymised (keyed HMAC) on read: no raw identifier is stored.
    """
    try:
        r = discovery.refresh_catalog(
            warehouse.get_warehouse(),
            dicom_sources.roots,
            secret=pseudonym_secret(),
            workers=dicom_sources.worker_count(),
        )
    except DicomRootsMissingError as exc:
        raise dg.Failure(
            description=str(exc),
            metadata={"missing_roots": dg.MetadataValue.json(list(dicom_sources.roots))},
            allow_retries=False,
        ) from exc
    except PseudonymKeyError as exc:  # another key than the warehouse's, or no usable key: nothing written
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    context.log.info(
        f"catalog: {r.seen} files seen, {r.read} read, {r.unchanged} unchanged, "
        f"{r.removed} removed, {r.out_of_roots} out of roots, {r.duplicates} copies, "
        f"{r.quarantined} quarantined in {r.elapsed_s} s"
    )
    if r.missing_roots:
        context.log.warning(f"DICOM roots missing (nothing crawled there): {', '.join(r.missing_roots)}")
    reasons = [{"reason": k, "files": v} for k, v in r.quarantine_by_reason.items()]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.catalogued,
            "files_seen": r.seen,
            "files_read": r.read,
            "files_unchanged": r.unchanged,
            "files_removed": r.removed,
            "files_out_of_roots": r.out_of_roots,
            "files_kept_outside_roots": r.kept_outside_roots,
            "duplicate_copies": r.duplicates,
            "catalogued_by_kind": dg.MetadataValue.json(r.catalogued_by_kind),
            "quarantined": r.quarantined,
            "quarantine_by_reason": table_metadata(reasons, ["reason", "files"]),
            "roots": dg.MetadataValue.json(list(dicom_sources.roots)),
            "missing_roots": dg.MetadataValue.json(r.missing_roots),
            "elapsed_s": r.elapsed_s,
        }
    )


@dg.asset(metadata=table_definition("imaging_series"),
    deps=[dicom_files],
    group_name=GROUP,
    kinds={"python", "duckdb"},
    owners=OWNERS,
    pool="duckdb_writer",
)
def imaging_series(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """One row per image series (DuckDB table `imaging_series`), grouped by SeriesInstanceUID and frame
    of reference, slices sorted along the slice normal, multi-frame supported.

    Geometry QC flags (duplicate positions, missing slices, non-uniform spacing, mixed orientation,
    gantry tilt, too few slices, inconsistent spacing/size, colour pixels) are stored with reasons;
    flagged series stay in the table with `usable = false` and are excluded from extraction. Copies of a
    file at other paths (`dicom_files.duplicate_of`) are not part of any series.
    """
    r = discovery.rebuild_series(warehouse.get_warehouse())
    context.log.info(f"{r.series} series, {r.flagged} flagged: {r.flag_counts}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.series,
            "usable": r.usable,
            "flagged": r.flagged,
            "flag_counts": dg.MetadataValue.json(r.flag_counts),
            "flagged_series": table_metadata(r.flagged_series, ["series_instance_uid", "n_slices", "flags", "details"]),
            "elapsed_s": r.elapsed_s,
        }
    )


@dg.asset(metadata=table_definition("segmentations"),
    deps=[imaging_series],
    group_name=GROUP,
    kinds={"python", "duckdb"},
    owners=OWNERS,
    pool="duckdb_writer",
)
def segmentations(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, dicom_sources: DicomSourcesResource
) -> dg.MaterializeResult:
    """Every DICOM SEG and RTSTRUCT (plus NIfTI/NRRD manifest pairs) linked to its image series
    (DuckDB table `segmentations`), with the rule that linked it: referenced series, or frame of
    reference + spatial extent when the referenced series is absent. Unlinkable ones keep a reason.
    """
    try:
        r = discovery.rebuild_segmentations(
            warehouse.get_warehouse(), dicom_sources.manifests, secret=pseudonym_secret()
        )
    except PseudonymKeyError as exc:  # another key than the warehouse's: nothing written
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    context.log.info(f"{r.segmentations} segmentations, by rule {r.by_rule}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.segmentations,
            "linked": r.linked,
            "unlinked": r.unlinked,
            "by_rule": dg.MetadataValue.json(r.by_rule),
            "by_kind": dg.MetadataValue.json(r.by_kind),
            "unlinked_segmentations": table_metadata(r.unlinked_rows, ["path", "reason"]),
            "elapsed_s": r.elapsed_s,
        }
    )


@dg.asset_check(asset=dicom_files, pool="duckdb_writer",
                description="Every configured DICOM root exists. Warns when some are missing (nothing is crawled "
                "there and their files stay in the catalog); when none exists the dicom_files asset itself fails.")
def dicom_roots_present(warehouse: WarehouseResource, dicom_sources: DicomSourcesResource) -> dg.AssetCheckResult:
    """Missing roots, with the catalog rows kept under each and those kept outside every root."""
    report = discovery.roots_report(warehouse.get_warehouse(), dicom_sources.roots)
    kept = [{"root": root, "files_kept": n} for root, n in report.active_under_missing.items()]
    return dg.AssetCheckResult(
        passed=not report.missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_missing": len(report.missing),
            "roots": dg.MetadataValue.json(report.roots),
            "missing_roots": dg.MetadataValue.json(report.missing),
            "threshold": 0,
            "files_kept_under_missing_roots": table_metadata(kept, ["root", "files_kept"]),
            "files_kept_outside_roots": report.outside_roots,
            "reason": "a missing root is not crawled: its files are neither updated nor removed, and files of "
                      "roots no longer configured stay active until every configured root is present",
        },
    )


@dg.asset_check(asset=imaging_series, pool="duckdb_writer", description="Reports series with geometry problems (they are "
                "excluded from extraction). Warns when any series is flagged.")
def series_geometry(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Series with geometry flags, with the flags and reasons in metadata."""
    report = discovery.geometry_report(warehouse.get_warehouse())
    flagged = report.flagged
    return dg.AssetCheckResult(
        passed=not flagged,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_flagged": len(flagged),
            "series": report.series,
            "threshold": 0,
            "reason": "flagged series are kept but not extracted; fix or re-export them",
            "flagged_series": table_metadata(flagged, ["series_instance_uid", "n_slices", "flags", "details"]),
        },
    )


@dg.asset_check(asset=segmentations, pool="duckdb_writer", description="Every segmentation links to an image series.")
def segmentations_linked(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Unlinked segmentations and their reasons."""
    report = discovery.link_report(warehouse.get_warehouse())
    unlinked = report.unlinked
    return dg.AssetCheckResult(
        passed=not unlinked,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_unlinked": len(unlinked),
            "segmentations": report.segmentations,
            "threshold": 0,
            "reason": "an unlinked segmentation yields no lesions",
            "unlinked": table_metadata(unlinked, ["path", "reason"]),
        },
    )


ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Crawl the DICOM roots, assemble series and link segmentations.",
)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Watches the DICOM roots (one stat per file, nothing opened) and runs the ingest job when a "
    "file was added, changed or deleted. Off by default: turn it on in Automation when the archive "
    "receives new studies.",
)
def new_dicom_sensor(context: dg.SensorEvaluationContext, dicom_sources: DicomSourcesResource):
    """Run `ingest_job` when the fingerprint of the DICOM roots changes."""
    fp = discovery.roots_fingerprint(dicom_sources.roots)
    previous = json.loads(context.cursor) if context.cursor else {}
    if previous.get("digest") == fp["digest"]:
        return dg.SkipReason(f"no change under {len(dicom_sources.roots)} root(s): {fp['files']} files")
    context.update_cursor(json.dumps(fp))
    return dg.RunRequest(
        run_key=f"dicom-{fp['digest']}",
        tags={"imaging_assets/trigger": "new_dicom_sensor", "imaging_assets/files": str(fp["files"])},
    )


refresh_job = dg.define_asset_job(
    "refresh_job",
    # cohorts are partitions of their own (one per name): materialized by cohort_discovery, not here
    # and the extraction's batches are partitions too (backfilled by extraction_job / extraction_celery_job;
    # radiomics_features extracts the batches that are not current itself)
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("cohorts")
    - dg.AssetSelection.assets("radiomics_batches"),
    description="The whole chain: discovery, lesions, pictures, features, robustness, vectors, clusters, "
    "outcomes (every stage is incremental: unchanged inputs are not read or extracted again).",
)

nightly_refresh_schedule = dg.ScheduleDefinition(
    name="nightly_refresh_schedule",
    job=refresh_job,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Refreshes the whole chain every night at 02:00 (incremental: only new or changed studies "
    "are read and extracted). Off by default; turn it on in Automation for a production archive.",
)
