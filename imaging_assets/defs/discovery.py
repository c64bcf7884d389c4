"""Ingest stage: catalog every DICOM file, assemble and geometry-check series, link segmentations."""

import json

import dagster as dg

from imaging_assets.defs.metadata import md_table
from imaging_assets.defs.resources import DicomSourcesResource, WarehouseResource
from imaging_assets.store import ingest

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
    summary = ingest.refresh_catalog(
        warehouse.database,
        dicom_sources.roots,
        secret=dicom_sources.pseudonym_key,
        workers=dicom_sources.worker_count(),
    )
    context.log.info(
        f"catalog: {summary['seen']} files seen, {summary['read']} read, {summary['unchanged']} unchanged, "
        f"{summary['removed']} removed, {summary['quarantined']} quarantined in {summary['elapsed_s']} s"
    )
    reasons = [{"reason": k, "files": v} for k, v in summary["quarantine_by_reason"].items()]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary["catalogued"],
            "files_seen": summary["seen"],
            "files_read": summary["read"],
            "files_unchanged": summary["unchanged"],
            "files_removed": summary["removed"],
            "catalogued_by_kind": dg.MetadataValue.json(summary["catalogued_by_kind"]),
            "quarantined": summary["quarantined"],
            "quarantine_by_reason": dg.MetadataValue.md(md_table(reasons, ["reason", "files"])),
            "roots": dg.MetadataValue.json(list(dicom_sources.roots)),
            "missing_roots": dg.MetadataValue.json(summary["missing_roots"]),
            "elapsed_s": summary["elapsed_s"],
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
    summary = ingest.rebuild_series(warehouse.database)
    context.log.info(f"{summary['series']} series, {summary['flagged']} flagged: {summary['flag_counts']}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary["series"],
            "usable": summary["usable"],
            "flagged": summary["flagged"],
            "flag_counts": dg.MetadataValue.json(summary["flag_counts"]),
            "flagged_series": dg.MetadataValue.md(
                md_table(summary["flagged_series"], ["series_instance_uid", "n_slices", "flags", "details"])
            ),
            "elapsed_s": summary["elapsed_s"],
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
    summary = ingest.rebuild_segmentations(
        warehouse.database, dicom_sources.manifests, secret=dicom_sources.pseudonym_key
    )
    context.log.info(f"{summary['segmentations']} segmentations, by rule {summary['by_rule']}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": summary["segmentations"],
            "linked": summary["linked"],
            "unlinked": summary["unlinked"],
            "by_rule": dg.MetadataValue.json(summary["by_rule"]),
            "by_kind": dg.MetadataValue.json(summary["by_kind"]),
            "unlinked_segmentations": dg.MetadataValue.md(
                md_table(summary["unlinked_rows"], ["path", "reason"])
            ),
            "elapsed_s": summary["elapsed_s"],
        }
    )


@dg.asset_check(asset=imaging_series, pool="duckdb_writer", description="Reports series with geometry problems (they are "
                "excluded from extraction). Warns when any series is flagged.")
def series_geometry(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Series with geometry flags, with the flags and reasons in metadata."""
    with warehouse.get_connection(read_only=True) as con:
        rows = con.execute(
            "SELECT series_instance_uid, n_slices, flags, flag_details FROM imaging_series "
            "WHERE NOT usable ORDER BY series_instance_uid"
        ).fetchall()
        total = con.execute("SELECT count(*) FROM imaging_series").fetchone()[0]
    flagged = [{"series_instance_uid": r[0], "n_slices": r[1], "flags": r[2], "details": r[3]} for r in rows]
    return dg.AssetCheckResult(
        passed=not flagged,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_flagged": len(flagged),
            "series": int(total),
            "threshold": 0,
            "reason": "flagged series are kept but not extracted; fix or re-export them",
            "flagged_series": dg.MetadataValue.md(md_table(flagged, ["series_instance_uid", "n_slices", "flags", "details"])),
        },
    )


@dg.asset_check(asset=segmentations, pool="duckdb_writer", description="Every segmentation links to an image series.")
def segmentations_linked(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Unlinked segmentations and their reasons."""
    with warehouse.get_connection(read_only=True) as con:
        rows = con.execute(
            "SELECT path, unlinked_reason FROM segmentations WHERE linked_series_key IS NULL ORDER BY path"
        ).fetchall()
        total = con.execute("SELECT count(*) FROM segmentations").fetchone()[0]
    unlinked = [{"path": p, "reason": r} for p, r in rows]
    return dg.AssetCheckResult(
        passed=not unlinked,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "observed_unlinked": len(unlinked),
            "segmentations": int(total),
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
    fp = ingest.roots_fingerprint(dicom_sources.roots)
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
