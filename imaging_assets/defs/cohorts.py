"""Cohorts: the similar-case job that stores a ranked cohort table (the one search path: stages.cohorts)."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import md_table
from imaging_assets.defs.resources import WarehouseResource


class CohortConfig(dg.Config):
    """A similar-case query: a reference lesion (id from the `lesions` preview) or a new image + mask."""

    name: str = Field(description="Cohort name: lower-case letters, digits, underscores; the table is cohort_<name>.")
    reference_lesion_id: str | None = Field(default=None, description="lesion_id of the reference lesion.")
    image: str | None = Field(default=None, description="Or: a new image (DICOM folder, NIfTI, NRRD) ...")
    mask: str | None = Field(default=None, description="... and its mask (SEG, RTSTRUCT, NIfTI, NRRD).")
    segment: str | None = Field(default=None, description="Segment/ROI name in the mask when it has several.")
    k: int = Field(default=20, description="Number of similar lesions.")
    modality: list[str] | None = Field(default=None, description="Filter: modalities, e.g. [CT].")
    roi_name: list[str] | None = Field(default=None, description="Filter: harmonised ROI names, e.g. [GTV].")
    body_part: list[str] | None = Field(default=None, description="Filter: body parts.")
    date_from: str | None = Field(default=None, description="Filter: study date from (YYYY-MM-DD).")
    date_to: str | None = Field(default=None, description="Filter: study date to (YYYY-MM-DD).")
    min_volume_mm3: float | None = Field(default=None, description="Filter: smallest lesion volume.")
    max_volume_mm3: float | None = Field(default=None, description="Filter: largest lesion volume.")
    cluster: list[int] | None = Field(default=None, description="Filter: phenotype clusters.")
    include_same_patient: bool = Field(
        default=False, description="Keep the reference patient's other lesions (re-scans rank first); by "
        "default they are left out, as in the CLI and the Python API.")

    def filters(self) -> dict:
        """The filter dict understood by `find_similar`."""
        f: dict = {}
        for col in ("modality", "roi_name", "body_part", "cluster"):
            if getattr(self, col):
                f[col] = list(getattr(self, col))
        if self.date_from or self.date_to:
            f["study_date"] = (self.date_from, self.date_to)
        if self.min_volume_mm3 is not None or self.max_volume_mm3 is not None:
            f["volume_mm3"] = (self.min_volume_mm3, self.max_volume_mm3)
        return f


@dg.op(tags={"kind": "lancedb"})
def find_cohort(context: dg.OpExecutionContext, config: CohortConfig, warehouse: WarehouseResource) -> dict:
    """Runs the similar-case search and writes the ranked cohort table (audited)."""
    from imaging_assets.stages.cohorts import discover_cohort

    out = discover_cohort(warehouse.get_warehouse(), config.name,
                          reference_lesion_id=config.reference_lesion_id, image=config.image, mask=config.mask,
                          segment=config.segment, k=config.k, filters=config.filters(),
                          exclude_same_patient=not config.include_same_patient)
    context.log.info(f"cohort {out.table}: {out.rows} lesions (lesion_vectors v{out.lance_version})")
    context.add_output_metadata({
        "table": out.table, "rows": out.rows, "lesion_vectors_version": out.lance_version,
        "query": dg.MetadataValue.json(out.query),
        "preview": dg.MetadataValue.md(md_table(
            [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in out.preview],
            ["rank", "lesion_id", "patient_key", "distance", "modality", "roi_name", "volume_mm3"])),
        "read_it": out.read_command,
    })
    return {"table": out.table, "rows": out.rows}


@dg.job(description="Similar-case cohort: give a reference lesion id (copy one from the `lesions` asset "
        "preview) or a new image + mask, k and filters in the launchpad; the ranked cohort goes to the "
        "DuckDB table cohort_<name>, the query to `cohorts` and `audit_log`.")
def cohort_discovery():
    """Find the lesions most similar to a reference and store them as a cohort."""
    find_cohort()
