"""In-memory index benchmark: ``MemoryIndex`` (faiss HNSW + numpy) against Lance ``nearest``, side by side.

Usage::

    .venv/bin/python benchmarks/memory_index.py [--rows 1000000] [--dim 128] [--queries 200] [--warmup 100]
        [--m 16] [--ef-construction 40] [--ef-search 64] [--quick] [--keep DIR]

One run, one table (the ``radiomics`` data of ``benchmarks/search.py``: 1,000,000 x 128, a 64-cluster mixture
in a 16-dimensional latent space, same metadata generator; plus ``cluster`` uniform over 0..999 and a single
feature space in ``space``), written by ``sync_vectors`` with the store's index policy (IVF_SQ + scalar
indexes), then:

* ``MemoryIndex.load``: time to read the table, HNSW build time, memory (the index's own estimate and the
  process RSS growth);
* p50 / p99 latency of single queries (stored vectors plus N(0, 0.05²) noise, timed after ``--warmup``
  queries for other lesions) through Lance ``nearest`` (its default knobs) and ``MemoryIndex.search``, and
  recall@10 of both against numpy exact search with the same filter: unfiltered; ``{"space": [the space]}``
  (what the web app always sends: keeps every row); the ~10 % filter of ``benchmarks/search.py``
  (``modality = CT`` and a 22-month ``study_date`` range), also with the space clause and with the filter
  cache off; ``cluster`` IN 100 of 1000 values (10 %); ``MR`` + ``ABDOMEN`` (~7.5 %);
* by lesion id, excluding the query's patient (the similar-case page);
* an ``efSearch`` sweep (unfiltered and the 10 % filter), and a selectivity sweep (``cluster`` IN m of 1000
  values: 0.2 % to 30 % of rows) of the exact path against the graph-with-selector path: where
  ``filtered_exact_rows`` comes from; the exact kernel at 10k-100k rows: where ``exact_threshold`` comes from;
* ``MemoryIndex.load`` again from the graph cache (``cache_dir``: what a second worker or a restart pays);
* throughput with 1 and 2 threads; the cost of ``is_stale()``;
* PASS/FAIL per target: MemoryIndex p50 <= 1.5 ms unfiltered and <= 3 ms with the 10 % filter, recall@10
  >= 0.95 for both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from imaging_assets.store import lance as V
from imaging_assets.store.lance import memory
from imaging_assets.store.lance import search as lance_search
from imaging_assets.store.lance.memory import MemoryIndex


def _load_search_bench():
    """benchmarks/search.py (its data generator, filters, numpy exact search and timing helpers)."""
    spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).with_name("search.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_search"] = module
    spec.loader.exec_module(module)
    return module


S = _load_search_bench()
K = 10
SPACE = "CT:robust-v3"


def rss_mib(field: str = "VmRSS") -> float:
    """The process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def run(args: argparse.Namespace) -> int:
    import faiss
    import lance
    import lancedb

    n, dim = args.rows, args.dim
    root = args.keep or Path(tempfile.mkdtemp(prefix="memory-bench-", dir="/tmp"))
    print(f"benchmarks/memory_index.py  lancedb {lancedb.__version__}  pylance {lance.__version__}  faiss "
          f"{faiss.__version__}  numpy {np.__version__}  cores {os.cpu_count()}  rows {n:,} x {dim}  queries "
          f"{args.queries} after {args.warmup} warm-up  {dt.datetime.now():%Y-%m-%d %H:%M}")
    try:
        t0 = time.perf_counter()
        x = S.make_vectors(n, dim, 16, args.seed)
        table, meta = S.make_table(x, args.seed)
        rng = np.random.default_rng(args.seed + 3)
        meta["cluster"] = rng.integers(0, 1000, n).astype(np.int32)
        table = table.append_column("cluster", pa.array(meta["cluster"], pa.int32()))
        table = table.append_column("space", pa.array(np.full(n, SPACE)))
        ids = table["lesion_id"].to_numpy(zero_copy_only=False)
        patients = table["patient_key"].to_numpy(zero_copy_only=False)
        print(f"generated in {time.perf_counter() - t0:.1f} s ({x.nbytes / 2**20:.0f} MiB of vectors)")

        uri = root / "radiomics"
        t0 = time.perf_counter()
        rep = V.sync_vectors(uri, table, dim)
        print(f"Lance: sync_vectors (write, verify, index policy) {time.perf_counter() - t0:.1f} s -> index {rep.index}, "
              f"version {rep.version}; nearest defaults nprobes {V.DEFAULT_NPROBES.get(rep.index)}, refine "
              f"{V.DEFAULT_REFINE.get(rep.index)}")
        del table
        gc.collect()

        rss0 = rss_mib()
        graphs = root / "graphs"
        params = dict(hnsw_m=args.m, ef_construction=args.ef_construction, ef_search=args.ef_search)
        t0 = time.perf_counter()
        mem = MemoryIndex.load(uri, cache_dir=graphs, **params)
        t_load = time.perf_counter() - t0
        gc.collect()
        st = mem.stats()
        print(f"MemoryIndex.load {t_load:.1f} s: read {st['load_s']:.1f} s + HNSW build {st['build_s']:.1f} s "
              f"(IndexHNSWFlat M {args.m}, efConstruction {args.ef_construction}, efSearch {args.ef_search}, "
              f"{faiss.omp_get_max_threads()} threads; incl. writing the graph cache); memory: index estimate "
              f"{st['memory_bytes'] / 2**20:.0f} MiB, process RSS {rss0:.0f} -> {rss_mib():.0f} MiB (peak so far "
              f"{rss_mib('VmHWM'):.0f} MiB); kind {st['kind']}, "
              f"filtered_exact_rows {st['filtered_exact_rows']:,}")
        t0 = time.perf_counter()
        again = MemoryIndex.load(uri, cache_dir=graphs, **params)
        t_again = time.perf_counter() - t0
        cache_mib = sum(f.stat().st_size for f in graphs.glob("*.faiss")) / 2**20
        print(f"MemoryIndex.load again with the graph cache (another worker, a restart): {t_again:.1f} s "
              f"(graph {again.stats()['graph']}, {again.stats()['build_s']:.1f} s to map and verify {cache_mib:.0f} MiB; "
              f"read {again.stats()['load_s']:.1f} s)")
        del again
        gc.collect()

        qrng = np.random.default_rng(args.seed + 7)
        qidx = qrng.choice(n, args.queries + args.warmup, replace=False)
        both = (x[qidx] + 0.05 * qrng.standard_normal((len(qidx), dim))).astype(np.float32)
        queries, warmup = both[: args.queries], both[args.queries :]
        npy = S.Numpy(x, meta)
        main_filters, main_mask = S.FILTERS[S.MAIN_FILTER]
        cluster10 = list(range(100))
        cases = [
            ("none", None, None),
            ("space", {"space": [SPACE]}, None),
            (S.MAIN_FILTER, main_filters, main_mask),
            (f"space+{S.MAIN_FILTER}", {"space": [SPACE], **main_filters}, main_mask),
            ("cluster10", {"cluster": cluster10}, lambda m: m["cluster"] < 100),
            ("MR+ABDOMEN", *S.FILTERS["MR+ABDOMEN"]),
        ]
        print(f"single queries, ms p50 / p99; recall@{K} vs numpy exact (same filter)")
        print(f"  {'filter':<22}{'rows':>7}  {'Lance nearest':>15}  {'MemoryIndex':>15}  {'speed-up':>9}  "
              f"{'recall L':>8}  {'recall M':>8}")
        out: dict[str, float] = {}
        truths: dict[str, list[list[str]]] = {}
        for name, filters, mask_fn in cases:
            share = float(mask_fn(meta).mean()) if mask_fn else 1.0
            _, res_np = S.timed(lambda q, mf=mask_fn: npy.knn(q, K, mf), queries, warmup[:2])
            truth = truths[name] = [ids[r].tolist() for r in res_np]
            lat_l, res_l = S.timed(lambda q, f=filters: S.ids_of(V.nearest(uri, q, k=K, filters=f)), queries, warmup)
            lat_m, res_m = S.timed(lambda q, f=filters: S.ids_of(mem.search(q, K, filters=f)), queries, warmup)
            (l50, l99), (m50, m99) = S.pct(lat_l), S.pct(lat_m)
            rl, rm = S.recall(res_l, truth), S.recall(res_m, truth)
            print(f"  {name:<22}{share:>7.1%}  {l50:6.2f} / {l99:6.2f}  {m50:6.2f} / {m99:6.2f}  {l50 / m50:>8.1f}x  "
                  f"{rl:>8.3f}  {rm:>8.3f}")
            out.update({f"{name}_p50": m50, f"{name}_p99": m99, f"{name}_recall": rm, f"{name}_lance_p50": l50})
            if filters:
                lat_u, res_u = S.timed(lambda q, f=filters: S.ids_of(mem.search(q, K, filters=f, cache_filter=False)),
                                       queries, warmup)
                u50, u99 = S.pct(lat_u)
                print(f"  {'  (filter cache off)':<22}{'':>7}  {'':>15}  {u50:6.2f} / {u99:6.2f}  {l50 / u50:>8.1f}x  "
                      f"{'':>8}  {S.recall(res_u, truth):>8.3f}")
                out[f"{name}_uncached_p50"] = u50

        # by lesion id, excluding the query's patient (the similar-case page)
        lids = ids[qidx[: args.queries]].tolist()
        warm_ids = ids[qidx[args.queries :]].tolist()

        def by_id_mem(lid: str, f=None) -> list[str]:
            return S.ids_of(mem.search(lid, K, filters=f, exclude_patient=patients[int(lid[1:])]))

        def by_id_lance(lid: str, f=None) -> list[str]:
            where = f"patient_key <> {V.sql_string(patients[int(lid[1:])])}"
            return S.ids_of(V.nearest(uri, lid, k=K, filters=f, where=where))

        for name, filters in (("by id, other patients", {"space": [SPACE]}),
                              (f"  + {S.MAIN_FILTER}", {"space": [SPACE], **main_filters})):
            lat_l, res_l = S.timed(lambda lid, f=filters: by_id_lance(lid, f), lids, warm_ids)
            lat_m, res_m = S.timed(lambda lid, f=filters: by_id_mem(lid, f), lids, warm_ids)
            mem_exact = [S.ids_of(mem.search(lid, K, filters=filters, exclude_patient=patients[int(lid[1:])],
                                             strategy="exact")) for lid in lids]
            (l50, l99), (m50, m99) = S.pct(lat_l), S.pct(lat_m)
            print(f"  {name:<22}{'':>7}  {l50:6.2f} / {l99:6.2f}  {m50:6.2f} / {m99:6.2f}  {l50 / m50:>8.1f}x  "
                  f"{S.recall(res_l, mem_exact):>8.3f}  {S.recall(res_m, mem_exact):>8.3f}")

        sq = queries[: min(len(queries), 100)]
        print(f"  efSearch sweep (MemoryIndex, {len(sq)} queries): p50 / p99 ms, recall@{K}   [unfiltered | "
              f"{S.MAIN_FILTER}]")
        for ef in (16, 32, 64, 128):
            cells = []
            for name, filters in (("none", None), (S.MAIN_FILTER, main_filters)):
                lat, res = S.timed(lambda q, f=filters, ef=ef: S.ids_of(mem.search(q, K, filters=f, ef_search=ef,
                                                                                  strategy="hnsw")), sq, warmup[:10])
                p50, p99 = S.pct(lat)
                cells.append(f"{p50:5.2f} / {p99:5.2f}  {S.recall(res, truths[name][: len(sq)]):.3f}")
            print(f"    efSearch {ef:>4}:  {cells[0]}   |  {cells[1]}")

        print(f"  selectivity sweep (cluster IN m of 1000 values; MemoryIndex, {len(sq)} queries): rows kept -> exact "
              f"path p50 ms | graph+selector p50 ms, recall@{K} | auto picks")
        for m in (2, 5, 10, 20, 50, 100, 300):
            filters = {"cluster": list(range(m))}
            mask_fn = (lambda mm: (lambda md: md["cluster"] < mm))(m)
            _, res_np = S.timed(lambda q, mf=mask_fn: npy.knn(q, K, mf), sq, warmup[:2])
            truth = [ids[r].tolist() for r in res_np]
            lat_e, res_e = S.timed(lambda q, f=filters: S.ids_of(mem.search(q, K, filters=f, strategy="exact")), sq,
                                   warmup[:10])
            lat_g, res_g = S.timed(lambda q, f=filters: S.ids_of(mem.search(q, K, filters=f, strategy="hnsw")), sq,
                                   warmup[:10])
            kept = int(mask_fn(meta).sum())
            pick = "exact" if kept <= st["filtered_exact_rows"] else "graph"
            print(f"    {kept:>9,} rows ({kept / n:5.1%}):  {S.pct(lat_e)[0]:6.2f} ({S.recall(res_e, truth):.3f})  |  "
                  f"{S.pct(lat_g)[0]:6.2f}, {S.recall(res_g, truth):.3f}  |  {pick}")

        # where the exact threshold comes from: the exact kernel (faiss fvec_L2sqr_ny + argpartition) on m rows
        cells = []
        for m in [m for m in (10_000, 25_000, 50_000, 100_000) if m <= n]:
            block = np.ascontiguousarray(x[:m])
            dis = np.empty(m, np.float32)

            def scan(q, block=block, dis=dis, m=m):
                faiss.fvec_L2sqr_ny(faiss.swig_ptr(dis), faiss.swig_ptr(q), faiss.swig_ptr(block), dim, m)
                return np.argpartition(dis, K - 1)[:K]

            lat, _ = S.timed(scan, sq, warmup[:5])
            cells.append(f"{m:,} rows {S.pct(lat)[0]:.2f} / {S.pct(lat)[1]:.2f} ms")
        print(f"  exact scan kernel p50 / p99 (no graph: tables below exact_threshold "
              f"{memory.default_exact_threshold(dim):,} rows at dim {dim}): " + ";  ".join(cells))

        # throughput: the same 200 queries (half unfiltered, half the 10 % filter) from 1 and 2 threads
        jobs = [(q, None if i % 2 else {"space": [SPACE], **main_filters}) for i, q in enumerate(queries)] * 5
        for threads in (1, 2):
            chunks = [jobs[i::threads] for i in range(threads)]
            workers = [threading.Thread(target=lambda c: [mem.search(q, K, filters=f) for q, f in c], args=(c,))
                       for c in chunks]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            print(f"  throughput {threads} thread(s): {len(jobs) / (time.perf_counter() - t0):,.0f} queries/s "
                  f"(half unfiltered, half space+{S.MAIN_FILTER})")
        t0 = time.perf_counter()
        for _ in range(200):
            mem.is_stale()
        print(f"  is_stale(): {(time.perf_counter() - t0) / 200 * 1e3:.3f} ms per call")

        checks = [
            (f"MemoryIndex unfiltered p50 {out['none_p50']:.2f} ms <= 1.5", out["none_p50"] <= 1.5),
            (f"MemoryIndex filtered ({S.MAIN_FILTER}, 10 %) p50 {out[f'{S.MAIN_FILTER}_p50']:.2f} ms <= 3 "
             f"(filter cache off {out[f'{S.MAIN_FILTER}_uncached_p50']:.2f} ms)", out[f"{S.MAIN_FILTER}_p50"] <= 3.0),
            (f"MemoryIndex recall@10 unfiltered {out['none_recall']:.3f} >= 0.95", out["none_recall"] >= 0.95),
            (f"MemoryIndex recall@10 filtered {out[f'{S.MAIN_FILTER}_recall']:.3f} >= 0.95",
             out[f"{S.MAIN_FILTER}_recall"] >= 0.95),
        ]
        for text, ok in checks:
            print(f"[{'PASS' if ok else 'FAIL'}] {text}")
        print(f"summary: {'all targets met' if all(ok for _, ok in checks) else 'targets NOT all met'}; "
              f"MemoryIndex build {t_load:.1f} s, ~{st['memory_bytes'] / 2**20:.0f} MiB")
    finally:
        lance_search._DATASETS.clear()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100, help="untimed queries (other lesions) first: as benchmarks/search.py")
    ap.add_argument("--m", type=int, default=16, help="HNSW graph degree")
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 60 queries after 20 warm-up ones")
    ap.add_argument("--keep", type=Path, help="write the table under this folder (not removed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows = 100_000 if args.rows == 1_000_000 else args.rows
        args.queries = 60 if args.queries == 200 else args.queries
        args.warmup = 20 if args.warmup == 100 else args.warmup
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
