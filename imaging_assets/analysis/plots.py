"""Plots of the reproducibility stage, drawn to PNG files (matplotlib, Agg backend; pure code).

The projection and Kaplan-Meier plots live beside what they draw (:mod:`~imaging_assets.analysis.clustering`,
:mod:`~imaging_assets.analysis.survival`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _feature_class(name: str) -> str:
    """``glcm`` of ``original_glcm_Contrast`` (pyradiomics' ``<image type>_<class>_<feature>`` names)."""
    parts = name.split("_", 2)
    return parts[1] if len(parts) > 1 else ""


def icc_plot_png(rows: Sequence[dict[str, Any]], path: Path, threshold: float = 0.75) -> Path | None:
    """Sorted lower 95% bounds of ICC per feature (perturbation and test-retest), threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    for analysis, color in (("perturbation", "tab:blue"), ("test_retest", "tab:orange")):
        lows = sorted((r["ci_low"] for r in rows if r["analysis"] == analysis and r["ci_low"] is not None),
                      reverse=True)
        if lows:
            ax.plot(range(len(lows)), lows, color=color, label=f"{analysis} ({len(lows)} features)")
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("features, sorted")
    ax.set_ylabel("ICC(3,1) lower 95% bound")
    ax.set_ylim(-0.2, 1.02)
    ax.legend(loc="lower left")
    ax.set_title("Feature reproducibility")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def robust_set_plot_png(totals: Mapping[str, int], features: Sequence[str], path: Path) -> Path | None:
    """Bars per feature class: features extracted (``totals``: class -> count) vs robust ones in the set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not totals:
        return None
    kept: dict[str, int] = {}
    for f in features:
        kept[_feature_class(f)] = kept.get(_feature_class(f), 0) + 1
    classes = sorted(totals)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    x = np.arange(len(classes))
    ax.bar(x - 0.2, [totals[c] for c in classes], 0.4, label="extracted", color="lightgray")
    ax.bar(x + 0.2, [kept.get(c, 0) for c in classes], 0.4, label="robust set", color="tab:green")
    ax.set_xticks(x, classes)
    ax.set_ylabel("features")
    ax.set_title(f"Robust set by feature class ({len(features)} of {sum(totals.values())})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_curve_png(losses: Sequence[float], path: Path, title: str = "Embedding model training") -> Path | None:
    """Self-supervised training loss per epoch (the ``embedding_model`` asset page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not losses:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(losses) + 1), list(losses), marker="o", ms=3, color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss (mean per epoch)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def embedding_icc_png(iccs: Sequence[float], overlaps: Sequence[float], path: Path,
                      threshold: float = 0.75) -> Path | None:
    """Embedding robustness: sorted ICC(3,1) per dimension, and the distribution of top-10 overlaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not len(iccs):
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    a.plot(range(len(iccs)), sorted(iccs, reverse=True), color="tab:blue")
    a.axhline(threshold, color="k", ls="--", lw=1, label=f"ICC {threshold}")
    a.set_xlabel("embedding dimensions, sorted")
    a.set_ylabel("ICC(3,1) under perturbation")
    a.set_ylim(-0.2, 1.02)
    a.legend(loc="lower left")
    if len(overlaps):
        b.hist(list(overlaps), bins=np.linspace(0, 1, 11), color="tab:green")
    b.set_xlabel("top-10 neighbours kept (original vs perturbed)")
    b.set_ylabel("lesion x perturbation")
    fig.suptitle("Embedding robustness")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
