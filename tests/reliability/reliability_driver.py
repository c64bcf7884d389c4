"""Subprocess driver of the reliability suite (crash and concurrency tests start it with ``Popen``).

Modes (``python reliability_driver.py MODE --help``):

``chain``          materialize the whole chain on a warehouse; prints ``STEP <name>``, ``PROGRESS <done>
                   <total>``, ``FLUSH_BEGIN <n>`` / ``FLUSH_END <n>`` around each extraction write transaction
                   and ``DONE``; ``--hang-in-flush N`` stops inside the N-th extraction write transaction
                   (features inserted, provenance not yet) after printing ``IN_TXN <n>``, so a test can
                   SIGKILL it at exactly that point.
``vectors``        ``sync_vectors`` a synthetic set (``A`` or ``B``, see :func:`vector_set`); prints
                   ``SYNC_START`` and ``SYNC_DONE <json>``; ``--hang-before-delete`` stops after the
                   ``merge_insert`` commit, before the deletes, after printing ``DELETING``.
``vector-writer``  alternate two vector sets (600 rows with an ANN index / 200 rows without) until a
                   stop file appears; logs each sync as a JSON line.
``reader``         loop similar-case searches (audited), pinned-version ``nearest`` and ``run_sql``
                   until a stop file appears; logs every answer and every error as JSON lines.
``duckdb-writer``  short write transactions on the DuckDB file in a loop until a stop file appears.

Process pools use spawn/forkserver: everything runs under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DIM_CONCURRENT = 16
CONCURRENT_SETS = {"big": (600, 11), "small": (200, 12)}  # rows, seed
CONCURRENT_THRESHOLD = 300  # >= 300 rows: ANN index; < 240 rows: dropped


def say(*parts: object) -> None:
    print(*parts, flush=True)


# --------------------------------------------------------------------------------------- synthetic vectors


def vector_set(variant: str, n: int, dim: int):
    """Deterministic synthetic ``lesion_vectors`` rows as a pyarrow Table.

    ``A``: ids ``V000000``.. ``V{n-1}``. ``B``: ``A`` minus every 10th id, with new vectors (and volumes) for
    every 3rd id, plus ``n // 10`` new ids.
    """
    import numpy as np

    rng = np.random.default_rng(1)
    vec = rng.standard_normal((n, dim)).astype(np.float32)
    vol = rng.uniform(100, 5000, n)
    ids = np.array([f"V{i:06d}" for i in range(n)])
    idx = np.arange(n)
    if variant == "B":
        rng2 = np.random.default_rng(2)
        changed = idx % 3 == 0
        vec = vec.copy()
        vec[changed] = rng2.standard_normal((int(changed.sum()), dim)).astype(np.float32)
        vol = vol.copy()
        vol[changed] += 1.0
        keep = idx % 10 != 0
        extra = n // 10
        ids = np.concatenate([ids[keep], np.array([f"V{n + j:06d}" for j in range(extra)])])
        vec = np.concatenate([vec[keep], rng2.standard_normal((extra, dim)).astype(np.float32)])
        vol = np.concatenate([vol[keep], rng2.uniform(100, 5000, extra)])
        idx = np.concatenate([idx[keep], n + np.arange(extra)])
    elif variant != "A":
        raise ValueError(variant)
    return _table(ids, vec, vol, idx)


def concurrent_set(name: str):
    """The two alternating sets of the concurrency test: ``big`` (600 rows) and ``small`` (200 rows, the
    first 200 ids of ``big`` with other vectors)."""
    import numpy as np

    n, seed = CONCURRENT_SETS[name]
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n, DIM_CONCURRENT)).astype(np.float32)
    ids = np.array([f"C{i:04d}" for i in range(n)])
    return _table(ids, vec, rng.uniform(100, 5000, n), np.arange(n))


def _table(ids, vec, vol, idx):
    import pyarrow as pa

    dim = vec.shape[1]
    return pa.table({
        "lesion_id": pa.array(ids.tolist(), pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), dim),
        "patient_key": pa.array([f"pk_{i % 97:04d}" for i in idx.tolist()], pa.string()),
        "modality": pa.array(["CT" if i % 2 else "MR" for i in idx.tolist()], pa.string()),
        "roi_name": pa.array(["GTV"] * len(ids), pa.string()),
        "volume_mm3": pa.array(vol, pa.float64()),
    })


# ------------------------------------------------------------------------------------------------ modes


def mode_chain(args: argparse.Namespace) -> int:
    import reliability_helpers as rh

    import imaging_assets.stages.batches as batches_mod

    flushes = {"n": 0}
    real_load = batches_mod.load_batch

    def load_batch(con, version):
        flushes["n"] += 1
        say("FLUSH_BEGIN", flushes["n"], version.read("provenance").num_rows)
        if flushes["n"] == args.hang_in_flush:  # hold the batch's write transaction open: the kill lands inside
            con.execute("BEGIN TRANSACTION")
            con.execute("DELETE FROM radiomics_features WHERE lesion_id IN (SELECT lesion_id FROM lesions)")
            say("IN_TXN", flushes["n"])
            time.sleep(600)
        n = real_load(con, version)
        say("FLUSH_END", flushes["n"])
        return n

    batches_mod.load_batch = load_batch
    rh.run_chain(Path(args.warehouse), Path(args.dicom), Path(args.outcomes), workers=args.workers,
                 batch_size=args.batch_size, progress=lambda done, total: say("PROGRESS", done, total),
                 log=lambda step: say("STEP", step))
    say("DONE")
    return 0


def mode_vectors(args: argparse.Namespace) -> int:
    import imaging_assets.store.lance.sync as vectors_mod

    data = vector_set(args.variant, args.n, args.dim)
    if args.hang_before_delete:
        real_delete = vectors_mod._delete_ids

        def delete_ids(tbl, ids):
            say("DELETING", len(ids))
            time.sleep(600)
            real_delete(tbl, ids)

        vectors_mod._delete_ids = delete_ids
    say("SYNC_START")
    t0 = time.perf_counter()
    report = vectors_mod.sync_vectors(args.uri, data, dim=args.dim, exact_threshold=args.exact_threshold)
    say("SYNC_DONE", json.dumps({**report.to_dict(), "seconds": time.perf_counter() - t0}))
    return 0


def mode_vector_writer(args: argparse.Namespace) -> int:
    from imaging_assets.store.lance import sync_vectors

    sets = {name: concurrent_set(name) for name in CONCURRENT_SETS}
    t0 = time.perf_counter()
    cycles = 0
    with open(args.log, "a") as log:
        while True:
            for name in ("small", "big"):
                rep = sync_vectors(args.uri, sets[name], dim=DIM_CONCURRENT, exact_threshold=CONCURRENT_THRESHOLD)
                log.write(json.dumps({"set": name, **rep.to_dict()}) + "\n")
                log.flush()
            cycles += 1
            if cycles >= args.min_cycles and (Path(args.stop).exists() or time.perf_counter() - t0 > args.max_seconds):
                break
    say("WRITER_DONE", cycles)
    return 0


def mode_reader(args: argparse.Namespace) -> int:
    import numpy as np

    from imaging_assets.stages.similar import find_similar
    from imaging_assets.store.lance import nearest, table_version
    from imaging_assets.store.sql import run_sql
    from imaging_assets.store.warehouse import Warehouse

    wh = Warehouse(Path(args.db).parent, str(args.uri))  # the reader's --db is <root>/warehouse.duckdb
    rng = np.random.default_rng(args.seed)
    calls = {"audited": 0, "iterations": 0, "errors": 0}
    sql = "SELECT count(*) AS n, count(DISTINCT lesion_id) AS d, sum(vector[1]) AS s FROM lesion_vectors"

    with open(args.log, "a") as log:
        def emit(rec):
            log.write(json.dumps(rec, default=float) + "\n")
            log.flush()

        def attempt(kind, fn):
            try:
                emit({"kind": kind, **fn()})
            except Exception as exc:  # noqa: BLE001 - the test counts and shows every error
                calls["errors"] += 1
                emit({"kind": "error", "where": kind, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()})

        def by_vector():
            q = rng.standard_normal(DIM_CONCURRENT).astype(np.float32)
            calls["audited"] += 1
            rows = find_similar(vector=q, k=5, warehouse=wh).to_dicts()
            return {"q": q.tolist(), "ids": [r["lesion_id"] for r in rows], "d": [r["distance"] for r in rows]}

        def by_id():
            calls["audited"] += 1
            rows = find_similar("C0007", k=5, warehouse=wh).to_dicts()
            return {"ids": [r["lesion_id"] for r in rows], "d": [r["distance"] for r in rows]}

        def pinned():
            q = rng.standard_normal(DIM_CONCURRENT).astype(np.float32)
            v = table_version(args.uri)
            rows = nearest(args.uri, q, k=5, version=v)
            return {"v": v, "q": q.tolist(), "ids": [r["lesion_id"] for r in rows],
                    "d": [r["_distance"] for r in rows]}

        def query():
            calls["audited"] += 1
            df = run_sql(wh, sql)
            return {"n": int(df["n"][0]), "d": int(df["d"][0]), "s": float(df["s"][0])}

        while True:
            for kind, fn in (("search_vec", by_vector), ("search_id", by_id), ("pinned", pinned), ("sql", query)):
                attempt(kind, fn)
            calls["iterations"] += 1
            if Path(args.stop).exists() and calls["iterations"] >= args.min_iterations:
                break
        emit({"kind": "summary", **calls})
    return 0


def mode_duckdb_writer(args: argparse.Namespace) -> int:
    from imaging_assets.store import audit
    from imaging_assets.store.warehouse import connect

    n = errors = 0
    slowest = 0.0
    with open(args.log, "a") as log:
        while True:
            t0 = time.perf_counter()
            try:
                with connect(args.db) as con:
                    con.execute("CREATE TABLE IF NOT EXISTS stress_writes (i INTEGER, note VARCHAR)")
                    con.execute("BEGIN TRANSACTION")
                    con.execute("INSERT INTO stress_writes VALUES (?, ?)", [n, "x" * 100])
                    con.execute("COMMIT")
                if n % 3 == 0:
                    audit.record(args.db, "stress", "stress write", {"i": n}, user="stress-writer")
                n += 1
                slowest = max(slowest, time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                errors += 1
                log.write(json.dumps({"kind": "error", "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()}) + "\n")
                log.flush()
            time.sleep(0.01)
            if Path(args.stop).exists() and n >= args.min_writes:
                break
        log.write(json.dumps({"kind": "summary", "writes": n, "errors": errors, "slowest_s": round(slowest, 3)}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)

    c = sub.add_parser("chain")
    c.add_argument("--warehouse", required=True)
    c.add_argument("--dicom", required=True)
    c.add_argument("--outcomes", required=True)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--batch-size", type=int, default=2)
    c.add_argument("--hang-in-flush", type=int, default=0)
    c.set_defaults(func=mode_chain)

    v = sub.add_parser("vectors")
    v.add_argument("--uri", required=True)
    v.add_argument("--variant", choices=["A", "B"], required=True)
    v.add_argument("--n", type=int, default=50_000)
    v.add_argument("--dim", type=int, default=16)
    v.add_argument("--exact-threshold", type=int, default=100_000)
    v.add_argument("--hang-before-delete", action="store_true")
    v.set_defaults(func=mode_vectors)

    w = sub.add_parser("vector-writer")
    w.add_argument("--uri", required=True)
    w.add_argument("--stop", required=True)
    w.add_argument("--log", required=True)
    w.add_argument("--min-cycles", type=int, default=2)
    w.add_argument("--max-seconds", type=float, default=60)
    w.set_defaults(func=mode_vector_writer)

    r = sub.add_parser("reader")
    r.add_argument("--db", required=True)
    r.add_argument("--uri", required=True)
    r.add_argument("--stop", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--min-iterations", type=int, default=3)
    r.set_defaults(func=mode_reader)

    d = sub.add_parser("duckdb-writer")
    d.add_argument("--db", required=True)
    d.add_argument("--stop", required=True)
    d.add_argument("--log", required=True)
    d.add_argument("--min-writes", type=int, default=20)
    d.set_defaults(func=mode_duckdb_writer)

    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
