"""Vectors stage: the LanceDB table of standardised robust features, and the cohort discovery job."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import md_table
from imaging_assets.defs.reproducibility import robust_feature_set
from imaging_assets.defs.resources import WarehouseResource

GROUP = "vectors"
OWNERS = ["team:imaging"]


class VectorConfig(dg.Config):
    """Index policy."""

    exact_threshold: int | None = Field(
        default=None, description="Below this many rows searches are exact (flat); from it on, an ANN index "
        "(IVF_SQ with exact re-ranking) is kept up to date after writes. Default: 3,500,000 / vector dimension "
        "rows, clipped to [5,000, 100,000] (a flat scan stays near 10 ms).")


@dg.asset(deps=[robust_feature_set, "radiomics_features"], group_name=GROUP, kinds={"python", "lancedb"},
          owners=OWNERS, pool="duckdb_writer")
def lesion_vectors(context: dg.AssetExecutionContext, config: VectorConfig,
                   warehouse: WarehouseResource) -> dg.MaterializeResult:
    """One row per extractable lesion in the LanceDB table `lesion_vectors`: the robust features
    scaled (Yeo-Johnson power transform, then standardisation) with parameters fitted on the cohort
    (stored in DuckDB `vector_scalers`, so a new lesion is scaled the same way) as a float32 vector,
    plus lesion_id, patient key, study date, modality, body part, harmonised ROI name, volume, series
    UID, feature-set version and cluster for filters.
    Idempotent upsert by lesion_id (verified after the write); lesions gone upstream are deleted; an
    unchanged cohort leaves the table version unchanged. Exact search below the threshold, ANN above.
    Read it from DuckDB SQL with `imaging-assets sql` (registered as the view `lesion_vectors`).
    """
    from imaging_assets.store.embedding import build_lesion_vectors

    s = build_lesion_vectors(warehouse.database, warehouse.lance_uri, exact_threshold=config.exact_threshold)
    context.log.info(f"lesion_vectors v{s['table_version']}: {s['rows']} rows of dim {s['dim']} "
                     f"(+{s['inserted']} ~{s['updated']} -{s['deleted']}), index {s['index']}")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": s["rows"],
        "table_version": s["table_version"],
        "dim": s["dim"],
        "feature_set_version": s["feature_set_version"],
        "inserted": s["inserted"], "updated": s["updated"], "deleted": s["deleted"], "unchanged": s["unchanged"],
        "index": s["index"],
        "lance_uri": warehouse.lance_uri,
        "elapsed_s": s["elapsed_s"],
    })


@dg.asset_check(asset=lesion_vectors, pool="duckdb_writer", blocking=True,
                description="Vector integrity: one row per extractable lesion with features, right dimension, "
                "finite values, current feature-set version.")
def vectors_integrity(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Compares the Lance table with the DuckDB lesions and the active robust set."""
    import numpy as np

    from imaging_assets.store.embedding import vectors_frame
    from imaging_assets.store.robustness import current_robust_set

    tbl, mat = vectors_frame(warehouse.lance_uri)
    with warehouse.get_connection(read_only=True) as con:
        version, features = current_robust_set(con)
        expected = {r[0] for r in con.execute(
            "SELECT lesion_id FROM lesions JOIN radiomics_provenance USING (lesion_id) WHERE extractable").fetchall()}
    ids = tbl.column("lesion_id").to_pylist() if tbl is not None else []
    problems = []
    if len(ids) != len(set(ids)):
        problems.append("duplicate lesion ids")
    if set(ids) != expected:
        problems.append(f"{len(expected - set(ids))} lesions missing, {len(set(ids) - expected)} extra")
    if mat is not None and mat.size and not np.isfinite(mat).all():
        problems.append("non-finite vector values")
    if mat is not None and mat.shape[1] != len(features):
        problems.append(f"dimension {mat.shape[1]} != robust set size {len(features)}")
    versions = set(tbl.column("feature_set_version").to_pylist()) if tbl is not None else set()
    if versions and versions != {version}:
        problems.append(f"feature-set versions {sorted(versions)} != active {version}")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"observed_rows": len(ids), "expected_rows": len(expected), "problems": "; ".join(problems) or "none",
                  "reason": "search must see exactly the current cohort"},
    )


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
    from imaging_assets.store.cohorts import discover_cohort

    out = discover_cohort(warehouse.database, warehouse.lance_uri, config.name,
                          reference_lesion_id=config.reference_lesion_id, image=config.image, mask=config.mask,
                          segment=config.segment, k=config.k, filters=config.filters())
    context.log.info(f"cohort {out['table']}: {out['rows']} lesions (lesion_vectors v{out['lance_version']})")
    context.add_output_metadata({
        "table": out["table"], "rows": out["rows"], "lesion_vectors_version": out["lance_version"],
        "query": dg.MetadataValue.json(out["query"]),
        "preview": dg.MetadataValue.md(md_table(
            [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "vector"}
             for r in out["preview"]],
            ["rank", "lesion_id", "patient_key", "distance", "modality", "roi_name", "volume_mm3"])),
        "read_it": f"imaging-assets sql \"SELECT * FROM {out['table']} ORDER BY rank\"",
    })
    return {"table": out["table"], "rows": out["rows"]}


@dg.job(description="Similar-case cohort: give a reference lesion id (copy one from the `lesions` asset "
        "preview) or a new image + mask, k and filters in the launchpad; the ranked cohort goes to the "
        "DuckDB table cohort_<name>, the query to `cohorts` and `audit_log`.")
def cohort_discovery():
    """Find the lesions most similar to a reference and store them as a cohort."""
    find_cohort()
