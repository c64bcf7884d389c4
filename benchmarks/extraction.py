"""Extraction benchmark: stock pyradiomics on the whole image vs the project's cropped extraction.

Usage::

    .venv/bin/python benchmarks/extraction.py [--pool-lesions 20] [--workers 2] [--skip-native] [--cases DIR]

Printed, in one run:

(1) per lesion (lung1, lung2, brain1: pyradiomics' test cases ``<case>_image.nrrd`` / ``<case>_label.nrrd``
    in ``--cases DIR``, default the environment variable ``IMAGING_ASSETS_PYRADIOMICS_CASES``; skipped
    with a message when absent; and a demo lesion), with the
    modality preset (CT for lung and demo, MR for brain): stock ``RadiomicsFeatureExtractor.execute`` on the
    whole image (seconds), ``features.extract.extract_lesion`` (seconds), the ratio (target >= 10) and the
    max relative difference over all features (target <= 1e-4; absolute floor 1e-6 x the largest value of
    the same image type + feature class). Rows ``native``: the same filters without resampling, where
    stock pyradiomics filters the whole image (with resampling it already filters only the resampled
    box, so what the crop saves there is the whole-image B-spline resampling and mask scans);
(2) the demo lesion's extraction time with every preset;
(3) the process pool: the same demo lesions (read from NRRD files by the workers) with ``workers=1`` vs
    ``workers=N`` (default 2), wall time including the pool's start-up, and the speed-up (target >= 1.7).

Stock timings exclude building the extractor (done once beforehand); the project's timings are the best
of two calls after a warm-up (its extractor is cached per params hash). The demo lesions come from
``imaging_assets.demo.generator.render_patient`` (seed 0) when available, else from a synthetic 128x128x50
CT with 20 mm lesions.
"""

from __future__ import annotations

import argparse
import os
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging_assets.features.extract import (
    ExtractionJob,
    FileLesionLoader,
    extract_lesion,
    extract_many,
    max_relative_difference,
)
from imaging_assets.features.params import load_params

def default_cases_dir() -> Path | None:
    """``IMAGING_ASSETS_PYRADIOMICS_CASES`` (pyradiomics' test cases: its wheel does not ship them)."""
    env = os.environ.get("IMAGING_ASSETS_PYRADIOMICS_CASES")
    return Path(env) if env else None


# ------------------------------------------------------------------------------------------------ data
def demo_patients(n_lesions: int) -> list[tuple[sitk.Image, sitk.Image, list[int]]]:
    """(image, label map, labels) of demo patients until ``n_lesions`` lesions are collected."""
    out: list[tuple[sitk.Image, sitk.Image, list[int]]] = []
    try:
        from imaging_assets.demo.generator import render_patient
    except ImportError:
        render_patient = None
    count, index = 0, 0
    while count < n_lesions:
        if render_patient is not None:
            rp = render_patient(0, index)
            g = rp.spec.series[0].grid
            image = sitk.GetImageFromArray(rp.volumes[0])
            image.SetSpacing((g.pixel_spacing, g.pixel_spacing, g.slice_spacing))
            image.SetOrigin((g.origin_x, g.origin_y, g.z_positions[0]))
            lab = np.zeros(rp.volumes[0].shape, np.uint8)
            labels = []
            for i, m in enumerate(rp.masks[0], start=1):
                if m.sum() > 1:
                    lab[m] = i
                    labels.append(i)
        else:
            image, lab, labels = synthetic_patient(index)
        mask = sitk.GetImageFromArray(lab)
        mask.CopyInformation(image)
        labels = labels[: n_lesions - count]
        out.append((image, mask, labels))
        count += len(labels)
        index += 1
    return out


def synthetic_patient(seed: int) -> tuple[sitk.Image, np.ndarray, list[int]]:
    """128x128x50 CT-like volume (0.78 x 0.78 x 2.5 mm) with two textured 20 mm lesions."""
    rng = np.random.default_rng(seed)
    shape = (50, 128, 128)
    z, y, x = np.indices(shape)
    sp = np.array([2.5, 0.78, 0.78])
    hu = np.where(((x - 64) / 58.0) ** 2 + ((y - 64) / 45.0) ** 2 < 1, -820.0, 40.0)
    hu = hu + 25.0 * rng.standard_normal(shape)
    lab = np.zeros(shape, np.uint8)
    labels = []
    for i, c in enumerate(((25, 64, 40), (25, 64, 88)), start=1):
        c = np.array(c) + rng.integers(-5, 6, 3)
        d = np.sqrt((((np.stack([z, y, x], -1) - c) * sp) ** 2).sum(-1))
        les = d <= 10.0
        hu[les] = 30.0 + 40.0 * np.sin(0.8 * x[les] + i) + 20.0 * rng.standard_normal(int(les.sum()))
        lab[les] = i
        labels.append(i)
    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    image.SetSpacing((0.78, 0.78, 2.5))
    return image, lab, labels


