"""Cohorts: a similar-case answer (:mod:`imaging_assets.stages.similar`) stored as a table, and its outcomes.

:func:`discover_cohort` writes the ranked answer (one row per patient by default), joined to clusters and
outcomes and with each row's explanation, into a DuckDB table ``cohort_<name>`` and registers it in
``cohorts`` with the query that made it; :func:`analyse_cohort_outcomes` compares the cohort's survival
with the rest of the archive; :func:`reference_candidates` is where a user picks a reference. No Dagster.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.stages.similar import explain_similar, find_similar, needs_embedding, query_vector
from imaging_assets.store import audit
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse, transaction

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


@dataclass(frozen=True)
class CohortResult:
    """A stored cohort: its table, row count, the Lance version searched, the query, a preview."""

    table: str
    rows: int
    lance_version: int | None
    query: dict[str, Any]
    preview: list[dict[str, Any]]
    elapsed_s: float
    #: the reference lesion (its row, cluster and picture) or the new image + mask, shown apart from the rows
    reference: dict[str, Any] = field(default_factory=dict)
    #: every row, with ``explanation`` (dict), ``why`` (words) and ``thumbnail`` (path or None)
    results: list[dict[str, Any]] = field(default_factory=list)
    audit_id: str | None = None
    space: str | None = None
    patients: int = 0

    @property
    def read_command(self) -> str:
        """The command that prints the cohort."""
        return f"imaging-assets sql \"SELECT * FROM {self.table} ORDER BY rank\""


def cohort_table_name(name: str) -> str:
    """``cohort_<name>`` for a valid name (lower-case letters, digits, underscores; starts with a letter)."""
    if not _NAME.match(name or ""):
        raise ValueError(f"cohort name {name!r} is not valid: use lower-case letters, digits and underscores, "
                         "starting with a letter (at most 48 characters)")
    return f"cohort_{name}"


def reference_candidates(wh: Warehouse, per_cluster: int = 3) -> list[dict[str, Any]]:
    """Where a user picks a cohort's reference: the ``per_cluster`` largest lesions of each phenotype cluster
    (per feature space), with patient, ROI, volume, outcome and the path of the lesion's picture."""
    from imaging_assets.stages.thumbnails import thumbnail_ids, thumbnail_uri

    with wh.connect(read_only=True) as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables "
                           "WHERE table_name = 'phenotype_clusters'").fetchone()[0]:
            return []
        rows = con.execute(
            "SELECT * FROM (SELECT pc.space, pc.cluster, l.lesion_id, l.patient_key, l.modality, l.roi_name, "
            "round(l.volume_mm3, 1) AS volume_mm3, o.time_months, o.event, row_number() OVER "
            "(PARTITION BY pc.space, pc.cluster ORDER BY l.volume_mm3 DESC NULLS LAST, l.lesion_id) AS pick "
            "FROM phenotype_clusters pc JOIN lesions l USING (lesion_id) "
            "LEFT JOIN patient_outcomes o ON o.patient_key = l.patient_key) WHERE pick <= ? "
            "ORDER BY space, cluster, pick", [per_cluster]).fetchdf().to_dict("records")
    out = []
    have = thumbnail_ids(wh)
    for r in rows:
        out.append({**{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items() if k != "pick"},
                    "thumbnail": thumbnail_uri(wh, r["lesion_id"]) if r["lesion_id"] in have else None})
    return out


def largest_lesion(wh: Warehouse, modality: str | None = None) -> str | None:
    """The largest lesion with a vector (of ``modality`` when given): a default reference for demos."""
    from imaging_assets.store import lance

    ds = lance.lance_dataset(wh.lance_uri)
    flt = f"modality = {lance.sql_string(modality.split(',')[0].strip())}" if modality else None
    rows = ds.to_table(columns=["lesion_id", "volume_mm3"], filter=flt).to_pylist()
    rows = [r for r in rows if r["volume_mm3"] is not None]
    return max(rows, key=lambda r: (r["volume_mm3"], r["lesion_id"]))["lesion_id"] if rows else None


