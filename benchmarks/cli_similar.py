"""Wall time of the ``imaging-assets similar`` command, beside the same search in process.

Usage::

    .venv/bin/python benchmarks/cli_similar.py [--warehouse data/warehouse] [--lesion ID] [--repeats 10]
        [--command "imaging-assets"]

Runs ``similar <id>`` and ``similar <id> --explain`` as subprocesses (``python -m imaging_assets.cli`` of
this checkout by default; ``--command`` runs another launcher, e.g. the installed console script),
``--repeats`` times each after one unmeasured warm-up run (disk cache), and prints the median, minimum and
maximum wall time; then the floor a command cannot go below (the interpreter starting; the imports of the
search path) and the search itself in process (``similar_rows``, ``+ explain_similar``; first call and
median of the following ones). A final line says PASS or FAIL per command: median <= 0.6 s.

Every search writes an audit row into the warehouse (as the command does); the reference lesion is the
first lesion of the vector table unless ``--lesion`` names one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 0.6


def _env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"]
                                                     if os.environ.get("PYTHONPATH") else "")}


def _wall(argv: list[str], repeats: int, warmup: int = 1) -> list[float]:
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO)
        elapsed = time.perf_counter() - t0
        if out.returncode != 0:
            sys.exit(f"{shlex.join(argv)} failed ({out.returncode}):\n{out.stderr}")
        if i >= warmup:
            times.append(elapsed)
    return times


def _row(label: str, times: list[float], unit: str = "s") -> str:
    scale = 1000.0 if unit == "ms" else 1.0
    med, lo, hi = (statistics.median(times) * scale, min(times) * scale, max(times) * scale)
    fmt = "{:8.1f}" if unit == "ms" else "{:8.3f}"
    return f"  {label:44s}" + "".join(fmt.format(v) + f" {unit}" for v in (med, lo, hi))


def _first_lesion(warehouse: Path) -> str:
    from imaging_assets.store.lance import lance_dataset
    from imaging_assets.store.warehouse import Warehouse

    wh = Warehouse.from_settings(root=warehouse)
    ids = lance_dataset(wh.lance_uri).to_table(columns=["lesion_id"]).column("lesion_id").to_pylist()
    if not ids:
        sys.exit(f"the vector table of {wh.root} is empty: run `make demo` first")
    return sorted(ids)[0]


def _in_process(warehouse: Path, lesion: str, repeats: int) -> dict[str, tuple[float, list[float]]]:
    from imaging_assets.stages.similar import explain_similar, similar_rows
    from imaging_assets.store.warehouse import Warehouse

    wh = Warehouse.from_settings(root=warehouse)

    def search():
        return similar_rows(lesion_id=lesion, warehouse=wh)

    def search_explain():
        return explain_similar(wh, similar_rows(lesion_id=lesion, warehouse=wh), reference_lesion_id=lesion)

    out = {}
    for label, fn in (("similar_rows", search), ("similar_rows + explain_similar", search_explain)):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[label] = (first, times)
    return out


def main(argv: list[str] | None = None) -> int:
    from imaging_assets import settings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warehouse", default=settings.warehouse_location(),
                   help="warehouse folder (default: the configured one, data/warehouse)")
    p.add_argument("--lesion", help="reference lesion id (default: the first of the vector table)")
    p.add_argument("--repeats", type=int, default=10, help="measured runs per command (default 10)")
    p.add_argument("--command", default=None,
                   help="launcher of the CLI (default: this interpreter with -m imaging_assets.cli)")
    args = p.parse_args(argv)
    warehouse = Path(args.warehouse)
    if not (warehouse / "warehouse.duckdb").exists():
        sys.exit(f"no warehouse at {warehouse}: run `make demo` first (or pass --warehouse)")
    lesion = args.lesion or _first_lesion(warehouse)
    launcher = shlex.split(args.command) if args.command else [sys.executable, "-m", "imaging_assets.cli"]
    base = [*launcher, "similar", lesion, "--warehouse", str(warehouse)]

    print(f"warehouse {warehouse}, lesion {lesion}, {args.repeats} runs each (after one warm-up), "
          f"launcher {shlex.join(launcher)}")
    print(f"  {'':44s}{'median':>11s}{'min':>11s}{'max':>11s}")
    results = {}
    for label, cmd in (("similar <id>", base), ("similar <id> --explain", [*base, "--explain"])):
        times = _wall(cmd, args.repeats)
        results[label] = statistics.median(times)
        print(_row(f"command: {label}", times))
    print(_row("floor: interpreter start (python -c pass)", _wall([sys.executable, "-c", "pass"], args.repeats)))
    imports = "import imaging_assets.cli, imaging_assets.stages.similar, imaging_assets.store.lance, lance"
    print(_row("floor: + imports of the search path", _wall([sys.executable, "-c", imports], args.repeats)))
    for label, (first, times) in _in_process(warehouse, lesion, args.repeats).items():
        print(_row(f"in process: {label}", times, unit="ms") + f"   (first call {first * 1000:.0f} ms)")
    verdicts = [f"{label}: {'PASS' if med <= TARGET_S else 'FAIL'} ({med:.3f} s, target <= {TARGET_S} s)"
                for label, med in results.items()]
    print("; ".join(verdicts))
    return 0 if all(med <= TARGET_S for med in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
