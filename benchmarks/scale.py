"""Scale-out benchmark: the demo's extraction as a partitioned backfill on 1 vs 2 Celery workers, and a
projection to a million lesions.

Usage::

    .venv/bin/python benchmarks/scale.py [--demo data/demo] [--series-per-batch 32] [--workers 1,2]

In one run, on this machine, with real servers (imaging_assets.localcluster: PostgreSQL, Redis, the
Dagster daemon, N Celery workers, each worker one process):

1. the demo cohort's discovery and lesions (no Dagster), its series split into batches;
2. the same batches extracted one after another in one process without Dagster (``extract_batch``, what a
   worker's step runs): the floor;
3. for each worker count: a fresh cluster, the batches as dynamic partitions of its PostgreSQL instance,
   ``run_backfill("extraction_celery_job", every batch)`` timed from submission to the last run's end;
4. the load step (``extract_features`` on the backfilled warehouse: DuckDB only, nothing extracted);
5. a Lance write of 100,000 x 128 synthetic vectors (``sync_vectors``): the vector writer's rate.

Prints wall times, the 1 -> 2 worker speed-up (target >= 1.6 on 2 cores), Dagster's overhead (the 1-worker
backfill's wall time beyond its steps' extraction time, per run; submission-to-start latency; the
daemon's launch interval), and a projection for 1M lesions on
8 / 64 / 512 workers with the measured per-lesion cost and overheads, naming the stage that bounds it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaging_assets import localcluster  # noqa: E402
from imaging_assets.dicom.pseudonym import DEMO_KEY  # noqa: E402
from imaging_assets.stages import ChainSettings, run_chain  # noqa: E402
from imaging_assets.stages.batches import batch_files, extract_batch  # noqa: E402
from imaging_assets.stages.radiomics import extract_features  # noqa: E402
from imaging_assets.store.warehouse import Warehouse  # noqa: E402

TARGET_SPEEDUP = 1.6


def _runs_stats(instance, report) -> dict:
    """Per run: duration, launch latency (created -> started), the step's own extraction seconds."""
    import dagster as dg

    durations, latency, extraction, starts = [], [], [], []
    for partition, (run_id, _) in report.runs.items():
        rec = instance.get_run_records(filters=dg.RunsFilter(run_ids=[run_id]))[0]
        if rec.start_time and rec.end_time:
            durations.append(rec.end_time - rec.start_time)
            latency.append(rec.start_time - rec.create_timestamp.timestamp())
            starts.append(rec.start_time)
        ev = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("radiomics_batches"), asset_partitions=[partition]), limit=1).records
        if ev:
            extraction.append(float(ev[0].asset_materialization.metadata["elapsed_s"].value))
    # the daemon launches queued runs one after another: the spacing of the first wave's start times (runs that
    # did not wait for a free slot, at most the tag limit of 8) is its launch rate
    wave = sorted(starts)[:8]
    launch = (wave[-1] - wave[0]) / (len(wave) - 1) if len(wave) > 1 else float("nan")
    return {"durations": durations, "latency": latency, "extraction": extraction, "launch": launch}


def _backfill(base: Path, pristine: Path, workers: int, partitions: list[str]) -> dict:
    import dagster as dg

    from imaging_assets.defs.backfill import run_backfill

    wh = base / f"warehouse-{workers}"
    shutil.copytree(pristine, wh)
    env = {"IMAGING_ASSETS_WAREHOUSE": str(wh), "IMAGING_ASSETS_PSEUDONYM_KEY": DEMO_KEY}
    t_up = time.perf_counter()
    with localcluster.local_cluster(base / f"servers-{workers}", workers=workers, extra_env=env) as c:
        up_s = time.perf_counter() - t_up
        saved = {k: os.environ.get(k) for k in [*env, *c.env]}
        os.environ.update({**env, **c.env})
        try:
            instance = dg.DagsterInstance.get()
            instance.add_dynamic_partitions("series_batches", partitions)
            t0 = time.perf_counter()
            report = run_backfill("extraction_celery_job", partitions, retries=0, timeout_s=3600, instance=instance)
            wall = time.perf_counter() - t0
            stats = _runs_stats(instance, report)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if not report.ok:
        raise SystemExit(f"backfill on {workers} workers failed: {report}")
    return {"wall": wall, "up": up_s, "wh": wh, **stats}