def stored_cohort_query(wh: Warehouse, name: str) -> dict[str, Any] | None:
    """The query a cohort was last made with (``cohorts.query``), or None for a cohort never made."""
    with wh.connect(read_only=True) as con:
        if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'cohorts'").fetchone()[0]:
            return None
        row = con.execute("SELECT query FROM cohorts WHERE name = ?", [name]).fetchone()
    return json.loads(row[0]) if row and row[0] else None


def reference_row(wh: Warehouse, lesion_id: str, warm: Any = None) -> dict[str, Any]:
    """A lesion as a cohort's or a search's reference: its row, cluster, space and picture path (from a
    server's :class:`~imaging_assets.stages.serving.WarmSearch` when given)."""
    from imaging_assets.stages.thumbnails import thumbnail_key, thumbnail_uri

    cols = ("lesion_id", "patient_key", "modality", "body_part", "roi_name", "raw_label", "volume_mm3",
            "study_date", "cluster", "space")
    cached = warm.tables.lesions.get(lesion_id) if warm is not None else None
    if cached is not None:
        row = {c: cached.get(c) for c in cols}
    else:
        with wh.connect(read_only=True) as con:
            rows = con.execute(
                "SELECT l.lesion_id, l.patient_key, l.modality, l.body_part, l.roi_name, l.raw_label, l.volume_mm3, "
                "l.study_date, pc.cluster, p.space FROM lesions l LEFT JOIN phenotype_clusters pc USING (lesion_id) "
                "LEFT JOIN radiomics_provenance p USING (lesion_id) WHERE l.lesion_id = ?", [lesion_id]).fetchall()
        row = dict(zip(cols, rows[0])) if rows else {"lesion_id": lesion_id}
    row = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
    if row.get("study_date") is not None:
        row["study_date"] = str(row["study_date"])[:10]
    if row.get("cluster") is not None:
        row["cluster"] = int(row["cluster"])
    has = wh.objects.exists(thumbnail_key(lesion_id))
    return {**row, "thumbnail": thumbnail_uri(wh, lesion_id) if has else None}


