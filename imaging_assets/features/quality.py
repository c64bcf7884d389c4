"""Great Expectations suite for the radiomics feature table (no Dagster here).

:func:`validate_features` validates a per-lesion wide table (one row per lesion, one column per
pyradiomics feature, plus ``lesion_id`` and ``n_features``) with an ephemeral GX 1.x context and returns
one result per expectation with the observed values and the failing lesions, so the Dagster check can
show *which* rows failed and why.

Expectations (physically possible ranges, from the pyradiomics feature definitions):

* ``lesion_id`` unique and not null (one row per lesion: no duplicated lesion x feature in the long table);
* every lesion has the same number of features (``n_features`` equals the expected count);
* no NaN or infinite value in the robust features (when a robust set is given; else in every feature);
* ``original_shape_VoxelVolume`` and ``original_shape_MeshVolume`` > 0;
* ``original_shape_Sphericity`` in (0, 1];
* every ``*_Entropy`` feature (first-order entropy, GLCM joint/sum entropy, run / zone / dependence
  entropies) >= 0 (pyradiomics adds eps inside the logarithm, so tiny negative values are rounding: the
  bound is -1e-9).
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


def _suite(df: pd.DataFrame, robust: Sequence[str] | None, expected_features: int | None) -> list[Any]:
    import great_expectations as gx

    ex = gx.expectations
    out: list[Any] = [
        ex.ExpectColumnValuesToBeUnique(column="lesion_id"),
        ex.ExpectColumnValuesToNotBeNull(column="lesion_id"),
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
    for col in df.columns:
        if col.endswith("Entropy"):
            out.append(ex.ExpectColumnValuesToBeBetween(column=col, min_value=ENTROPY_FLOOR))
    finite_cols = [c for c in (robust if robust is not None else df.columns) if c in df and c not in ("lesion_id",)]
    for col in finite_cols:
        out.append(ex.ExpectColumnValuesToNotBeNull(column=col, meta={"finite": True}))
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

    df = wide.copy()
    feature_cols = [c for c in df.columns if c not in ("lesion_id", "n_features")]
    df[feature_cols] = df[feature_cols].replace([np.inf, -np.inf], np.nan)
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
    for expectation in _suite(df, robust, expected_features):
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
        outcomes.append(ExpectationOutcome(cfg.type, column, bool(r.success), observed, failing))
    return outcomes
