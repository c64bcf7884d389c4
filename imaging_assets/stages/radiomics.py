"""Radiomics: the steps behind the ``lesions`` and ``radiomics_features`` assets, and their checks' queries.

Writes are transactional per batch of lesions: a crash leaves whole lesions (features + provenance), never
a part of one. Extraction is incremental: a lesion whose provenance matches its current source
fingerprint and parameter hash is not extracted again; lesions that left the ``lesions`` table (or
became non-extractable) lose their features in the same transaction that rewrites ``lesions``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, insert_rows, table_rows, transaction

logger = logging.getLogger(__name__)

WIDE_VIEW = "radiomics_features_wide"
_DERIVED = ("radiomics_features", "radiomics_provenance", "radiomics_errors")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LesionsResult:
    """Lesion rows written: counts by status and ROI, segmentations decoded, lesions whose features were
    dropped (``removed``), the non-ok lesions (lesion_id, status, reason)."""

    lesions: int
    extractable: int
    by_status: dict[str, int]
    by_roi_name: dict[str, int]
    decoded_segmentations: int
    removed: int
    problem_rows: list[dict[str, Any]]
    elapsed_s: float
    #: every batch of series (the extraction's partitions), those new in this run, those whose inputs changed
    batches: tuple[str, ...] = ()
    new_batches: tuple[str, ...] = ()
    changed_batches: tuple[str, ...] = ()
    series_per_batch: int = 0


@dataclass(frozen=True)
class ExtractionResult:
    """One extraction run: lesions extracted / failed / skipped, feature columns, errors (lesion_id, message)."""

    extractable: int
    extracted: int
    failed: int
    skipped_current: int
    skipped_failed: int
    features_per_lesion: int
    errors: list[dict[str, str]]
    lesions_per_s: float | None
    elapsed_s: float
    #: batches in all / extracted here (not current) / loaded into the feature tables by this run
    batches: int = 0
    batches_extracted: int = 0
    batches_loaded: int = 0


@dataclass(frozen=True)
class FeatureTableReport:
    """The stored feature tables as the ``radiomics_features`` asset shows them."""

    rows: int
    lesions_with_features: int
    features_by_image_type: list[dict[str, Any]]
    mean_s_per_lesion: float
    max_s_per_lesion: float
    params_hashes: list[str]
    #: per feature space: space, modality, source (preset / file), lesions, features, incomplete lesions
    spaces: list[dict[str, Any]]


@dataclass(frozen=True)
class FailureShare:
    """Failed extractions over extractable lesions (the ``radiomics_failure_share`` check)."""

    extractable: int
    failures: list[dict[str, str]]

    @property
    def share(self) -> float:
        """Failed / extractable (0 when nothing is extractable)."""
        return len(self.failures) / self.extractable if self.extractable else 0.0


@dataclass(frozen=True)
class LesionStatusReport:
    """Lesions whose status is not ok (lesion_id, status, reason), and the total (``lesions_decodable``)."""

    not_ok: list[dict[str, Any]]
    lesions: int


def _delete_for(con: duckdb.DuckDBPyConnection, tables: Sequence[str], lesion_ids: Sequence[str]) -> None:
    if not lesion_ids:
        return
    con.register("_ids", pa.table({"lesion_id": pa.array(list(lesion_ids), pa.string())}))
    try:
        for t in tables:
            con.execute(f"DELETE FROM {t} WHERE lesion_id IN (SELECT lesion_id FROM _ids)")
    finally:
        con.unregister("_ids")


def rebuild_lesions(
    wh: Warehouse,
    split_components: bool = False,
    fractional_threshold: float = 0.5,
    roi_mapping: Sequence[tuple[str, str]] | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    series_per_batch: int | None = None,
) -> LesionsResult:
    """Decode linked segmentations into the ``lesions`` table (unchanged ones are reused); lesions that left
    it (or became non-extractable) lose their features in the same transaction. Then every series with an
    extractable lesion gets its batch, and the inputs of new or changed batches are written
    (:func:`~imaging_assets.stages.batches.assign_batches`; ``series_per_batch`` default: its setting)."""
    from imaging_assets.features.pipeline import LesionOptions, lesion_rows
    from imaging_assets.stages.batches import assign_batches, batch_files

    t0 = time.perf_counter()
    options = LesionOptions(split_components, fractional_threshold,
                            tuple(tuple(m) for m in roi_mapping) if roi_mapping else None)
    with wh.connect() as con:
        ensure_schema(con)
        series = table_rows(con, "imaging_series")
        segs = [s for s in table_rows(con, "segmentations") if s["linked_series_key"]]
        previous = table_rows(con, "lesions")
    rows, decoded = lesion_rows(series, segs, options, previous=previous, workers=workers, progress=progress)
    keep = {r["lesion_id"] for r in rows if r["extractable"]}
    with wh.connect() as con:
        stale = [r[0] for r in con.execute(
            "SELECT DISTINCT lesion_id FROM radiomics_provenance UNION SELECT lesion_id FROM radiomics_errors"
        ).fetchall() if r[0] not in keep]
        with transaction(con):
            con.execute("DELETE FROM lesions")
            insert_rows(con, "lesions", rows)
            _delete_for(con, _DERIVED, stale)
        assignment = assign_batches(con, batch_files(wh), {
            "split_components": split_components, "fractional_threshold": fractional_threshold,
            "roi_mapping": [list(m) for m in options.roi_mapping] if options.roi_mapping else None,
        }, series_per_batch)
    problems = [r for r in rows if r["status"] != "ok"]
    return LesionsResult(
        lesions=len(rows),
        extractable=len(keep),
        by_status=dict(Counter(r["status"] for r in rows)),
        by_roi_name=dict(Counter(r["roi_name"] for r in rows)),
        decoded_segmentations=decoded,
        removed=len(stale),
        problem_rows=[{"lesion_id": r["lesion_id"], "status": r["status"], "reason": r["reason"]}
                      for r in problems],
        elapsed_s=round(time.perf_counter() - t0, 3),
        batches=assignment.batches,
        new_batches=assignment.new,
        changed_batches=assignment.changed,
        series_per_batch=assignment.series_per_batch,
    )


def feature_rows(lesion_id: str, features: Mapping[str, float]) -> list[dict[str, Any]]:
    """One long-table row (lesion, image type, class, feature, value) per pyradiomics feature."""
    from imaging_assets.features.pipeline import split_feature_name

    rows = []
    for name, value in features.items():
        image_type, feature_class, feature = split_feature_name(name)
        rows.append({"lesion_id": lesion_id, "image_type": image_type, "feature_class": feature_class,
                     "feature": feature, "value": float(value)})
    return rows


def record_spaces(con: duckdb.DuckDBPyConnection, spaces: Mapping[str, Any]) -> None:
    """Upsert the settings of each feature space in use (``feature_spaces``: modality, params hash, source
    file, the resolved parameters as JSON), so a new lesion can be extracted exactly like them."""
    import json

    from imaging_assets.features.params import _canonical

    with transaction(con):
        for space, st in spaces.items():
            params_json = json.dumps(_canonical(st.params), sort_keys=True)
            # a rerun with the same settings writes nothing (reruns leave every table identical)
            known = con.execute("SELECT source FROM feature_spaces WHERE space = ?", [space]).fetchone()
            if known is None:
                con.execute("INSERT INTO feature_spaces (space, modality, params_hash, source, params_json, "
                            "first_seen) VALUES (?, ?, ?, ?, ?, (now() AT TIME ZONE 'UTC'))",
                            [space, st.modality, st.params_hash, st.source, params_json])
            elif known[0] != st.source:  # the same parameters from another file: name the latest
                con.execute("UPDATE feature_spaces SET source = ? WHERE space = ?", [st.source, space])


def mark_missing_image_types(con: duckdb.DuckDBPyConnection) -> int:
    """Record on each lesion the image types it lacks against its space (pyradiomics skips a filter it
    cannot apply, e.g. LoG on a box thinner than 4 voxels): ``radiomics_provenance.missing_image_types``.
    Such a lesion is incomplete, not faulty; the expectations and the vectors treat it so. Returns the
    number of incomplete lesions."""
    with transaction(con):
        con.execute("UPDATE radiomics_provenance SET missing_image_types = NULL")
        con.execute(
            "WITH have AS (SELECT DISTINCT p.space, f.lesion_id, f.image_type FROM radiomics_features f "
            "JOIN radiomics_provenance p USING (lesion_id)), "
            "types AS (SELECT DISTINCT space, image_type FROM have), "
            "lack AS (SELECT p.lesion_id, list(t.image_type ORDER BY t.image_type) AS missing "
            "FROM radiomics_provenance p JOIN types t ON t.space IS NOT DISTINCT FROM p.space "
            "WHERE NOT EXISTS (SELECT 1 FROM have h WHERE h.lesion_id = p.lesion_id AND h.image_type = t.image_type) "
            "GROUP BY p.lesion_id) "
            "UPDATE radiomics_provenance SET missing_image_types = lack.missing FROM lack "
            "WHERE radiomics_provenance.lesion_id = lack.lesion_id")
        return int(con.execute("SELECT count(*) FROM radiomics_provenance WHERE missing_image_types IS NOT NULL"
                               ).fetchone()[0])


def refresh_wide_view(con: duckdb.DuckDBPyConnection) -> int:
    """(Re)create ``radiomics_features_wide``: one row per lesion, one column per feature
    (``<image_type>_<class>_<feature>``, pyradiomics' own names). Returns the number of feature columns."""
    names = [r[0] for r in con.execute(
        "SELECT DISTINCT image_type || '_' || feature_class || '_' || feature FROM radiomics_features ORDER BY 1"
    ).fetchall()]
    bad = [n for n in names if not _SAFE_NAME.match(n)]
    if bad:
        raise ValueError(f"unexpected characters in feature names: {bad[:5]}")
    if not names:
        con.execute(f"CREATE OR REPLACE VIEW {WIDE_VIEW} AS SELECT lesion_id FROM lesions WHERE false")
        return 0
    in_list = ", ".join(f"'{n}'" for n in names)  # validated above: DDL cannot take parameters
    con.execute(
        f"CREATE OR REPLACE VIEW {WIDE_VIEW} AS PIVOT (SELECT lesion_id, image_type || '_' || feature_class "
        f"|| '_' || feature AS name, value FROM radiomics_features) ON name IN ({in_list}) "
        "USING first(value) GROUP BY lesion_id ORDER BY lesion_id"
    )
    return len(names)


def extract_features(
    wh: Warehouse,
    params_override: str | Path | None = None,
    workers: int | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
) -> ExtractionResult:
    """Bring the feature tables up to date, batch by batch (the ``radiomics_features`` asset).

    Batches of series whose result files are current (extracted by the partitioned ``radiomics_batches``
    asset on any worker, or by an earlier run) are not extracted again; the others are extracted here, in
    one process pool, and each batch is committed to its files as soon as its last lesion is done. Every
    batch whose files changed is then loaded into DuckDB in one transaction per batch
    (:func:`~imaging_assets.stages.batches.load_batch`): a crash leaves whole batches, never part of one.

    Parameters
    ----------
    params_override
        A pyradiomics YAML used for every modality instead of the presets in ``data/params``.
    retry_failed
        Re-run lesions that failed before with the same inputs (by default they are skipped: the same
        inputs fail the same way).
    """
    from imaging_assets.stages import batches as bt

    t0 = time.perf_counter()
    files = bt.batch_files(wh)
    with wh.connect() as con:
        ensure_schema(con)
        unassigned = con.execute(
            "SELECT count(*) FROM lesions l WHERE l.extractable AND NOT EXISTS "
            "(SELECT 1 FROM series_batches b WHERE b.series_key = l.series_key)").fetchone()[0]
        if unassigned:  # a warehouse whose lesions were written before batches existed
            logger.warning("%d extractable lesions have no batch: assigning them (default lesion options)",
                           unassigned)
            bt.assign_batches(con, files, {})
        batch_ids = [r[0] for r in con.execute(
            "SELECT DISTINCT batch_id FROM series_batches ORDER BY 1").fetchall()]
        loaded = bt.loaded_tokens(con)
        # settings are resolved and validated for every batch before anything is written: a bad parameter
        # file stops the run with the file and the key named, and every stored feature stays as it was
        plans = []
        for batch in batch_ids:
            version = files.current(batch)
            if version is not None:
                prior = bt.prior_from_version(version)
            else:  # no files yet: carry the features this warehouse already holds
                ids = [r["lesion_id"] for r in files.read_inputs(batch)["lesions"]]
                prior = bt.prior_from_store(con, ids)
            plans.append(bt.plan_batch(files, batch, params_override, retry_failed, prior=prior))
        record_spaces(con, {space: st for plan in plans for space, st in plan.settings.items()})
    stale = [plan for plan in plans if not bt.is_current(files, plan)]
    stale_ids = {plan.batch for plan in stale}
    n_loaded = 0
    for plan in plans:  # current files not loaded yet (e.g. written by a backfill on other workers)
        version = files.current(plan.batch)
        if plan.batch not in stale_ids and version is not None and loaded.get(plan.batch) != version.token:
            with wh.connect() as con:
                bt.load_batch(con, version)
            n_loaded += 1
    todo = sum(len(plan.todo) for plan in stale)
    errors: list[dict[str, str]] = []
    n_ok = 0
    for plan, version in bt.extract_plans(files, stale, workers=workers, progress=progress):
        with wh.connect() as con:
            bt.load_batch(con, version)
        n_loaded += 1
        n_ok += sum(1 for o in plan.outcomes if o.ok)
        errors += [{"lesion_id": o.lesion_id, "message": o.error} for o in plan.outcomes if not o.ok]
    with wh.connect() as con:
        mark_missing_image_types(con)
        n_columns = refresh_wide_view(con)
    elapsed = time.perf_counter() - t0
    return ExtractionResult(
        extractable=sum(len(plan.jobs) for plan in plans),
        extracted=n_ok,
        failed=len(errors),
        skipped_current=sum(plan.skipped_current for plan in plans),
        skipped_failed=sum(plan.skipped_failed for plan in plans),
        features_per_lesion=n_columns,
        errors=errors,
        lesions_per_s=round(todo / elapsed, 3) if todo else None,
        elapsed_s=round(elapsed, 3),
        batches=len(plans),
        batches_extracted=len(stale),
        batches_loaded=n_loaded,
    )


def lesions_preview(wh: Warehouse, limit: int = 10) -> list[dict[str, Any]]:
    """The largest extractable lesions (id, patient key, modality, ROI, label, volume, status, the path of
    the picture ``lesion_thumbnails`` draws): where a user copies a reference lesion id from."""
    from imaging_assets.stages.thumbnails import thumbnail_uri

    with wh.connect(read_only=True) as con:
        rows = con.execute(
            "SELECT lesion_id, patient_key, modality, roi_name, raw_label, round(volume_mm3, 1) AS volume_mm3, "
            "status FROM lesions ORDER BY extractable DESC, volume_mm3 DESC NULLS LAST, lesion_id LIMIT ?",
            [limit]).fetchdf().to_dict("records")
    return [{**r, "thumbnail": thumbnail_uri(wh, r["lesion_id"])} for r in rows]


def feature_table_report(wh: Warehouse) -> FeatureTableReport:
    """Row counts, features per image type, timing and parameter hashes of the stored features."""
    with wh.connect(read_only=True) as con:
        n_rows = con.execute("SELECT count(*) FROM radiomics_features").fetchone()[0]
        n_lesions = con.execute("SELECT count(*) FROM radiomics_provenance").fetchone()[0]
        per_class = con.execute(
            "SELECT image_type, count(DISTINCT feature_class || feature) AS features FROM radiomics_features "
            "GROUP BY 1 ORDER BY 1").fetchdf().to_dict("records")
        timing = con.execute("SELECT avg(elapsed_s), max(elapsed_s) FROM radiomics_provenance").fetchone()
        versions = [r[0] for r in con.execute(
            "SELECT DISTINCT params_hash FROM radiomics_provenance ORDER BY 1").fetchall()]
        spaces = con.execute(
            "SELECT p.space, any_value(s.modality) AS modality, any_value(s.source) AS source, "
            "count(*) AS lesions, max(p.n_features) AS features, "
            "count(*) FILTER (WHERE p.missing_image_types IS NOT NULL) AS incomplete "
            "FROM radiomics_provenance p LEFT JOIN feature_spaces s USING (space) GROUP BY 1 ORDER BY 1"
        ).fetchdf().to_dict("records")
    return FeatureTableReport(rows=int(n_rows), lesions_with_features=int(n_lesions),
                              features_by_image_type=per_class, mean_s_per_lesion=round(float(timing[0] or 0.0), 3),
                              max_s_per_lesion=round(float(timing[1] or 0.0), 3), params_hashes=versions,
                              spaces=spaces)


def failure_share(wh: Warehouse) -> FailureShare:
    """Failed extractions of extractable lesions, with their messages."""
    with wh.connect(read_only=True) as con:
        total = con.execute("SELECT count(*) FROM lesions WHERE extractable").fetchone()[0]
        failed = con.execute(
            "SELECT e.lesion_id, e.message FROM radiomics_errors e JOIN lesions l USING (lesion_id) "
            "WHERE l.extractable ORDER BY 1").fetchall()
    return FailureShare(int(total), [{"lesion_id": a, "message": b} for a, b in failed])


def lesion_status_report(wh: Warehouse) -> LesionStatusReport:
    """Lesions that are not ok, with status and reason."""
    with wh.connect(read_only=True) as con:
        rows = con.execute("SELECT lesion_id, status, reason FROM lesions WHERE status <> 'ok' ORDER BY 1").fetchall()
        total = con.execute("SELECT count(*) FROM lesions").fetchone()[0]
    return LesionStatusReport([{"lesion_id": a, "status": b, "reason": c} for a, b, c in rows], int(total))
