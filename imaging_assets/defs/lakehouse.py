"""Lakehouse stage: Delta Lake copies of the governed tables (local folder or s3://)."""

import dagster as dg

from imaging_assets.defs.metadata import table_metadata
from imaging_assets.defs.resources import WarehouseResource

GROUP = "lakehouse"
OWNERS = ["team:imaging"]


@dg.asset(deps=["lesions", "radiomics_features", "feature_robustness", "robust_feature_set", "lesion_vectors",
                "lesion_embeddings", "phenotype_clusters", "cluster_outcomes", "cohort"],
          group_name=GROUP, kinds={"python", "deltalake"}, owners=OWNERS, pool="duckdb_writer")
def delta_tables(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Delta Lake copies of the governed tables under `<warehouse>/delta/<table>` (a local folder or
    s3://): lesions, radiomics_features (long, partitioned by feature space), feature_robustness,
    robust_feature_sets, phenotype_clusters, cluster_survival / cluster_cox / cluster_logrank, the vectors
    (lesion_vectors, lesion_embeddings: the vector as array<float>), the cohorts registry and each
    cohort_<name> table. One MERGE per table per run on its natural key (changed rows updated, new ones
    inserted, vanished ones deleted): an unchanged run rewrites no data file and adds one version whose
    commit names this run. Tables carry a description, column comments and properties (project version,
    params hash per feature space, active robust-set versions); every commit records the asset key and
    the Dagster run id (DESCRIBE HISTORY: userMetadata). Only pseudonymised keys: file paths, raw DICOM UIDs
    and free-text labels are dropped. Read with Spark / Databricks, polars (`pl.read_delta`) or
    `imaging-assets sql` (as `delta_<table>`). Tables whose upstream has not run yet are skipped.
    """
    from imaging_assets.stages.lakehouse import export_delta_tables

    wh = warehouse.get_warehouse()
    r = export_delta_tables(wh, run_id=context.run.run_id, asset_key=context.asset_key.to_user_string(),
                            progress=context.log.info)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": r.rows,
        "delta_uri": dg.MetadataValue.path(r.delta_uri),
        "tables": table_metadata([t.as_row() for t in r.tables],
                                 ["table", "version", "rows", "inserted", "updated", "deleted", "created",
                                  "files_added", "files_removed", "elapsed_s"], limit=50),
        "versions": dg.MetadataValue.json({t.table: t.version for t in r.tables}),
        "skipped": dg.MetadataValue.json(r.skipped),
        "properties": dg.MetadataValue.json(r.properties),
        "inserted": sum(t.inserted for t in r.tables),
        "updated": sum(t.updated for t in r.tables),
        "deleted": sum(t.deleted for t in r.tables),
        "elapsed_s": r.elapsed_s,
    })
