"""What the search server answers, apart from HTTP: filters from a request, the JSON answer of a search
(with explanations, signed picture links and the neighbours' outcomes), a new lesion's query vector from
uploads or archive paths, read-only SQL as a user. No Dagster here."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from imaging_assets.store.warehouse import Warehouse

#: Folders of the warehouse the server publishes.
PICTURE_FOLDERS = ("thumbnails", "plots")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.png$")
COOKIE = "ia_token"
#: Largest upload (image + mask) accepted by ``POST /api/similar`` and the page.
MAX_UPLOAD_BYTES = 1 << 30
_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def picture_file(wh: Warehouse, folder: str, name: str) -> bytes | None:
    """The picture a URL names (PNG bytes from the warehouse files, local or on object storage), or None
    (unknown folder, a name that could leave it, no such file)."""
    from imaging_assets.stages.thumbnails import picture_bytes

    if folder not in PICTURE_FOLDERS or not _NAME.match(name) or ".." in name:
        return None
    return picture_bytes(wh, folder, name)


def _values(params: Any, name: str) -> list[str]:
    raw = params.getlist(name) if hasattr(params, "getlist") else (
        params.get(name) if isinstance(params.get(name), list) else [params.get(name)] if params.get(name) else [])
    return [v.strip() for r in raw for v in str(r).split(",") if v.strip()]


def search_filters(params: Any) -> dict[str, Any]:
    """The structured filters of a query string, form or JSON object (modality, roi_name, body_part, date
    range, volume range, cluster), as :func:`~imaging_assets.stages.similar.find_similar` takes them.

    Raises
    ------
    ValueError
        A cluster, volume or date that is not one.
    """
    import datetime as dt

    f: dict[str, Any] = {}
    for col in ("modality", "roi_name", "body_part"):
        if vals := _values(params, col):
            f[col] = vals
    if clusters := _values(params, "cluster"):
        try:
            f["cluster"] = [int(v) for v in clusters]
        except ValueError:
            raise ValueError(f"cluster must be whole numbers, got {','.join(clusters)!r}") from None
    dates = [str(params.get(n) or "").strip() or None for n in ("date_from", "date_to")]
    for d in dates:
        if d is not None:
            try:
                dt.date.fromisoformat(d)
            except ValueError:
                raise ValueError(f"dates are YYYY-MM-DD, got {d!r}") from None
    if any(dates):
        f["study_date"] = tuple(dates)
    vols = []
    for n in ("min_volume", "max_volume"):
        v = str(params.get(n) or "").strip()
        try:
            vols.append(float(v) if v else None)
        except ValueError:
            raise ValueError(f"{n} must be a number (mm³), got {v!r}") from None
    if any(v is not None for v in vols):
        f["volume_mm3"] = tuple(vols)
    if params.get("filters"):  # any filter find_similar takes, as JSON (what the CLI sends): ranges as {"range": [lo, hi]}
        try:
            extra = json.loads(params.get("filters")) if isinstance(params.get("filters"), str) else params.get("filters")
        except ValueError:
            raise ValueError("filters must be a JSON object") from None
        if not isinstance(extra, dict):
            raise ValueError("filters must be a JSON object")
        for col, spec in extra.items():
            if isinstance(spec, dict):
                if set(spec) != {"range"} or not isinstance(spec["range"], list) or len(spec["range"]) != 2:
                    raise ValueError(f"filter {col}: a range is {{\"range\": [low, high]}}")
                spec = tuple(spec["range"])
            f[str(col)] = spec
    return f


def similar_answer(wh: Warehouse, lesion_id: str | None = None, k: int = 10, filters: dict[str, Any] | None = None,
                   user: str | None = None, picture_base: str = "", one_per_patient: bool = True, warm: Any = None,
                   query: Any = None, outcomes: bool = False, exclude_same_patient: bool = True,
                   space: str | None = None) -> dict[str, Any]:
    """The JSON answer of ``/api/similar``: the reference (a lesion, or the new lesion of ``query``) and
    the results with explanations and the (signed) URLs of their pictures; with ``outcomes``, the
    neighbours' and the rest's Kaplan-Meier curves (:func:`neighbour_outcomes`). ``space``: the search space
    (radiomics | deep | hybrid; default :data:`~imaging_assets.stages.similar.DEFAULT_SPACE`)."""
    from imaging_assets.stages.cohorts import reference_row
    from imaging_assets.stages.similar import explain_similar, similar_rows
    from imaging_assets.stages.thumbnails import picture_url

    rows = similar_rows(lesion_id, vector=None if query is None else query.vector, k=k, where=filters or None,
                        warehouse=wh, one_per_patient=one_per_patient, user=user, warm=warm,
                        feature_space=None if query is None else query.space, space=space or None,
                        exclude_same_patient=exclude_same_patient, embedding=None if query is None else query.embedding)
    explanations = explain_similar(wh, rows, reference_lesion_id=lesion_id, query=query, warm=warm)
    if lesion_id is not None:
        ref = reference_row(wh, lesion_id, warm=warm)
        ref["thumbnail_url"] = picture_url(wh, picture_base, "thumbnails", f"{lesion_id}.png") if ref.pop(
            "thumbnail", None) else None
    else:
        ref = {"lesion_id": None, "space": query.space, "feature_set_version": query.feature_set_version,
               "thumbnail_url": None}
    results = []
    for row, e in zip(rows, explanations):
        results.append({**{c: (str(v) if c == "study_date" and v is not None else v) for c, v in row.items()},
                        "explanation": e.to_dict() if e is not None else None,
                        "thumbnail_url": picture_url(wh, picture_base, "thumbnails", f"{row['lesion_id']}.png")})
    answer: dict[str, Any] = {"reference": ref, "results": results}
    if outcomes and warm is not None:
        answer["outcomes"] = neighbour_outcomes(warm, results, ref.get("space"), ref.get("patient_key"))
    return answer


def neighbour_outcomes(warm: Any, results: list[dict[str, Any]], space: str | None,
                       reference_patient: str | None = None) -> dict[str, Any]:
    """How the neighbours' patients did against the rest of the feature space's patients with outcomes
    (the reference patient left out): per group patients, events, median months and the Kaplan-Meier
    steps ``[[months, survival], ...]`` (lifelines)."""
    from lifelines import KaplanMeierFitter

    known = warm.tables.outcomes
    near = {r["patient_key"] for r in results if r.get("patient_key") in known}
    space_patients = {rec["patient_key"] for rec in warm.tables.lesions.values()
                      if space is None or rec.get("space") == space}
    rest = {p for p in space_patients if p in known and p not in near and p != reference_patient}
    out: dict[str, Any] = {}
    for group, patients in (("neighbours", near), ("rest", rest)):
        if not patients:
            out[group] = {"patients": 0, "events": 0, "median_months": None, "km": []}
            continue
        times = [known[p][0] for p in sorted(patients)]
        events = [known[p][1] for p in sorted(patients)]
        kmf = KaplanMeierFitter().fit(times, events)
        sf = kmf.survival_function_.iloc[:, 0]
        median = float(kmf.median_survival_time_)
        out[group] = {"patients": len(patients), "events": int(sum(events)),
                      "median_months": None if median != median or median == float("inf") else round(median, 1),
                      "km": [[round(float(t), 2), round(float(v), 4)] for t, v in sf.items()]}
    return out


def query_from_paths(wh: Warehouse, image: str, mask: str, roots: list[str], segment: str | None = None,
                     space: str | None = None, modality: str | None = None, label: int | None = None,
                     embed: bool = True) -> Any:
    """The query vector of a new lesion named by server paths, which must lie under ``roots`` (the
    archive's folders): a user of the page cannot make the server read anything else.

    Raises
    ------
    PermissionError
        A path outside the roots; ``FileNotFoundError`` one that does not exist.
    """
    from imaging_assets.stages.similar import query_vector

    checked = []
    for what, raw in (("image", image), ("mask", mask)):
        p = inside_roots(str(raw), roots, what)
        if not p.exists():
            raise FileNotFoundError(f"{what} {raw}: no such file or folder")
        checked.append(p)
    return query_vector(wh, checked[0], checked[1], label=label, segment=segment or None, space=space or None,
                        modality=modality or None, embed=embed)


async def query_from_request(wh: Warehouse, form: Any, roots: list[str]) -> Any:
    """The query vector of the new lesion a form or JSON body gives (uploads, else paths)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    from imaging_assets.stages.similar import needs_embedding, query_vector, split_space

    opts: dict[str, Any] = {n: (str(form.get(n)).strip() or None) if form.get(n) is not None else None
                            for n in ("segment", "space", "feature_space", "modality")}
    opts["embed"] = needs_embedding(opts["space"])  # embedded only for a deep or hybrid search
    opts["space"] = split_space(opts["space"], opts.pop("feature_space"))[1]  # the feature space to extract with
    raw_label = str(form.get("label") or "").strip()
    try:
        opts["label"] = int(raw_label) if raw_label else None
    except ValueError:
        raise ValueError(f"label must be a whole number (the mask's label or segment number), got {raw_label!r}") from None
    def given(name: str) -> Any:  # an empty file input of the page is no upload
        v = form.get(name)
        return None if (isinstance(v, UploadFile) and not v.filename) or v in ("", None) else v

    image, mask = given("image"), given("mask")
    if image is None and mask is None:  # the page's path fields
        image, mask = given("image_path"), given("mask_path")
    if isinstance(image, UploadFile) or isinstance(mask, UploadFile):
        if not (isinstance(image, UploadFile) and isinstance(mask, UploadFile)):
            raise ValueError("upload both an image and a mask file")
        with tempfile.TemporaryDirectory(prefix="ia-query-") as tmp:
            paths, total = [], 0
            for what, up in (("image", image), ("mask", mask)):
                name = Path(up.filename or what).name.lower()
                suffix = next((s for s in _UPLOAD_SUFFIXES if name.endswith(s)), None)
                if suffix is None:
                    raise ValueError(f"{what} {up.filename!r}: upload a NIfTI, NRRD or MetaImage file "
                                     f"({', '.join(_UPLOAD_SUFFIXES)}); DICOM series: give their folder's path")
                path = Path(tmp) / f"{what}{suffix}"
                with path.open("wb") as fh:
                    while chunk := await up.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_UPLOAD_BYTES:
                            raise ValueError(f"the upload is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
                        fh.write(chunk)
                paths.append(path)
            return await run_in_threadpool(lambda: query_vector(wh, paths[0], paths[1], **opts))
    if not image or not mask:
        raise ValueError("give a lesion id, or an image and a mask (uploads or paths under the archive roots)")
    return await run_in_threadpool(query_from_paths, wh, str(image), str(mask), roots, **opts)


def inside_roots(path: str, roots: list[str], what: str = "path") -> Path:
    """``path`` resolved (links followed), or PermissionError when it is not under one of ``roots``."""
    p = Path(path).expanduser().resolve()
    if not any(p == Path(r).resolve() or Path(r).resolve() in p.parents for r in roots):
        raise PermissionError(f"{what} {path}: only files under the archive roots (IMAGING_ASSETS_DICOM_ROOTS) "
                              "can be used from the server; upload the files instead")
    return p


def run_sql_as(wh: Warehouse, sql: str, limit: int, user: Any, warm: Any = None) -> tuple[list[str], list[list[Any]], int]:
    """Columns, the first ``limit`` rows (JSON-ready) and the row count of a read-only query, as ``user``
    (the server's journal is flushed first, so the query sees the user's latest searches in ``audit_log``)."""
    from imaging_assets.store.sql import run_sql

    if warm is not None:
        warm.flush_audit()
    df = run_sql(wh, sql, user=user.name, see_all_audit=user.role == "admin")
    head = json.loads(df.head(max(0, int(limit))).to_json(orient="split", date_format="iso", default_handler=str))
    return [str(c) for c in df.columns], head["data"], len(df)
