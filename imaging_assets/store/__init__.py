"""store domain package (no Dagster imports)."""
