"""Vectors stage: the LanceDB table of standardised robust features and its integrity check."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import table_definition, table_metadata
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


@dg.asset(metadata=table_definition("lesion_vectors"),
          deps=[robust_feature_set, "radiomics_features"], group_name=GROUP, kinds={"python", "lancedb"},
          owners=OWNERS, pool="duckdb_writer")
def lesion_vectors(context: dg.AssetExecutionContext, config: VectorConfig,
                   warehouse: WarehouseResource) -> dg.MaterializeResult:
    """One row per extractable lesion in the LanceDB table `lesion_vectors`, per feature space (a
    `space` column; CT, MR and PET lesions are never compared): the space's robust features scaled
    (Yeo-Johnson power transform, then standardisation) with parameters fitted on the space's lesions
    (stored in DuckDB `vector_scalers`, so a new lesion is scaled the same way) as a float32 vector,
    plus lesion_id, patient key, study date, modality, body part, harmonised ROI name, volume, series
    UID, feature-set version and cluster for filters.
    Idempotent upsert by lesion_id (verified after the write); lesions gone upstream are deleted; an
    unchanged cohort leaves the table version unchanged. Exact search below the threshold, ANN above.
    Old table versions are removed by the retention policy after the write (the versions audit rows and
    cohorts name stay, and the last IMAGING_ASSETS_LANCE_KEEP_DAYS days, default 1): `retention_*` metadata.
    Read it from DuckDB SQL with `imaging-assets sql` (registered as the view `lesion_vectors`).
    """
    from imaging_assets.stages.vectors import build_lesion_vectors

    wh = warehouse.get_warehouse()
    s = build_lesion_vectors(wh, exact_threshold=config.exact_threshold)
    context.log.info(f"lesion_vectors v{s.table_version}: {s.rows} rows of dim {s.dim} "
                     f"(+{s.inserted} ~{s.updated} -{s.deleted}), index {s.index}")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": s.rows,
        "table_version": s.table_version,
        "dim": s.dim,
        "feature_set_version": s.feature_set_version,
        "inserted": s.inserted, "updated": s.updated, "deleted": s.deleted, "unchanged": s.unchanged,
        "index": s.index,
        "by_space": table_metadata(s.spaces, ["space", "rows", "dim", "feature_set_version",
                                                            "excluded"]),
        "excluded_lesions": table_metadata(s.excluded, ["lesion_id", "space", "reason"]),
        "lance_uri": wh.lance_uri,
        "elapsed_s": s.elapsed_s,
        # version retention (pinned versions and the last N days stay): what this run removed and kept
        **{f"retention_{k}": v for k, v in s.retention.items()},
    })


@dg.asset_check(asset=lesion_vectors, pool="duckdb_writer", blocking=True,
                description="Vector integrity: one row per extractable lesion with features, right dimension, "
                "finite values, current feature-set version.")
def vectors_integrity(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Compares the Lance table with the DuckDB lesions and the active robust set."""
    from imaging_assets.stages.vectors import vector_integrity

    report = vector_integrity(warehouse.get_warehouse())
    return dg.AssetCheckResult(
        passed=not report.problems,
        metadata={"observed_rows": report.rows, "expected_rows": report.expected_rows,
                  "problems": "; ".join(report.problems) or "none",
                  "reason": "search must see exactly the current cohort"},
    )