def discover_cohort(wh: Warehouse, name: str, reference_lesion_id: str | None = None, image: str | None = None,
                    mask: str | None = None, segment: str | None = None, k: int = 20,
                    filters: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                    one_per_patient: bool = True, user: str | None = None,
                    search_space: str | None = None) -> CohortResult:
    """Run a similar-case search (:func:`find_similar`) and store the ranked cohort as ``cohort_<name>``.

    By default the cohort has **one row per patient** (their closest lesion) and leaves out the reference
    patient, so an outcome analysis counts each patient once. Columns: those of :func:`find_similar`,
    the cluster of ``phenotype_clusters`` and the outcome (time_months, event, stage) of
    ``patient_outcomes`` (NULL where there is none), the explanation (:func:`explain_similar`) as JSON and
    in words (``why``), and the path of the lesion's picture. The reference is not a row: it is in the
    ``cohorts`` registry (with the query, the Lance version searched, the audit id) and in the result.
    Re-running a name replaces its table and registry row in one transaction. ``user`` is who asked (the
    audit row and the registry; default :func:`imaging_assets.store.audit.current_user`). ``search_space``:
    radiomics | deep | hybrid (:func:`find_similar`'s ``space``; default there).
    """
    from imaging_assets.stages.thumbnails import thumbnail_ids, thumbnail_uri
    from imaging_assets.store.lance import table_version

    t0 = time.perf_counter()
    table = cohort_table_name(name)
    vector, fs_version, space, q = None, None, None, None
    if reference_lesion_id is None:
        if not (image and mask):
            raise ValueError("a cohort needs reference_lesion_id, or image and mask of a new lesion")
        q = query_vector(wh, image, mask, segment=segment, embed=needs_embedding(search_space))
        vector, fs_version, space = q.vector, q.feature_set_version, q.space
    lance_version = table_version(wh.lance_uri)
    try:
        found = find_similar(reference_lesion_id, vector=vector, k=k, where=filters, warehouse=wh,
                             exclude_same_patient=exclude_same_patient, version=lance_version, action="cohort",
                             extra_params={"name": name, "image": image, "mask": mask, "segment": segment},
                             feature_space=space, space=search_space, one_per_patient=one_per_patient, user=user,
                             embedding=None if q is None else q.embedding)
    except KeyError as exc:  # a mistyped id in the launchpad: say what to do, not a raw KeyError
        raise ValueError(f"{exc.args[0]}: copy a lesion_id from the `lesions` asset's preview, or give image + "
                         "mask of a new lesion") from None
    explanations = explain_similar(wh, found, reference_lesion_id=reference_lesion_id, query=q,
                                   version=lance_version)
    df = found.to_pandas()
    df["explanation"] = [json.dumps(e.to_dict(), ensure_ascii=False) if e is not None else None for e in explanations]
    df["why"] = [e.summary() if e is not None else "found by its embedding (no radiomics vector)"
                 for e in explanations]
    have = thumbnail_ids(wh)
    df["thumbnail"] = [thumbnail_uri(wh, lid) if lid in have else None for lid in df["lesion_id"]]
    query = {"reference_lesion_id": reference_lesion_id, "image": image, "mask": mask, "segment": segment, "k": k,
             "filters": filters or {}, "exclude_same_patient": exclude_same_patient,
             "one_per_patient": one_per_patient, "search_space": search_space}
    if reference_lesion_id is not None:
        reference = reference_row(wh, reference_lesion_id)
    else:
        reference = {"lesion_id": None, "image": image, "mask": mask, "segment": segment, "space": space,
                     "patient_key": None, "thumbnail": None}
    space = space or reference.get("space") or (df["space"].iloc[0] if len(df) else None)
    fs = fs_version or (df["feature_set_version"].iloc[0] if len(df) else None)
    with wh.connect() as con:
        ensure_schema(con)
        con.register("_cohort", df)
        try:
            with transaction(con):
                # the name is validated by cohort_table_name: DDL cannot take it as a parameter
                con.execute(
                    f"CREATE OR REPLACE TABLE {table} AS SELECT c.* EXCLUDE (study_date, cluster, explanation, why, "
                    "thumbnail) REPLACE (CAST(c.rank AS INTEGER) AS rank), CAST(c.study_date AS DATE) AS study_date, "
                    "coalesce(pc.cluster, c.cluster) AS cluster, o.time_months, o.event, o.stage, "
                    "CAST(c.why AS VARCHAR) AS why, CAST(c.explanation AS VARCHAR) AS explanation, "
                    "CAST(c.thumbnail AS VARCHAR) AS thumbnail FROM _cohort c "
                    "LEFT JOIN phenotype_clusters pc USING (lesion_id) "
                    "LEFT JOIN patient_outcomes o ON o.patient_key = c.patient_key ORDER BY c.rank")
                con.execute("DELETE FROM cohorts WHERE name = ?", [name])
                con.execute(
                    "INSERT INTO cohorts (name, table_name, created_at, \"user\", query, lance_version, "
                    "feature_set_version, n_rows, audit_id, space, reference_lesion_id, reference_patient_key, "
                    "patients) VALUES (?, ?, (now() AT TIME ZONE 'UTC'), ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                    [name, table, user or audit.current_user(), json.dumps(query, sort_keys=True), lance_version, fs,
                     len(df), space, reference_lesion_id, reference.get("patient_key"),
                     int(df["patient_key"].nunique()) if len(df) else 0])
        finally:
            con.unregister("_cohort")
        last = con.execute("SELECT id FROM audit_log WHERE action = 'cohort' ORDER BY logged_at DESC LIMIT 1").fetchone()
        if last:
            con.execute("UPDATE cohorts SET audit_id = ? WHERE name = ?", [last[0], name])
    rows = found.to_dicts()
    for r, e, thumb in zip(rows, explanations, df["thumbnail"]):
        r["explanation"] = e.to_dict() if e is not None else None
        r["why"] = e.summary() if e is not None else "found by its embedding (no radiomics vector)"
        r["thumbnail"] = thumb
    return CohortResult(table=table, rows=len(df), lance_version=lance_version, query=query, preview=rows[:10],
                        elapsed_s=round(time.perf_counter() - t0, 3), reference=reference, results=rows,
                        audit_id=last[0] if last else None, space=space,
                        patients=int(df["patient_key"].nunique()) if len(df) else 0)


