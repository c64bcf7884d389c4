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

from imaging_assets.stages.search_sources import StoreSources, WarmSources
from imaging_assets.store.schema import ensure_schema
from imaging_assets.store.warehouse import Warehouse

#: The search spaces: the scaled robust radiomics features (``lesion_vectors``), the learned embeddings
#: (``lesion_embeddings``), or both fused by reciprocal rank (:func:`fuse_ranks`).
SEARCH_SPACES = ("radiomics", "deep", "hybrid")
#: The space searched when none is named: the best measured (benchmarks/embeddings.py: precision@10 of the
#: planted phenotype among other patients' lesions on two generated cohorts). Radiomics: the learned embedding
#: alone is worse (0.75 vs 0.91 on the demo) and fused it does not beat radiomics yet (README "Deep embeddings").
DEFAULT_SPACE = "radiomics"
#: Weighted reciprocal-rank fusion: score = sum over the spaces of weight / (RRF_K + rank). Equal weights
#: (plain RRF) lost 0.03 precision@10 on the demo against radiomics alone; 0.75 / 0.25 ties it (measured on
#: seed 0 only; benchmarks/embeddings.py reports another seed, never tuned on).
RRF_K = 60
HYBRID_WEIGHTS = {"radiomics": 0.75, "deep": 0.25}
#: Hybrid candidates: this many times ``k`` (at least :data:`HYBRID_MIN_CANDIDATES`) from each space, then
#: both distances of every candidate computed exactly and ranked.
HYBRID_CANDIDATES = 4
HYBRID_MIN_CANDIDATES = 50

#: Columns of a :func:`find_similar` answer, in order. ``distance``: L2 on the scaled robust features (the
#: explanations' distance; None for a lesion without radiomics vector); ``deep_distance``: L2 between the
#: L2-normalised embeddings (None in a radiomics search); ``score``: the hybrid fusion score (higher is closer;
#: None otherwise); ``search_space``: radiomics | deep | hybrid; ``rank`` orders by the space searched.
RESULT_COLUMNS = ("rank", "lesion_id", "distance", "patient_key", "series_instance_uid", "segment_number",
                  "raw_label", "roi_name", "modality", "body_part", "volume_mm3", "study_date", "cluster",
                  "feature_set_version", "space", "search_space", "deep_distance", "score")
