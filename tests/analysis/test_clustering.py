"""Phenotype clustering: k by silhouette, stable labels, HDBSCAN, profiles and the projection plot."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from imaging_assets.analysis.clustering import cluster_profile, cluster_vectors, projection_png


def _blobs(sizes=(60, 40, 25), d: int = 6, seed: int = 0, spread: float = 0.5):
    """Well-separated Gaussian blobs of different sizes; returns (x, truth)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((len(sizes), d))
    for i in range(len(sizes)):
        centres[i, i % d] = 10.0 * (1 + i)
    x = np.vstack([rng.normal(centres[i], spread, (n, d)) for i, n in enumerate(sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def test_three_blobs_choose_k3_and_recover_truth():
    x, truth = _blobs()
    res = cluster_vectors(x, k_range=(2, 8), seed=0)
    assert res.method == "kmeans" and res.k == 3
    assert max(res.silhouette_by_k, key=res.silhouette_by_k.get) == 3
    assert set(res.silhouette_by_k) == set(range(2, 9))
    assert adjusted_rand_score(truth, res.labels) == 1.0
    # ordering rule: largest cluster is 0 -> blob sizes 60, 40, 25 map to labels 0, 1, 2
    assert res.sizes == [60, 40, 25]
    assert (res.labels == truth).all()
    assert res.centroids.shape == (3, 6)
    np.testing.assert_allclose(res.centroids[0], x[truth == 0].mean(axis=0))
    assert res.labels.dtype.kind == "i"


def test_labels_stable_across_runs_seeds_and_row_permutations():
    x, _ = _blobs(sizes=(50, 50, 30), seed=1)
    a = cluster_vectors(x, seed=0)
    b = cluster_vectors(x, seed=0)
    c = cluster_vectors(x, seed=123)  # different internal numbering, same partition
    assert (a.labels == b.labels).all() and (a.labels == c.labels).all()
    perm = np.random.default_rng(7).permutation(len(x))
    p = cluster_vectors(x[perm], seed=0)
    assert (p.labels == a.labels[perm]).all()  # labels follow the rows
    np.testing.assert_allclose(p.centroids, a.centroids)


def test_equal_sizes_ordered_by_centroid():
    # two blobs of equal size: the one with the lexicographically smaller centroid gets label 0
    x, truth = _blobs(sizes=(40, 40), d=3, seed=2)
    res = cluster_vectors(x, k=2)
    assert res.method == "kmeans-fixed" and res.sizes == [40, 40]
    assert tuple(res.centroids[0]) < tuple(res.centroids[1])
    # blob 0 has centre (10, 0, 0), blob 1 (0, 20, 0): blob 1 is lexicographically smaller
    assert (res.labels == 1 - truth).all()


def test_fixed_k_and_clipping():
    x, _ = _blobs(sizes=(30, 30, 30), seed=3)
    assert cluster_vectors(x, k=4).k == 4
    few = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    r = cluster_vectors(few, k=5)
    assert r.k == 2 and "clipped" in (r.note or "")
    r2 = cluster_vectors(np.ones((5, 3)))
    assert r2.k == 1 and r2.method == "single" and (r2.labels == 0).all()
    r3 = cluster_vectors(np.random.default_rng(0).normal(size=(2, 3)))
    assert r3.k == 1 and r3.note
    with pytest.raises(ValueError, match="NaN"):
        cluster_vectors(np.array([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(ValueError, match="method"):
        cluster_vectors(x, method="dbscan")


def test_hdbscan_path_keeps_noise():
    x, truth = _blobs(sizes=(80, 50, 30), d=4, seed=4)
    outliers = np.array([[100.0, -100.0, 100.0, -100.0], [-100.0, 100.0, -100.0, 100.0]])
    xx = np.vstack([x, outliers])
    res = cluster_vectors(xx, method="hdbscan", min_cluster_size=10)
    assert res.method == "hdbscan" and res.k == 3
    assert (res.labels[-2:] == -1).all() and res.n_noise >= 2
    core = res.labels[:-2] >= 0
    assert adjusted_rand_score(truth[core], res.labels[:-2][core]) == 1.0
    assert res.sizes == sorted(res.sizes, reverse=True)
    again = cluster_vectors(xx[::-1], method="hdbscan", min_cluster_size=10)
    assert (again.labels == res.labels[::-1]).all()


def test_profile_picks_distinguishing_feature_first():
    rng = np.random.default_rng(5)
    n = 200
    labels = np.r_[np.zeros(120, int), np.ones(80, int)]
    values = rng.normal(size=(n, 4))
    values[labels == 1, 2] += 3.0  # feature "c" separates cluster 1
    values[labels == 1, 0] += 0.5  # "a" a little
    values[:, 3] = 7.0  # constant feature: undefined effect size, ranked last
    names = ["a", "b", "c", "const"]
    rows = cluster_profile(values, names, labels, top=4)
    c1 = [r for r in rows if r["cluster"] == 1]
    assert [r["rank"] for r in c1] == [1, 2, 3, 4]
    assert c1[0]["feature"] == "c" and c1[0]["effect_size"] > 2.5 and c1[0]["size"] == 80
    assert c1[1]["feature"] == "a"
    assert c1[-1]["feature"] == "const" and c1[-1]["effect_size"] is None
    c0 = [r for r in rows if r["cluster"] == 0]
    assert c0[0]["feature"] == "c" and c0[0]["effect_size"] < -2.5
    assert abs(c1[0]["mean_in"] - values[labels == 1, 2].mean()) < 1e-12
    assert abs(c1[0]["mean_out"] - values[labels == 0, 2].mean()) < 1e-12
    assert len(cluster_profile(values, names, labels, top=2)) == 4
    with pytest.raises(ValueError):
        cluster_profile(values, names[:3], labels)


def test_projection_png_written(tmp_path):
    x, truth = _blobs()
    labels = truth.copy()
    labels[:3] = -1
    out = projection_png(x, labels, tmp_path / "sub" / "proj.png", "lesion phenotypes")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = projection_png(np.zeros((0, 3)), np.zeros(0, int), tmp_path / "empty.png", "none")
    assert empty.stat().st_size > 0