def _lance_rate(base: Path, n: int = 100_000, dim: int = 128) -> float:
    import numpy as np
    import pyarrow as pa

    from imaging_assets.store.lance import sync_vectors

    rng = np.random.default_rng(0)
    vec = rng.standard_normal((n, dim)).astype(np.float32)
    table = pa.table({"lesion_id": [f"L{i:07d}" for i in range(n)],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), dim)})
    t0 = time.perf_counter()
    sync_vectors(base / "lance-bench", table, dim=dim)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "data" / "demo", help="demo cohort (make demo makes it)")
    ap.add_argument("--series-per-batch", type=int, default=32, help="the project default")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args(argv)
    if not (args.demo / "dicom").is_dir():
        print(f"error: {args.demo}/dicom missing: run `make demo` first", file=sys.stderr)
        return 2
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        base = Path(tmp)
        pristine = base / "after-lesions"
        t0 = time.perf_counter()
        run_chain(Warehouse(pristine), ChainSettings(dicom_roots=[args.demo / "dicom"], secret=DEMO_KEY,
                                                     batch_size=args.series_per_batch), until="lesions")
        files = batch_files(Warehouse(pristine))
        partitions = files.folders()
        lesions = sum(len(files.read_inputs(p)["lesions"]) for p in partitions)
        print(f"demo: {lesions} extractable lesions in {len(partitions)} batches of {args.series_per_batch} series "
              f"(discovery + lesions {time.perf_counter() - t0:.1f} s)", flush=True)

        single = base / "single"
        shutil.copytree(pristine, single)
        t0 = time.perf_counter()
        for p in partitions:
            extract_batch(Warehouse(single), p)
        floor = time.perf_counter() - t0
        per_lesion = floor / lesions
        print(f"one process, no Dagster, batch after batch: {floor:.1f} s ({per_lesion:.3f} s per lesion)", flush=True)

        results = {}
        for w in counts:
            r = _backfill(base, pristine, w, partitions)
            results[w] = r
            print(f"{w} Celery worker(s): backfill {r['wall']:.1f} s (cluster up in {r['up']:.1f} s); per run: "
                  f"duration {statistics.mean(r['durations']):.1f} s, step extraction "
                  f"{statistics.mean(r['extraction']):.1f} s, launch latency {statistics.mean(r['latency']):.1f} s",
                  flush=True)
        last = results[counts[-1]]
        t0 = time.perf_counter()
        load = extract_features(Warehouse(last["wh"]))
        load_s = time.perf_counter() - t0
        assert load.batches_extracted == 0, load
        print(f"load step (DuckDB, one writer): {load_s:.2f} s for {lesions} lesions "
              f"({load_s / lesions * 1000:.2f} ms per lesion)", flush=True)
        lance = _lance_rate(base)
        print(f"Lance write: {lance:,.0f} vectors/s (100,000 x 128, sync_vectors)", flush=True)

    status = 0
    if len(counts) >= 2:
        speedup = results[counts[0]]["wall"] / results[counts[-1]]["wall"]
        ok = speedup >= TARGET_SPEEDUP
        status |= 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'} speed-up {counts[0]} -> {counts[-1]} workers: {speedup:.2f}x "
              f"(target >= {TARGET_SPEEDUP})")
    r1 = results[counts[0]]
    # one worker runs the batches one after another: whatever its backfill took beyond its steps' extraction
    # is Dagster's (queue, run start, step start, events, the result backend), per run
    overhead = (r1["wall"] - sum(r1["extraction"])) / len(partitions)
    latency = statistics.mean(r1["latency"])
    launch_s = max(r["launch"] for r in results.values())
    print(f"Dagster overhead (1 worker): {overhead:.1f} s per run beyond the step's extraction "
          f"({r1['wall']:.1f} s backfill vs {sum(r1['extraction']):.1f} s in the steps, {len(partitions)} runs); "
          f"{latency:.1f} s from a run's creation to its start; the daemon launched a run every {launch_s:.2f} s; "
          f"whole backfill {(r1['wall'] / floor - 1) * 100:+.0f} % vs one process without Dagster")

    n = 1_000_000
    lesions_per_batch = lesions / len(partitions)
    runs = n / lesions_per_batch
    print(f"projection for {n:,} lesions ({per_lesion:.3f} s per lesion per core, {lesions_per_batch:.1f} lesions "
          f"per batch -> {runs:,.0f} runs):")
    load_total = n * load_s / lesions
    lance_total = n / lance
    # each worker holds one run at a time: the run's overhead is paid per batch on some worker
    for w in (8, 64, 512):
        extract = (n * per_lesion + runs * overhead) / w
        launch = runs * launch_s  # the daemon's launch interval as measured here (its threads included)
        bound = max(("extraction on the workers", extract), ("run launches by the daemon", launch),
                    key=lambda kv: kv[1])
        total = max(extract, launch) + load_total + lance_total
        print(f"  {w:>3} workers: extraction {extract / 3600:7.2f} h, run launches {launch / 3600:5.2f} h, "
              f"DuckDB load {load_total / 60:5.1f} min, Lance write {lance_total / 60:4.1f} min -> "
              f"{total / 3600:6.2f} h, bounded by {bound[0]}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
