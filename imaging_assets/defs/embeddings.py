"""Deep embeddings: lesion crops, the self-supervised encoder (or a model of yours), the Lance table of
embeddings and its robustness under perturbation."""

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import picture, table_definition, table_metadata
from imaging_assets.defs.outcomes import phenotype_clusters
from imaging_assets.defs.radiomics import lesions
from imaging_assets.defs.resources import WarehouseResource

GROUP = "embeddings"
OWNERS = ["team:imaging"]


class CropConfig(dg.Config):
    """Crop settings."""

    workers: int = Field(default=0, description="Processes; 0 = one per CPU core.")
    force: bool = Field(default=False, description="Make every crop again (default: only new or changed lesions).")


@dg.asset(metadata=table_definition("lesion_crops"), deps=[lesions], group_name=GROUP, kinds={"python", "duckdb"},
          owners=OWNERS, pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
          check_specs=[dg.AssetCheckSpec(
              "crops_complete", asset="lesion_crops",
              description="Every extractable lesion has a crop (warns and names the lesions that failed, with the "
              "reason).")])
def lesion_crops(context: dg.AssetExecutionContext, config: CropConfig,
                 warehouse: WarehouseResource) -> dg.MaterializeResult:
    """The encoder's input: per extractable lesion a lesion-centred 48³ crop at 1 mm isotropic spacing (CT:
    HU window -1000..400 scaled to 0..1; MR/PET: 1st-99th percentile of the lesion's surroundings), with the
    mask as a second channel, as `<warehouse>/crops/<lesion_id>.npy` (float16). Incremental by content hash
    (the lesion's source files, modality, crop version); crops of removed lesions are deleted.
    """
    from imaging_assets.stages.embeddings import build_lesion_crops

    wh = warehouse.get_warehouse()
    r = build_lesion_crops(wh, workers=config.workers or None, force=config.force)
    context.log.info(f"crops: {r.made} made, {r.unchanged} unchanged, {r.removed} removed, {len(r.failed)} failed "
                     f"({r.elapsed_s:.1f} s)")
    done = r.total - len(r.failed)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": done, "folder": dg.MetadataValue.path(r.folder), "made": r.made,
        "unchanged": r.unchanged, "removed": r.removed, "failed": len(r.failed),
        "crop": f"{r.size}³ voxels at {r.spacing_mm} mm, 2 channels (image, mask), float16",
        "failures": table_metadata(r.failed, ["lesion_id", "error"]), "elapsed_s": r.elapsed_s,
    }, check_results=[dg.AssetCheckResult(
        check_name="crops_complete", passed=not r.failed, severity=dg.AssetCheckSeverity.WARN,
        metadata={"observed_with_crop": done, "lesions": r.total,
                  "errors": table_metadata(r.failed, ["lesion_id", "error"]), "threshold": "every extractable lesion"})])


class ModelConfig(dg.Config):
    """Training settings (the defaults train the demo's encoder in about 30 s on 2 idle cores; the time cap
    guards a loaded machine)."""

    seed: int = Field(default=0, description="Seed of the weights, augmentations and batches (same seed, same "
                      "crops, same threads: the same model).")
    epochs: int = Field(default=0, description="Training epochs; 0 = the default of TrainConfig.")
    max_seconds: float = Field(default=300.0, description="Stop after the epoch that passes this many seconds "
                               "(the model then says stopped_early).")
    threads: int = Field(default=0, description="Torch threads; 0 = one per CPU core.")
    force: bool = Field(default=False, description="Train again even when the active model could be reused.")
    retrain_growth: float = Field(default=0.25, description="Reuse the active model until the cohort grew by more "
                                  "than this fraction of the lesions it was trained on.")
    model_path: str = Field(default="", description="A TorchScript or ONNX file of yours to use instead of training "
                            "(default IMAGING_ASSETS_EMBEDDING_MODEL); its input size, channels and intensity come "
                            "from its sidecar <file>.json or the settings below.")
    model_input_size: int = Field(default=0, description="Your model's input cube size in voxels (0: from the "
                                  "sidecar or IMAGING_ASSETS_EMBEDDING_INPUT_SIZE).")
    model_channels: int = Field(default=0, description="Your model's input channels, 1 (image) or 2 (image, mask).")
    model_intensity: str = Field(default="", description="project | zscore | minmax (how your model wants the "
                                 "crop's intensities).")


@dg.asset(deps=[lesion_crops], group_name=GROUP, kinds={"pytorch", "duckdb"}, owners=OWNERS, pool="duckdb_writer",
          automation_condition=dg.AutomationCondition.eager(),
          metadata={"dagster/table_name": "embedding_models"})
