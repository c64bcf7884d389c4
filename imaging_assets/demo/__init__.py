"""demo domain package (no Dagster imports): the synthetic demo cohort.

``imaging_assets.demo.generator.generate_cohort(out_dir, n_patients=100, seed=0, workers=None)`` writes a
deterministic CT cohort with DICOM SEG / RTSTRUCT lesion segmentations, test-retest series, a few
deliberately broken files, ``outcomes.csv``, ``ground_truth.csv`` and ``manifest.json``; with
``modalities=("CT", "MR", "PT")`` every patient also gets a T1 MR and an FDG PET series of the same lesions.
Modules: ``phantom`` (analytic anatomy and lesion phenotypes), ``modalities`` (MR and PET rendering and
headers), ``rtstruct`` (contours + RTSTRUCT), ``seg`` (highdicom SEG, made deterministic), ``generator``
(cohort layout, process pool, tables).
"""