@dataclass(frozen=True)
class CohortOutcomeResult:
    """A cohort's outcomes against the rest of its feature space's patients (see :func:`analyse_cohort_outcomes`)."""

    name: str
    space: str | None
    cohort_patients: int
    rest_patients: int
    #: per group (``cohort`` / ``rest``): patients, events, median months and its 95% CI
    groups: list[dict[str, Any]]
    logrank: dict[str, Any]
    #: hazard ratio of the cohort against the rest (None below the minimum sizes)
    hazard_ratio: dict[str, Any] | None
    at_risk: dict[str, Any]
    png: Path | None
    notes: list[str]
    inadequate: list[str]

    @property
    def adequate(self) -> bool:
        """True when the comparison met the minimum sizes (:func:`~imaging_assets.analysis.survival.minimums`)."""
        return not self.inadequate


def analyse_cohort_outcomes(wh: Warehouse, name: str, png_path: Path | None = None) -> CohortOutcomeResult:
    """Kaplan-Meier of a cohort's patients against the rest of the archive, log-rank test and the cohort's
    hazard ratio, with a number-at-risk table, under the minimum sizes of
    :mod:`~imaging_assets.analysis.survival` (below them: curves and counts, no p-value, a note).

    "The rest" are the patients with an outcome and a lesion vector in the cohort's feature space who are
    neither in the cohort nor the reference patient. Each patient counts once.

    Raises
    ------
    ValueError
        The cohort does not exist (make it first).
    """
    from imaging_assets.analysis.survival import analyse_survival, at_risk_table

    table = cohort_table_name(name)
    with wh.connect(read_only=True) as con:
        has_registry = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'cohorts'").fetchone()[0]
        reg = con.execute("SELECT space, reference_patient_key FROM cohorts WHERE name = ?", [name]).fetchone() \
            if has_registry else None
        if reg is None:
            raise ValueError(f"cohort {name!r} does not exist: materialize the `cohort` asset's partition {name!r} first")
        space, ref_patient = reg
        members = con.execute(f"SELECT DISTINCT patient_key FROM {table}").fetchdf()["patient_key"].tolist()
        everyone = con.execute(
            "SELECT DISTINCT o.patient_key, o.time_months, o.event FROM patient_outcomes o "
            "JOIN lesions l ON l.patient_key = o.patient_key JOIN radiomics_provenance p USING (lesion_id) "
            "WHERE l.extractable AND (p.space = ? OR ? IS NULL)", [space, space]).fetchdf()
    everyone = everyone.drop_duplicates("patient_key")
    inside = set(members)
    data = everyone[everyone["patient_key"] != ref_patient].copy()
    data["cluster"] = data["patient_key"].isin(inside).astype(int)
    labels = {1: f"cohort {name}", 0: "rest of the archive"}
    result = analyse_survival(data, covariates=(), png_path=png_path, reference_cluster=0, labels=labels,
                              title=f"Cohort {name} vs the rest")
    groups = [{"group": "cohort" if r["cluster"] == 1 else "rest", **{k: v for k, v in r.items() if k != "cluster"}}
              for r in result.per_cluster]
    hr = next(({"hr": c["hr"], "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p_value": c["p_value"]}
               for c in result.cox if c["term"] == "cluster_1"), None)
    ticks = [0.0, 12.0, 24.0, 36.0, 48.0, 60.0]
    fits = [(c, None, data[data["cluster"] == c]) for c in (1, 0) if (data["cluster"] == c).any()]
    at_risk = {"months": ticks, **{("cohort" if c == 1 else "rest"): counts
                                   for c, counts in at_risk_table(fits, ticks).items()}}
    n_in = int(data["cluster"].sum())
    notes = list(result.notes) + ([result.cox_note] if result.cox_note else [])
    missing = len(inside - set(everyone["patient_key"]))
    if missing:
        notes.append(f"{missing} cohort patient(s) without an outcome left out")
    return CohortOutcomeResult(name=name, space=space, cohort_patients=n_in, rest_patients=int(len(data) - n_in),
                               groups=groups, logrank=result.logrank, hazard_ratio=hr, at_risk=at_risk,
                               png=result.km_png, notes=notes, inadequate=list(result.inadequate))
