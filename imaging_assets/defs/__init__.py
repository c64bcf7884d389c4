"""The Dagster layer: thin wrappers that wire the domain packages into assets, checks and automation."""
