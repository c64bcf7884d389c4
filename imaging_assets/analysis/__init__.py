"""analysis domain package (no Dagster imports).

* :mod:`imaging_assets.analysis.clustering` — k-means (k by silhouette) / HDBSCAN on lesion vectors with
  stable labels, per-cluster profiles (Cohen's d), PCA projection plot.
* :mod:`imaging_assets.analysis.survival` — one row per patient (largest-lesion rule), Kaplan-Meier,
  log-rank and an adjusted Cox model per cluster (lifelines), Kaplan-Meier plot.
"""
