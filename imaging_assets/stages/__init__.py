"""Pipeline steps: one module per stage, named as its ``defs`` module.

Each public step takes the :class:`~imaging_assets.store.warehouse.Warehouse` it works on and returns a
frozen result dataclass; each module also owns the read queries its asset metadata and checks need, so
the Dagster layer (``defs``) holds no SQL. Imports run one way: ``defs`` / ``cli`` -> ``stages`` ->
{``dicom``, ``features``, ``analysis``, ``store``}. No Dagster here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChainSettings:
    """What the whole chain needs beyond the warehouse: the sources and the knobs tests and benchmarks turn.

    ``spec`` is a :class:`~imaging_assets.features.perturb.PerturbationSpec` (default: its defaults);
    ``png_dir`` receives the cluster and Kaplan-Meier plots when given.
    """

    dicom_roots: Sequence[str | Path]
    outcomes: str | Path | Sequence[str | Path] | None = None
    manifests: Sequence[str | Path] = ()
    secret: str | None = None
    workers: int | None = None
    #: series per batch of the partitioned extraction (:mod:`imaging_assets.stages.batches`); default its setting
    batch_size: int | None = None
    spec: Any = None
    max_lesions: int = 48
    progress: Callable[[int, int], None] | None = None
    png_dir: Path | None = None
    #: the embedding model's :class:`~imaging_assets.features.embedding.TrainConfig` (default: its defaults)
    train: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _steps() -> list[tuple[str, Callable[[Any, ChainSettings], Any]]]:
    from imaging_assets.stages import (
        discovery,
        embedding_robustness,
        embeddings,
        outcomes,
        radiomics,
        reproducibility,
        thumbnails,
        vectors,
    )

    def png(s: ChainSettings, name: str) -> Path | None:
        return Path(s.png_dir) / name if s.png_dir is not None else None

    return [
        ("dicom_files", lambda wh, s: discovery.refresh_catalog(wh, s.dicom_roots, secret=s.secret,
                                                                workers=s.workers)),
        ("imaging_series", lambda wh, s: discovery.rebuild_series(wh)),
        ("segmentations", lambda wh, s: discovery.rebuild_segmentations(wh, s.manifests, secret=s.secret)),
        ("lesions", lambda wh, s: radiomics.rebuild_lesions(wh, workers=s.workers,
                                                            series_per_batch=s.batch_size)),
        ("lesion_thumbnails", lambda wh, s: thumbnails.render_lesion_thumbnails(wh, workers=s.workers)),
        ("lesion_crops", lambda wh, s: embeddings.build_lesion_crops(wh, workers=s.workers)),
        ("embedding_model", lambda wh, s: embeddings.train_embedding_model(wh, s.train)),
        ("radiomics_features", lambda wh, s: radiomics.extract_features(wh, workers=s.workers,
                                                                        progress=s.progress)),
        ("feature_robustness", lambda wh, s: reproducibility.compute_robustness(
            wh, spec=s.spec, max_lesions=s.max_lesions, workers=s.workers)),
        ("robust_feature_set", lambda wh, s: reproducibility.select_robust_set(wh)),
        ("lesion_vectors", lambda wh, s: vectors.build_lesion_vectors(wh)),
        ("clinical_outcomes", lambda wh, s: outcomes.load_outcomes(wh, s.outcomes, secret=s.secret)),
        ("phenotype_clusters", lambda wh, s: outcomes.build_clusters(wh, png_path=png(s, "clusters.png"))),
        ("cluster_outcomes", lambda wh, s: outcomes.analyse_cluster_outcomes(wh, png_path=png(s, "km.png"))),
        ("lesion_embeddings", lambda wh, s: embeddings.build_lesion_embeddings(wh)),
        ("embedding_robustness", lambda wh, s: embedding_robustness.compute_embedding_robustness(
            wh, workers=s.workers)),
    ]


#: The asset names of the chain, in the order the steps run (the Dagster graph's topological order).
CHAIN: tuple[str, ...] = ("dicom_files", "imaging_series", "segmentations", "lesions", "lesion_thumbnails",
                          "lesion_crops", "embedding_model", "radiomics_features",
                          "feature_robustness", "robust_feature_set", "lesion_vectors", "clinical_outcomes",
                          "phenotype_clusters", "cluster_outcomes", "lesion_embeddings", "embedding_robustness")


def run_chain(wh: Any, settings: ChainSettings, until: str | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the steps of :data:`CHAIN` in order without Dagster (tests, benchmarks, crash drivers).

    Parameters
    ----------
    wh
        The :class:`~imaging_assets.store.warehouse.Warehouse`.
    settings
        Sources and knobs (:class:`ChainSettings`).
    until
        Stop after this step (inclusive); default: the whole chain.
    log
        Called with each step's name before it runs.

    Returns
    -------
    dict
        Step name -> its result dataclass.
    """
    if until is not None and until not in CHAIN:
        raise ValueError(f"unknown step {until!r}; the chain is {', '.join(CHAIN)}")
    out: dict[str, Any] = {}
    for name, step in _steps():
        if log is not None:
            log(name)
        out[name] = step(wh, settings)
        if name == until:
            break
    return out