#: polars types of the :func:`find_similar` columns (names of ``polars`` dtypes, so this module does not
#: import polars: the CLI's search path, :func:`similar_rows`, never needs it).
RESULT_SCHEMA: dict[str, str] = {
    "rank": "Int64", "lesion_id": "String", "distance": "Float64", "patient_key": "String",
    "series_instance_uid": "String", "segment_number": "Int32", "raw_label": "String", "roi_name": "String",
    "modality": "String", "body_part": "String", "volume_mm3": "Float64", "study_date": "Date", "cluster": "Int32",
    "feature_set_version": "String", "space": "String", "search_space": "String", "deep_distance": "Float64",
    "score": "Float64",
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
    #: its embedding by the active model (None without a model), and that model's version
    embedding: np.ndarray | None = None
    model_version: str | None = None


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
                 modality: str | None = None, resample_mask: bool = False, embed: bool = True) -> QueryVector:
    """Vector of a new lesion (image + mask), extracted with **the settings of the feature space it is
    compared with** (read from ``feature_spaces``), then the space's robust set and stored scaler.

    The space is ``space`` when given; else the one made by ``params`` (a pyradiomics file) for the image's
    modality; else the warehouse's only space of that modality (a DICOM image names its modality; a NIfTI /
    NRRD image takes ``modality``, or the warehouse's only space). With ``embed`` (and an embedding model in
    the warehouse) the lesion is also embedded (:attr:`QueryVector.embedding`), for deep and hybrid searches.

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
    embedding, model_version = (_new_lesion_embedding(wh, image, mask, label, segment, info["modality"], resample_mask)
                                if embed else (None, None))
    return QueryVector(padded, str(info["feature_set_version"]), space, str(info["params_hash"]), str(info["source"]),
                       values={n: float(outcome.features[n]) for n in scaler.feature_names if n in outcome.features},
                       embedding=embedding, model_version=model_version)


def _new_lesion_embedding(wh: Warehouse, image: Any, mask: Any, label: int | None, segment: str | None,
                          modality: str | None, resample_mask: bool) -> tuple[np.ndarray | None, str | None]:
    """The embedding of a new lesion by the active model; (None, None) while the warehouse has no model."""
    from imaging_assets.features.pipeline import lesion_loader
    from imaging_assets.stages.embeddings import query_embedding

    with wh.connect(read_only=True) as con:
        has_model = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'embedding_models'"
                                ).fetchone()[0] and con.execute(
            "SELECT count(*) FROM embedding_models WHERE active").fetchone()[0]
    if not has_model:
        return None, None
    _, series, loader = lesion_loader(image, mask, label, segment, modality, resample_mask)
    img, msk, _ = loader()
    return query_embedding(wh, img, msk, series.get("modality") or modality)


def find_similar(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: Warehouse | str | Path | None = None, version: int | None = None,
                 action: str = "search", extra_params: dict[str, Any] | None = None, space: str | None = None,
                 one_per_patient: bool = False, user: str | None = None, warm: Any = None,
                 feature_space: str | None = None, embedding: np.ndarray | None = None):
    """The lesions most similar to a lesion (or a vector), as a polars DataFrame ranked in the space searched.

    Parameters
    ----------
    lesion_id, vector
        The query: a lesion of the warehouse, or a standardised radiomics vector (see :func:`query_vector`).
    embedding
        With ``vector``: the new lesion's embedding (:attr:`QueryVector.embedding`), for deep / hybrid searches.
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
        Search an older version of the radiomics table (the audit log names the version of every answer).
    space
        The search space, one of :data:`SEARCH_SPACES`: ``radiomics`` (the scaled robust features), ``deep``
        (the learned embeddings) or ``hybrid`` (both, fused by weighted reciprocal rank: :func:`fuse_ranks`
        with :data:`HYBRID_WEIGHTS`). Default :data:`DEFAULT_SPACE` (radiomics where the query has no
        embedding). For compatibility, any other value names a ``feature_space``.
    feature_space
        The feature space searched (e.g. ``CT-1a2b3c4d``). A lesion id searches its own (always: a CT lesion is
        never compared with an MR lesion's vector); a vector needs it unless the table holds one space only.
    one_per_patient
        Return the closest lesion of each patient only (a cohort counts each patient once).
    user
        Who asks (the audit row's ``user``; default :func:`imaging_assets.store.audit.current_user`).
    warm
        What a server keeps in memory (:class:`~imaging_assets.stages.serving.WarmSearch`): the search
        then opens no file (the vectors, tables and audit journal are in memory; same rows). Ignored with
        ``version``.
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
        ``lesion_id`` is not in the table searched.
    ValueError
        An unknown space; a deep / hybrid search without embeddings (the message says what to materialize).
    """
    import polars as pl

    rows = similar_rows(lesion_id=lesion_id, vector=vector, k=k, where=where,
                        exclude_same_patient=exclude_same_patient, warehouse=warehouse, version=version,
                        action=action, extra_params=extra_params, space=space, one_per_patient=one_per_patient,
                        user=user, warm=warm, feature_space=feature_space, embedding=embedding)
    return pl.DataFrame({c: [r[c] for r in rows] for c in RESULT_COLUMNS},
                        schema_overrides={c: getattr(pl, t) for c, t in RESULT_SCHEMA.items()})


def split_space(space: str | None, feature_space: str | None = None) -> tuple[str | None, str | None]:
    """``(search space or None for the default, feature space)`` of the ``space`` / ``feature_space`` arguments."""
    if space is not None and str(space).lower() in SEARCH_SPACES:
        return str(space).lower(), feature_space
    if space is not None and feature_space is not None and space != feature_space:
        raise ValueError(f"space {space!r} is neither one of {', '.join(SEARCH_SPACES)} nor the feature space "
                         f"{feature_space!r}")
    return None, feature_space if feature_space is not None else space


def needs_embedding(space: str | None) -> bool:
    """Whether a search of ``space`` (the ``space`` argument of :func:`find_similar`) compares embeddings."""
    return (split_space(space)[0] or DEFAULT_SPACE) != "radiomics"


def similar_rows(lesion_id: str | None = None, vector: np.ndarray | None = None, k: int = 10,
                 where: dict[str, Any] | None = None, exclude_same_patient: bool = True,
                 warehouse: Warehouse | str | Path | None = None, version: int | None = None,
                 action: str = "search", extra_params: dict[str, Any] | None = None, space: str | None = None,
                 one_per_patient: bool = False, user: str | None = None, warm: Any = None,
                 feature_space: str | None = None, embedding: np.ndarray | None = None) -> list[dict[str, Any]]:
    """:func:`find_similar` as a list of row dicts (keys :data:`RESULT_COLUMNS`, in order), without polars.

    The one search path: :func:`find_similar` wraps these rows into its DataFrame; the CLI prints them
    directly (a command then imports neither polars nor lancedb). Values are plain Python: ``rank`` int,
    ``distance`` float, ``study_date`` :class:`datetime.date`, None where a value is missing. Same
    parameters, audit row and errors as :func:`find_similar`.
    """

    wh = _warehouse(warehouse)
    if (lesion_id is None) == (vector is None):
        raise ValueError("give either a lesion_id or a vector")
    search_space, feature_space = split_space(space, feature_space)
    params: dict[str, Any] = {"lesion_id": lesion_id, "k": k, "filters": where or {}, "version": version,
                              "exclude_same_patient": exclude_same_patient, "space": feature_space,
                              "search_space": search_space,
                              **({"one_per_patient": True} if one_per_patient else {}), **(extra_params or {})}
    queries: dict[str, Any] = {"radiomics": lesion_id, "deep": lesion_id}
    if vector is not None:
        vec = np.asarray(vector, np.float32)
        params["vector_sha1"] = hashlib.sha1(vec.tobytes()).hexdigest()
        params["vector"] = [round(float(x), 6) for x in vec]
        queries = {"radiomics": vec, "deep": None if embedding is None else np.asarray(embedding, np.float32)}
        if embedding is not None:
            params["embedding_sha1"] = hashlib.sha1(queries["deep"].tobytes()).hexdigest()
    if warm is not None and version is None and warm.index is not None:
        # a server: vectors, tables and audit journal in memory (stages.serving), no file opened
        return _search(WarmSources(warm), queries, lesion_id, k, where, exclude_same_patient, feature_space,
                       search_space, one_per_patient, params, action, user)
    # One connection per search: opening a DuckDB file costs ~10 ms, the Lance search itself ~3 ms; the
    # write lock is held for the search's few milliseconds only (robust-set version, audit row, metadata).
    with wh.connect() as con:
        ensure_schema(con)
        return _search(StoreSources(wh, con, version), queries, lesion_id, k, where, exclude_same_patient,
                       feature_space, search_space, one_per_patient, params, action, user)


def fuse_ranks(distances: dict[str, list[float | None]], k0: int = RRF_K,
               weights: dict[str, float] | None = None) -> list[float]:
    """Weighted reciprocal-rank fusion of the candidates' distances in several spaces: per space the candidates
    are ranked by distance (1 = closest; a candidate without a distance in a space ranks after all others
    there), and each scores ``sum over spaces of weight / (k0 + rank)`` (``weights`` default 1 each: plain
    RRF). Returns the scores, in input order."""
    n = len(next(iter(distances.values()))) if distances else 0
    scores = np.zeros(n)
    for space, values in distances.items():
        d = np.array([np.inf if v is None else float(v) for v in values])
        order = np.argsort(d, kind="stable")
        ranks = np.empty(n)
        ranks[order] = np.arange(1, n + 1)
        ranks[~np.isfinite(d)] = n + 1
        scores += (1.0 if weights is None else float(weights.get(space, 1.0))) / (k0 + ranks)
    return scores.tolist()


def _choose_space(src: Any, asked: str | None, lesion_id: str | None, queries: dict[str, Any]) -> str:
    """The search space: the one asked for (checked), else the default where the query has an embedding."""
    deep = src.tables["deep"]
    has_deep = deep.present and (deep.lesion(lesion_id) is not None if lesion_id is not None
                                 else queries["deep"] is not None)
    if asked is None:
        return DEFAULT_SPACE if has_deep else "radiomics"
    if asked in ("deep", "hybrid") and not has_deep:
        what = f"lesion {lesion_id!r} has no embedding" if lesion_id is not None and deep.present else (
            "the query has no embedding (no embedding model)" if lesion_id is None
            else "the warehouse has no lesion_embeddings table")
        raise ValueError(f"cannot search space {asked}: {what}; materialize lesion_crops, embedding_model and "
                         "lesion_embeddings, or search space radiomics")
    return asked


def _search(src: Any, queries: dict[str, Any], lesion_id: str | None, k: int, where: dict[str, Any] | None,
            exclude_same_patient: bool, space: str | None, search_space: str | None, one_per_patient: bool,
            params: dict[str, Any], action: str, user: str | None) -> list[dict[str, Any]]:
    """The search itself, on either source; audited once (also when it fails)."""
    rad, deep = src.tables["radiomics"], src.tables["deep"]
    versions: dict[str, Any] = {"lesion_vectors": rad.version}
    try:
        mode = _choose_space(src, search_space, lesion_id, queries)
        params["search_space"] = mode
        if mode != "radiomics":
            versions["lesion_embeddings"] = deep.version
        first = rad if mode != "deep" else deep
        patient = None
        if lesion_id is not None:
            row = first.lesion(lesion_id) or (deep.lesion(lesion_id) if mode == "hybrid" else None)
            if row is None:
                raise KeyError(f"lesion {lesion_id!r} is not in the "
                               f"{'vector' if first is rad else 'embedding'} table (version {first.version})")
            if space is not None and row["space"] != space:
                raise ValueError(f"lesion {lesion_id!r} is in feature space {row['space']}, not {space}")
            space = row["space"]
            patient = row["patient_key"] if exclude_same_patient else None
        elif space is None:
            stored = first.spaces()
            if len(stored) > 1:
                raise ValueError(f"the vector table holds {len(stored)} feature spaces ({', '.join(stored)}): "
                                 "a query vector needs its space")
            space = stored[0] if stored else None
        versions["robust_feature_set"] = src.robust_version(space) if space else None
        params["space"] = space
        filters = {**(where or {}), **({"space": [space]} if space is not None else {})}
        fetch = k
        while True:
            if mode == "radiomics":
                rows = rad.nearest(queries["radiomics"], fetch, filters or None, exclude_same_patient, patient)
                got = len(rows)
            else:
                rows, got = _fused(rad, deep, mode, queries, lesion_id, fetch, filters or None, exclude_same_patient,
                                   patient)
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
    return [{"rank": rank, "lesion_id": r["lesion_id"],
             "distance": None if r.get("_distance") is None else float(r["_distance"]),
             "patient_key": r.get("patient_key"), "series_instance_uid": r.get("series_instance_uid"),
             "segment_number": meta.get(r["lesion_id"], (None, None))[0],
             "raw_label": meta.get(r["lesion_id"], (None, None))[1],
             **{c: r.get(c) for c in ("roi_name", "modality", "body_part", "volume_mm3", "study_date", "cluster",
                                      "feature_set_version", "space")},
             "search_space": mode, "deep_distance": r.get("_deep_distance"), "score": r.get("_score")}
            for rank, r in enumerate(rows, start=1)]


def _fused(rad: Any, deep: Any, mode: str, queries: dict[str, Any], lesion_id: str | None, fetch: int,
           filters: dict[str, Any] | None, exclude_self: bool, patient: str | None) -> tuple[list[dict], int]:
    """Deep or hybrid candidates with both distances computed exactly; (rows in rank order, candidates seen).

    deep: the ``fetch`` nearest embeddings. hybrid: the ``max(HYBRID_CANDIDATES * fetch,
    HYBRID_MIN_CANDIDATES)`` nearest of each space, both distances of every candidate, ranked by
    :func:`fuse_ranks`. A row's metadata (``feature_set_version`` = the robust set, as explanations need) is
    the radiomics table's where the lesion has a vector there."""
    m = fetch if mode == "deep" else max(HYBRID_CANDIDATES * fetch, HYBRID_MIN_CANDIDATES)
    deep_rows = deep.nearest(queries["deep"], m, filters, exclude_self, patient)
    rad_rows = rad.nearest(queries["radiomics"], m, filters, exclude_self, patient) if mode == "hybrid" else []
    ids = list(dict.fromkeys([r["lesion_id"] for r in deep_rows] + [r["lesion_id"] for r in rad_rows]))
    wanted = ids + ([lesion_id] if lesion_id is not None else [])
    rad_of, deep_of = rad.rows_of(wanted), deep.rows_of(wanted)
    q_rad = rad_of[lesion_id][0] if lesion_id is not None and lesion_id in rad_of else (
        None if lesion_id is not None else queries["radiomics"])
    q_deep = deep_of[lesion_id][0] if lesion_id is not None and lesion_id in deep_of else (
        None if lesion_id is not None else queries["deep"])

    def dist(q: Any, table: dict, i: str) -> float | None:
        if q is None or i not in table:
            return None
        v = table[i][0]
        n = min(len(v), len(q))
        return float(np.sqrt(((np.asarray(q[:n], np.float64) - v[:n]) ** 2).sum()))

    d_rad = [dist(q_rad, rad_of, i) for i in ids]
    d_deep = [dist(q_deep, deep_of, i) for i in ids]
    if mode == "deep":
        order = sorted(range(len(ids)), key=lambda j: (np.inf if d_deep[j] is None else d_deep[j], ids[j]))
        scores: list[float | None] = [None] * len(ids)
    else:
        fused = fuse_ranks({"radiomics": d_rad, "deep": d_deep}, weights=HYBRID_WEIGHTS)
        scores = [float(x) for x in fused]
        order = sorted(range(len(ids)), key=lambda j: (-fused[j], np.inf if d_deep[j] is None else d_deep[j], ids[j]))
    out = []
    for j in order:
        i = ids[j]
        base = dict(rad_of[i][1]) if i in rad_of else dict(deep_of[i][1])
        if i not in rad_of:
            base["feature_set_version"] = None  # no radiomics vector: no explanation by features
        out.append({**base, "_distance": d_rad[j], "_deep_distance": d_deep[j], "_score": scores[j]})
    return out, len(deep_rows)


def explain_similar(wh: Warehouse, results: Any, reference_lesion_id: str | None = None,
                    query: QueryVector | None = None, n: int = 5, version: int | None = None,
                    warm: Any = None) -> list[Any]:
    """Why each result of :func:`find_similar` is close to its reference: one
    :class:`~imaging_assets.features.explain.Explanation` per result row, in order (the one explanation of
    the CLI, the Python API, the cohort asset and the search page), by the radiomics features also for a deep
    or hybrid search (the features are what a person can read); None for a row found by its embedding that
    has no radiomics vector.

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
        if any(r.get("search_space") == "deep" for r in rows):
            return [None] * len(rows)  # a deep search of a lesion without radiomics vector: nothing to explain by
        raise KeyError(f"lesion {reference_lesion_id!r} is not in the vector table at {wh.lance_uri}")
    ref_vec = vectors[reference_lesion_id] if reference_lesion_id is not None else query.vector
    ref_values = raw.get(reference_lesion_id, {}) if reference_lesion_id is not None else query.values
    out: list[Any] = []
    for r in rows:
        lid = str(r["lesion_id"])
        scaler = scalers.get(str(r.get("feature_set_version")))
        if r.get("feature_set_version") is None and r.get("search_space") in ("deep", "hybrid"):
            out.append(None)  # found by its embedding, without radiomics vector (it lacks robust features)
            continue
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
