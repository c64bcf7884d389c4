"""Great Expectations suite for the radiomics feature table (no Dagster here).

:func:`validate_features` validates a per-lesion wide table (one row per lesion, one column per
pyradiomics feature, plus ``lesion_id`` and ``n_features``) with an ephemeral GX 1.x context and returns
one result per expectation with the observed values and the failing lesions, so the Dagster check can
show *which* rows failed and why.

Expectations (physically possible ranges, from the pyradiomics feature definitions):

* ``lesion_id`` unique and not null (one row per lesion: no duplicated lesion x feature in the long table);
* every lesion has the same number of features (``n_features`` equals the expected count);
* no NaN or infinite value in the robust features (when a robust set is given; else in every feature),
  validated as a per-lesion count of non-finite values that must be 0 (the failing features are named);
* ``original_shape_VoxelVolume`` and ``original_shape_MeshVolume`` > 0;
* ``original_shape_Sphericity`` in (0, 1];
* every ``*_Entropy`` feature (first-order entropy, GLCM joint/sum entropy, run / zone / dependence
  entropies) >= 0, validated on the per-lesion minimum over those features (pyradiomics adds eps inside
  the logarithm, so tiny negative values are rounding: the bound is -1e-9).

Rules are validated on per-lesion summary columns rather than one expectation per feature: GX costs about
0.2 s per expectation, and the feature table has over a thousand columns.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

ENTROPY_FLOOR = -1e-9


@dataclass
class ExpectationOutcome:
    """One expectation's result: what was expected, what was seen, and which lesions failed."""

    expectation: str
    column: str | None
    success: bool
    observed: Any
    failing_lesions: list[str] = field(default_factory=list)
    detail: str | None = None


def _suite(df: pd.DataFrame, expected_features: int | None) -> list[Any]:
    import great_expectations as gx

    ex = gx.expectations
    out: list[Any] = [
        ex.ExpectColumnValuesToBeUnique(column="lesion_id"),
        ex.ExpectColumnValuesToNotBeNull(column="lesion_id"),
        ex.ExpectColumnValuesToBeBetween(column="nonfinite_features", min_value=0, max_value=0),
    ]
    if expected_features is not None:
        out.append(ex.ExpectColumnValuesToBeBetween(column="n_features", min_value=expected_features,
                                                    max_value=expected_features))
    for col in ("original_shape_VoxelVolume", "original_shape_MeshVolume"):
        if col in df:
            out.append(ex.ExpectColumnValuesToBeBetween(column=col, min_value=0, strict_min=True))
    if "original_shape_Sphericity" in df:
        out.append(ex.ExpectColumnValuesToBeBetween(column="original_shape_Sphericity", min_value=0,
                                                    max_value=1, strict_min=True))
    if "min_entropy" in df:
        out.append(ex.ExpectColumnValuesToBeBetween(column="min_entropy", min_value=ENTROPY_FLOOR))
    return out


def validate_features(
    wide: pd.DataFrame, robust: Sequence[str] | None = None, expected_features: int | None = None
) -> list[ExpectationOutcome]:
    """Validate the per-lesion feature table with Great Expectations.

    Parameters
    ----------
    wide
        One row per lesion: ``lesion_id``, ``n_features`` and feature columns (pyradiomics names).
        Infinite values are turned into nulls before validation, so "not null" means finite.
    robust
        Features that must be finite (the current robust set); None checks every feature column.
    expected_features
        The number of features every lesion must have (from the parameter set); None skips it.

    Returns
    -------
    list of ExpectationOutcome
        One per expectation, with the failing lesion ids (at most 50 listed).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    feature_cols = [c for c in wide.columns if c not in ("lesion_id", "n_features")]
    finite_cols = [c for c in (robust if robust is not None else feature_cols) if c in wide.columns]
    entropy_cols = [c for c in feature_cols if c.endswith("Entropy")]
    shape_cols = [c for c in ("original_shape_VoxelVolume", "original_shape_MeshVolume",
                              "original_shape_Sphericity") if c in wide.columns]
    # one expectation per rule, not per feature (GX costs ~0.2 s per expectation): per-lesion summaries
    finite = np.isfinite(wide[finite_cols].to_numpy(dtype=float)) if finite_cols else np.ones((len(wide), 0), bool)
    df = pd.DataFrame({"lesion_id": wide["lesion_id"].to_numpy(),
                       "nonfinite_features": (~finite).sum(axis=1)})
    if "n_features" in wide:
        df["n_features"] = wide["n_features"].to_numpy()
    for c in shape_cols:
        df[c] = wide[c].replace([np.inf, -np.inf], np.nan).to_numpy(dtype=float)
    if entropy_cols:
        df["min_entropy"] = wide[entropy_cols].to_numpy(dtype=float).min(axis=1)
    bad_features = sorted({finite_cols[j] for j in np.where(~finite)[1]}) if finite.size else []
    context = gx.get_context(mode="ephemeral")
    try:  # no progress bars in asset logs
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    source = context.data_sources.add_pandas("radiomics")
    asset = source.add_dataframe_asset("radiomics_features")
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = context.suites.add(gx.ExpectationSuite(name="radiomics_features"))
    for expectation in _suite(df, expected_features):
        suite.add_expectation(expectation)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    outcomes = []
    for r in result.results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        res = r.result or {}
        failing: list[str] = []
        idx = res.get("unexpected_index_list") or []
        if idx and column is not None:
            rows = [i if isinstance(i, int) else i.get("index", i) for i in idx]
            try:
                failing = [str(df.iloc[int(i)]["lesion_id"]) for i in rows[:50]]
            except (TypeError, ValueError, IndexError):
                failing = []
        elif res.get("unexpected_list") and column == "lesion_id":
            failing = [str(v) for v in res["unexpected_list"][:50]]
        observed = res.get("unexpected_count", res.get("observed_value"))
        if isinstance(observed, float) and math.isnan(observed):
            observed = None
        detail = None
        if column == "nonfinite_features" and bad_features:
            detail = "non-finite in: " + ", ".join(bad_features[:10]) + (" ..." if len(bad_features) > 10 else "")
        if column == "min_entropy" and not r.success:
            neg = [c for c in entropy_cols if (wide[c].to_numpy(dtype=float) < ENTROPY_FLOOR).any()]
            detail = "negative: " + ", ".join(neg[:10])
        outcomes.append(ExpectationOutcome(cfg.type, column, bool(r.success), observed, failing, detail))
    return outcomes
