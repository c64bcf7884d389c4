"""Phenotype clustering of lesion vectors: k-means (k by silhouette) or HDBSCAN, profiles and a 2-D plot.

Inputs are the lesion vectors as stored (the reproducible radiomics features, already standardised by the
vector stage); nothing is rescaled here, so distances are those of the vector table.

Stable labels
    Cluster numbers from scikit-learn depend on its internal initialisation order. :func:`cluster_vectors`
    renumbers clusters by **size (largest first), then centroid in lexicographic order** (coordinates
    divided by the data's largest absolute value and rounded to 9 decimals, so summation order does not
    matter). Identical data therefore gives
    identical labels on every rerun, and a row permutation of the same data permutes the labels with the
    rows (as long as the clustering itself is the same partition, which k-means with ``n_init=20`` finds
    for any reasonably separated data). HDBSCAN noise keeps the label ``-1``.

Choosing k
    ``KMeans(n_init=20, random_state=seed)`` for each k in ``k_range`` (inclusive, clipped to
    ``[2, n - 1]``); the k with the highest silhouette wins (ties: the smaller k) among the candidates
    whose smallest cluster has at least :func:`min_cluster_size_for` lesions. The silhouette is computed on at
    most 5,000 points (a seeded sample) because it is quadratic in n.

Minimum cluster size (honest statistics)
    Silhouette alone rewards splitting off outliers: k=6 on 17 lesions once gave two clusters of one
    lesion. A candidate k whose smallest cluster is below ``max(MIN_CLUSTER_LESIONS, MIN_CLUSTER_SHARE *
    n)`` lesions is not chosen (``ClusterResult.ineligible`` lists them with their smallest cluster). When
    no candidate qualifies, the least unbalanced one (largest smallest cluster; then silhouette, then the
    smaller k) is kept so that the downstream steps still run, with a ``note`` saying so and ``adequate``
    False; the survival analysis then applies its own minimum group sizes. A configured ``k`` is honoured
    but, when it violates the minimum, reported the same way; HDBSCAN's default ``min_cluster_size`` is the
    same minimum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SILHOUETTE_SAMPLE = 5000
#: Fewest lesions in a cluster worth calling a phenotype: a smaller group is mostly the outliers k-means
#: isolates to raise the silhouette, and its profile (Cohen's d) and survival curve rest on a handful of
#: lesions that will not replicate.
MIN_CLUSTER_LESIONS = 5
#: ... and at least this share of the lesions: in a large cohort a cluster of under 5 % is still an outlier
#: group, too small to carry its own survival estimate next to the others.
MIN_CLUSTER_SHARE = 0.05


def min_cluster_size_for(n: int) -> int:
    """The smallest cluster accepted for ``n`` lesions: ``max(MIN_CLUSTER_LESIONS, ceil(MIN_CLUSTER_SHARE * n))``."""
    return max(MIN_CLUSTER_LESIONS, math.ceil(MIN_CLUSTER_SHARE * n - 1e-9))


@dataclass
class ClusterResult:
    """Outcome of :func:`cluster_vectors`.

    Attributes
    ----------
    labels
        Integer label per row, ``0..k-1`` in the stable order (``-1``: HDBSCAN noise).
    k
        Number of clusters (noise excluded).
    method
        ``"kmeans"`` (k chosen by silhouette), ``"kmeans-fixed"`` (k given), ``"hdbscan"`` or ``"single"``
        (too few distinct points to cluster: everything in cluster 0).
    silhouette_by_k
        Silhouette per k tried (k-means with k chosen), or ``{k: silhouette}`` of the final clustering
        (fixed k, HDBSCAN non-noise points) when computable.
    centroids
        ``(k, d)`` mean vector of each cluster, in label order.
    sizes
        Rows per cluster, in label order.
    n_noise
        Rows labelled ``-1`` (HDBSCAN only).
    note
        Why the result is degenerate or below the minimum cluster size, else None.
    min_size
        The minimum cluster size applied (:func:`min_cluster_size_for` unless given).
    ineligible
        Candidate k not chosen because their smallest cluster was below ``min_size`` (k -> smallest size).
    """

    labels: np.ndarray
    k: int
    method: str
    silhouette_by_k: dict[int, float]
    centroids: np.ndarray
    sizes: list[int]
    n_noise: int = 0
    note: str | None = None
    silhouette: float | None = field(default=None)
    min_size: int = 0
    ineligible: dict[int, int] = field(default_factory=dict)

    @property
    def adequate(self) -> bool:
        """True when there are at least two clusters and none is below :attr:`min_size` (noise aside)."""
        return self.k >= 2 and bool(self.sizes) and min(self.sizes) >= self.min_size


def _stable_relabel(vectors: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Renumber non-negative labels by (size desc, centroid lexicographic); -1 stays -1."""
    ids = sorted(int(c) for c in np.unique(raw) if c >= 0)
    scale = float(np.abs(vectors).max()) if vectors.size else 1.0
    scale = scale if scale > 0 else 1.0
    info = []
    for c in ids:
        members = vectors[raw == c]
        centroid = members.mean(axis=0)
        # rounded relative to the data's scale: summation order (row permutations) cannot flip the order
        key_centroid = tuple(float(v) + 0.0 for v in np.round(centroid / scale, 9))
        info.append((-len(members), key_centroid, c, centroid))
    info.sort(key=lambda t: (t[0], t[1]))
    mapping = {old: new for new, (_, _, old, _) in enumerate(info)}
    labels = np.full(raw.shape, -1, dtype=int)
    for old, new in mapping.items():
        labels[raw == old] = new
    d = vectors.shape[1]
    centroids = np.array([t[3] for t in info], dtype=float).reshape(len(info), d)
    sizes = [-t[0] for t in info]
    return labels, centroids, sizes


