"""Discovery benchmark: naive pydicom loop vs the project's crawl vs its re-scan, on the same files.

Usage::

    .venv/bin/python benchmarks/discovery.py [--tree DIR] [--files 20000] [--workers N]

Without ``--tree`` it writes (once, then reuses) a tree of ``--files`` small CT slices (128x128 int16,
50 slices per series, distinct UIDs and positions) under ``/tmp/imaging-assets-bench-<files>``. The page
cache is warmed first so the three measurements read the same cached bytes. Printed:

(a) naive single-process ``pydicom.dcmread(stop_before_pixels=True)`` loop,
(b) the project's full crawl into an empty warehouse (``stages.discovery.refresh_catalog``: parallel header
    reads, quarantine, DuckDB write),
(c) the project's re-scan of the unchanged tree (same call again),
and the ratios a/b (target >= 2 on 2 cores) and b/c (target >= 20).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from imaging_assets.dicom.pseudonym import DEMO_KEY  # synthetic data: the explicit demo key
from imaging_assets.stages import discovery
from imaging_assets.store.warehouse import Warehouse

SLICES_PER_SERIES = 50


def make_tree(root: Path, n_files: int) -> None:
    """Write ``n_files`` CT slices (distinct UIDs, positions) below ``root``; skip when already there."""
    marker = root / ".complete"
    if marker.exists():
        return
    if root.exists():
        shutil.rmtree(root)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.PatientID = "BENCH"
    rng = np.random.default_rng(0)
    pixels = rng.integers(-1000, 1000, size=(128, 128), dtype=np.int16)
    template.PixelData = pixels.tobytes()
    base = "1.2.826.0.1.3680043.8.498.99"
    for i in range(n_files):
        s, k = divmod(i, SLICES_PER_SERIES)
        ds = template.copy()
        ds.SeriesInstanceUID = f"{base}.1.{s}"
        ds.StudyInstanceUID = f"{base}.2.{s}"
        ds.FrameOfReferenceUID = f"{base}.3.{s}"
        ds.SOPInstanceUID = f"{base}.4.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        folder = root / f"series_{s:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    marker.write_text("ok")


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", type=Path, default=None, help="existing DICOM tree to use")
    ap.add_argument("--files", type=int, default=20000, help="files to generate when --tree is not given")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    tree = args.tree or Path(tempfile.gettempdir()) / f"imaging-assets-bench-{args.files}"
    if args.tree is None:
        t0 = time.perf_counter()
        make_tree(tree, args.files)
        print(f"tree: {tree} ready in {time.perf_counter() - t0:.1f} s")
    paths = sorted(str(p) for p in tree.rglob("*.dcm"))
    warm(paths)
    print(f"files: {len(paths)}, cores: {os.cpu_count()}, crawl workers: {args.workers}")

    t0 = time.perf_counter()
    n_ok = 0
    for p in paths:
        try:
            pydicom.dcmread(p, stop_before_pixels=True)
            n_ok += 1
        except Exception:
            pass
    naive = time.perf_counter() - t0
    print(f"(a) naive dcmread(stop_before_pixels=True) loop, 1 process: {naive:8.2f} s  "
          f"({len(paths) / naive:,.0f} files/s, {n_ok} read)")

    with tempfile.TemporaryDirectory() as tmp:
        wh = Warehouse(Path(tmp))
        t0 = time.perf_counter()
        full = discovery.refresh_catalog(wh, [tree], secret=DEMO_KEY, workers=args.workers)
        crawl_s = time.perf_counter() - t0
        print(f"(b) project full crawl (parallel headers + quarantine + DuckDB): {crawl_s:8.2f} s  "
              f"({full.seen / crawl_s:,.0f} files/s, {full.catalogued} catalogued, "
              f"{full.quarantined} quarantined)")
        t0 = time.perf_counter()
        again = discovery.refresh_catalog(wh, [tree], secret=DEMO_KEY, workers=args.workers)
        rescan_s = time.perf_counter() - t0
        print(f"(c) project re-scan of the unchanged tree:                    {rescan_s:8.2f} s  "
              f"({again.read} files read, {again.unchanged} unchanged)")
    print(f"ratio a/b (full crawl vs naive, target >= 2):   {naive / crawl_s:6.2f}x")
    print(f"ratio b/c (re-scan vs full crawl, target >= 20): {crawl_s / rescan_s:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