# ------------------------------------------------------------------------------------------------ timing
def time_stock(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> tuple[float, dict[str, float]]:
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    extractor = RadiomicsFeatureExtractor(params)
    t0 = time.perf_counter()
    result = extractor.execute(image, mask, label=label)
    elapsed = time.perf_counter() - t0
    return elapsed, {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def time_project(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> tuple[float, dict[str, float]]:
    feats = extract_lesion(image, mask, label, params)  # warm-up: extractor cache
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        feats = extract_lesion(image, mask, label, params)
        best = min(best, time.perf_counter() - t0)
    return best, feats


def per_lesion(rows: list[tuple[str, sitk.Image, sitk.Image, int, str]], native: bool) -> list[float]:
    print(f"{'lesion':<14}{'preset':<12}{'image':>16}{'stock s':>10}{'project s':>11}{'ratio':>8}{'max rel diff':>14}")
    ratios = []
    variants = [False, True] if native else [False]
    for name, image, mask, label, preset in rows:
        for nat in variants:
            params = load_params(preset)
            tag = preset
            if nat:
                params["setting"].pop("resampledPixelSpacing", None)
                tag = f"{preset}-native"
            ts, ref = time_stock(image, mask, label, params)
            tp, mine = time_project(image, mask, label, params)
            diff, where = max_relative_difference(ref, mine)
            ratios.append(ts / tp)
            size = "x".join(str(s) for s in image.GetSize())
            print(f"{name:<14}{tag:<12}{size:>16}{ts:>10.2f}{tp:>11.3f}{ts / tp:>8.1f}{diff:>14.1e}"
                  + (f"  ({where})" if diff > 1e-4 else ""), flush=True)
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-lesions", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-native", action="store_true", help="only the presets, no native-grid rows")
    ap.add_argument("--cases", type=Path, default=default_cases_dir(),
                    help="folder with lung1/lung2/brain1 <case>_image.nrrd and <case>_label.nrrd")
    args = ap.parse_args(argv)
    logging.getLogger("radiomics").setLevel(logging.ERROR)

    patients = demo_patients(args.pool_lesions)
    demo_image, demo_mask, demo_labels = patients[0]
    sizes = [int((sitk.GetArrayViewFromImage(demo_mask) == lab).sum()) for lab in demo_labels]
    demo_label = demo_labels[int(np.argmax(sizes))]

    rows = []
    for case, preset in (("lung1", "ct"), ("lung2", "ct"), ("brain1", "mr")):
        img, lab = (Path(args.cases or ".") / f"{case}_{kind}.nrrd" for kind in ("image", "label"))
        if args.cases and img.is_file() and lab.is_file():
            rows.append((case, sitk.ReadImage(str(img)), sitk.ReadImage(str(lab)), 1, preset))
        else:
            print(f"(skipping {case}: no {img.name} and {lab.name} in {args.cases}; pass --cases DIR)")
    rows.append((f"demo-label{demo_label}", demo_image, demo_mask, demo_label, "ct"))

    print("== (1) per lesion: stock pyradiomics on the whole image vs project extraction")
    per_lesion(rows, native=not args.skip_native)

    print("\n== (2) demo lesion with each preset (project extraction)")
    for preset in ("ct", "mr", "pet", "default"):
        t, feats = time_project(demo_image, demo_mask, demo_label, load_params(preset))
        print(f"{preset:<10}{t:>8.3f} s  {len(feats)} features")

    print(f"\n== (3) process pool: {args.pool_lesions} demo lesions, CT preset, workers=1 vs workers={args.workers}")
    with tempfile.TemporaryDirectory(prefix="imaging-assets-bench-") as tmp:
        jobs = []
        for i, (image, mask, labels) in enumerate(patients):
            ip, mp = Path(tmp) / f"p{i}_image.nrrd", Path(tmp) / f"p{i}_label.nrrd"
            sitk.WriteImage(image, str(ip))
            sitk.WriteImage(mask, str(mp))
            jobs += [ExtractionJob(f"p{i}-{lab}", FileLesionLoader(str(ip), str(mp), lab), "ct") for lab in labels]
        wall = {}
        feats = {}
        for w in (1, args.workers):
            t0 = time.perf_counter()
            outs = list(extract_many(jobs, workers=w))
            wall[w] = time.perf_counter() - t0
            failed = [o for o in outs if not o.ok]
            feats[w] = {o.lesion_id: o.features for o in outs}
            print(f"workers={w}: {wall[w]:.2f} s for {len(outs)} lesions ({len(failed)} failed), "
                  f"{sum(o.elapsed_s for o in outs) / len(outs):.3f} s per lesion in the worker")
        same = feats[1] == feats[args.workers]
        print(f"pool speed-up: {wall[1] / wall[args.workers]:.2f}x (target >= 1.7 on 2 cores); "
              f"identical features: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
