"""features domain package (no Dagster imports)."""
