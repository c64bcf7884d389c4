"""analysis domain package (no Dagster imports)."""
