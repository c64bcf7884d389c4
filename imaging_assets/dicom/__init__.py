"""Pure DICOM domain code: crawl, header parsing, series assembly + geometry QC, segmentation linking,
pseudonymisation. Never imports Dagster."""
