"""``imaging-assets serve``: similar-case search over HTTP, with access control (Starlette + uvicorn).

Who may do what
    Every request but ``/healthz`` carries a token of :mod:`imaging_assets.access` (``Authorization: Bearer
    <token>``, or the ``ia_token`` cookie the login form sets): none or an unknown one gets 401, a role
    without the permission 403. ``viewer``: search and view; ``analyst``: + save cohorts + read-only SQL;
    ``admin``: everything (and every user's audit rows in SQL). Every search, cohort and SQL query is
    audited with the user's name (``audit_log.user``), also when it fails.

Speed
    The server keeps the vectors, the small tables and an audit journal in memory
    (:class:`~imaging_assets.stages.serving.WarmSearch`, refreshed in the background when the pipeline
    writes): an answer opens no file. ``benchmarks/serve.py`` measures it.

Pictures
    The Dagster UI shows markdown metadata inline only when it is short, so asset metadata links the
    stored pictures here (``IMAGING_ASSETS_PICTURES_URL``; ``make dev`` runs this server and sets it). A
    browser's ``<img>`` cannot send a bearer token, so those links are **signed**: ``?sig=`` is an HMAC of
    the file's name with the warehouse's picture key (:func:`imaging_assets.stages.thumbnails.picture_url`);
    a signed link opens that one picture only, an unsigned one needs a token. Only ``thumbnails/`` and
    ``plots/`` are served, by names that cannot leave them.

Routes
    ``GET /api/similar/{lesion_id}?k=10&modality=CT&date_from=&date_to=&min_volume=&max_volume=&cluster=&outcomes=1``
    (also ``filters=<JSON>``, ``all_lesions=1``, ``include_same_patient=1``; permission ``search``):
    ``{"reference": {...}, "results": [{"rank", "lesion_id", "patient_key", "distance",
    "modality", ..., "explanation": {...}, "thumbnail_url"}], "outcomes": {...}}``;
    ``POST /api/similar`` (``search``): the same for a new lesion: multipart files ``image`` + ``mask``
    (NIfTI/NRRD/MHA), or form/JSON fields ``image`` + ``mask`` naming files or DICOM folders under the
    archive roots (``IMAGING_ASSETS_DICOM_ROOTS``), with ``segment``, ``space``, ``modality``, ``k``;
    ``POST /api/cohorts`` (``save_cohort``): JSON ``{"name", "reference_lesion_id" | "image" + "mask", "k",
    filters}`` materializes the cohort's partition in Dagster (as ``imaging-assets cohort`` does);
    ``POST /api/sql`` (``sql``): JSON ``{"sql", "limit"}`` through :func:`imaging_assets.store.sql.run_sql`;
    ``GET /`` the search page, ``POST /`` (new lesion), ``POST /cohorts`` (save), ``GET|POST /sql`` (SQL
    page); ``POST /login`` (form field ``token``) sets the cookie, ``POST /logout`` clears it;
    ``GET /pictures/{folder}/{name}``; ``GET /healthz``. Binds to loopback by default (see the README for a
    reverse proxy).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import sys
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


def picture_file(wh: Warehouse, folder: str, name: str) -> Path | None:
    """The file a picture URL names, or None (unknown folder, a name that could leave it, no such file)."""
    if folder not in PICTURE_FOLDERS or not _NAME.match(name) or ".." in name:
        return None
    path = Path(wh.root) / folder / name
    return path if path.is_file() else None


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
                   query: Any = None, outcomes: bool = False, exclude_same_patient: bool = True) -> dict[str, Any]:
    """The JSON answer of ``/api/similar``: the reference (a lesion, or the new lesion of ``query``) and
    the results with explanations and the (signed) URLs of their pictures; with ``outcomes``, the
    neighbours' and the rest's Kaplan-Meier curves (:func:`neighbour_outcomes`)."""
    from imaging_assets.stages.cohorts import reference_row
    from imaging_assets.stages.similar import explain_similar, similar_rows
    from imaging_assets.stages.thumbnails import picture_url

    rows = similar_rows(lesion_id, vector=None if query is None else query.vector, k=k, where=filters or None,
                        warehouse=wh, one_per_patient=one_per_patient, user=user, warm=warm,
                        space=None if query is None else query.space, exclude_same_patient=exclude_same_patient)
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
                        "explanation": e.to_dict(),
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
                     space: str | None = None, modality: str | None = None, label: int | None = None) -> Any:
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
        p = _inside(str(raw), roots, what)
        if not p.exists():
            raise FileNotFoundError(f"{what} {raw}: no such file or folder")
        checked.append(p)
    return query_vector(wh, checked[0], checked[1], label=label, segment=segment or None, space=space or None,
                        modality=modality or None)


async def _query_from_request(wh: Warehouse, form: Any, roots: list[str]) -> Any:
    """The query vector of the new lesion a form or JSON body gives (uploads, else paths)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    from imaging_assets.stages.similar import query_vector

    opts: dict[str, Any] = {n: (str(form.get(n)).strip() or None) if form.get(n) is not None else None
                            for n in ("segment", "space", "modality")}
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


