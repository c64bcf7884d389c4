"""store domain package (no Dagster imports): the warehouse.

* :mod:`~imaging_assets.store.warehouse` -- DuckDB connections, schema, transactions, catalog writes;
* :mod:`~imaging_assets.store.ingest`, :mod:`~imaging_assets.store.features`,
  :mod:`~imaging_assets.store.robustness`, :mod:`~imaging_assets.store.embedding`,
  :mod:`~imaging_assets.store.outcomes`, :mod:`~imaging_assets.store.phenotypes` -- the step behind each
  asset, one transaction per write;
* :mod:`~imaging_assets.store.vectors` -- the LanceDB vector table (verified upserts, index policy, search);
* :mod:`~imaging_assets.store.cohorts`, :mod:`~imaging_assets.store.sql`, :mod:`~imaging_assets.store.audit`
  -- similar-case search, cohort tables, read-only SQL, the audit log.
"""