def _silhouette(vectors: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(labels) - 1:
        return None
    sample = SILHOUETTE_SAMPLE if len(labels) > SILHOUETTE_SAMPLE else None
    return float(silhouette_score(vectors, labels, sample_size=sample, random_state=seed))


def cluster_vectors(
    vectors: np.ndarray,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    method: str = "kmeans",
    seed: int = 0,
    min_cluster_size: int | None = None,
    min_size: int | None = None,
) -> ClusterResult:
    """Cluster lesion vectors with stable labels.

    Parameters
    ----------
    vectors
        ``(n, d)`` finite values, one row per lesion.
    k
        Fixed number of clusters for k-means (clipped to the number of distinct rows); None chooses k by
        silhouette over ``k_range``.
    k_range
        Inclusive ``(low, high)`` range of k tried, clipped to ``[2, n - 1]``.
    method
        ``"kmeans"`` or ``"hdbscan"`` (:class:`sklearn.cluster.HDBSCAN`; ``k`` and ``k_range`` ignored).
    seed
        ``random_state`` of k-means and of the silhouette sample.
    min_cluster_size
        HDBSCAN's smallest cluster (default: ``min_size``).
    min_size
        The smallest cluster a k-means candidate may have to be chosen by silhouette, and the size below
        which a configured k is reported (default :func:`min_cluster_size_for` of ``n``; 1 disables the rule).

    Returns
    -------
    ClusterResult

    Raises
    ------
    ValueError
        For a non-2-D or non-finite input, an unknown method or an invalid ``k``/``k_range``.
    """
    x = np.asarray(vectors, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"vectors must be 2-D (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"vectors contain NaN/inf in {bad} row(s); impute or drop them before clustering")
    if method not in ("kmeans", "hdbscan"):
        raise ValueError(f"unknown clustering method {method!r} (expected 'kmeans' or 'hdbscan')")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    lo, hi = k_range
    if lo < 2 or hi < lo:
        raise ValueError(f"k_range must satisfy 2 <= low <= high, got {k_range}")
    n = len(x)
    n_distinct = len(np.unique(x, axis=0)) if n else 0
    floor = min_cluster_size_for(n) if min_size is None else max(1, int(min_size))
    rule = (f"{floor} lesions (max({MIN_CLUSTER_LESIONS}, {MIN_CLUSTER_SHARE:.0%} of {n}))" if min_size is None
            else f"{floor} lesions (min_size)")

    def single(note: str, scores: dict[int, float] | None = None,
               ineligible: dict[int, int] | None = None) -> ClusterResult:
        labels = np.zeros(n, dtype=int)
        centroids = x.mean(axis=0, keepdims=True) if n else np.zeros((0, x.shape[1]))
        logger.info("clustering: %s", note)
        return ClusterResult(labels, 1 if n else 0, "single", scores or {}, centroids, [n] if n else [],
                             note=note, min_size=floor, ineligible=ineligible or {})

    if method == "hdbscan":
        from sklearn.cluster import HDBSCAN

        mcs = min_cluster_size or floor
        if n < max(2, mcs):
            return single(f"{n} rows: fewer than min_cluster_size={mcs}, one cluster")
        raw = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(x)
        labels, centroids, sizes = _stable_relabel(x, raw)
        n_noise = int((labels < 0).sum())
        kk = len(sizes)
        sil = None
        if kk >= 2:
            keep = labels >= 0
            sil = _silhouette(x[keep], labels[keep], seed)
        note = None if kk else "HDBSCAN found no cluster: every row is noise (-1)"
        if sizes and min(sizes) < floor:
            note = f"HDBSCAN min_cluster_size={mcs} gave a cluster of {min(sizes)} lesion(s), below the minimum of {rule}"
        logger.info("HDBSCAN: %d clusters, %d noise rows of %d", kk, n_noise, n)
        return ClusterResult(labels, kk, "hdbscan", {kk: sil} if sil is not None else {}, centroids, sizes,
                             n_noise=n_noise, note=note, silhouette=sil, min_size=floor)

    from sklearn.cluster import KMeans

    def fit(kk: int) -> np.ndarray:
        return KMeans(n_clusters=kk, n_init=20, random_state=seed).fit_predict(x)

    if k is not None:
        if n_distinct < 2 or k == 1:
            return single(f"k={k} with {n_distinct} distinct row(s): one cluster")
        kk = min(k, n_distinct)
        notes = [] if kk == k else [f"k={k} clipped to {kk} distinct rows"]
        labels, centroids, sizes = _stable_relabel(x, fit(kk))
        sil = _silhouette(x, labels, seed)
        if min(sizes) < floor:
            notes.append(f"configured k={kk} gives a cluster of {min(sizes)} lesion(s), below the minimum of "
                         f"{rule}: its profile and survival rest on too few lesions")
        return ClusterResult(labels, len(sizes), "kmeans-fixed", {len(sizes): sil} if sil is not None else {},
                             centroids, sizes, note="; ".join(notes) or None, silhouette=sil, min_size=floor)

    hi_eff = min(hi, n - 1, n_distinct)
    if hi_eff < 2 or lo > hi_eff:
        return single(f"{n} rows ({n_distinct} distinct): too few to choose k in {k_range}")
    scores: dict[int, float] = {}
    fits: dict[int, np.ndarray] = {}
    ineligible: dict[int, int] = {}
    for kk in range(lo, hi_eff + 1):
        raw = fit(kk)
        sil = _silhouette(x, raw, seed)
        if sil is None:
            continue
        scores[kk] = sil
        smallest = int(np.bincount(raw).min()) if len(np.unique(raw)) == kk else 0
        if smallest < floor:
            ineligible[kk] = smallest
        else:
            fits[kk] = raw
    if not scores:
        return single(f"no k in {k_range} gave a valid silhouette: one cluster")
    note = None
    if fits:
        best = max(fits, key=lambda kk: (scores[kk], -kk))
        chosen = fits[best]
    else:  # none qualifies: the least unbalanced candidate, reported as below the minimum (adequate False)
        best = max(ineligible, key=lambda kk: (ineligible[kk], scores[kk], -kk))
        chosen = fit(best)
        note = (f"no k in {lo}..{hi_eff} gives clusters of at least {rule} (smallest cluster per k: "
                f"{', '.join(f'{kk}: {sz}' for kk, sz in ineligible.items())}); k={best} is kept as the least "
                f"unbalanced, its smallest cluster ({ineligible[best]} lesions) is too small to be a phenotype")
    labels, centroids, sizes = _stable_relabel(x, chosen)
    logger.info("k-means: k=%d chosen by silhouette %.3f (tried %s; below the minimum cluster size %d: %s)",
                best, scores[best], ", ".join(f"{kk}:{s:.3f}" for kk, s in scores.items()), floor,
                ", ".join(str(kk) for kk in ineligible) or "none")
    return ClusterResult(labels, len(sizes), "kmeans", scores, centroids, sizes, note=note,
                         silhouette=scores[best], min_size=floor, ineligible=ineligible)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def cluster_profile(values: np.ndarray, feature_names: list[str], labels: np.ndarray,
                    top: int = 5) -> list[dict]:
    """The features that best distinguish each cluster from the rest, by |Cohen's d|.

    Parameters
    ----------
    values
        ``(n, f)`` feature values (e.g. the robust features, any scale; NaNs are ignored per feature).
    feature_names
        ``f`` names, in column order.
    labels
        Cluster label per row; clusters ``>= 0`` are profiled, noise (``-1``) only counts as "rest".
    top
        Features reported per cluster.

    Returns
    -------
    list of dict
        ``{cluster, rank (1 = most distinguishing), feature, effect_size (Cohen's d, cluster minus rest,
        pooled SD), mean_in, mean_out, size}``. A feature whose pooled SD is 0 (or a cluster without a
        rest) has ``effect_size`` None and ranks last; ties rank by feature name. Non-finite numbers are
        None.
    """
    v = np.asarray(values, dtype=float)
    lab = np.asarray(labels)
    if v.ndim != 2 or v.shape[1] != len(feature_names) or len(v) != len(lab):
        raise ValueError(f"values {v.shape}, {len(feature_names)} names and {len(lab)} labels disagree")
    rows: list[dict] = []
    for c in sorted(int(c) for c in np.unique(lab) if c >= 0):
        inside = lab == c
        a, b = v[inside], v[~inside]
        size = int(inside.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            na = np.sum(np.isfinite(a), axis=0)
            nb = np.sum(np.isfinite(b), axis=0)
            ma = np.nanmean(a, axis=0) if len(a) else np.full(v.shape[1], np.nan)
            mb = np.nanmean(b, axis=0) if len(b) else np.full(v.shape[1], np.nan)
            va = np.nanvar(a, axis=0, ddof=1) if len(a) > 1 else np.zeros(v.shape[1])
            vb = np.nanvar(b, axis=0, ddof=1) if len(b) > 1 else np.zeros(v.shape[1])
            va = np.where(na > 1, va, 0.0)
            vb = np.where(nb > 1, vb, 0.0)
            dof = na + nb - 2
            pooled = np.sqrt(((np.maximum(na - 1, 0)) * va + (np.maximum(nb - 1, 0)) * vb) / dof)
            d = (ma - mb) / pooled
        d = np.where(np.isfinite(d) & (pooled > 0) & (na > 0) & (nb > 0), d, np.nan)
        order = sorted(range(v.shape[1]),
                       key=lambda j: (np.isnan(d[j]), -abs(d[j]) if not np.isnan(d[j]) else 0.0,
                                      feature_names[j]))
        for rank, j in enumerate(order[:top], start=1):
            rows.append({"cluster": c, "rank": rank, "feature": feature_names[j],
                         "effect_size": _finite(d[j]), "mean_in": _finite(ma[j]), "mean_out": _finite(mb[j]),
                         "size": size})
    return rows


def projection_png(vectors: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """Write a PCA 2-D scatter of the vectors coloured by cluster (legend with sizes) as PNG.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Axis labels carry each
    component's explained-variance share. Noise (-1) is drawn in grey.

    Returns
    -------
    pathlib.Path
        ``path`` (its folder is created).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.asarray(vectors, dtype=float)
    lab = np.asarray(labels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, d = x.shape if x.ndim == 2 else (0, 0)
    coords = np.zeros((n, 2))
    ratios = [0.0, 0.0]
    if n >= 2 and d >= 1:
        centred = x - x.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        m = min(2, len(s))
        coords[:, :m] = centred @ vt[:m].T
        total = float((s**2).sum())
        if total > 0:
            ratios[:m] = [float(s[i] ** 2 / total) for i in range(m)]
        # sign convention: largest-|loading| coordinate positive, so reruns give the same picture
        for i in range(m):
            if vt[i][np.argmax(np.abs(vt[i]))] < 0:
                coords[:, i] *= -1

    fig = Figure(figsize=(7, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    ids = sorted(int(c) for c in np.unique(lab)) if n else []
    palette = colormaps["tab10" if len([c for c in ids if c >= 0]) <= 10 else "tab20"]
    for c in ids:
        sel = lab == c
        colour = (0.6, 0.6, 0.6, 0.6) if c < 0 else palette(c % palette.N)
        name = "noise" if c < 0 else f"cluster {c}"
        ax.scatter(coords[sel, 0], coords[sel, 1], s=18, color=colour, alpha=0.8, edgecolors="none",
                   label=f"{name} (n={int(sel.sum())})")
    ax.set_xlabel(f"PC1 ({100 * ratios[0]:.1f}% variance)")
    ax.set_ylabel(f"PC2 ({100 * ratios[1]:.1f}% variance)")
    ax.set_title(title)
    if ids:
        ax.legend(loc="best", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no vectors", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
