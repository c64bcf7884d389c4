"""features domain package (no Dagster imports).

* :mod:`~imaging_assets.features.volumes` -- a series row as a SimpleITK image in patient space;
* :mod:`~imaging_assets.features.lesions` -- SEG / RTSTRUCT / NIfTI / NRRD segments as lesion masks on the
  series grid, ROI-name harmonisation, stable lesion ids;
* :mod:`~imaging_assets.features.params` -- pyradiomics YAML presets per modality (``data/params``), their
  hash, and the crop margin each filter needs;
* :mod:`~imaging_assets.features.extract` -- per-lesion pyradiomics extraction on the lesion's
  neighbourhood (same values as stock pyradiomics on the whole image) and the process-pool batch runner;
* :mod:`~imaging_assets.features.fastclasses` -- one fused vectorised pass per image type over
  pyradiomics' C texture matrices (same values as its classes to 1e-10), used by that extraction;
* :mod:`~imaging_assets.features.pipeline` -- lesion rows and extraction jobs for the assets and the
  ``extract`` command (one code path);
* :mod:`~imaging_assets.features.perturb`, :mod:`~imaging_assets.features.icc`,
  :mod:`~imaging_assets.features.robust` -- perturbation chain, vectorised ICC, robust-set selection;
* :mod:`~imaging_assets.features.quality` -- the Great Expectations suite of the feature table;
* :mod:`~imaging_assets.features.scaling` -- the fitted, stored scaling (Yeo-Johnson + standardisation)
  that turns robust features into lesion vectors.

Submodules are imported explicitly (SimpleITK and pyradiomics load only when extraction is used).
"""
