"""Similar-case explanations: group shares of the squared distance, agree/differ, names, percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from imaging_assets.features.explain import QUANTILE_GRID, explain, feature_group, percentile, plain_name, quantiles_of

NAMES = [
    "original_shape_Sphericity", "original_shape_Elongation", "original_shape_MeshVolume",
    "original_firstorder_Mean", "original_firstorder_90Percentile",
    "original_glcm_Contrast", "original_glcm_Idmn", "original_glszm_ZoneEntropy",
    "log-sigma-2-0-mm-3D_glcm_Contrast", "log-sigma-1-5-mm-3D_firstorder_Mean",
    "wavelet-LLH_glrlm_RunEntropy", "wavelet-HHH_firstorder_Skewness",
]


def test_groups_partition_by_class_and_filter_family():
    assert feature_group("original_shape_Sphericity") == "Shape"
    assert feature_group("original_firstorder_Mean") == "First-order intensity"
    assert feature_group("original_glcm_Contrast") == "GLCM texture"
    assert feature_group("original_ngtdm_Busyness") == "NGTDM texture"
    # a filtered image's features belong to their filter family, whatever their class
    assert feature_group("log-sigma-2-0-mm-3D_glcm_Contrast") == "LoG filtered"
    assert feature_group("wavelet-LLH_shape_Sphericity") == "Wavelet filtered"
    assert feature_group("squareroot_firstorder_Mean") == "Square-root filtered"


def test_plain_names():
    assert plain_name("original_shape_Sphericity") == "Sphericity"
    assert plain_name("log-sigma-2-0-mm-3D_glcm_Contrast") == "GLCM Contrast (LoG σ=2 mm)"
    assert plain_name("log-sigma-1-5-mm-3D_firstorder_Mean") == "Intensity mean (LoG σ=1.5 mm)"
    assert plain_name("wavelet-LLH_glrlm_RunEntropy") == "GLRLM Run entropy (wavelet LLH)"
    assert plain_name("original_firstorder_90Percentile") == "Intensity 90th percentile"
    assert plain_name("original_glcm_Idmn") == "GLCM IDMN"


@pytest.mark.parametrize("seed", range(5))
def test_shares_sum_to_one(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=len(NAMES)), rng.normal(size=len(NAMES))
    e = explain(a, b, NAMES)
    assert sum(e.groups.values()) == pytest.approx(1.0, abs=1e-12)
    assert e.distance == pytest.approx(float(np.linalg.norm(a - b)))
    assert set(e.groups) == {feature_group(n) for n in NAMES}
    assert sum(e.group_features.values()) == len(NAMES)
    # the differ list is ordered by contribution and its shares are the exact terms of d^2
    shares = [c.share for c in e.differ]
    assert shares == sorted(shares, reverse=True)
    top = int(np.argmax((a - b) ** 2))
    assert e.differ[0].feature == NAMES[top]
    assert e.differ[0].share == pytest.approx((a[top] - b[top]) ** 2 / np.sum((a - b) ** 2))


def test_planted_difference_shows_in_its_group():
    rng = np.random.default_rng(7)
    a = rng.normal(size=len(NAMES))
    b = a + rng.normal(scale=0.05, size=len(NAMES))  # nearly identical ...
    shape = [i for i, n in enumerate(NAMES) if feature_group(n) == "Shape"]
    b[shape] += 3.0  # ... except a large planted difference in the shape features
    e = explain(a, b, NAMES, n=3)
    assert e.groups["Shape"] > 0.95
    assert max(e.groups, key=e.groups.get) == "Shape"
    assert {c.group for c in e.differ} == {"Shape"}
    assert all(c.group != "Shape" for c in e.agree)
    d = e.to_dict()
    assert set(d) >= {"groups", "agree", "differ", "distance"}
    assert d["groups"]["Shape"] == pytest.approx(e.groups["Shape"], abs=1e-4)
    assert d["differ"][0]["name"] in {plain_name(NAMES[i]) for i in shape}


def test_agree_prefers_shared_unusual_values():
    names = ["original_shape_Sphericity", "original_glcm_Contrast"]
    # both features differ by 0.1; both lesions are extreme in the first, average in the second
    e = explain(np.array([2.5, 0.0]), np.array([2.4, 0.1]), names, n=2)
    assert e.agree[0].feature == "original_shape_Sphericity"


def test_identical_vectors_and_padding():
    v = np.array([1.0, 2.0, 0.0, 0.0])  # padded beyond the two features
    e = explain(v, v.copy(), ["original_shape_Sphericity", "original_glcm_Contrast"])
    assert e.distance == 0 and sum(e.groups.values()) == 0 and e.differ == []
    with pytest.raises(ValueError):
        explain(np.zeros(1), np.zeros(1), ["original_shape_Sphericity", "original_glcm_Contrast"])


def test_percentiles_from_quantiles():
    rng = np.random.default_rng(3)
    pop = rng.normal(size=(1000, 2))
    q = quantiles_of(pop)
    assert q.shape == (QUANTILE_GRID.size, 2)
    assert percentile(0.0, q[:, 0]) == pytest.approx(50, abs=3)
    assert percentile(1.0, q[:, 0]) == pytest.approx(84, abs=3)
    assert percentile(-99, q[:, 0]) == 0 and percentile(99, q[:, 0]) == 100
    assert percentile(0.0, None) is None
    # a feature with many equal values: the tie gets the middle of its percentiles
    tied = quantiles_of(np.r_[np.zeros(500), np.arange(1, 501)].reshape(-1, 1))
    assert 20 < percentile(0.0, tied[:, 0]) < 30
    e = explain(pop[0], pop[1], ["original_shape_Sphericity", "original_glcm_Contrast"], quantiles=q,
                reference_values={"original_shape_Sphericity": 0.8})
    c = next(c for c in e.agree + e.differ if c.feature == "original_shape_Sphericity")
    assert c.reference_value == 0.8 and c.neighbour_value is None
    assert c.reference_percentile == pytest.approx(100 * np.mean(pop[:, 0] < pop[0, 0]), abs=2)
