"""Storage only: where the warehouse is and how its tables are read and written. No domain package and
no Dagster is imported here.

* :mod:`~imaging_assets.store.warehouse` -- the :class:`~imaging_assets.store.warehouse.Warehouse` object (the
  one path resolver), DuckDB connections, transactions, typed row writes;
* :mod:`~imaging_assets.store.schema` -- every DuckDB table and view, declared once, and ``ensure_schema``;
* :mod:`~imaging_assets.store.catalog` -- the file catalog's incremental writes;
* :mod:`~imaging_assets.store.lance` -- the LanceDB vector tables (verified upserts, index policy, the
  ``nearest`` search primitive, DuckDB views);
* :mod:`~imaging_assets.store.sql`, :mod:`~imaging_assets.store.audit` -- read-only SQL and the audit log.

The pipeline steps that use them live in :mod:`imaging_assets.stages`.
"""