def embedding_model(context: dg.AssetExecutionContext, config: ModelConfig,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
    """The lesion encoder: a small 3D CNN trained self-supervised (SimCLR-style contrastive loss; flips, 90°
    rotations, small affine, intensity jitter, noise and crop shifts as augmentations) on this cohort's crops
    with PyTorch on the CPU, deterministic for a seed; saved as TorchScript under `<warehouse>/models/` with
    its training config, data version and loss curve (`embedding_models` keeps every version, one active).
    Reused while the config is the same and the cohort has not grown by more than `retrain_growth`. With
    `model_path` / IMAGING_ASSETS_EMBEDDING_MODEL, your TorchScript or ONNX model is registered instead
    (nothing is downloaded).
    """
    from dataclasses import replace

    from imaging_assets import settings
    from imaging_assets.analysis.plots import loss_curve_png
    from imaging_assets.features.embedding import TrainConfig
    from imaging_assets.stages.embeddings import train_embedding_model

    wh = warehouse.get_warehouse()
    cfg = replace(TrainConfig(), seed=config.seed, max_seconds=config.max_seconds, threads=config.threads,
                  **({"epochs": config.epochs} if config.epochs else {}))
    external = settings.embedding_model()
    if config.model_path:
        external = {"path": config.model_path}
    if external is not None:
        for key, value in (("input_size", config.model_input_size), ("channels", config.model_channels),
                           ("intensity", config.model_intensity)):
            if value:
                external[key] = value

    def progress(epoch: int, loss: float) -> None:
        context.log.info(f"epoch {epoch}: loss {loss:.4f}")

    m = train_embedding_model(wh, cfg, force=config.force, retrain_growth=config.retrain_growth,
                              external=external or {}, progress=progress)
    context.log.info(f"embedding model {m.model_version} ({m.source}, {'reused' if m.reused else 'new'}): {m.reason}")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        png = loss_curve_png(m.loss_curve, Path(tmp) / "loss.png") if m.loss_curve else None
        plot = picture(wh, "embedding_loss", png, "training loss per epoch")
    return dg.MaterializeResult(metadata={
        "model_version": m.model_version, "source": m.source, "reused": m.reused, "reason": m.reason,
        "path": dg.MetadataValue.path(m.path), "sha256": m.sha256, "dim": m.dim, "input_size": m.input_size,
        "trained_on_lesions": m.n_lesions, "data_version": m.data_version or "", "epochs": m.epochs or 0,
        "train_s": m.train_s or 0.0, "stopped_early": m.stopped_early, "loss_curve": plot,
        "final_loss": m.loss_curve[-1] if m.loss_curve else 0.0,
        "config": dg.MetadataValue.json(m.config), "elapsed_s": m.elapsed_s,
    })


class EmbeddingConfig(dg.Config):
    """Index policy (as lesion_vectors)."""

    batch_size: int = Field(default=64, description="Crops embedded per batch.")
    exact_threshold: int | None = Field(default=None, description="Rows from which an ANN index is kept (default "
                                        "as lesion_vectors).")


@dg.asset(metadata=table_definition("lesion_embeddings"), deps=[embedding_model, lesion_crops, phenotype_clusters],
          group_name=GROUP, kinds={"pytorch", "lancedb"}, owners=OWNERS, pool="duckdb_writer",
          automation_condition=dg.AutomationCondition.eager())
def lesion_embeddings(context: dg.AssetExecutionContext, config: EmbeddingConfig,
                      warehouse: WarehouseResource) -> dg.MaterializeResult:
    """One L2-normalised embedding per lesion with a crop, from the active embedding model, in the LanceDB
    table `lesion_embeddings`: the same metadata columns, upsert, verification, index and retention policy as
    `lesion_vectors` (its `feature_set_version` holds the model version, `space` the lesion's feature space,
    `cluster` its phenotype cluster). Only new or changed crops are embedded, or all under a new model.
    Searched by `similar --space deep|hybrid`; in DuckDB SQL as the view `lesion_embeddings`.
    """
    from imaging_assets.stages.embeddings import build_lesion_embeddings

    wh = warehouse.get_warehouse()
    s = build_lesion_embeddings(wh, batch_size=config.batch_size, exact_threshold=config.exact_threshold)
    context.log.info(f"lesion_embeddings v{s.table_version}: {s.rows} rows of dim {s.dim} ({s.embedded} embedded "
                     f"at {s.lesions_per_s} lesions/s; +{s.inserted} ~{s.updated} -{s.deleted})")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": s.rows, "table_version": s.table_version, "dim": s.dim, "model_version": s.model_version,
        "embedded": s.embedded, "lesions_per_s": s.lesions_per_s or 0.0, "embed_s": s.embed_s,
        "inserted": s.inserted, "updated": s.updated, "deleted": s.deleted, "unchanged": s.unchanged,
        "index": s.index, "lance_uri": wh.lance_uri, "elapsed_s": s.elapsed_s,
        "excluded_lesions": table_metadata(s.excluded, ["lesion_id", "reason"]),
        **{f"retention_{k}": v for k, v in s.retention.items()},
    })


