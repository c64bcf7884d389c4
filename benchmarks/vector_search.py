"""Similar-case search benchmark: numpy brute force vs LanceDB flat vs LanceDB ANN, and the sync cost.

Usage::

    .venv/bin/python benchmarks/vector_search.py [--rows 1000000] [--dim 32] [--queries 200]
        [--data clustered|random] [--hnsw-rows 100000] [--flat-sizes 10000,100000] [--keep DIR]

Printed, in one run:

(1) ``sync_vectors`` of N synthetic lesions into a temporary LanceDB (write + verification read-back + scalar
    indexes + the ANN index per policy), and a re-sync of the unchanged cohort (diff only, no new version);
(2) k-NN latency, p50/p95 over ``--queries`` warm queries, side by side: numpy brute force over the
    in-memory float32 matrix, LanceDB flat search (``bypass_vector_index``), LanceDB with the ANN index
    (``refine_factor`` 10) through the table API and through ``find_similar`` (the public API, which also
    opens the table and builds the filter); each unfiltered, with ``modality='CT' AND study_date`` in a
    4-year range (~13 % of rows) and with a selective filter (modality + body part + ROI + dates, ~0.7 %);
    recall@10 of the ANN results against the exact top 10; ratios to numpy;
(3) recall/latency of the ANN index for a few ``nprobes`` values (unfiltered);
(4) flat (exact) search latency at 10k, 100k and N rows: where exact search stops being "milliseconds"
    (this is the ``exact_threshold`` of the index policy);
(5) IVF_PQ vs IVF_HNSW_SQ on ``--hnsw-rows`` rows: build time, latency, recall.

Data: ``clustered`` (default) draws vectors from 64 Gaussian clusters in an 8-dimensional latent space
mapped to ``dim`` dimensions plus noise, then standardises them (radiomics features are strongly
correlated); ``random`` uses i.i.d. N(0, 1) vectors, the hardest case for any ANN index. Queries are
stored vectors plus small noise (a "find lesions like this one" query).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from imaging_assets.store import vectors as V

MODALITIES = np.array(["CT", "MR", "PT"])
BODY_PARTS = np.array(["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK"])
ROIS = np.array(["GTV", "GTV-N", "nodule", "metastasis"])
EPOCH = dt.date(2014, 1, 1)


# ------------------------------------------------------------------------------------------------ data
def make_vectors(n: int, dim: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((n, dim), dtype=np.float32)
    latent_dim, clusters = min(8, dim), 64
    centres = rng.normal(0, 2.0, (clusters, latent_dim))
    mixing = rng.normal(size=(latent_dim, dim))
    out = np.empty((n, dim), np.float32)
    step = 200_000
    for s in range(0, n, step):
        m = min(step, n - s)
        z = centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, latent_dim))
        out[s : s + m] = z @ mixing + 0.5 * rng.normal(size=(m, dim))
    out -= out.mean(axis=0)
    out /= out.std(axis=0)
    return out


def make_table(vectors: np.ndarray, seed: int) -> tuple[pa.Table, dict[str, np.ndarray]]:
    n, dim = vectors.shape
    rng = np.random.default_rng(seed + 1)
    meta = {
        "modality": rng.integers(0, 3, n),
        "body_part": rng.integers(0, 5, n),
        "roi_name": rng.integers(0, 4, n),
        "days": rng.integers(0, 3653, n).astype(np.int32),  # 10 years
        "volume_mm3": rng.lognormal(7.0, 1.5, n),
    }
    ids = np.char.add("L", np.char.zfill(np.arange(n).astype(str), 7))
    table = pa.table(
        {
            "lesion_id": pa.array(ids),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "patient_key": pa.array(np.char.add("P", (np.arange(n) // 3).astype(str))),
            "study_date": pa.array(meta["days"] + (EPOCH - dt.date(1970, 1, 1)).days, pa.int32()).cast(pa.date32()),
            "modality": pa.array(MODALITIES[meta["modality"]]),
            "body_part": pa.array(BODY_PARTS[meta["body_part"]]),
            "roi_name": pa.array(ROIS[meta["roi_name"]]),
            "volume_mm3": pa.array(meta["volume_mm3"]),
            "series_instance_uid": pa.array(np.char.add("1.2.826.0.1.", np.arange(n).astype(str))),
            "feature_set_version": pa.array(np.full(n, "bench-v1")),
        }
    )
    return table, meta


def days(d: str) -> int:
    return (dt.date.fromisoformat(d) - EPOCH).days


FILTERS = {
    "none": (None, None),
    "CT+4y": (
        {"modality": "CT", "study_date": ("2016-01-01", "2019-12-31")},
        lambda m: (m["modality"] == 0) & (m["days"] >= days("2016-01-01")) & (m["days"] <= days("2019-12-31")),
    ),
    "selective": (
        {"modality": "CT", "body_part": "CHEST", "roi_name": "GTV", "study_date": ("2016-01-01", "2019-12-31")},
        lambda m: (m["modality"] == 0) & (m["body_part"] == 0) & (m["roi_name"] == 0)
        & (m["days"] >= days("2016-01-01")) & (m["days"] <= days("2019-12-31")),
    ),
}


# ------------------------------------------------------------------------------------------------ search
class Numpy:
    """Brute force over the in-memory matrix: ||x||² - 2 x·q (+ ||q||²), argpartition top k."""

    def __init__(self, x: np.ndarray, meta: dict[str, np.ndarray]) -> None:
        self.x = x
        self.sq = np.einsum("ij,ij->i", x, x)
        self.meta = meta

    def knn(self, q: np.ndarray, k: int, mask_fn=None) -> np.ndarray:
        if mask_fn is None:
            idx = None
            d = self.sq - 2.0 * (self.x @ q)
        else:
            idx = np.flatnonzero(mask_fn(self.meta))
            d = self.sq[idx] - 2.0 * (self.x[idx] @ q)
        k = min(k, d.size)
        top = np.argpartition(d, k - 1)[:k]
        top = top[np.argsort(d[top])]
        return top if idx is None else idx[top]


def lance_search(tbl, q: np.ndarray, k: int, where: str | None, flat: bool, nprobes: int | None = None,
                 refine: int | None = 10) -> list[str]:
    s = tbl.search(q, vector_column_name="vector").distance_type("l2").limit(k).select(["lesion_id", "_distance"])
    if where:
        s = s.where(where, prefilter=True)
    if flat:
        s = s.bypass_vector_index()
    else:
        if nprobes is not None:
            s = s.nprobes(nprobes)
        if refine is not None:
            s = s.refine_factor(refine)
    return s.to_arrow()["lesion_id"].to_pylist()


def timed(fn, queries: np.ndarray, warm: int = 5) -> tuple[np.ndarray, list]:
    for q in queries[:warm]:
        fn(q)
    lat, out = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        lat.append(time.perf_counter() - t0)
    return np.asarray(lat) * 1e3, out


def pct(lat: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95))


def recall(got: list[list[str]], truth: list[list[str]]) -> float:
    vals = [len(set(g) & set(t)) / max(1, len(t)) for g, t in zip(got, truth, strict=True)]
    return float(np.mean(vals))


def sync_timed(uri: Path, table: pa.Table, dim: int, **kw) -> tuple[V.SyncReport, float]:
    t0 = time.perf_counter()
    rep = V.sync_vectors(uri, table, dim, **kw)
    return rep, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--data", choices=["clustered", "random"], default="clustered")
    ap.add_argument("--flat-sizes", default="10000,100000", help="extra table sizes for the flat-latency scan")
    ap.add_argument("--hnsw-rows", type=int, default=100_000, help="rows for IVF_PQ vs IVF_HNSW_SQ (0: skip)")
    ap.add_argument("--nprobes", default="10,20,50,100", help="nprobes values for section (3)")
    ap.add_argument("--keep", type=Path, help="write the tables here (kept) instead of a temporary folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n, dim, k = args.rows, args.dim, args.k
    root = args.keep or Path(tempfile.mkdtemp(prefix="vector-bench-"))
    print(f"rows {n:,}  dim {dim}  data {args.data}  k {k}  queries {args.queries}  cores {os.cpu_count()}  "
          f"folder {root}")
    try:
        t0 = time.perf_counter()
        x = make_vectors(n, dim, args.data, args.seed)
        table, meta = make_table(x, args.seed)
        print(f"generated in {time.perf_counter() - t0:.1f} s ({x.nbytes / 2**20:.0f} MiB of vectors)")
        rng = np.random.default_rng(args.seed + 7)
        qidx = rng.choice(n, args.queries, replace=False)
        queries = (x[qidx] + 0.05 * rng.standard_normal((args.queries, dim))).astype(np.float32)
        ids = table["lesion_id"].to_numpy(zero_copy_only=False)

        # (1) sync
        uri = root / "main"
        print("\n(1) sync_vectors")
        rep, t_sync = sync_timed(uri, table, dim)
        print(f"    first sync   {t_sync:8.1f} s  -> {rep.rows:,} rows, version {rep.version}, index {rep.index}")
        rep2, t_resync = sync_timed(uri, table, dim)
        print(f"    re-sync      {t_resync:8.1f} s  unchanged {rep2.unchanged:,}, version {rep2.version} "
              f"(same: {rep2.version == rep.version})")
        tbl = V.open_db(uri).open_table(V.VECTOR_TABLE)
        parts, _ = V._ann_layout(tbl, V.ANN_INDEX_NAME)
        if rep.index != "none":
            print(f"    ANN index {rep.index}: {parts} partitions, params {V.ivf_pq_params(n, dim)}")

        # (2) side by side
        print(f"\n(2) k-NN latency, ms over {args.queries} warm queries (p50 / p95), recall@{k} vs exact")
        npy = Numpy(x, meta)
        print(f"    {'filter':<10}{'rows':>9}  {'numpy':>15}{'lance flat':>17}{'lance ANN':>17}{'find_similar':>17}"
              f"{'recall':>8}{'flat/np':>9}{'ANN/np':>8}")
        for fname, (filters, mask_fn) in FILTERS.items():
            where = V.filters_to_where(filters) if filters else None
            selected = int(mask_fn(meta).sum()) if mask_fn else n
            lat_np, res_np = timed(lambda q, mf=mask_fn: npy.knn(q, k, mf), queries)
            truth = [ids[r].tolist() for r in res_np]
            lat_flat, res_flat = timed(lambda q, w=where: lance_search(tbl, q, k, w, flat=True), queries)
            flat_ok = recall(res_flat, truth)
            lat_ann, res_ann = timed(lambda q, w=where: lance_search(tbl, q, k, w, flat=False), queries)
            lat_api, res_api = timed(lambda q, f=filters: V.find_similar(uri, q, k=k, filters=f), queries)
            r_ann = recall(res_ann, truth)
            p_np, p_flat, p_ann, p_api = pct(lat_np), pct(lat_flat), pct(lat_ann), pct(lat_api)
            print(f"    {fname:<10}{selected:>9,}  {p_np[0]:7.2f}/{p_np[1]:7.2f}{p_flat[0]:9.2f}/{p_flat[1]:7.2f}"
                  f"{p_ann[0]:9.2f}/{p_ann[1]:7.2f}{p_api[0]:9.2f}/{p_api[1]:7.2f}{r_ann:8.3f}"
                  f"{p_flat[0] / p_np[0]:9.2f}{p_ann[0] / p_np[0]:8.2f}"
                  + ("" if flat_ok > 0.999 else f"  (flat recall {flat_ok:.3f}!)"))

        # (3) nprobes
        if rep.index != "none":
            print(f"\n(3) ANN nprobes (unfiltered, refine 10 / no refine): p50 ms, recall@{k}")
            lat_np, res_np = timed(lambda q: npy.knn(q, k), queries, warm=0)
            truth = [ids[r].tolist() for r in res_np]
            for npb in [int(v) for v in args.nprobes.split(",") if v]:
                lat_r, res_r = timed(lambda q, p=npb: lance_search(tbl, q, k, None, False, p, 10), queries)
                lat_n, res_n = timed(lambda q, p=npb: lance_search(tbl, q, k, None, False, p, None), queries)
                print(f"    nprobes {npb:>4}: refine {pct(lat_r)[0]:7.2f} ms recall {recall(res_r, truth):.3f}   "
                      f"no refine {pct(lat_n)[0]:7.2f} ms recall {recall(res_n, truth):.3f}")

        # (4) flat latency vs size
        print("\n(4) exact (flat) search latency vs rows, p50 / p95 ms (unfiltered | CT+4y)")
        sizes = sorted({int(s) for s in args.flat_sizes.split(",") if s and int(s) < n})
        where = V.filters_to_where(FILTERS["CT+4y"][0])
        nq = min(args.queries, 100)
        for size in [*sizes, n]:
            if size == n:
                t_small, note = tbl, "(main table, index bypassed)"
            else:
                suri = root / f"flat{size}"
                V.sync_vectors(suri, table.slice(0, size), dim, exact_threshold=size + 1)
                t_small, note = V.open_db(suri).open_table(V.VECTOR_TABLE), ""
            lat_u, _ = timed(lambda q, t=t_small: lance_search(t, q, k, None, True), queries[:nq])
            lat_f, _ = timed(lambda q, t=t_small: lance_search(t, q, k, where, True), queries[:nq])
            npy_s = Numpy(x[:size], {c: v[:size] for c, v in meta.items()})
            lat_n, _ = timed(lambda q: npy_s.knn(q, k), queries[:nq])
            print(f"    {size:>10,} rows: lance flat {pct(lat_u)[0]:8.2f} / {pct(lat_u)[1]:8.2f} | "
                  f"{pct(lat_f)[0]:8.2f} / {pct(lat_f)[1]:8.2f}    numpy {pct(lat_n)[0]:7.2f}  {note}")

        # (5) IVF_PQ vs IVF_HNSW_SQ
        m = min(args.hnsw_rows, n)
        if m >= 1000:
            print(f"\n(5) IVF_PQ vs IVF_HNSW_SQ on {m:,} rows (build = sync incl. scalar indexes)")
            sub = table.slice(0, m)
            npy_s = Numpy(x[:m], {c: v[:m] for c, v in meta.items()})
            sq = queries[: min(args.queries, 100)]
            truth = [ids[npy_s.knn(q, k)].tolist() for q in sq]
            for itype in V.ANN_INDEX_TYPES:
                suri = root / f"ann-{itype}"
                r, t_build = sync_timed(suri, sub, dim, exact_threshold=min(m, 1000), index_type=itype)
                t_ann = V.open_db(suri).open_table(V.VECTOR_TABLE)
                lat_a, res_a = timed(lambda q, t=t_ann: lance_search(t, q, k, None, False), sq)
                print(f"    {itype:<12} sync {t_build:7.1f} s  p50 {pct(lat_a)[0]:6.2f} ms  p95 {pct(lat_a)[1]:6.2f} ms"
                      f"  recall@{k} {recall(res_a, truth):.3f}  (index {r.index})")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
