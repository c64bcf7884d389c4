"""Pictures: one PNG per lesion (axial / coronal / sagittal through its centre, mask outline)."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import picture, table_definition, table_metadata
from imaging_assets.defs.radiomics import lesions
from imaging_assets.defs.resources import WarehouseResource

GROUP = "features"
OWNERS = ["team:imaging"]


class ThumbnailConfig(dg.Config):
    """Rendering settings."""

    workers: int = Field(default=0, description="Rendering processes; 0 = one per CPU core.")
    force: bool = Field(default=False, description="Draw every picture again (default: only new or changed lesions).")


@dg.asset(metadata=table_definition("lesion_thumbnails"),
          deps=[lesions], group_name=GROUP, kinds={"python", "duckdb"}, owners=OWNERS, pool="duckdb_writer",
          check_specs=[dg.AssetCheckSpec(
              "thumbnails_complete", asset="lesion_thumbnails",
              description="Every extractable lesion has a picture (warns and names the lesions that could not "
              "be drawn, with the reason).")])
def lesion_thumbnails(context: dg.AssetExecutionContext, config: ThumbnailConfig,
                      warehouse: WarehouseResource) -> dg.MaterializeResult:
    """A small PNG per extractable lesion, `<warehouse>/thumbnails/<lesion_id>.png` (any tool can open it):
    axial, coronal and sagittal slices through the lesion centre with the mask outline, windowed per
    modality (CT lung or soft-tissue window by the lesion's surroundings, MR/PET 1st-99th percentile), with
    scale bars and orientation letters; no patient information is drawn. Incremental: a picture is drawn
    again only when its content hash (the lesion's source files, modality, body part, renderer version)
    changes; pictures of removed lesions are deleted. The pictures of cohorts and the search page are these.
    """
    from imaging_assets.stages.thumbnails import montage_png, render_lesion_thumbnails, thumbnail_coverage

    wh = warehouse.get_warehouse()
    r = render_lesion_thumbnails(wh, workers=config.workers or None, force=config.force)
    context.log.info(f"thumbnails: {r.rendered} drawn, {r.unchanged} unchanged, {r.removed} removed, "
                     f"{len(r.failed)} failed ({r.elapsed_s:.1f} s)")
    cover = thumbnail_coverage(wh)
    tiles = [{"lesion_id": e["lesion_id"], "caption": [e["lesion_id"], f"{e['modality']} "
              f"{(e['volume_mm3'] or 0) / 1000:.1f} cm3"]} for e in r.examples]
    metadata = {
        "dagster/row_count": cover["with_picture"],
        "folder": dg.MetadataValue.path(r.folder),
        "rendered": r.rendered, "unchanged": r.unchanged, "removed": r.removed, "failed": len(r.failed),
        "largest_lesions": picture(wh, "lesion_thumbnails", montage_png(wh, tiles, columns=4) if tiles else None,
                                   "largest lesions"),
        "failures": table_metadata(r.failed, ["lesion_id", "error"]),
        "elapsed_s": r.elapsed_s,
    }
    missing = cover["missing"]
    return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
        check_name="thumbnails_complete", passed=not missing, severity=dg.AssetCheckSeverity.WARN,
        metadata={"observed_with_picture": cover["with_picture"], "lesions": cover["lesions"],
                  "missing": dg.MetadataValue.json(missing[:50]),
                  "errors": table_metadata(cover["errors"], ["lesion_id", "error"]),
                  "threshold": "every extractable lesion"})])
