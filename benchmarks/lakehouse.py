"""Object storage and lakehouse benchmark: the demo materialized with the warehouse on a local S3 server vs on
local disk, side by side in one run, and the cost of the Delta Lake export.

Usage::

    .venv/bin/python benchmarks/lakehouse.py [--demo data/demo] [--patients N]

In one run, on this machine:

1. a fresh local warehouse: every unpartitioned asset of the code location materialized in-process
   (``dg.materialize``, as ``make demo`` runs them), then again (the incremental re-run: nothing new);
2. the same on a warehouse whose files and tables live on a real S3-compatible server on loopback
   (``imaging_assets.locals3``: moto, conditional writes enforced), DuckDB's file on local disk;
3. per step seconds from Dagster's event log (step start to success) for both, the Delta export
   (``delta_tables``) among them.

Prints wall times, the S3 / local ratio (target <= 1.5: object storage may cost requests, not a redesign)
and the Delta export's share of the local demo materialization (target <= 10 %), with PASS/FAIL lines.
``--patients N`` generates a smaller synthetic cohort instead of using the demo's (a quick check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S3_RATIO = 1.5
TARGET_DELTA_SHARE = 0.10


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Seconds from STEP_START to STEP_SUCCESS (or failure) per step of a run."""
    import dagster as dg

    start: dict[str, float] = {}
    out: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        ev = entry.dagster_event
        if ev is None or not entry.step_key:
            continue
        if ev.event_type == dg.DagsterEventType.STEP_START:
            start[entry.step_key] = entry.timestamp
        elif ev.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            out[entry.step_key] = entry.timestamp - start.get(entry.step_key, entry.timestamp)
    return out


