"""Survival by phenotype cluster: Kaplan-Meier, log-rank and an adjusted Cox model (lifelines).

One row per patient
    Survival is a patient-level outcome, so every analysis counts a patient once. A patient with several
    lesions gets the cluster of their **largest lesion** (``volume_mm3``; ties: the smallest ``lesion_id``;
    a missing volume counts as smallest) — the same rule the demo generator uses to draw the outcome.
    ``rule="majority"`` (most frequent cluster among the patient's lesions, ties by the largest lesion) is
    offered for sensitivity analyses. See :func:`one_row_per_patient`.

Kaplan-Meier
    Per cluster with :class:`lifelines.KaplanMeierFitter`; the median and its 95% CI come from
    :func:`lifelines.utils.median_survival_times` on the survival curve and on ``confidence_interval_``
    (exponential Greenwood). A median (or CI bound) that is not reached is None.

Log-rank
    :func:`lifelines.statistics.multivariate_logrank_test` across the compared clusters (df = clusters - 1).

Cox model
    :class:`lifelines.CoxPHFitter` on one-hot cluster membership (terms ``cluster_<c>``, each versus the
    reference cluster: the largest cluster by patients, ties the smaller label, or ``reference_cluster``)
    plus the covariates. ``stage`` is encoded **ordinally** (I..IV -> 1..4; the term ``stage`` is the hazard
    ratio per stage step) so a small cohort spends one degree of freedom on it; other numeric covariates
    enter linearly; other text covariates (e.g. ``sex``) are one-hot with their most frequent level as the
    reference (terms ``<name>_<level>``). Covariates that are absent, all-null or constant are dropped with
    a note; patients with a missing value in a kept covariate are left out of the Cox model only
    (complete-case, noted). A small ridge ``penalizer`` (default 0.01, lifelines' scale: ``n * 0.01 *
    beta**2 / 2``) keeps the fit finite when a cluster has few or no events; it shrinks log hazard ratios
    towards 0 by roughly ``penalizer / (penalizer + information per patient)`` (a few percent for a
    balanced two-cluster cohort); pass ``penalizer=0`` for the plain partial-likelihood estimate.

Minimum sizes (honest statistics)
    Kaplan-Meier summaries are given for every cluster (descriptive, with patients and events). A
    *comparison* (log-rank, Cox) takes only the clusters with at least :data:`MIN_GROUP_PATIENTS` patients
    (the others are named in a note); the log-rank test needs at least :data:`MIN_LOGRANK_EVENTS` events in
    those clusters, and the Cox model at least :data:`MIN_EVENTS_PER_VARIABLE` events per estimated term
    (cluster terms plus covariate terms, counted on the complete cases). Where a minimum is not met there
    is no p-value / no Cox row, and a note gives the rule and the numbers. Each such reason is also in
    ``SurvivalResult.inadequate`` (``adequate`` is False), as is a Cox fit that lifelines reports as not
    converged, so a caller can flag the analysis instead of showing absurd hazard ratios.

Degenerate input (no patients, one cluster, no events, too few patients) never raises: the affected parts
are empty/None and ``notes`` / ``cox_note`` say why.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Patients a cluster needs to be compared (log-rank, Cox): below 5 a Kaplan-Meier curve drops by 20 % or
#: more at each event and a cluster's hazard ratio rests on one or two events, so one patient decides it.
MIN_GROUP_PATIENTS = 5
#: Events (in the compared clusters) a log-rank test needs: its chi-square compares observed with expected
#: events per cluster, and with fewer than 5 events that approximation has no footing (Cochran's rule of
#: 5 expected per cell) and the test no power: a p-value would only look like evidence.
MIN_LOGRANK_EVENTS = 5
#: Events per estimated Cox term: with fewer than 10 the coefficients are biased and their confidence
#: intervals unreliable (Peduzzi et al. 1996, J Clin Epidemiol 49:1373); 6 patients with 3 events gave a
#: hazard ratio of 526 (0.0124-22,354,930) before this rule.
MIN_EVENTS_PER_VARIABLE = 10


def minimums() -> str:
    """The minimum sizes in words (for check metadata)."""
    return (f">= {MIN_GROUP_PATIENTS} patients per compared cluster, >= {MIN_LOGRANK_EVENTS} events for the "
            f"log-rank test, >= {MIN_EVENTS_PER_VARIABLE} events per Cox term")
STAGE_ORDINAL = {"I": 1, "II": 2, "III": 3, "IV": 4}
RULES = ("largest", "majority")


def one_row_per_patient(lesions: pd.DataFrame, rule: str = "largest") -> pd.DataFrame:
    """Collapse lesion rows to one row per patient.

    Parameters
    ----------
    lesions
        Columns ``patient_key``, ``lesion_id``, ``volume_mm3``, ``cluster`` (extra columns are carried from
        the chosen lesion).
    rule
        ``"largest"``: the cluster of the patient's largest lesion (ties: smallest ``lesion_id``; NaN volume
        ranks below any volume). ``"majority"``: the most frequent cluster among the patient's lesions
        (ties: the cluster of the largest lesion among the tied clusters).

    Returns
    -------
    pandas.DataFrame
        One row per ``patient_key`` (sorted) with the chosen lesion's columns plus ``lesions`` (the
        patient's lesion count); ``lesion_id``/``volume_mm3`` are those of the lesion that decided.

    Raises
    ------
    ValueError
        For missing columns or an unknown rule.
    """
    need = {"patient_key", "lesion_id", "volume_mm3", "cluster"}
    missing = need - set(lesions.columns)
    if missing:
        raise ValueError(f"lesions lacks column(s): {', '.join(sorted(missing))}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (expected one of {RULES})")
    df = lesions[lesions["patient_key"].notna()].copy()
    if df.empty:
        return df.assign(lesions=pd.Series(dtype="int64")).reset_index(drop=True)
    df["_vol"] = pd.to_numeric(df["volume_mm3"], errors="coerce").fillna(-np.inf)
    df["_lid"] = df["lesion_id"].astype(str)
    counts = df.groupby("patient_key").size().rename("lesions")
    # largest first, then smallest lesion_id
    ordered = df.sort_values(["patient_key", "_vol", "_lid"], ascending=[True, False, True], kind="mergesort")
    if rule == "majority":
        n_in = ordered.groupby(["patient_key", "cluster"])["lesion_id"].transform("size")
        ordered = ordered.assign(_n=n_in).sort_values(
            ["patient_key", "_n", "_vol", "_lid"], ascending=[True, False, False, True], kind="mergesort")
        ordered = ordered.drop(columns="_n")
    first = ordered.groupby("patient_key", sort=True).head(1).drop(columns=["_vol", "_lid"])
    out = first.join(counts, on="patient_key")
    return out.sort_values("patient_key").reset_index(drop=True)


@dataclass
class SurvivalResult:
    """Outcome of :func:`analyse_survival` (see the module docstring for the methods)."""

    per_cluster: list[dict]
    logrank: dict
    cox: list[dict]
    cox_note: str | None
    n_patients: int
    km_png: Path | None
    notes: list[str] = field(default_factory=list)
    reference_cluster: int | None = None
    covariates_used: list[str] = field(default_factory=list)
    n_cox: int = 0
    penalizer: float = 0.0
    #: why the comparison is not to be trusted (a minimum not met, a fit not converged); [] when it is
    inadequate: list[str] = field(default_factory=list)
    #: the clusters the log-rank test and the Cox model compared (those with enough patients)
    compared_clusters: list[int] = field(default_factory=list)

    @property
    def adequate(self) -> bool:
        """True when the log-rank test and the Cox model were run on enough patients and events."""
        return not self.inadequate

    def as_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Table-ready rows: ``cluster_survival``, ``cluster_cox`` and ``cluster_logrank`` (one row)."""
        lr = {"statistic": self.logrank.get("statistic"), "p_value": self.logrank.get("p_value"),
              "df": self.logrank.get("df"), "n_patients": self.n_patients,
              "n_clusters": len(self.per_cluster),
              "note": "; ".join(self.notes + ([self.cox_note] if self.cox_note else [])) or None}
        cox = [{**r, "reference_cluster": self.reference_cluster, "n_patients": self.n_cox,
                "penalizer": self.penalizer} for r in self.cox]
        return {"cluster_survival": [dict(r) for r in self.per_cluster], "cluster_cox": cox,
                "cluster_logrank": [lr]}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _stage_ordinal(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    text = str(v).strip().upper().removeprefix("STAGE").strip()
    if text in STAGE_ORDINAL:
        return float(STAGE_ORDINAL[text])
    f = _num(text)
    return f if f is not None and f in (1.0, 2.0, 3.0, 4.0) else None


def _median_ci(kmf: Any) -> tuple[float | None, float | None, float | None]:
    from lifelines.utils import median_survival_times

    med = _num(kmf.median_survival_time_)
    ci = median_survival_times(kmf.confidence_interval_)
    lo, hi = (_num(ci.iloc[0, 0]), _num(ci.iloc[0, 1])) if ci.shape == (1, 2) else (None, None)
    return med, lo, hi


def _design(data: pd.DataFrame, covariates: Sequence[str], reference: int,
            notes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Cox design matrix (time_months, event, cluster dummies, covariates), complete cases only."""
    x = data[["time_months", "event"]].astype(float).copy()
    used: list[str] = []
    for cov in covariates:
        if cov not in data.columns:
            notes.append(f"covariate {cov!r} absent: dropped")
            continue
        col = data[cov]
        if cov == "stage":
            vals = col.map(_stage_ordinal).astype(float)
        elif pd.api.types.is_numeric_dtype(col) or col.dropna().map(lambda v: _num(v) is not None).all():
            vals = col.map(_num).astype(float)
        else:
            vals = None
        if vals is not None:
            if vals.notna().sum() == 0:
                notes.append(f"covariate {cov!r} is all null: dropped")
                continue
            if vals.dropna().nunique() < 2:
                notes.append(f"covariate {cov!r} is constant: dropped")
                continue
            x[cov] = vals
            used.append(cov)
            continue
        levels = col.dropna().astype(str)
        if levels.empty:
            notes.append(f"covariate {cov!r} is all null: dropped")
            continue
        counts = levels.value_counts()
        if len(counts) < 2:
            notes.append(f"covariate {cov!r} is constant: dropped")
            continue
        ref = sorted(counts.index[counts == counts.max()])[0]
        for level in sorted(counts.index):
            if level == ref:
                continue
            x[f"{cov}_{level}"] = np.where(col.isna(), np.nan, (col.astype(str) == level).astype(float))
        used.append(cov)
        notes.append(f"covariate {cov!r} one-hot, reference level {ref!r}")
    for c in sorted(data["cluster"].unique()):
        if c != reference:
            x[f"cluster_{c}"] = (data["cluster"] == c).astype(float)
    before = len(x)
    x = x.dropna()
    if len(x) < before:
        notes.append(f"{before - len(x)} patient(s) with missing covariates left out of the Cox model")
    constant = [c for c in x.columns if c not in ("time_months", "event") and x[c].nunique() < 2]
    if constant:
        notes.append(f"constant term(s) after complete-case selection dropped: {', '.join(constant)}")
        x = x.drop(columns=constant)
    return x, used


def at_risk_table(fits: Sequence[tuple[int, Any, pd.DataFrame]], times: Sequence[float]) -> dict[int, list[int]]:
    """Number at risk (time >= t) of each group at each time: group -> counts."""
    return {c: [int((grp["time_months"] >= t).sum()) for t in times] for c, _, grp in fits}


def _km_png(fits: list[tuple[int, Any, pd.DataFrame]], path: Path, title: str,
            labels: Mapping[int, str] | None = None) -> Path:
    """Kaplan-Meier curves (95% bands, censoring ticks) with a number-at-risk table under the axes."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(fits))
    fig = Figure(figsize=(8, 5.2 + 0.22 * rows), dpi=100)
    FigureCanvasAgg(fig)
    table_h = (0.3 + 0.22 * rows) / (5.2 + 0.22 * rows)
    ax = fig.add_axes((0.19, 0.1 + table_h + 0.06, 0.78, 0.8 - table_h - 0.06))
    palette = colormaps["tab10" if len(fits) <= 10 else "tab20"]

    def name(c: int) -> str:
        return labels.get(c, f"cluster {c}") if labels else f"cluster {c}"

    t_max = 0.0
    for c, kmf, grp in fits:
        colour = palette(c % palette.N)
        sf = kmf.survival_function_.iloc[:, 0]
        ci = kmf.confidence_interval_
        label = f"{name(c)} (n={len(grp)}, events={int(grp['event'].sum())})"
        ax.step(sf.index, sf.values, where="post", color=colour, label=label, lw=1.8)
        ax.fill_between(ci.index, ci.iloc[:, 0], ci.iloc[:, 1], step="post", color=colour, alpha=0.15, lw=0)
        cens = grp.loc[grp["event"] == 0, "time_months"].to_numpy()
        if len(cens):
            ax.plot(cens, kmf.survival_function_at_times(cens).to_numpy(), "|", color=colour, ms=7)
        t_max = max(t_max, float(grp["time_months"].max()) if len(grp) else 0.0)
    ax.set_ylabel("survival probability")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if fits:
        ax.legend(loc="best", fontsize=8, frameon=False)
        ticks = [float(t) for t in ax.get_xticks() if 0 <= t <= t_max * 1.0001] or [0.0]
        ax.set_xticks(ticks)
        ax.set_xlim(left=0, right=max(t_max, ticks[-1]) * 1.02 or 1)
        counts = at_risk_table(fits, ticks)
        tab = fig.add_axes((0.19, 0.04, 0.78, table_h), sharex=ax)
        tab.set_xlim(ax.get_xlim())
        tab.set_ylim(-0.5, len(fits) - 0.5)
        tab.axis("off")
        for i, (c, _, _) in enumerate(fits):
            y = len(fits) - 1 - i
            tab.text(-0.04, y, name(c), transform=tab.get_yaxis_transform(), ha="right", va="center", fontsize=8,
                     color=palette(c % palette.N))
            for t, n_risk in zip(ticks, counts[c]):
                tab.text(t, y, str(n_risk), ha="center", va="center", fontsize=8)
        tab.set_title("number at risk", fontsize=8, loc="left")
        ax.set_xlabel("time (months)")
    else:
        ax.text(0.5, 0.5, "no patients", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("time (months)")
    fig.savefig(path, format="png")
    return path


def analyse_survival(
    patients: pd.DataFrame,
    covariates: Sequence[str] = ("age", "stage"),
    png_path: Path | None = None,
    reference_cluster: int | None = None,
    penalizer: float = 0.01,
    labels: Mapping[int, str] | None = None,
    title: str | None = None,
) -> SurvivalResult:
    """Kaplan-Meier per cluster, log-rank across clusters and a Cox model of cluster membership.

    Parameters
    ----------
    patients
        One row per patient: ``patient_key``, ``cluster``, ``time_months``, ``event`` and the covariates;
        ``lesions`` (lesion count) is optional (default 1). Rows with a missing/negative time, an event not
        0/1, or a negative cluster (HDBSCAN noise) are left out with a note.
    covariates
        Adjustment covariates of the Cox model (encoding in the module docstring).
    png_path
        Where to write the Kaplan-Meier plot (all clusters in one PNG); None writes nothing.
    reference_cluster
        Reference level of the cluster terms (default: the largest cluster, ties the smaller label).
    penalizer
        Ridge penalizer of :class:`lifelines.CoxPHFitter`.
    labels, title
        Names of the groups in the plot (default ``cluster <c>``) and its title (the log-rank p is added).

    Returns
    -------
    SurvivalResult

    Raises
    ------
    ValueError
        When a required column is missing or a patient appears twice (use :func:`one_row_per_patient`).
    """
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    need = {"patient_key", "cluster", "time_months", "event"}
    missing = need - set(patients.columns)
    if missing:
        raise ValueError(f"patients lacks column(s): {', '.join(sorted(missing))}")
    dup = patients["patient_key"].duplicated(keep=False)
    if dup.any():
        raise ValueError(f"{int(patients.loc[dup, 'patient_key'].nunique())} patient(s) appear more than once; "
                         "collapse lesions with one_row_per_patient() first")
    notes: list[str] = []
    df = patients.copy()
    if "lesions" not in df.columns:
        df["lesions"] = 1
    df["time_months"] = pd.to_numeric(df["time_months"], errors="coerce")
    df["event"] = pd.to_numeric(df["event"], errors="coerce")
    df["cluster"] = pd.to_numeric(df["cluster"], errors="coerce")
    bad = df["time_months"].isna() | (df["time_months"] < 0) | ~df["event"].isin([0, 1]) | df["cluster"].isna()
    if bad.any():
        notes.append(f"{int(bad.sum())} patient(s) without a valid time, event or cluster left out")
        df = df[~bad]
    noise = df["cluster"] < 0
    if noise.any():
        notes.append(f"{int(noise.sum())} patient(s) in the noise cluster (-1) left out")
        df = df[~noise]
    df = df.assign(cluster=df["cluster"].astype(int), event=df["event"].astype(int),
                   lesions=pd.to_numeric(df["lesions"], errors="coerce").fillna(1).astype(int))
    n = len(df)
    clusters = sorted(df["cluster"].unique().tolist())

    per_cluster: list[dict] = []
    fits: list[tuple[int, Any, pd.DataFrame]] = []
    for c in clusters:
        grp = df[df["cluster"] == c]
        kmf = KaplanMeierFitter(label=f"cluster {c}")
        kmf.fit(grp["time_months"], grp["event"])
        med, lo, hi = _median_ci(kmf)
        per_cluster.append({"cluster": int(c), "patients": int(len(grp)), "lesions": int(grp["lesions"].sum()),
                            "events": int(grp["event"].sum()), "median_months": med, "median_ci_low": lo,
                            "median_ci_high": hi})
        fits.append((int(c), kmf, grp))

    sizes = {c: int((df["cluster"] == c).sum()) for c in clusters}
    compared = [c for c in clusters if sizes[c] >= MIN_GROUP_PATIENTS]
    small = [c for c in clusters if sizes[c] < MIN_GROUP_PATIENTS]
    inadequate: list[str] = []
    if small and len(clusters) >= 2:
        listed = ", ".join(f"{c} ({sizes[c]} patient{'s' if sizes[c] != 1 else ''})" for c in small)
        msg = (f"cluster(s) {listed} have fewer than {MIN_GROUP_PATIENTS} patients (MIN_GROUP_PATIENTS): "
               "left out of the log-rank test and the Cox model")
        notes.append(msg)
        inadequate.append(msg)
    cmp = df[df["cluster"].isin(compared)]
    cmp_events = int(cmp["event"].sum())

    logrank: dict[str, Any] = {"statistic": None, "p_value": None, "df": None}
    if n == 0:
        notes.append("no patients to analyse")
        inadequate.append("no patients with outcomes to analyse")
    elif len(clusters) < 2:
        notes.append("one cluster only: no log-rank test")
        inadequate.append("one cluster only: nothing to compare")
    elif len(compared) < 2:
        msg = (f"{len(compared)} cluster(s) with at least {MIN_GROUP_PATIENTS} patients: no log-rank test "
               "(it needs two)")
        notes.append(msg)
        inadequate.append(msg)
    elif cmp_events == 0:
        notes.append("no events: no log-rank test")
        inadequate.append("no events in the compared clusters")
    elif cmp_events < MIN_LOGRANK_EVENTS:
        msg = (f"{cmp_events} event(s) in the compared clusters: fewer than {MIN_LOGRANK_EVENTS} "
               "(MIN_LOGRANK_EVENTS), no log-rank test")
        notes.append(msg)
        inadequate.append(msg)
    else:
        res = multivariate_logrank_test(cmp["time_months"], cmp["cluster"], cmp["event"])
        logrank = {"statistic": _num(res.test_statistic), "p_value": _num(res.p_value),
                   "df": int(res.degrees_of_freedom)}

    if reference_cluster is not None and reference_cluster not in compared:
        notes.append(f"reference cluster {reference_cluster} is not among the compared clusters: using the largest")
        reference_cluster = None
    reference = reference_cluster if reference_cluster is not None else (
        min(compared, key=lambda c: (-sizes[c], c)) if compared else
        (min(clusters, key=lambda c: (-sizes[c], c)) if clusters else None))

    cox: list[dict] = []
    cox_note: str | None = None
    used: list[str] = []
    n_cox = 0
    if len(compared) < 2:
        cox_note = (f"{n} patient(s) in {len(clusters)} cluster(s), {len(compared)} with at least "
                    f"{MIN_GROUP_PATIENTS} patients (fewer than {MIN_GROUP_PATIENTS} in a compared cluster or "
                    "one cluster only): no Cox model of cluster membership")
    elif cmp_events == 0:
        cox_note = "no events: no Cox model"
    else:
        cox_notes: list[str] = []
        x, used = _design(cmp, covariates, int(reference), cox_notes)
        n_cox = len(x)
        terms = [c for c in x.columns if c not in ("time_months", "event")]
        events = int(x["event"].sum())
        if not any(t.startswith("cluster_") for t in terms) or events == 0:
            cox_notes.append(f"after complete-case selection {n_cox} patient(s), {events} event(s): no Cox model")
            inadequate.append(cox_notes[-1])
        elif events < MIN_EVENTS_PER_VARIABLE * len(terms):
            msg = (f"no Cox model: {events} event(s) for {len(terms)} term(s) ({', '.join(terms)}) = "
                   f"{events / len(terms):.1f} events per term, fewer than {MIN_EVENTS_PER_VARIABLE} "
                   f"(MIN_EVENTS_PER_VARIABLE; {MIN_EVENTS_PER_VARIABLE * len(terms)} events needed)")
            cox_notes.append(msg)
            inadequate.append(msg)
        else:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    cph = CoxPHFitter(penalizer=penalizer).fit(x, duration_col="time_months", event_col="event")
                for w in caught:
                    if "lifelines" in type(w.message).__module__ or "converge" in str(w.message).lower():
                        cox_notes.append(f"lifelines: {str(w.message).splitlines()[0][:200]}")
                        if "converge" in str(w.message).lower():
                            inadequate.append(cox_notes[-1])
                s = cph.summary
                for term in terms:
                    cox.append({"term": term, "hr": _num(s.loc[term, "exp(coef)"]),
                                "ci_low": _num(s.loc[term, "exp(coef) lower 95%"]),
                                "ci_high": _num(s.loc[term, "exp(coef) upper 95%"]),
                                "p_value": _num(s.loc[term, "p"]), "coef": _num(s.loc[term, "coef"]),
                                "se": _num(s.loc[term, "se(coef)"])})
            except Exception as exc:  # noqa: BLE001 - lifelines ConvergenceError, LinAlgError, ...
                cox_notes.append(f"Cox model failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                inadequate.append(cox_notes[-1])
                cox = []
        cox_note = "; ".join(cox_notes) or None

    km_png = None
    if png_path is not None:
        p = logrank.get("p_value")
        head = title or "Kaplan-Meier by phenotype cluster"
        km_png = _km_png(fits, Path(png_path), head + (f" (log-rank p={p:.3g})" if p is not None else ""), labels)
    if cox_note:
        logger.info("survival: %s", cox_note)
    for note in notes:
        logger.info("survival: %s", note)
    return SurvivalResult(per_cluster=per_cluster, logrank=logrank, cox=cox, cox_note=cox_note, n_patients=n,
                          km_png=km_png, notes=notes, reference_cluster=None if reference is None else int(reference),
                          covariates_used=used, n_cox=n_cox, penalizer=float(penalizer),
                          inadequate=list(dict.fromkeys(inadequate)), compared_clusters=[int(c) for c in compared])
