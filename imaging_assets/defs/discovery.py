"""Ingest stage: catalog every DICOM file, assemble and geometry-check series, link segmentations."""

import json

import dagster as dg

from imaging_assets.defs.metadata import md_table
from imaging_assets.defs.resources import DicomSourcesResource, WarehouseResource
from imaging_assets.stages import discovery

GROUP = "ingest"
OWNERS = ["team:imaging"]


@dg.asset(
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
    files gone from disk are marked `removed`. Files that cannot be used (not DICOM, truncated, missing
    tags, unsupported SOP class, undecodable pixels) go to `dicom_quarantine` with a reason.
    Patient ids are pseudonymised (keyed HMAC) on read: no raw identifier is stored.
    """
    r = discovery.refresh_catalog(
        warehouse.get_warehouse(),
        dicom_sources.roots,
        secret=dicom_sources.pseudonym_key,
        workers=dicom_sources.worker_count(),
    )
    context.log.info(
        f"catalog: {r.seen} files seen, {r.read} read, {r.unchanged} unchanged, "
        f"{r.removed} removed, {r.quarantined} quarantined in {r.elapsed_s} s"
    )
    reasons = [{"reason": k, "files": v} for k, v in r.quarantine_by_reason.items()]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.catalogued,
            "files_seen": r.seen,
            "files_read": r.read,
            "files_unchanged": r.unchanged,
            "files_removed": r.removed,
            "catalogued_by_kind": dg.MetadataValue.json(r.catalogued_by_kind),
            "quarantined": r.quarantined,
            "quarantine_by_reason": dg.MetadataValue.md(md_table(reasons, ["reason", "files"])),
            "roots": dg.MetadataValue.json(list(dicom_sources.roots)),
            "missing_roots": dg.MetadataValue.json(r.missing_roots),
            "elapsed_s": r.elapsed_s,
        }
    )


@dg.asset(
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
    gantry tilt, too few slices, inconsistent spacing/size) are stored with reasons; flagged series stay
    in the table with `usable = false` and are excluded from extraction.
    """
    r = discovery.rebuild_series(warehouse.get_warehouse())
    context.log.info(f"{r.series} series, {r.flagged} flagged: {r.flag_counts}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.series,
            "usable": r.usable,
            "flagged": r.flagged,
            "flag_counts": dg.MetadataValue.json(r.flag_counts),
            "flagged_series": dg.MetadataValue.md(
                md_table(r.flagged_series, ["series_instance_uid", "n_slices", "flags", "details"])
            ),
            "elapsed_s": r.elapsed_s,
        }
    )


@dg.asset(
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
    r = discovery.rebuild_segmentations(
        warehouse.get_warehouse(), dicom_sources.manifests, secret=dicom_sources.pseudonym_key
    )
    context.log.info(f"{r.segmentations} segmentations, by rule {r.by_rule}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": r.segmentations,
            "linked": r.linked,
            "unlinked": r.unlinked,
            "by_rule": dg.MetadataValue.json(r.by_rule),
            "by_kind": dg.MetadataValue.json(r.by_kind),
            "unlinked_segmentations": dg.MetadataValue.md(md_table(r.unlinked_rows, ["path", "reason"])),
            "elapsed_s": r.elapsed_s,
        }
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
            "flagged_series": dg.MetadataValue.md(md_table(flagged, ["series_instance_uid", "n_slices", "flags", "details"])),
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
            "unlinked": dg.MetadataValue.md(md_table(unlinked, ["path", "reason"])),
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
    selection=dg.AssetSelection.all(),
    description="The whole chain: discovery, lesions, features, robustness, vectors, clusters, outcomes "
    "(every stage is incremental: unchanged inputs are not read or extracted again).",
)

nightly_refresh_schedule = dg.ScheduleDefinition(
    name="nightly_refresh_schedule",
    job=refresh_job,
    cron_schedule="0 2 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Refreshes the whole chain every night at 02:00 (incremental: only new or changed studies "
    "are read and extracted). Off by default; turn it on in Automation for a production archive.",
)
