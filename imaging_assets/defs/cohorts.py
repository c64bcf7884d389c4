"""Cohorts as assets: one dynamic partition per cohort name, the similar-case cohort and its outcomes.

Make a cohort in the UI: asset `cohort` -> Materialize -> add a partition (the cohort's name) -> give the
reference in the launchpad (config `reference_lesion_id`, or `image` + `mask`). Re-materializing a
partition without a reference re-runs the query stored for that name (new lesions, new vectors).
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from imaging_assets.defs.metadata import picture, table_metadata
from imaging_assets.defs.outcomes import cluster_outcomes, phenotype_clusters
from imaging_assets.defs.resources import WarehouseResource
from imaging_assets.defs.thumbnails import lesion_thumbnails
from imaging_assets.defs.vectors import lesion_vectors

GROUP = "cohorts"
OWNERS = ["team:imaging"]

#: Neighbours shown beside the reference in the montage (all of them are in the table and `results`).
MONTAGE_RESULTS = 5

#: One partition per cohort name (its table is cohort_<name>).
cohort_partitions = dg.DynamicPartitionsDefinition(name="cohorts")

#: Run tag naming who asked for a cohort (the search page sets it to the signed-in user; the audit row and
#: the `cohorts` registry take it; without it, the run's OS user).
USER_TAG = "imaging_assets/user"

COHORT_COLUMNS = dg.TableSchema(columns=[
    dg.TableColumn("rank", "integer", description="1 = closest (one row per patient by default)"),
    dg.TableColumn("lesion_id", "string", description="the patient's closest lesion"),
    dg.TableColumn("distance", "float", description="L2 distance of the scaled robust features"),
    dg.TableColumn("patient_key", "string", description="pseudonymised patient"),
    dg.TableColumn("modality", "string"), dg.TableColumn("roi_name", "string"),
    dg.TableColumn("volume_mm3", "float"), dg.TableColumn("study_date", "date"),
    dg.TableColumn("cluster", "integer", description="phenotype cluster"),
    dg.TableColumn("time_months", "float", description="follow-up (patient_outcomes)"),
    dg.TableColumn("event", "integer", description="1 = event, 0 = censored"),
    dg.TableColumn("why", "string", description="the explanation in words"),
    dg.TableColumn("explanation", "json", description="feature-group shares of d^2, features that agree / differ"),
    dg.TableColumn("thumbnail", "string", description="path of the lesion's picture"),
])


class CohortConfig(dg.Config):
    """A similar-case query; the cohort's name is the partition. Leave the reference empty to re-run the
    query stored for this name."""

    reference_lesion_id: str | None = Field(
        default=None, description="lesion_id of the reference lesion (see `phenotype_clusters`' reference picker "
        "or `lesions`' preview).")
    image: str | None = Field(default=None, description="Or: a new image (DICOM folder, NIfTI, NRRD) ...")
    mask: str | None = Field(default=None, description="... and its mask (SEG, RTSTRUCT, NIfTI, NRRD).")
    segment: str | None = Field(default=None, description="Segment/ROI name in the mask when it has several.")
    k: int = Field(default=20, description="Number of similar patients (lesions with all_lesions).")
    modality: list[str] | None = Field(default=None, description="Filter: modalities, e.g. [CT].")
    roi_name: list[str] | None = Field(default=None, description="Filter: harmonised ROI names, e.g. [GTV].")
    body_part: list[str] | None = Field(default=None, description="Filter: body parts.")
    date_from: str | None = Field(default=None, description="Filter: study date from (YYYY-MM-DD).")
    date_to: str | None = Field(default=None, description="Filter: study date to (YYYY-MM-DD).")
    min_volume_mm3: float | None = Field(default=None, description="Filter: smallest lesion volume.")
    max_volume_mm3: float | None = Field(default=None, description="Filter: largest lesion volume.")
    cluster: list[int] | None = Field(default=None, description="Filter: phenotype clusters.")
    include_same_patient: bool = Field(
        default=False, description="Keep the reference patient's other lesions (re-scans rank first); by "
        "default they are left out, as in the CLI and the Python API.")
    all_lesions: bool = Field(
        default=False, description="Every similar lesion; by default one row per patient (their closest "
        "lesion), so outcome analyses count each patient once.")
    space: str | None = Field(
        default=None, description="Search space: radiomics (the robust features), deep (the learned embeddings) "
        "or hybrid (both, rank-fused); default radiomics, the best measured (README 'Deep embeddings').")

    def filters(self) -> dict:
        """The filter dict understood by `find_similar`."""
        f: dict = {}
        for col in ("modality", "roi_name", "body_part", "cluster"):
            if getattr(self, col):
                f[col] = list(getattr(self, col))
        if self.date_from or self.date_to:
            f["study_date"] = (self.date_from, self.date_to)
        if self.min_volume_mm3 is not None or self.max_volume_mm3 is not None:
            f["volume_mm3"] = (self.min_volume_mm3, self.max_volume_mm3)
        return f


def _fmt(v):
    return round(v, 3) if isinstance(v, float) else v


@dg.asset(partitions_def=cohort_partitions, deps=[lesion_vectors, phenotype_clusters, lesion_thumbnails],
          group_name=GROUP, kinds={"python", "duckdb", "lancedb"}, owners=OWNERS, pool="duckdb_writer",
          metadata={"dagster/column_schema": COHORT_COLUMNS})
def cohort(context: dg.AssetExecutionContext, config: CohortConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """A similar-case cohort (DuckDB table `cohort_<name>`, registered in `cohorts` with its query, the
    LanceDB table version searched and the audit id): the patients whose lesions look most like the
    reference, one row per patient (their closest lesion), the reference patient left out, each row with
    its distance, outcome, picture and the explanation of why it is close (feature-group shares of the
    squared distance, features that agree and differ most). The reference is shown apart, first in the
    montage.
    """
    from imaging_assets.stages.cohorts import discover_cohort, stored_cohort_query
    from imaging_assets.stages.thumbnails import montage_png

    wh = warehouse.get_warehouse()
    name = context.partition_key
    if config.space is not None and config.space not in ("radiomics", "deep", "hybrid"):
        raise dg.Failure(f"space must be radiomics, deep or hybrid; got {config.space!r}")
    if config.reference_lesion_id or config.image or config.mask:
        query = {"reference_lesion_id": config.reference_lesion_id, "image": config.image, "mask": config.mask,
                 "segment": config.segment, "k": config.k, "filters": config.filters(),
                 "exclude_same_patient": not config.include_same_patient, "one_per_patient": not config.all_lesions,
                 "search_space": config.space}
    else:
        query = stored_cohort_query(wh, name)
        if query is None:
            raise dg.Failure(f"cohort {name!r} has no stored query yet: give reference_lesion_id (or image + mask) "
                             "in the launchpad config")
        context.log.info(f"re-running the stored query of cohort {name}: {query}")
    filters = {k: tuple(v) if k in ("study_date", "volume_mm3") else v for k, v in (query.get("filters") or {}).items()}
    out = discover_cohort(wh, name, reference_lesion_id=query.get("reference_lesion_id"), image=query.get("image"),
                          mask=query.get("mask"), segment=query.get("segment"), k=int(query.get("k") or 20),
                          filters=filters, exclude_same_patient=query.get("exclude_same_patient", True),
                          one_per_patient=query.get("one_per_patient", True), user=context.run.tags.get(USER_TAG),
                          search_space=query.get("search_space"))
    context.log.info(f"cohort {out.table}: {out.rows} rows, {out.patients} patients (lesion_vectors v{out.lance_version})")
    ref = out.reference
    ref_caption = [f"REFERENCE  lesion {ref.get('lesion_id') or 'new lesion'}",
                   f"{ref.get('modality') or ''} {ref.get('roi_name') or ''}  {(ref.get('volume_mm3') or 0) / 1000:.1f} cm3"
                   f"  cluster {ref.get('cluster')}", ""]
    tiles = [{"lesion_id": ref.get("lesion_id") or "", "caption": ref_caption}] + [
        {"lesion_id": r["lesion_id"], "caption": [
            f"#{r['rank']}  d={r['distance']:.2f}  lesion {r['lesion_id']}  {(r['volume_mm3'] or 0) / 1000:.1f} cm3",
            _groups_line(r["explanation"]),
            "agree: " + ", ".join(c["name"] for c in r["explanation"]["agree"][:2])]}
        for r in out.results[:MONTAGE_RESULTS]]
    rows = [{"rank": r["rank"], "lesion_id": r["lesion_id"], "patient_key": r["patient_key"],
             "distance": _fmt(r["distance"]), "volume_mm3": _fmt(r["volume_mm3"]), "cluster": r["cluster"],
             "months": _fmt(r.get("time_months")), "event": r.get("event"),
             "mostly": _top_group(r["explanation"]),
             "closest_feature": (r["explanation"]["agree"] or [{}])[0].get("name"),
             "most_different": (r["explanation"]["differ"] or [{}])[0].get("name")} for r in out.results]
    return dg.MaterializeResult(metadata={
        "dagster/row_count": out.rows,
        "dagster/table_name": out.table,
        "dagster/column_schema": COHORT_COLUMNS,
        "reference_and_neighbours": picture(wh, f"cohort_{name}", montage_png(
            wh, tiles, columns=1, title=f"cohort {name}: the reference, then its closest patients"),
            "reference and neighbours"),
        "results": table_metadata(rows, list(rows[0]) if rows else ["rank"], 50),
        "explanations": dg.MetadataValue.json([{"rank": r["rank"], "lesion_id": r["lesion_id"], **r["explanation"]}
                                               for r in out.results]),
        "reference": dg.MetadataValue.json({k: (str(v) if v is not None else None) for k, v in ref.items()}),
        "patients": out.patients,
        "space": str(out.space),
        "query": dg.MetadataValue.json(out.query),
        "lesion_vectors_version": out.lance_version if out.lance_version is not None else -1,
        "audit_id": str(out.audit_id),
        "read_it": out.read_command,
        "elapsed_s": out.elapsed_s,
    })


def _groups_line(explanation: dict, top: int = 3) -> str:
    groups = sorted((explanation.get("groups") or {}).items(), key=lambda kv: -kv[1])
    return "d² from " + ", ".join(f"{g} {v:.0%}" for g, v in groups[:top] if v > 0) if groups else ""


def _top_group(explanation: dict) -> str:
    groups = explanation.get("groups") or {}
    if not groups or not any(groups.values()):
        return ""
    g = max(groups, key=groups.get)
    return f"{g} {groups[g]:.0%}"


@dg.asset(partitions_def=cohort_partitions, deps=[cohort, cluster_outcomes], group_name=GROUP,
          kinds={"python", "duckdb"}, owners=OWNERS, pool="duckdb_writer",
          check_specs=[dg.AssetCheckSpec(
              "cohort_comparison_adequate", asset="cohort_outcomes",
              description="The cohort-vs-rest comparison met the minimum sizes (>= 5 patients per group, >= 5 "
              "events for the log-rank test, >= 10 events for the hazard ratio); warns otherwise.")])
def cohort_outcomes(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """How the cohort's patients did against the rest of the archive (the other patients of the same
    feature space with outcomes, the reference patient left out): Kaplan-Meier curves with 95% bands and
    a number-at-risk table, median survival per group, the log-rank test and the cohort's hazard ratio.
    Below the minimum sizes the curves and counts are shown without p-value or hazard ratio, with a note.
    """
    from imaging_assets.analysis.survival import minimums
    from imaging_assets.stages.cohorts import analyse_cohort_outcomes

    name = context.partition_key
    wh = warehouse.get_warehouse()
    with tempfile.TemporaryDirectory() as tmp:
        r = analyse_cohort_outcomes(wh, name, png_path=Path(tmp) / "cohort_km.png")
        plot = picture(wh, f"cohort_outcomes_{name}", r.png, f"Kaplan-Meier, cohort {name} vs the rest")
    p = r.logrank.get("p_value")
    context.log.info(f"cohort {name}: {r.cohort_patients} vs {r.rest_patients} patients, log-rank p = {p}")
    at_risk = [{"group": g, **{f"{m:g} mo": n for m, n in zip(r.at_risk["months"], r.at_risk[g])}}
               for g in ("cohort", "rest") if g in r.at_risk]
    return dg.MaterializeResult(metadata={
        "kaplan_meier": plot,
        "groups": table_metadata([{k: _fmt(v) for k, v in g.items()} for g in r.groups], [
            "group", "patients", "events", "median_months", "median_ci_low", "median_ci_high"]),
        "number_at_risk": table_metadata(at_risk, list(at_risk[0]) if at_risk else ["group"]),
        "cohort_patients": r.cohort_patients, "rest_patients": r.rest_patients,
        "logrank_p": float(p) if p is not None else -1.0,
        "hazard_ratio": dg.MetadataValue.json(r.hazard_ratio),
        "notes": "; ".join(r.notes) or "none",
    }, check_results=[dg.AssetCheckResult(
        check_name="cohort_comparison_adequate", passed=r.adequate, severity=dg.AssetCheckSeverity.WARN,
        metadata={"observed_cohort_patients": r.cohort_patients, "rest_patients": r.rest_patients,
                  "threshold": minimums(), "reason": "; ".join(r.inadequate) or "enough patients and events"})])


cohort_discovery = dg.define_asset_job(
    "cohort_discovery", selection=dg.AssetSelection.assets(cohort, cohort_outcomes), partitions_def=cohort_partitions,
    description="Similar-case cohort and its outcomes: pick (or add) a partition named after the cohort, give a "
    "reference lesion id (see `phenotype_clusters`' reference picker) or a new image + mask in the config of "
    "`cohort`; the cohort goes to the DuckDB table cohort_<name>, the query to `cohorts` and `audit_log`.")


@dataclass(frozen=True)
class CohortRun:
    """A cohort materialized by :func:`materialize_cohort`: the Dagster run and, when it failed, why."""

    name: str
    run_id: str
    success: bool
    errors: list[str]


def materialize_cohort(wh: WarehouseResource, name: str, config: dict | None = None, user: str | None = None,
                       instance: dg.DagsterInstance | None = None) -> CohortRun:
    """Materialize the cohort's partition of `cohort` and `cohort_outcomes` in a Dagster instance (default:
    that of ``DAGSTER_HOME``), adding the partition first: the one way the CLI (`imaging-assets cohort`) and
    the search page's "save as cohort" make a cohort, so it is in the UI's catalog with its run.

    ``config`` is the cohort op's config (:class:`CohortConfig` fields; empty re-runs the stored query);
    ``user`` goes into the run's tags (:data:`USER_TAG`) and from there into the audit row.
    """
    from imaging_assets.definitions import defs

    instance = instance or dg.DagsterInstance.get()
    if not instance.has_dynamic_partition(cohort_partitions.name, name):
        instance.add_dynamic_partitions(cohort_partitions.name, [name])
    job = defs().resolve_job_def("cohort_discovery")
    result = job.execute_in_process(
        instance=instance, partition_key=name, raise_on_error=False, resources={"warehouse": wh},
        tags={USER_TAG: user} if user else None,
        run_config={"ops": {"cohort": {"config": config}}} if config else None)
    errors = [ev.step_failure_data.error.message.strip() for ev in result.all_events
              if ev.is_step_failure and ev.step_failure_data.error is not None]
    return CohortRun(name, result.run_id, bool(result.success), errors)