def create_app(wh: Warehouse, users: str | Path | None = None, warm: Any = None, roots: list[str] | None = None):
    """The Starlette application over ``wh``; users from ``users`` (default: the settings' users file);
    ``warm`` a :class:`~imaging_assets.stages.serving.WarmSearch` (default: one started with the app);
    ``roots`` the folders a new lesion's paths may lie under (default: the archive roots)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    from imaging_assets import settings
    from imaging_assets.access import SAVE_COHORT, SEARCH, SQL, authenticate
    from imaging_assets.stages.serving import WarmSearch
    from imaging_assets.stages.thumbnails import picture_signature_ok

    warm = warm if warm is not None else WarmSearch(wh)
    roots = list(roots) if roots is not None else settings.dicom_roots()

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(warm.start)
        try:
            yield
        finally:
            await run_in_threadpool(warm.stop)

    def token_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.cookies.get(COOKIE)

    def guard(request: Request, permission: str, page: bool = False):
        """(user, None) when allowed, else (None, the 401/403 response)."""
        user = authenticate(token_of(request), users)
        if user is None:
            if page:
                return None, HTMLResponse(_page("Sign in", _login_form()), status_code=401)
            return None, JSONResponse({"error": "a valid token is needed (Authorization: Bearer <token>)"},
                                      status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if not user.can(permission):
            message = f"user {user.name} (role {user.role}) may not {permission.replace('_', ' ')}"
            if page:
                return None, HTMLResponse(_page("Not allowed", f"<p class='error'>{html.escape(message)}</p>"
                                                "<p><a href='/'>back to the search</a></p>"), status_code=403)
            return None, JSONResponse({"error": message}, status_code=403)
        return user, None

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/pictures"

    def failure(exc: Exception) -> tuple[int, str]:
        """HTTP status and message of a failed search (the search itself was audited)."""
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        status = (404 if isinstance(exc, (KeyError, FileNotFoundError)) else 403 if isinstance(exc, PermissionError)
                  else 400 if isinstance(exc, ValueError) else 409)
        return status, message

    def audit_refused(user: Any, action: str, params: dict[str, Any], status: str) -> None:
        """A request refused before it reached the search (bad k or filters) is audited too."""
        warm.journal.record(action, f"http {action}", params, {}, 0, status=status, user=user.name)

    def k_of(params: Any, default: int = 10) -> int:
        raw = str(params.get("k") or default).strip()
        try:
            k = int(raw)
        except ValueError:
            raise ValueError(f"k must be a whole number, got {raw!r}") from None
        if not 1 <= k <= 500:
            raise ValueError("k must be between 1 and 500")
        return k

    async def pictures(request: Request):
        folder, name = request.path_params["folder"], request.path_params["name"]
        path = picture_file(wh, folder, name)
        signed = picture_signature_ok(wh, folder, name, request.query_params.get("sig", ""))
        if not signed:
            _, denied = guard(request, "view")
            if denied is not None:
                return denied
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        # plots are content-addressed (never change); a thumbnail changes when its lesion does
        cache = "private, max-age=31536000, immutable" if folder == "plots" else "private, no-cache"
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": cache})

    async def api_similar(request: Request):
        user, denied = guard(request, SEARCH)
        if denied is not None:
            return denied
        q = request.query_params
        lesion_id = request.path_params["lesion_id"]
        try:
            k, filters = k_of(q), search_filters(q)
        except ValueError as exc:
            audit_refused(user, "search", {"lesion_id": lesion_id, "query_string": str(q)}, f"refused: {exc}")
            return JSONResponse({"error": str(exc)}, status_code=400)
        try:
            answer = similar_answer(wh, lesion_id, k, filters, user.name, base(request),
                                    one_per_patient=q.get("all_lesions") not in ("1", "true"), warm=warm,
                                    outcomes=q.get("outcomes") in ("1", "true"),
                                    exclude_same_patient=q.get("include_same_patient") not in ("1", "true"))
        except (KeyError, ValueError, RuntimeError) as exc:
            status, message = failure(exc)
            return JSONResponse({"error": message}, status_code=status)
        return JSONResponse(answer)

    async def body_of(request: Request) -> Any:
        if request.headers.get("content-type", "").startswith("application/json"):
            doc = await request.json()
            if not isinstance(doc, dict):
                raise ValueError("the JSON body must be an object")
            return doc
        return await request.form(max_files=2, max_part_size=1 << 20)

    async def api_similar_new(request: Request):
        user, denied = guard(request, SEARCH)
        if denied is not None:
            return denied
        try:
            form = await body_of(request)
            k, filters = k_of(form), search_filters(form)
            query = await _query_from_request(wh, form, roots)
        except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as exc:
            status, message = failure(exc)
            audit_refused(user, "search", {"new_lesion": True}, f"refused: {message}")
            return JSONResponse({"error": message}, status_code=status)
        try:
            answer = similar_answer(wh, None, k, filters, user.name, base(request), warm=warm, query=query,
                                    outcomes=str(form.get("outcomes")) in ("1", "true", "True"))
        except (KeyError, ValueError, RuntimeError) as exc:
            status, message = failure(exc)
            return JSONResponse({"error": message}, status_code=status)
        return JSONResponse(answer)

    async def save_cohort(user: Any, form: Any) -> dict[str, Any]:
        """Materialize a cohort in Dagster as ``imaging-assets cohort`` does, as ``user``."""
        from imaging_assets.defs.cohorts import CohortConfig
        from imaging_assets.stages.cohorts import cohort_table_name

        name = str(form.get("name") or "").strip()
        cohort_table_name(name)  # ValueError for a bad name
        config: dict[str, Any] = {"k": k_of(form, 20)}
        if form.get("reference_lesion_id"):
            config["reference_lesion_id"] = str(form.get("reference_lesion_id")).strip()
        elif form.get("image") and form.get("mask"):
            for n in ("image", "mask", "segment"):
                if form.get(n):
                    config[n] = str(form.get(n))
            _inside(config["image"], roots)
            _inside(config["mask"], roots)
        else:
            raise ValueError("a cohort needs reference_lesion_id, or image and mask paths under the archive roots")
        f = search_filters(form)
        for col in ("modality", "roi_name", "body_part", "cluster"):
            if col in f:
                config[col] = f[col]
        if "study_date" in f:
            config["date_from"], config["date_to"] = f["study_date"]
        if "volume_mm3" in f:
            config["min_volume_mm3"], config["max_volume_mm3"] = f["volume_mm3"]
        CohortConfig(**config)  # the launchpad's validation, before a run is made
        # `imaging-assets cohort` in a child process: the run (extraction for a new image, DuckDB writes,
        # Dagster's imports) neither slows the searches of this process nor takes it down when it fails
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imaging_assets.cli", "cohort", name, "--config", json.dumps(config),
            "--requested-by", user.name, "--json", "--warehouse", str(wh.root),
            env={**os.environ, "IMAGING_ASSETS_LANCE_URI": wh.lance_uri},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        try:
            doc = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            return {"name": name, "table": cohort_table_name(name), "run_id": None, "success": False,
                    "errors": tail or [f"imaging-assets cohort exited with {proc.returncode}"], "config": config}
        return doc

    async def api_cohorts(request: Request):
        user, denied = guard(request, SAVE_COHORT)
        if denied is not None:
            return denied
        try:
            form = await body_of(request)
            out = await save_cohort(user, form)
        except (ValueError, PermissionError) as exc:
            audit_refused(user, "cohort", {"name": str(locals().get("form", {}).get("name", ""))},
                          f"refused: {exc}")
            return JSONResponse({"error": str(exc)}, status_code=403 if isinstance(exc, PermissionError) else 400)
        return JSONResponse(out, status_code=201 if out["success"] else 422)

    async def api_sql(request: Request):
        user, denied = guard(request, SQL)
        if denied is not None:
            return denied
        try:
            doc = await body_of(request)
            sql, limit = str(doc.get("sql") or ""), int(doc.get("limit") or 1000)
            columns, rows, n = await run_in_threadpool(_run_sql, wh, sql, limit, user)
        except Exception as exc:  # noqa: BLE001 - refused, or DuckDB's error: audited by run_sql
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"columns": columns, "rows": rows, "n_rows": n, "truncated": n > len(rows)})

    async def search_page(request: Request):
        user, denied = guard(request, SEARCH, page=True)
        if denied is not None:
            return denied
        q = request.query_params
        body = _nav(user) + _search_form(q)
        if q.get("lesion_id"):
            lesion_id = q["lesion_id"].strip()
            try:
                k, filters = k_of(q), search_filters(q)
                answer = similar_answer(wh, lesion_id, k, filters, user.name, base(request), warm=warm, outcomes=True)
                body += _results_html(answer) + (_save_form(q) if user.can(SAVE_COHORT) else "")
            except (KeyError, ValueError, RuntimeError) as exc:
                body += f"<p class='error'>{html.escape(failure(exc)[1])}</p>"
        body += _new_lesion_form()
        return HTMLResponse(_page(f"Similar cases — {html.escape(user.name)} ({user.role})", body))

    async def search_new_page(request: Request):
        user, denied = guard(request, SEARCH, page=True)
        if denied is not None:
            return denied
        form = await request.form(max_files=2, max_part_size=1 << 20)
        body = _nav(user) + _search_form({})
        try:
            k, filters = k_of(form), search_filters(form)
            query = await _query_from_request(wh, form, roots)
            answer = similar_answer(wh, None, k, filters, user.name, base(request), warm=warm, query=query,
                                    outcomes=True)
            body += _results_html(answer)
        except (KeyError, ValueError, PermissionError, FileNotFoundError, RuntimeError) as exc:
            audit_refused(user, "search", {"new_lesion": True}, f"refused: {failure(exc)[1]}")
            body += f"<p class='error'>{html.escape(failure(exc)[1])}</p>"
        body += _new_lesion_form()
        return HTMLResponse(_page(f"Similar cases — {html.escape(user.name)} ({user.role})", body))

    async def cohorts_page(request: Request):
        user, denied = guard(request, SAVE_COHORT, page=True)
        if denied is not None:
            return denied
        form = await request.form(max_files=0)
        try:
            out = await save_cohort(user, form)
        except (ValueError, PermissionError) as exc:
            audit_refused(user, "cohort", {"name": str(form.get("name") or "")}, f"refused: {exc}")
            return HTMLResponse(_page("Cohort not saved", _nav(user) + f"<p class='error'>{html.escape(str(exc))}</p>"),
                                status_code=400)
        if not out["success"]:
            errors = "".join(f"<li>{html.escape(e)}</li>" for e in out["errors"])
            return HTMLResponse(_page("Cohort not saved", _nav(user) + f"<p class='error'>the run {out['run_id']} "
                                      f"failed:</p><ul>{errors}</ul>"), status_code=422)
        body = (_nav(user) + f"<p class='ok'>Cohort <b>{html.escape(out['name'])}</b> saved as table "
                f"<code>{out['table']}</code> by Dagster run <code>{out['run_id']}</code>: it is in the Dagster UI "
                f"(asset <code>cohort</code>, partition <code>{html.escape(out['name'])}</code>, with its outcome "
                "analysis in <code>cohort_outcomes</code>).</p>")
        if user.can(SQL):
            body += (f"<p><a href='/sql?sql=SELECT+rank,+lesion_id,+patient_key,+distance,+why+FROM+{out['table']}"
                     "+ORDER+BY+rank'>read it with SQL</a></p>")
        return HTMLResponse(_page(f"Cohort {html.escape(out['name'])} saved", body), status_code=201)

    async def sql_page(request: Request):
        user, denied = guard(request, SQL, page=True)
        if denied is not None:
            return denied
        form = await request.form(max_files=0) if request.method == "POST" else request.query_params
        sql = str(form.get("sql") or "")
        body = _nav(user) + _sql_form(sql)
        if sql.strip():
            try:
                columns, rows, n = await run_in_threadpool(_run_sql, wh, sql, 200, user)
                body += _table_html(columns, rows, n)
            except Exception as exc:  # noqa: BLE001 - refused, or DuckDB's error: audited by run_sql
                body += f"<p class='error'>{html.escape(str(exc))}</p>"
        return HTMLResponse(_page("Read-only SQL", body))

    async def login(request: Request):
        form = await request.form(max_files=0)
        token = str(form.get("token") or "")
        if authenticate(token, users) is None:
            return HTMLResponse(_page("Sign in", "<p class='error'>unknown token</p>" + _login_form()),
                                status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(request: Request):
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def healthz(request: Request):
        return JSONResponse({"ok": True})

    return Starlette(lifespan=lifespan, routes=[
        Route("/", search_page), Route("/", search_new_page, methods=["POST"]),
        Route("/cohorts", cohorts_page, methods=["POST"]), Route("/sql", sql_page, methods=["GET", "POST"]),
        Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
        Route("/api/similar/{lesion_id}", api_similar), Route("/api/similar", api_similar_new, methods=["POST"]),
        Route("/api/cohorts", api_cohorts, methods=["POST"]), Route("/api/sql", api_sql, methods=["POST"]),
        Route("/pictures/{folder}/{name}", pictures), Route("/healthz", healthz)])


def _inside(path: str, roots: list[str], what: str = "path") -> Path:
    """``path`` resolved (links followed), or PermissionError when it is not under one of ``roots``."""
    p = Path(path).expanduser().resolve()
    if not any(p == Path(r).resolve() or Path(r).resolve() in p.parents for r in roots):
        raise PermissionError(f"{what} {path}: only files under the archive roots (IMAGING_ASSETS_DICOM_ROOTS) "
                              "can be used from the server; upload the files instead")
    return p


def _run_sql(wh: Warehouse, sql: str, limit: int, user: Any) -> tuple[list[str], list[list[Any]], int]:
    """Columns, the first ``limit`` rows (JSON-ready) and the row count of a read-only query, as ``user``."""
    from imaging_assets.store.sql import run_sql

    df = run_sql(wh, sql, user=user.name, see_all_audit=user.role == "admin")
    head = json.loads(df.head(max(0, int(limit))).to_json(orient="split", date_format="iso", default_handler=str))
    return [str(c) for c in df.columns], head["data"], len(df)


def serve(wh: Warehouse, host: str = "127.0.0.1", port: int = 8321) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(wh), host=host, port=port, log_level="warning")


# ------------------------------------------------------------------------------------------------ pages
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1250px}
table{border-collapse:collapse}td,th{padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;text-align:left}
img.thumb{width:300px;height:auto;background:#111}.bar{display:inline-block;height:.7rem;background:#4a7}
.error{color:#b00}.ok{color:#060}form{margin:.6rem 0}form input,form select{margin:.2rem .4rem .2rem 0}
small{color:#555}nav{margin-bottom:.8rem}nav form{display:inline}fieldset{border:1px solid #ccc;margin:.6rem 0}
textarea{width:100%;font-family:monospace}.km{margin:.5rem 0}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{body}</body></html>")


def _login_form() -> str:
    return ("<form method='post' action='/login'><label>Access token <input type='password' name='token' "
            "size='60' autofocus></label> <button type='submit'>Sign in</button></form>"
            "<p><small>An administrator makes one with <code>imaging-assets users add NAME --role viewer</code>."
            "</small></p>")


def _nav(user: Any) -> str:
    from imaging_assets.access import SQL

    sql = " · <a href='/sql'>SQL</a>" if user.can(SQL) else ""
    return (f"<nav><a href='/'>Search</a>{sql} · <form method='post' action='/logout'>"
            "<button type='submit'>Sign out</button></form></nav>")


def _field(q: Any, name: str, label: str, size: int = 10) -> str:
    return (f"<label>{label} <input name='{name}' size='{size}' "
            f"value='{html.escape(str(q.get(name) or ''), quote=True)}'></label>")


def _filter_fields(q: Any) -> str:
    return (_field(q, "k", "k", 3) + _field(q, "modality", "Modality", 6) + _field(q, "date_from", "Date from") +
            _field(q, "date_to", "to") + _field(q, "min_volume", "Volume from (mm³)", 8) +
            _field(q, "max_volume", "to", 8) + _field(q, "cluster", "Cluster", 4))


def _search_form(q: Any) -> str:
    return ("<form class='search' method='get' action='/'>" + _field(q, "lesion_id", "Lesion id", 20) +
            _filter_fields(q) + " <button type='submit'>Search</button></form>")


def _new_lesion_form() -> str:
    return ("<fieldset><legend>Or a new lesion</legend><form method='post' action='/' enctype='multipart/form-data'>"
            "<label>Image <input type='file' name='image'></label> <label>Mask <input type='file' name='mask'>"
            "</label><small>NIfTI, NRRD or MetaImage</small><br><label>or image path <input name='image_path' "
            "size='40'></label> <label>mask path <input name='mask_path' size='40'></label> <small>files or DICOM "
            "folders under the archive roots</small><br>" + _field({}, "segment", "Segment") +
            _field({}, "label", "or label", 3) + _field({}, "modality", "Modality", 6) + _field({}, "k", "k", 3) +
            " <button type='submit'>Search</button></form></fieldset>")


def _save_form(q: Any) -> str:
    hidden = "".join(f"<input type='hidden' name='{n}' value='{html.escape(str(q.get(n)), quote=True)}'>"
                     for n in ("lesion_id", "modality", "date_from", "date_to", "min_volume", "max_volume", "cluster")
                     if q.get(n))
    hidden = hidden.replace("name='lesion_id'", "name='reference_lesion_id'")
    return ("<form method='post' action='/cohorts'>" + hidden +
            "<label>Save as cohort named <input name='name' size='24' pattern='[a-z][a-z0-9_]{0,47}' required></label>"
            " <label>patients <input name='k' size='3' value='20'></label> <button type='submit'>Save as cohort"
            "</button> <small>(a Dagster run of the <code>cohort</code> asset: table, outcomes, audit)</small></form>")


def _sql_form(sql: str) -> str:
    return ("<form method='post' action='/sql'><textarea name='sql' rows='6'>" + html.escape(sql) + "</textarea><br>"
            "<button type='submit'>Run (read-only)</button> <small>DuckDB SQL over the warehouse tables and "
            "<code>lesion_vectors</code>; writes are refused; every query is audited.</small></form>")


def _table_html(columns: list[str], rows: list[list[Any]], n: int) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))[:200]}</td>" for v in r) + "</tr>"
                   for r in rows)
    more = f"<p><small>first {len(rows)} of {n} rows</small></p>" if n > len(rows) else f"<p><small>{n} rows</small></p>"
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _km_svg(outcomes: dict[str, Any], width: int = 420, height: int = 220) -> str:
    """The neighbours' and the rest's Kaplan-Meier curves as an inline SVG, with a legend."""
    groups = [(g, outcomes.get(g) or {}, colour) for g, colour in (("neighbours", "#c33"), ("rest", "#36c"))]
    horizon = max([t for _, o, _ in groups for t, _ in o.get("km", [])] + [1.0])
    left, top, w, h = 40, 10, width - 50, height - 45

    def xy(t: float, s: float) -> str:
        return f"{left + w * t / horizon:.1f},{top + h * (1 - s):.1f}"

    parts = [f"<svg class='km' width='{width}' height='{height}' role='img' aria-label='Kaplan-Meier'>",
             f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#999'/>"]
    for s in (0, 0.5, 1):
        parts.append(f"<text x='{left - 4}' y='{top + h * (1 - s) + 4:.0f}' font-size='10' text-anchor='end'>{s:g}</text>")
    for frac in (0, 0.5, 1):
        parts.append(f"<text x='{left + w * frac:.0f}' y='{top + h + 14}' font-size='10' text-anchor='middle'>"
                     f"{horizon * frac:.0f}</text>")
    parts.append(f"<text x='{left + w / 2:.0f}' y='{height - 4}' font-size='10' text-anchor='middle'>months</text>")
    legend_y = top + 12
    for g, o, colour in groups:
        pts, last = [], 1.0
        for t, s in o.get("km", []):
            pts += [xy(t, last), xy(t, s)]
            last = s
        if pts:
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{' '.join(pts)}'/>")
        median = o.get("median_months")
        parts.append(f"<text x='{left + w - 4}' y='{legend_y}' font-size='11' text-anchor='end' fill='{colour}'>"
                     f"{g}: {o.get('patients', 0)} patients, {o.get('events', 0)} events, median "
                     f"{'not reached' if median is None else f'{median:g} mo'}</text>")
        legend_y += 14
    parts.append("</svg>")
    return "".join(parts)


def _results_html(answer: dict[str, Any]) -> str:
    from imaging_assets.features.explain import percentile_words as _pct

    ref = answer["reference"]
    picture = (f"<img class='thumb' src='{html.escape(ref['thumbnail_url'], quote=True)}' alt='reference'><br>"
               if ref.get("thumbnail_url") else "")
    if ref.get("lesion_id"):
        title = f"Reference {html.escape(str(ref.get('lesion_id')))}"
        what = (f"{html.escape(str(ref.get('modality')))} {html.escape(str(ref.get('roi_name')))}, "
                f"{(ref.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster {ref.get('cluster')}")
    else:
        title, what = "Reference: the new lesion", f"feature space {html.escape(str(ref.get('space')))}"
    out = [f"<h2>{title}</h2><p>{picture}{what}</p>"]
    if "outcomes" in answer:
        out.append("<h3>How these patients did</h3>" + _km_svg(answer["outcomes"]))
    out.append(f"<h2>{len(answer['results'])} closest patients</h2><table class='results'>"
               "<tr><th>#</th><th>picture</th><th>lesion</th><th>why it is close</th></tr>")
    for r in answer["results"]:
        e = r["explanation"]
        groups = "".join(f"<div>{html.escape(g)} <span class='bar' style='width:{s * 150:.0f}px'></span> {s:.0%}</div>"
                         for g, s in sorted(e["groups"].items(), key=lambda kv: -kv[1]) if s >= 0.01)

        def items(key: str, e: dict = e) -> str:
            return "".join(
                f"<li>{html.escape(c['name'])}: {_pct(c['reference_percentile'])} vs {_pct(c['neighbour_percentile'])}</li>"
                for c in e[key][:3])

        out.append(
            f"<tr class='result'><td>{r['rank']}</td><td><img class='thumb' src='{html.escape(r['thumbnail_url'], quote=True)}' "
            f"alt='lesion {html.escape(r['lesion_id'])}'></td><td><code>{html.escape(r['lesion_id'])}</code><br>"
            f"d = {r['distance']:.2f}<br>{html.escape(str(r.get('modality')))} {html.escape(str(r.get('roi_name')))}<br>"
            f"{(r.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster {r.get('cluster')}<br>"
            f"<small>{html.escape(str(r.get('patient_key')))}</small></td><td class='why'>{groups}<b>agree</b><ul>"
            f"{items('agree')}</ul><b>differ</b><ul>{items('differ')}</ul></td></tr>")
    out.append("</table>")
    return "".join(out)