@dg.asset_check(asset=lesion_embeddings, pool="duckdb_writer", blocking=True,
                description="Embedding integrity: one row per lesion with a crop, finite unit-norm vectors, all from "
                "the active model.")
def embeddings_integrity(warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """Compares the Lance table with the crops and the active model."""
    from imaging_assets.stages.embeddings import embedding_integrity

    r = embedding_integrity(warehouse.get_warehouse())
    return dg.AssetCheckResult(passed=not r.problems, metadata={
        "observed_rows": r.rows, "expected_rows": r.expected_rows, "problems": "; ".join(r.problems) or "none"})


class EmbeddingRobustnessConfig(dg.Config):
    """Sample size of the robustness analysis."""

    lesions: int = Field(default=30, description="Lesions sampled (stable sample by lesion id).")
    perturbations: int = Field(default=4, description="Perturbed copies per lesion (the radiomics stage's "
                               "perturbations: noise, sub-voxel shift, rotation, volume change, contour).")
    workers: int = Field(default=0, description="Processes; 0 = one per CPU core.")


@dg.asset(metadata=table_definition("embedding_robustness"), deps=[lesion_embeddings], group_name=GROUP,
          kinds={"pytorch", "duckdb"}, owners=OWNERS, pool="duckdb_writer",
          automation_condition=dg.AutomationCondition.eager(),
          check_specs=[dg.AssetCheckSpec(
              "embedding_robust", asset="embedding_robustness",
              description="Median ICC(3,1) of the embedding dimensions >= 0.75 under perturbation and a mean top-10 "
              "neighbour overlap (original vs perturbed lesion) >= 0.5 (warns otherwise).")])
def embedding_robustness(context: dg.AssetExecutionContext, config: EmbeddingRobustnessConfig,
                         warehouse: WarehouseResource) -> dg.MaterializeResult:
    """How stable the active model's embeddings are under the perturbations the radiomics features are
    tested with: ICC(3,1) per embedding dimension over sampled lesions (`embedding_robustness`), and the
    retrieval stability: the share of a lesion's top-10 neighbours (other patients, same space) that stay
    when the lesion is perturbed (`embedding_stability`).
    """
    import tempfile
    from pathlib import Path

    from imaging_assets.analysis.plots import embedding_icc_png
    from imaging_assets.stages.embedding_robustness import (
        ICC_THRESHOLD,
        OVERLAP_THRESHOLD,
        compute_embedding_robustness,
        embedding_robustness_rows,
    )

    wh = warehouse.get_warehouse()
    r = compute_embedding_robustness(wh, n_lesions=config.lesions, n_perturbations=config.perturbations,
                                     workers=config.workers or None)
    iccs, overlaps = embedding_robustness_rows(wh, r.model_version)
    with tempfile.TemporaryDirectory() as tmp:
        plot = picture(wh, "embedding_robustness", embedding_icc_png(iccs, overlaps, Path(tmp) / "icc.png"),
                       "embedding robustness")
    context.log.info(f"embedding robustness of {r.model_version}: median ICC {r.median_icc}, top-10 overlap "
                     f"{r.mean_overlap} over {r.n_lesions} lesions x {r.n_perturbations} perturbations")
    summary = {"median_icc": r.median_icc if r.median_icc is not None else float("nan"),
               "share_dims_icc_above_0_75": r.share_icc_above if r.share_icc_above is not None else float("nan"),
               "mean_top10_overlap": r.mean_overlap if r.mean_overlap is not None else float("nan")}
    return dg.MaterializeResult(metadata={
        "dagster/row_count": len(iccs), "model_version": r.model_version, "lesions": r.n_lesions,
        "perturbations": r.n_perturbations, **summary, "plot": plot,
        "failures": table_metadata(r.failed, ["lesion_id", "error"]), "elapsed_s": r.elapsed_s,
    }, check_results=[dg.AssetCheckResult(
        check_name="embedding_robust", passed=r.passed, severity=dg.AssetCheckSeverity.WARN,
        metadata={**summary, "icc_threshold": ICC_THRESHOLD, "overlap_threshold": OVERLAP_THRESHOLD,
                  "lesions": r.n_lesions})])
