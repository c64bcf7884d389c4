"""Robustness of the deep embeddings: the step behind ``embedding_robustness`` and its check.

Under the perturbations of the radiomics robustness stage (:mod:`imaging_assets.features.perturb`: noise,
sub-voxel shift, small rotation, volume change, contour randomisation), on a stable sample of lesions: the
ICC(3,1) of every embedding dimension (``embedding_robustness``), and the retrieval stability: the share of a
lesion's top-10 neighbours (other patients, same feature space) that stay its neighbours when it is perturbed
(``embedding_stability``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imaging_assets.stages.embeddings import embeddings_frame, load_active_embedder
from imaging_assets.store.warehouse import Warehouse, table_rows

#: Lesions sampled and perturbed copies per lesion.
ROBUSTNESS_LESIONS = 30
ROBUSTNESS_PERTURBATIONS = 4
#: The check's thresholds: median ICC(3,1) over the dimensions, mean top-10 overlap.
ICC_THRESHOLD = 0.75
OVERLAP_THRESHOLD = 0.5


@dataclass(frozen=True)
class EmbeddingRobustnessResult:
    """Embedding robustness of the active model under the radiomics perturbations."""

    model_version: str
    n_lesions: int
    n_perturbations: int
    dims: int
    median_icc: float | None
    share_icc_above: float | None
    mean_overlap: float | None
    failed: list[dict[str, str]]
    elapsed_s: float
    passed: bool


def _sample(ids: Sequence[str], n: int, seed: int) -> list[str]:
    """A stable sample: the ``n`` ids with the smallest sha1(seed:id)."""
    return sorted(ids, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())[:n]


def _perturbed_crops(task: tuple[dict, dict, dict, Any, int]) -> tuple[str, np.ndarray | None, str | None]:
    """In a worker: the original crop and ``spec.n_perturbations`` perturbed crops of one lesion."""
    from imaging_assets.errors import error_text
    from imaging_assets.features.crops import CROP_SIZE, CROP_SPACING_MM, lesion_crop
    from imaging_assets.features.perturb import perturb
    from imaging_assets.features.pipeline import LesionOptions, SeriesLesionLoader

    lesion, series, seg, spec, _ = task
    try:
        options = LesionOptions(split_components=int(lesion.get("component") or 0) > 0, resample_mask=True)
        image, mask, _ = SeriesLesionLoader(series, seg, int(lesion["segment_number"]),
                                            int(lesion.get("component") or 0), options)()
        margin = [int(np.ceil(CROP_SIZE * CROP_SPACING_MM / 2 / s)) + 2 for s in image.GetSpacing()]
        out = [lesion_crop(image, mask, lesion.get("modality"))]
        for i in range(spec.n_perturbations):
            pim, pmask, _ = perturb(image, mask, i, spec, lesion["lesion_id"], margin_voxels=margin)
            out.append(lesion_crop(pim, pmask, lesion.get("modality")))
        return lesion["lesion_id"], np.stack(out), None
    except Exception as exc:  # noqa: BLE001 - one lesion must not stop the others
        return lesion["lesion_id"], None, error_text(exc, 300)


def _top_ids(query: np.ndarray, mat: np.ndarray, allowed: np.ndarray, k: int) -> set[int]:
    d = ((mat - query) ** 2).sum(axis=1)
    d[~allowed] = np.inf
    order = np.argsort(d, kind="stable")[:k]
    return {int(i) for i in order if np.isfinite(d[i])}


def compute_embedding_robustness(wh: Warehouse, n_lesions: int = ROBUSTNESS_LESIONS,
                                 n_perturbations: int = ROBUSTNESS_PERTURBATIONS, seed: int = 0,
                                 workers: int | None = None, k: int = 10) -> EmbeddingRobustnessResult:
    """ICC(3,1) per embedding dimension and top-``k`` retrieval stability of the active model, on ``n_lesions``
    sampled lesions with ``n_perturbations`` perturbed copies each (noise, sub-voxel shift, small rotation,
    volume change, contour randomisation: :class:`~imaging_assets.features.perturb.PerturbationSpec`).
    Stored in ``embedding_robustness`` / ``embedding_stability`` (replaced for the model version)."""
    import concurrent.futures as cf
    import multiprocessing

    from imaging_assets.features.extract import default_workers
    from imaging_assets.features.icc import icc
    from imaging_assets.features.perturb import PerturbationSpec

    t0 = time.perf_counter()
    emb, model = load_active_embedder(wh)
    mv = model["model_version"]
    tbl, mat = embeddings_frame(wh.lance_uri)
    if tbl is None or mat is None or not len(tbl):
        raise RuntimeError("no lesion_embeddings yet: materialize lesion_embeddings")
    ids = tbl.column("lesion_id").to_pylist()
    patients = np.array(tbl.column("patient_key").to_pylist(), dtype=object)
    spaces = np.array(tbl.column("space").to_pylist(), dtype=object)
    with wh.connect(read_only=True) as con:
        lesions = {r["lesion_id"]: dict(r) for r in table_rows(con, "lesions") if r["extractable"]}
        series = {r["series_key"]: dict(r) for r in table_rows(con, "imaging_series")}
        segs = {r["seg_key"]: dict(r) for r in table_rows(con, "segmentations")}
    chosen = _sample([i for i in ids if i in lesions], n_lesions, seed)
    spec = PerturbationSpec(n_perturbations=n_perturbations, seed=seed)
    tasks = [(lesions[i], series[lesions[i]["series_key"]], segs[lesions[i]["seg_key"]], spec, seed) for i in chosen
             if lesions[i]["series_key"] in series and lesions[i]["seg_key"] in segs]
    n = max(1, min(workers or default_workers(), len(tasks)))
    if n == 1:
        done = [_perturbed_crops(t) for t in tasks]
    else:
        with cf.ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_perturbed_crops, tasks))
    failed = [{"lesion_id": lid, "error": err} for lid, _, err in done if err]
    good = [(lid, crops) for lid, crops, err in done if crops is not None]
    position = {lid: i for i, lid in enumerate(ids)}
    icc_rows, stability = [], []
    if good:
        cube = np.stack([emb.embed(crops) for _, crops in good])  # (lesions, 1 + perturbations, dim)
        values, lo, hi = icc(cube.astype(np.float64), "ICC3") if len(good) >= 3 else (None, None, None)
        if values is not None:
            icc_rows = [[mv, d, _f(values[d]), _f(lo[d]), _f(hi[d]), len(good), n_perturbations]
                        for d in range(cube.shape[2])]
        for (lid, _), vecs in zip(good, cube):
            me = position[lid]
            allowed = (patients != patients[me]) & (spaces == spaces[me])
            base = _top_ids(mat[me], mat, allowed, k)
            for p in range(1, vecs.shape[0]):
                overlap = len(base & _top_ids(vecs[p], mat, allowed, k)) / max(1, len(base))
                stability.append([mv, lid, p - 1, float(overlap)])
    with wh.transaction() as con:
        con.execute("DELETE FROM embedding_robustness WHERE model_version = ?", [mv])
        con.execute("DELETE FROM embedding_stability WHERE model_version = ?", [mv])
        if icc_rows:
            con.executemany("INSERT INTO embedding_robustness VALUES (?, ?, ?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                            icc_rows)
        if stability:
            con.executemany("INSERT INTO embedding_stability VALUES (?, ?, ?, ?)", stability)
    iccs = np.array([r[2] for r in icc_rows if r[2] is not None], float)
    median = float(np.median(iccs)) if iccs.size else None
    overlap = float(np.mean([s[3] for s in stability])) if stability else None
    passed = (median is not None and median >= ICC_THRESHOLD and overlap is not None
              and overlap >= OVERLAP_THRESHOLD)
    return EmbeddingRobustnessResult(
        model_version=mv, n_lesions=len(good), n_perturbations=n_perturbations, dims=int(mat.shape[1]),
        median_icc=None if median is None else round(median, 4),
        share_icc_above=None if not iccs.size else round(float((iccs >= ICC_THRESHOLD).mean()), 4),
        mean_overlap=None if overlap is None else round(overlap, 4), failed=failed,
        elapsed_s=round(time.perf_counter() - t0, 3), passed=bool(passed))


def _f(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def embedding_robustness_rows(wh: Warehouse, model_version: str) -> tuple[list[float], list[float]]:
    """ICC per dimension and the top-10 overlaps stored for a model (for the plot)."""
    with wh.connect(read_only=True) as con:
        iccs = [r[0] for r in con.execute("SELECT icc FROM embedding_robustness WHERE model_version = ? AND icc IS NOT "
                                          "NULL ORDER BY dimension", [model_version]).fetchall()]
        overlaps = [r[0] for r in con.execute("SELECT overlap_at_10 FROM embedding_stability WHERE model_version = ?",
                                              [model_version]).fetchall()]
    return iccs, overlaps
