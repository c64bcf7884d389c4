"""Robustness benchmark: wall time of the perturbation analysis vs the cohort's feature extraction.

Usage::

    .venv/bin/python benchmarks/robustness.py [--demo DIR] [--patients 100] [--max-lesions 48] [--perturbations 6]

On the demo cohort (generated into a temporary folder when ``--demo`` is not given), in one run: the
ingest steps, ``extract_features`` on every lesion (the ``radiomics_features`` asset's code), then
``compute_robustness`` with the default chain (the ``feature_robustness`` asset's code, sample of at most
``--max-lesions`` lesions x ``--perturbations``). Prints both wall times, the time per perturbed
extraction and the ratio (target: robustness < 4x extraction).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from imaging_assets.dicom.pseudonym import DEMO_KEY  # synthetic data: the explicit demo key
from imaging_assets.features.perturb import PerturbationSpec
from imaging_assets.stages import ChainSettings, run_chain
from imaging_assets.stages.radiomics import extract_features
from imaging_assets.stages.reproducibility import compute_robustness
from imaging_assets.store.warehouse import Warehouse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, help="an existing demo cohort folder (with dicom/)")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--max-lesions", type=int, default=48)
    ap.add_argument("--perturbations", type=int, default=6)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo
        if demo is None:
            from imaging_assets.demo.generator import generate_cohort

            demo = generate_cohort(Path(tmp) / "demo", n_patients=args.patients, seed=0).out_dir
        wh = Warehouse(Path(tmp) / "wh")
        run_chain(wh, ChainSettings(dicom_roots=[demo / "dicom"], secret=DEMO_KEY), until="lesions")
        t0 = time.perf_counter()
        ext = extract_features(wh)
        t_ext = time.perf_counter() - t0
        spec = PerturbationSpec(n_perturbations=args.perturbations)
        t0 = time.perf_counter()
        rob = compute_robustness(wh, spec=spec, max_lesions=args.max_lesions)
        t_rob = time.perf_counter() - t0
    n = rob.extracted + rob.failed
    print(f"cores: {os.cpu_count()}; cohort: {ext.extractable} extractable lesions")
    print(f"radiomics_features (all {ext.extracted} lesions):            {t_ext:7.1f} s "
          f"({t_ext / max(ext.extracted, 1):.3f} s per lesion)")
    print(f"feature_robustness ({rob.sampled} lesions x {spec.n_perturbations} perturbations = {n} extractions,"
          f" {rob.pairs} test-retest pairs): {t_rob:7.1f} s ({t_rob / max(n, 1):.3f} s per perturbed extraction)")
    print(f"ratio robustness / extraction: {t_rob / t_ext:.2f}x (target < 4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
