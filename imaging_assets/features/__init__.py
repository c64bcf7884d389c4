"""features domain package (no Dagster imports).

* :mod:`~imaging_assets.features.params` -- pyradiomics YAML presets per modality (``data/params``), their
  hash, and the crop margin each filter needs;
* :mod:`~imaging_assets.features.extract` -- per-lesion pyradiomics extraction on the lesion's
  neighbourhood (same values as stock pyradiomics on the whole image) and the process-pool batch runner
  (``extract_lesion``, ``extract_many``, ``ExtractionJob``, ``ExtractionOutcome``, ``stock_extract``).

Submodules are imported explicitly (SimpleITK and pyradiomics load only when extraction is used).
"""
