"""Extraction benchmark: stock pyradiomics on the whole image vs the project's cropped extraction.

Usage::

    .venv/bin/python benchmarks/extraction.py [--pool-lesions 120] [--workers 2] [--skip-native]
        [--skip-thin-slice] [--cases DIR]

Printed, in one run:

(1) per lesion (lung1, lung2, brain1: pyradiomics' test cases ``<case>_image.nrrd`` / ``<case>_label.nrrd``
    in ``--cases DIR``, default the environment variable ``IMAGING_ASSETS_PYRADIOMICS_CASES``; skipped
    with a message when absent; ``lung1-1.25mm``: lung1 reconstructed at 1.25 mm slices, 512x512x189, the
    size of a routine thin-slice chest CT; and a demo lesion), with the modality preset (CT for lung and
    demo, MR for brain):
    stock ``RadiomicsFeatureExtractor.execute`` on the whole image (seconds),
    ``features.extract.extract_lesion`` (seconds: the crop plus :mod:`imaging_assets.features.fastclasses`),
    the ratio (target >= 10), the *floor* and *ceiling*, ``project / floor`` (target <= 1.25, a PASS/FAIL line
    per row, with a profile of where the time beyond the floor goes), and the max relative difference over all features
    (target <= 1e-4; absolute floor 1e-6 x the largest value of the same image type + feature class). The
    floor is the time the project's extraction spends in the computations that both paths run on the same
    box (pyradiomics' C texture matrices and shape, the resampling, the LoG and wavelet filters, see
    :func:`pyradiomics_kernel_timer`); ceiling = stock / floor is the largest ratio any extraction that
    keeps pyradiomics' algorithms could reach on that lesion. Rows ``native``: the same filters without
    resampling, where stock pyradiomics filters the whole image (with resampling it already filters only
    the resampled box, so what the crop saves there is the whole-image B-spline resampling and mask scans);
(2) the demo lesion's extraction time with every preset;
(3) the process pool: the first ``--pool-lesions`` demo lesions (read from NRRD files by the workers)
    with ``workers=1`` vs ``workers=N`` (default 2), each the best of two runs, wall time including the
    pool's start-up, and the speed-up (target >= 1.7).

Stock timings exclude building the extractor (done once beforehand); the project's timings are the best
of two calls after a warm-up (its extractor is cached per params hash). The demo lesions come from
``imaging_assets.demo.generator.render_patient`` (seed 0) when available, else from a synthetic 128x128x50
CT with 20 mm lesions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imaging_assets.features.extract import (
    ExtractionJob,
    FileLesionLoader,
    extract_lesion,
    extract_many,
    extraction_image,
    float32_geometry,
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
@contextmanager
def pyradiomics_kernel_timer() -> Iterator[dict[str, float]]:
    """Seconds spent, inside the block, in the computations no extraction of the same values can skip.

    Wraps pyradiomics' C texture-matrix functions (GLCM, GLRLM, GLSZM, GLDM, NGTDM), its C shape
    coefficients, ``imageoperations.resampleImage`` and the LoG / wavelet filter generators (the time
    spent producing each filtered image). Both stock pyradiomics and the project's extraction run these
    on the same (resampled) box around the lesion, so their sum is a floor for any extraction that keeps
    pyradiomics' algorithms, and ``stock / floor`` is the largest speed ratio cropping (or any other
    reorganisation around pyradiomics) could reach. The Python feature formulas, discretisation and
    cropping are not counted, so the floor is a lower bound. Benchmark-only: the wrappers are removed on exit.
    """
    from radiomics import cMatrices, cShape, imageoperations

    spent = {"matrices": 0.0, "shape": 0.0, "resampling": 0.0, "filters": 0.0}
    saved: list[tuple[object, str, object]] = []

    def timed(owner: object, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        saved.append((owner, name, fn))
        setattr(owner, name, wrapper)

    def timed_generator(owner: object, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            it = iter(fn(*args, **kwargs))
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    spent[key] += time.perf_counter() - t0
                yield item

        saved.append((owner, name, fn))
        setattr(owner, name, wrapper)

    for fn_name in ("calculate_glcm", "calculate_glrlm", "calculate_glszm", "calculate_gldm", "calculate_ngtdm"):
        timed(cMatrices, fn_name, "matrices")
    timed(cShape, "calculate_coefficients", "shape")
    timed(imageoperations, "resampleImage", "resampling")
    for gen_name in ("getLoGImage", "getWaveletImage"):
        timed_generator(imageoperations, gen_name, "filters")
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def time_stock(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> tuple[float, dict[str, float]]:
    """Stock pyradiomics on the whole image, fed the float32 image every extraction sees (the project's one
    pixel type for every source, :func:`extraction_image`), so the comparison holds like inputs."""
    from radiomics.featureextractor import RadiomicsFeatureExtractor

    extractor = RadiomicsFeatureExtractor(params)
    # the cast is not timed: both sides get it (the mask gets the same float32 geometry, else an image whose
    # origin is not float32-exact no longer shares the mask's grid)
    image, mask = extraction_image(image), float32_geometry(mask)
    t0 = time.perf_counter()
    result = extractor.execute(image, mask, label=label)
    elapsed = time.perf_counter() - t0
    return elapsed, {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


def time_project(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> tuple[float, dict[str, float]]:
    """Best of two calls after a warm-up (the extractor is cached per params hash)."""
    feats = extract_lesion(image, mask, label, params)
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        feats = extract_lesion(image, mask, label, params)
        best = min(best, time.perf_counter() - t0)
    return best, feats


def time_floor(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> float:
    """Smallest :func:`pyradiomics_kernel_timer` total over two project extractions."""
    best = float("inf")
    for _ in range(2):
        with pyradiomics_kernel_timer() as spent:
            extract_lesion(image, mask, label, params)
        best = min(best, sum(spent.values()))
    return best


def thin_slice(image: sitk.Image, mask: sitk.Image, slice_mm: float = 1.25) -> tuple[sitk.Image, sitk.Image]:
    """The same volume reconstructed at ``slice_mm`` slices (linear image, nearest-neighbour mask).

    Clinical chest CT is read at 1-1.25 mm: lung1 (48 slices of 5 mm) becomes 512x512x189, the size of a
    routine thin-slice study, to show how the ratio grows with the image while the lesion stays the same.
    """
    sx, sy, sz = image.GetSpacing()
    nx, ny, nz = image.GetSize()
    size = [nx, ny, int(round((nz - 1) * sz / slice_mm)) + 1]
    out = []
    for img, interp in ((image, sitk.sitkLinear), (mask, sitk.sitkNearestNeighbor)):
        out.append(sitk.Resample(img, size, sitk.Transform(), interp, img.GetOrigin(), (sx, sy, slice_mm),
                                 img.GetDirection(), 0, img.GetPixelID()))
    return out[0], out[1]


FLOOR_TARGET = 1.25


def remainder_profile(image: sitk.Image, mask: sitk.Image, label: int, params: dict) -> str:
    """Where one project extraction's time beyond the floor goes: the fused feature passes by class
    (Python only: their C matrices are in the floor), pyradiomics' shape class beyond its C mesh, and the
    rest (the crop and cast, content hashes, mask checks, the extractor's loop)."""
    from imaging_assets.features import fastclasses

    spent: dict[str, float] = {}
    saved = []

    def timed(owner: object, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

        saved.append((owner, name, fn))
        setattr(owner, name, wrapper)

    texture = dict(fastclasses.TEXTURE_FUNCTIONS)
    for name in ("glcm", "glrlm", "glszm", "gldm", "ngtdm", "firstorder"):
        timed(fastclasses, f"{name}_features", name)
    fastclasses.TEXTURE_FUNCTIONS.update({k: getattr(fastclasses, f"{k}_features") for k in texture})
    timed(fastclasses, "discretise", "binning")
    timed(fastclasses.FastFeatureExtractor, "computeShape", "shape")
    try:
        with pyradiomics_kernel_timer() as kernels:
            t0 = time.perf_counter()
            extract_lesion(image, mask, label, params)
            total = time.perf_counter() - t0
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
        fastclasses.TEXTURE_FUNCTIONS.update(texture)
    floor = sum(kernels.values())
    parts = dict(spent)
    parts["shape"] -= kernels["shape"]
    # the C matrices ran inside the texture passes: split them out by their share of the passes' time
    texture_time = sum(parts[k] for k in texture)
    for k in texture:
        parts[k] -= kernels["matrices"] * parts[k] / texture_time if texture_time else 0.0
    parts["other"] = total - floor - sum(parts.values())
    return (f"{(total - floor) * 1e3:.0f} ms beyond the floor: "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))


def per_lesion(rows: list[tuple[str, sitk.Image, sitk.Image, int, str]], native: bool) -> list[float]:
    print(f"{'lesion':<16}{'preset':<12}{'image':>14}{'stock s':>9}{'project s':>11}{'ratio':>7}"
          f"{'floor s':>9}{'ceiling':>9}{'proj/floor':>11}{'max rel diff':>14}")
    ratios = []
    over: list[tuple[str, float]] = []
    profiles = []
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
            tf = time_floor(image, mask, label, params)
            diff, where = max_relative_difference(ref, mine)
            ratios.append(ts / tp)
            size = "x".join(str(s) for s in image.GetSize())
            print(f"{name:<16}{tag:<12}{size:>14}{ts:>9.2f}{tp:>11.3f}{ts / tp:>7.1f}{tf:>9.3f}{ts / tf:>9.1f}"
                  f"{tp / tf:>11.2f}{diff:>14.1e}" + (f"  ({where})" if diff > 1e-4 else ""), flush=True)
            over.append((f"{name} {tag}", tp / tf))
            profiles.append(f"  {name} {tag}: " + remainder_profile(image, mask, label, params))
    print("floor: seconds the project's extraction spends in pyradiomics' C texture matrices and shape, the "
          "resampling and the LoG/wavelet filters (on the same box stock pyradiomics computes them on); "
          "ceiling = stock / floor, the largest ratio any extraction keeping pyradiomics' algorithms can reach")
    print("where the time beyond the floor goes (one extraction each, ms):")
    print("\n".join(profiles))
    for row, ratio in over:
        verdict = "PASS" if ratio <= FLOOR_TARGET else "FAIL"
        print(f"{verdict} project / floor {ratio:.2f} on {row} (target <= {FLOOR_TARGET})")
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-lesions", type=int, default=120,
                    help="demo lesions for the pool comparison (about half the 100-patient demo cohort)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-native", action="store_true", help="only the presets, no native-grid rows")
    ap.add_argument("--skip-thin-slice", action="store_true",
                    help="no lung1-1.25mm row (lung1 reconstructed at 1.25 mm slices: 512x512x189)")
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
            if case == "lung1" and not args.skip_thin_slice:
                rows.append(("lung1-1.25mm", *thin_slice(rows[-1][1], rows[-1][2]), 1, preset))
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
        wall: dict[int, float] = {}
        feats = {}
        for w in (1, args.workers, 1, args.workers):  # alternating, best of two each
            t0 = time.perf_counter()
            outs = list(extract_many(jobs, workers=w))
            elapsed = time.perf_counter() - t0
            wall[w] = min(wall.get(w, float("inf")), elapsed)
            failed = [o for o in outs if not o.ok]
            feats.setdefault(w, {o.lesion_id: o.features for o in outs})
            print(f"workers={w}: {elapsed:.2f} s for {len(outs)} lesions ({len(failed)} failed), "
                  f"{sum(o.elapsed_s for o in outs) / len(outs):.3f} s per lesion in the worker")
        same = feats[1] == feats[args.workers]
        print(f"pool speed-up (best of two each): {wall[1] / wall[args.workers]:.2f}x (target >= 1.7 on 2 cores); "
              f"identical features: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