def materialize_twice(resources: dict, label: str) -> dict:
    """Two materializations of every unpartitioned asset (with checks) on a fresh instance: wall and step seconds."""
    import dagster as dg

    from imaging_assets.definitions import defs as loaded

    defs = loaded() if callable(loaded) and not isinstance(loaded, dg.Definitions) else loaded
    everything = [a for a in defs.assets if a.partitions_def is None] + list(defs.asset_checks)
    out: dict = {}
    with dg.instance_for_test() as instance:
        for run in ("first", "again"):
            t0 = time.perf_counter()
            result = dg.materialize(everything, instance=instance, resources=resources, raise_on_error=False,
                                    run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
            wall = time.perf_counter() - t0
            if not result.success:
                failed = [e.step_key for e in result.all_events if e.is_step_failure]
                raise SystemExit(f"{label} {run}: the materialization failed at {failed}")
            out[run] = {"wall_s": wall, "steps": _step_seconds(instance, result.run_id)}
            print(f"  {label:5s} {run:5s}: {wall:7.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default=str(ROOT / "data" / "demo"), help="the demo cohort folder (make demo makes it)")
    p.add_argument("--patients", type=int, default=0, help="generate a cohort of N patients instead")
    args = p.parse_args(argv)

    from imaging_assets.defs.resources import DicomSourcesResource, OutcomeSourcesResource
    from imaging_assets.dicom.pseudonym import DEMO_KEY

    os.environ.setdefault("IMAGING_ASSETS_PSEUDONYM_KEY", DEMO_KEY)  # the demo's key, no key file made
    # the first materialization of a process pays the heavy imports: pay them before either is timed
    import importlib

    for name in ("torch", "radiomics", "SimpleITK", "lancedb", "lance", "deltalake", "sklearn", "lifelines",
                 "matplotlib.pyplot", "great_expectations", "highdicom", "polars"):
        importlib.import_module(name)
    work = Path(tempfile.mkdtemp(prefix="lakehouse-bench-"))
    if args.patients:
        from imaging_assets.demo.generator import generate_cohort

        cohort = generate_cohort(work / "demo", n_patients=args.patients, seed=11, workers=2)
        dicom, outcomes = cohort.dicom_dir, cohort.outcomes_csv
    else:
        demo = Path(args.demo)
        dicom, outcomes = demo / "dicom", demo / "outcomes.csv"
        if not dicom.is_dir():
            raise SystemExit(f"{dicom}: no demo cohort (run `make demo` first, or pass --patients N)")
    sources = {"dicom_sources": DicomSourcesResource(roots=[str(dicom)]),
               "outcome_sources": OutcomeSourcesResource(path=str(outcomes))}
    print(f"cohort {dicom}; {os.cpu_count()} CPUs", flush=True)
    try:
        return _compare(work, sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(work: Path, sources: dict) -> int:
    from imaging_assets.defs.resources import WarehouseResource
    from imaging_assets.locals3 import local_s3

    os.environ["IMAGING_ASSETS_DUCKDB_DIR"] = str(work / "local-wh")
    local = materialize_twice({**sources, "warehouse": WarehouseResource(root=str(work / "local-wh"))}, "local")
    with local_s3() as s3:
        bucket = s3.bucket("bench-warehouse")
        o = s3.options
        os.environ.update({"AWS_ACCESS_KEY_ID": o.access_key_id, "AWS_SECRET_ACCESS_KEY": o.secret_access_key})
        os.environ["IMAGING_ASSETS_DUCKDB_DIR"] = str(work / "s3-duckdb")
        remote = materialize_twice({**sources, "warehouse": WarehouseResource(
            root=f"{bucket}/wh", s3_endpoint_url=o.endpoint_url, s3_region=o.region)}, "s3")
        client = s3.client()
        objects = sum(len(page.get("Contents", [])) for page in
                      client.get_paginator("list_objects_v2").paginate(Bucket="bench-warehouse"))
        size = sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench-warehouse")
                   for o in page.get("Contents", []))

    print("\nper step (seconds): local first | s3 first | local again | s3 again")
    steps = sorted(set(local["first"]["steps"]) | set(remote["first"]["steps"]),
                   key=lambda s: -remote["first"]["steps"].get(s, 0))
    for s in steps:
        vals = [local["first"]["steps"].get(s), remote["first"]["steps"].get(s), local["again"]["steps"].get(s),
                remote["again"]["steps"].get(s)]
        print(f"  {s:32s} " + " | ".join(f"{v:7.2f}" if v is not None else "      -" for v in vals))
    ratio = remote["first"]["wall_s"] / local["first"]["wall_s"]
    ratio2 = remote["again"]["wall_s"] / local["again"]["wall_s"]
    print(f"\nbucket: {objects} objects, {size / 1e6:.1f} MB")
    print(f"demo materialization: local {local['first']['wall_s']:.1f} s, S3 {remote['first']['wall_s']:.1f} s "
          f"(S3/local {ratio:.2f}); re-run: local {local['again']['wall_s']:.1f} s, S3 {remote['again']['wall_s']:.1f} s "
          f"(S3/local {ratio2:.2f})")
    print(f"{'PASS' if ratio <= TARGET_S3_RATIO else 'FAIL'}: S3/local demo materialization {ratio:.2f} "
          f"(target <= {TARGET_S3_RATIO})")
    delta = {k: local[r]["steps"].get("delta_tables") for k, r in (("local", "first"), ("local_again", "again"))}
    delta_s3 = {k: remote[r]["steps"].get("delta_tables") for k, r in (("s3", "first"), ("s3_again", "again"))}
    if delta["local"] is None:
        print("FAIL: no delta_tables step ran")
        return 1
    share = delta["local"] / local["first"]["wall_s"]
    print(f"Delta export: local {delta['local']:.2f} s first, {delta['local_again']:.2f} s re-run; "
          f"S3 {delta_s3['s3']:.2f} s first, {delta_s3['s3_again']:.2f} s re-run")
    print(f"{'PASS' if share <= TARGET_DELTA_SHARE else 'FAIL'}: Delta export {100 * share:.1f} % of the local demo "
          f"materialization (target <= {100 * TARGET_DELTA_SHARE:.0f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
