"""The similar-case search path: the one way the job, the CLI, the Python API and the search page ask
"which lesions look like this one?", and why.

:func:`find_similar` answers for a lesion id of the warehouse or for a vector (a new image + mask goes
through :func:`query_vector`: extracted with the settings of the feature space it is compared with and
scaled with the stored scaler), with metadata filters; by default the query lesion's patient is left out
(its other lesions and re-scans would otherwise rank first); every search is audited once, also when it
fails. :func:`explain_similar` says why each result is close (:mod:`imaging_assets.features.explain`).
Cohorts built on it are in :mod:`imaging_assets.stages.cohorts`. No Dagster here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imaging_assets.store import audit
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse

#: Columns of a :func:`find_similar` answer, in order (``distance``: L2 on the scaled robust features).
RESULT_COLUMNS = ("rank", "lesion_id", "distance", "patient_key", "series_instance_uid", "segment_number",
                  "raw_label", "roi_name", "modality", "body_part", "volume_mm3", "study_date", "cluster",
                  "feature_set_version", "space")
#: polars types of the :func:`find_similar` columns (names of ``polars`` dtypes, so this module does not
#: import polars: the CLI's search path, :func:`similar_rows`, never needs it).
RESULT_SCHEMA: dict[str, str] = {
    "rank": "Int64", "lesion_id": "String", "distance": "Float64", "patient_key": "String",
    "series_instance_uid": "String", "segment_number": "Int32", "raw_label": "String", "roi_name": "String",
    "modality": "String", "body_part": "String", "volume_mm3": "Float64", "study_date": "Date", "cluster": "Int32",
    "feature_set_version": "String", "space": "String",
}


def _warehouse(warehouse: Warehouse | str | Path | None) -> Warehouse:
    if isinstance(warehouse, Warehouse):
        return warehouse
    return Warehouse.from_settings(root=warehouse)


@dataclass(frozen=True)
class QueryVector:
    """A new lesion as a query: its vector (padded to the table's dimension) and the space it belongs to."""

    vector: np.ndarray
    feature_set_version: str
    space: str
    params_hash: str
    params_source: str
    #: the lesion's raw feature values (pyradiomics names), shown in explanations
    values: dict[str, float] = field(default_factory=dict)


def feature_spaces(wh: Warehouse) -> list[dict[str, Any]]:
    """The warehouse's feature spaces with an active robust set: space, modality, params hash, source, the
    robust-set version and size, lesions with vectors' worth of features."""
    from imaging_assets.stages.reproducibility import current_robust_sets

    with wh.connect(read_only=True) as con:
        sets = current_robust_sets(con)
        rows = con.execute("SELECT s.space, s.modality, s.params_hash, s.source, s.params_json, "
                           "(SELECT count(*) FROM radiomics_provenance p WHERE p.space = s.space) AS lesions "
                           "FROM feature_spaces s ORDER BY 1").fetchdf().to_dict("records")
    return [{**r, "feature_set_version": sets[r["space"]][0], "robust_features": len(sets[r["space"]][1])}
            for r in rows if r["space"] in sets]


def query_vector(wh: Warehouse, image: str | Path, mask: str | Path, label: int | None = None,
                 segment: str | None = None, params: str | Path | None = None, space: str | None = None,
                 modality: str | None = None, resample_mask: bool = False) -> QueryVector:
    """Vector of a new lesion (image + mask), extracted with **the settings of the feature space it is
    compared with** (read from ``feature_spaces``), then the space's robust set and stored scaler.

    The space is ``space`` when given; else the one made by ``params`` (a pyradiomics file) for the image's
    modality; else the warehouse's only space of that modality (a DICOM image names its modality; a NIfTI /
    NRRD image takes ``modality``, or the warehouse's only space).

    Raises
    ------
    ValueError
        No or several matching spaces (the message lists the warehouse's spaces), or the extraction failed.
    """
    import json

    from imaging_assets.features.params import extraction_settings, modality_code
    from imaging_assets.features.pipeline import extract_one, resolve_inputs
    from imaging_assets.stages.vectors import load_scaler
    from imaging_assets.store.lance import lance_dataset

    spaces = {r["space"]: r for r in feature_spaces(wh)}
    listing = ", ".join(f"{k} ({v['modality']}, {Path(str(v['source'])).name})" for k, v in sorted(spaces.items()))
    if not spaces:
        raise RuntimeError("no feature space with a robust set yet: materialize lesion_vectors first")
    if space is None:
        series, _ = resolve_inputs(image, mask, modality)
        is_volume = str(image).lower().endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"))
        image_modality = modality or (None if is_volume else series.get("modality"))
        if params is not None:
            chosen = extraction_settings(image_modality or next(iter(spaces.values()))["modality"], params)
            space = chosen.space
            if space not in spaces:
                raise ValueError(f"{params}: the warehouse has no lesions extracted with these settings "
                                 f"(space {space}); its spaces: {listing}")
        else:
            matches = [k for k, v in spaces.items()
                       if image_modality is None or v["modality"] == modality_code(image_modality)]
            if len(matches) != 1:
                what = f"modality {image_modality}" if image_modality else "this image"
                raise ValueError(f"{len(matches)} feature spaces match {what}; name one with --space "
                                 f"(or --params): {listing}")
            space = matches[0]
    if space not in spaces:
        raise ValueError(f"unknown feature space {space!r}; the warehouse's spaces: {listing}")
    info = spaces[space]
    stored = json.loads(info["params_json"])
    outcome = extract_one(image, mask, label=label, segment=segment, params=stored, modality=info["modality"],
                          resample_mask=resample_mask)
    if not outcome.ok:
        raise ValueError(f"{mask}: extraction failed: {outcome.error}")
    with wh.connect(read_only=True) as con:
        scaler = load_scaler(con, info["feature_set_version"])
    if scaler is None:
        raise RuntimeError(f"no vector scaler stored for space {space}: materialize lesion_vectors first")
    values = np.array([[outcome.features.get(n, np.nan) for n in scaler.feature_names]], dtype=float)
    vec = scaler.transform(values)[0].astype(np.float32)
    dim = lance_dataset(wh.lance_uri).schema.field("vector").type.list_size
    padded = np.zeros(dim, np.float32)
    padded[: len(vec)] = vec
    return QueryVector(padded, str(info["feature_set_version"]), space, str(info["params_hash"]), str(info["source"]),
                       values={n: float(outcome.features[n]) for n in scaler.feature_names if n in outcome.features})


def find_similar(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: Warehouse | str | Path | None = None, version: int | None = None,
                 action: str = "search", extra_params: dict[str, Any] | None = None, space: str | None = None,
                 one_per_patient: bool = False, user: str | None = None, warm: Any = None):
    """The lesions most similar to a lesion (or a vector), as a polars DataFrame ranked by distance.

    Parameters
    ----------
    lesion_id, vector
        The query: a lesion of the warehouse, or a standardised vector (see :func:`query_vector`).
    k
        Number of rows returned.
    where
        Structured filters ``{column: value | [values] | (low, high)}`` on modality, body_part, roi_name,
        patient_key, cluster, study_date, volume_mm3; values are quoted by the vector store, never
        spliced into a filter string.
    exclude_same_patient
        Leave out the query lesion's patient (its other lesions and retest scans). With False, the query
        lesion itself comes first (distance 0).
    warehouse
        A :class:`~imaging_assets.store.warehouse.Warehouse`, a warehouse folder, or None for the
        configured one (``IMAGING_ASSETS_WAREHOUSE`` and ``IMAGING_ASSETS_LANCE_URI``).
    version
        Search an older version of the Lance table (the audit log names the version of every answer).
    one_per_patient
        Return the closest lesion of each patient only (a cohort counts each patient once).
    user
        Who asks (the audit row's ``user``; default :func:`imaging_assets.store.audit.current_user`).
    warm
        What a server keeps in memory (:class:`~imaging_assets.stages.serving.WarmSearch`): the search
        then opens no file (the vectors, tables and audit journal are in memory; same rows). Ignored with
        ``version``.
    space
        The feature space searched. A lesion id searches its own space (always: a CT lesion is never
        compared with an MR lesion's vector); a vector needs it unless the table holds one space only.
    action, extra_params
        What the audit row calls this search (``search`` | ``cohort``) and extra parameters it records.

    Returns
    -------
    polars.DataFrame
        :data:`RESULT_COLUMNS`. The query is audited once (with ``status`` ``error: ...`` when it fails).
        The rows are those of :func:`similar_rows` (the same search), typed by :data:`RESULT_SCHEMA`.

    Raises
    ------
    KeyError
        ``lesion_id`` is not in the vector table.
    """
    import polars as pl

    rows = similar_rows(lesion_id=lesion_id, vector=vector, k=k, where=where,
                        exclude_same_patient=exclude_same_patient, warehouse=warehouse, version=version,
                        action=action, extra_params=extra_params, space=space, one_per_patient=one_per_patient,
                        user=user, warm=warm)
    return pl.DataFrame({c: [r[c] for r in rows] for c in RESULT_COLUMNS},
                        schema_overrides={c: getattr(pl, t) for c, t in RESULT_SCHEMA.items()})


def similar_rows(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: Warehouse | str | Path | None = None, version: int | None = None,
                 action: str = "search", extra_params: dict[str, Any] | None = None, space: str | None = None,
                 one_per_patient: bool = False, user: str | None = None, warm: Any = None) -> list[dict[str, Any]]:
    """:func:`find_similar` as a list of row dicts (keys :data:`RESULT_COLUMNS`, in order), without polars.

    The one search path: :func:`find_similar` wraps these rows into its DataFrame; the CLI prints them
    directly (a command then imports neither polars nor lancedb). Values are plain Python: ``rank`` int,
    ``distance`` float, ``study_date`` :class:`datetime.date`, None where a value is missing. Same
    parameters, audit row and errors as :func:`find_similar`.
    """

    wh = _warehouse(warehouse)
    if (lesion_id is None) == (vector is None):
        raise ValueError("give either a lesion_id or a vector")
    params: dict[str, Any] = {"lesion_id": lesion_id, "k": k, "filters": where or {}, "version": version,
                              "exclude_same_patient": exclude_same_patient, "space": space,
                              **({"one_per_patient": True} if one_per_patient else {}), **(extra_params or {})}
    query: str | np.ndarray = lesion_id if lesion_id is not None else np.asarray(vector, np.float32)
    if vector is not None:
        vec = np.asarray(vector, np.float32)
        params["vector_sha1"] = hashlib.sha1(vec.tobytes()).hexdigest()
        params["vector"] = [round(float(x), 6) for x in vec]
    if warm is not None and version is None and warm.index is not None:
        # a server: vectors, tables and audit journal in memory (stages.serving), no file opened
        return _search(_WarmSources(warm), query, lesion_id, k, where, exclude_same_patient, space, one_per_patient,
                       params, action, user)
    # One connection per search: opening a DuckDB file costs ~10 ms, the Lance search itself ~3 ms; the
    # write lock is held for the search's few milliseconds only (robust-set version, audit row, metadata).
    with wh.connect() as con:
        ensure_schema(con)
        return _search(_StoreSources(wh, con, version), query, lesion_id, k, where, exclude_same_patient,
                       space, one_per_patient, params, action, user)


class _StoreSources:
    """What a search reads and writes, from the files (one DuckDB connection, the Lance table)."""

    def __init__(self, wh: Warehouse, con: Any, version: int | None) -> None:
        from imaging_assets.store import lance

        self.wh, self.con, self.lance = wh, con, lance
        # pin the table version first: the audit names exactly the version that was searched
        self.version = version if version is not None else lance.table_version(wh.lance_uri)
        self._ds: Any = None

    @property
    def ds(self) -> Any:
        if self._ds is None:
            self._ds = self.lance.lance_dataset(self.wh.lance_uri, version=self.version)
        return self._ds

    def lesion(self, lesion_id: str) -> dict[str, Any] | None:
        row = self.ds.to_table(columns=["patient_key", "space"],
                               filter=f"lesion_id = {self.lance.sql_string(lesion_id)}").to_pylist()
        return row[0] if row else None

    def spaces(self) -> list[str]:
        return sorted({s for s in self.ds.to_table(columns=["space"]).column("space").to_pylist() if s})

    def robust_version(self, space: str) -> str | None:
        from imaging_assets.stages.reproducibility import current_robust_set

        return current_robust_set(self.con, space)[0]

    def nearest(self, query: Any, k: int, filters: dict[str, Any] | None, exclude_self: bool,
                patient: str | None) -> list[dict[str, Any]]:
        extra = self.ds.count_rows(filter=f"patient_key = {self.lance.sql_string(patient)}") if patient else 0
        rows = self.lance.nearest(self.wh.lance_uri, query, k=k + extra, filters=filters, version=self.version,
                                  exclude_self=exclude_self)
        return [r for r in rows if patient is None or r.get("patient_key") != patient]

    def record(self, action: str, params: dict[str, Any], versions: dict[str, Any], n_rows: int, status: str,
               user: str | None) -> None:
        audit.record_on(self.con, action, "find_similar", params, versions, n_rows, status=status, user=user)

    def meta(self, ids: list[str]) -> dict[str, tuple[Any, Any]]:
        return {r[0]: r[1:] for r in self.con.execute(
            "SELECT lesion_id, segment_number, raw_label FROM lesions WHERE list_contains(?, lesion_id)",
            [ids]).fetchall()}


class _WarmSources:
    """The same reads and writes from a server's memory (:class:`~imaging_assets.stages.serving.WarmSearch`)."""

    def __init__(self, warm: Any) -> None:
        self.warm, self.index, self.tables = warm, warm.index, warm.tables
        self.version = self.index.version

    def lesion(self, lesion_id: str) -> dict[str, Any] | None:
        return self.index.row(lesion_id)

    def spaces(self) -> list[str]:
        return [str(s) for s in self.index.distinct("space") if s]

    def robust_version(self, space: str) -> str | None:
        return self.tables.robust.get(space, (None, []))[0]

    def nearest(self, query: Any, k: int, filters: dict[str, Any] | None, exclude_self: bool,
                patient: str | None) -> list[dict[str, Any]]:
        return self.index.search(query, k=k, filters=filters, exclude_self=exclude_self, exclude_patient=patient)

    def record(self, action: str, params: dict[str, Any], versions: dict[str, Any], n_rows: int, status: str,
               user: str | None) -> None:
        self.warm.journal.record(action, "find_similar", params, versions, n_rows, status=status, user=user)

    def meta(self, ids: list[str]) -> dict[str, tuple[Any, Any]]:
        lesions = self.tables.lesions
        return {i: (lesions[i]["segment_number"], lesions[i]["raw_label"]) for i in ids if i in lesions}


def _search(src: Any, query: Any, lesion_id: str | None, k: int, where: dict[str, Any] | None,
            exclude_same_patient: bool, space: str | None, one_per_patient: bool, params: dict[str, Any],
            action: str, user: str | None) -> list[dict[str, Any]]:
    """The search itself, on either source; audited once (also when it fails)."""
    versions: dict[str, Any] = {"lesion_vectors": src.version}
    try:
        patient = None
        if lesion_id is not None:
            row = src.lesion(lesion_id)
            if row is None:
                raise KeyError(f"lesion {lesion_id!r} is not in the vector table (version {src.version})")
            if space is not None and row["space"] != space:
                raise ValueError(f"lesion {lesion_id!r} is in feature space {row['space']}, not {space}")
            space = row["space"]
            patient = row["patient_key"] if exclude_same_patient else None
        elif space is None:
            stored = src.spaces()
            if len(stored) > 1:
                raise ValueError(f"the vector table holds {len(stored)} feature spaces ({', '.join(stored)}): "
                                 "a query vector needs its space")
            space = stored[0] if stored else None
        versions["robust_feature_set"] = src.robust_version(space) if space else None
        params["space"] = space
        filters = {**(where or {}), **({"space": [space]} if space is not None else {})}
        fetch = k
        while True:
            rows = src.nearest(query, fetch, filters or None, exclude_same_patient, patient)
            got = len(rows)
            if one_per_patient:  # the closest lesion of each patient, in rank order
                seen: set[Any] = set()
                rows = [r for r in rows if r.get("patient_key") not in seen and not seen.add(r.get("patient_key"))]
            if len(rows) >= k or got < fetch:  # enough, or the table (under the filters) is exhausted
                break
            fetch *= 4
    except Exception as exc:
        src.record(action, params, versions, 0, f"error: {exc}", user)
        raise
    rows = rows[:k]
    src.record(action, params, versions, len(rows), "ok", user)
    meta = src.meta([r["lesion_id"] for r in rows])
    return [{"rank": rank, "lesion_id": r["lesion_id"], "distance": float(r["_distance"]),
             "patient_key": r.get("patient_key"), "series_instance_uid": r.get("series_instance_uid"),
             "segment_number": meta.get(r["lesion_id"], (None, None))[0],
             "raw_label": meta.get(r["lesion_id"], (None, None))[1],
             **{c: r.get(c) for c in ("roi_name", "modality", "body_part", "volume_mm3", "study_date", "cluster",
                                      "feature_set_version", "space")}}
            for rank, r in enumerate(rows, start=1)]


def explain_similar(wh: Warehouse, results: Any, reference_lesion_id: str | None = None,
                    query: QueryVector | None = None, n: int = 5, version: int | None = None,
                    warm: Any = None) -> list[Any]:
    """Why each result of :func:`find_similar` is close to its reference: one
    :class:`~imaging_assets.features.explain.Explanation` per result row, in order (the one explanation of
    the CLI, the Python API, the cohort asset and the search page).

    Parameters
    ----------
    results
        The rows of :func:`find_similar` (a polars/pandas DataFrame or a list of dicts with ``lesion_id``
        and ``feature_set_version``).
    reference_lesion_id, query
        The reference: a lesion of the warehouse, or the :class:`QueryVector` of a new lesion.
    version
        The Lance table version the results came from (default: the latest).
    warm
        A server's :class:`~imaging_assets.stages.serving.WarmSearch` (vectors, scalers, quantiles and raw
        values from memory; ignored with ``version``).

    Raises
    ------
    ValueError
        Neither or both references given; KeyError when the reference lesion has no vector.
    """
    from imaging_assets.features.explain import explain
    from imaging_assets.stages.serving import raw_feature_values
    from imaging_assets.stages.vectors import load_quantiles, load_scaler
    from imaging_assets.store.lance import vectors_of

    if (reference_lesion_id is None) == (query is None):
        raise ValueError("explain_similar needs either reference_lesion_id or query")
    rows = _result_rows(results)
    if not rows:
        return []
    ids = [str(r["lesion_id"]) for r in rows]
    wanted = ids + ([reference_lesion_id] if reference_lesion_id else [])
    fs_versions = sorted({str(r["feature_set_version"]) for r in rows if r.get("feature_set_version")})
    if (warm is not None and version is None and warm.index is not None
            and all(v in warm.tables.scalers for v in fs_versions)):
        tables = warm.tables
        vectors = warm.index.vectors_of(wanted)
        scalers = {v: tables.scalers.get(v) for v in fs_versions}
        quantiles = {v: tables.quantiles.get(v) for v in fs_versions}
        names = sorted({f for sc in scalers.values() if sc is not None for f in sc.feature_names})
        raw = tables.raw_values(wh, wanted, names)
    else:
        vectors = vectors_of(wh.lance_uri, wanted, version=version)
        with wh.connect(read_only=True) as con:
            scalers = {v: load_scaler(con, version=v) for v in fs_versions}
            quantiles = {v: load_quantiles(con, v) for v in fs_versions}
            names = sorted({f for sc in scalers.values() if sc is not None for f in sc.feature_names})
            raw = raw_feature_values(con, wanted, names)
    if reference_lesion_id is not None and reference_lesion_id not in vectors:
        raise KeyError(f"lesion {reference_lesion_id!r} is not in the vector table at {wh.lance_uri}")
    ref_vec = vectors[reference_lesion_id] if reference_lesion_id is not None else query.vector
    ref_values = raw.get(reference_lesion_id, {}) if reference_lesion_id is not None else query.values
    out = []
    for r in rows:
        lid = str(r["lesion_id"])
        scaler = scalers.get(str(r.get("feature_set_version")))
        if scaler is None or lid not in vectors:
            raise RuntimeError(f"no scaler or vector for lesion {lid} (feature set {r.get('feature_set_version')}): "
                               "materialize lesion_vectors")
        out.append(explain(ref_vec, vectors[lid], scaler.feature_names, reference_values=ref_values,
                           neighbour_values=raw.get(lid, {}), quantiles=quantiles.get(str(r["feature_set_version"])),
                           n=n))
    return out


def _result_rows(results: Any) -> list[dict[str, Any]]:
    if results is None:
        return []
    if hasattr(results, "to_dicts"):  # polars
        return results.to_dicts()
    if hasattr(results, "to_dict"):  # pandas
        return results.to_dict("records")
    return [dict(r) for r in results]
