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
import sys
from pathlib import Path
from typing import Any

from imaging_assets.store.warehouse import Warehouse
from imaging_assets.web.answers import (
    COOKIE,
    inside_roots,
    picture_file,
    query_from_request,
    run_sql_as,
    search_filters,
    similar_answer,
)
from imaging_assets.web.pages import (
    login_form,
    nav,
    new_lesion_form,
    page,
    results_html,
    save_form,
    search_form,
    sql_form,
    table_html,
)

__all__ = ["create_app", "picture_file", "search_filters", "serve", "similar_answer"]


def create_app(wh: Warehouse, users: str | Path | None = None, warm: Any = None, roots: list[str] | None = None):
    """The Starlette application over ``wh``; users from ``users`` (default: the settings' users file);
    ``warm`` a :class:`~imaging_assets.stages.serving.WarmSearch` (default: one started with the app);
    ``roots`` the folders a new lesion's paths may lie under (default: the archive roots)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
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

    def guard(request: Request, permission: str, as_page: bool = False):
        """(user, None) when allowed, else (None, the 401/403 response)."""
        user = authenticate(token_of(request), users)
        if user is None:
            if as_page:
                return None, HTMLResponse(page("Sign in", login_form()), status_code=401)
            return None, JSONResponse({"error": "a valid token is needed (Authorization: Bearer <token>)"},
                                      status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if not user.can(permission):
            doing = {"search": "search", "view": "view pictures", "save_cohort": "save cohorts",
                     "sql": "run SQL queries", "admin": "administer the server"}.get(permission, permission)
            message = f"user {user.name} (role {user.role}) may not {doing}"
            if as_page:
                return None, HTMLResponse(page("Not allowed", f"<p class='error'>{html.escape(message)}</p>"
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
        data = await asyncio.to_thread(picture_file, wh, folder, name)  # may be a request to object storage
        signed = picture_signature_ok(wh, folder, name, request.query_params.get("sig", ""))
        if not signed:
            _, denied = guard(request, "view")
            if denied is not None:
                return denied
        if data is None:
            return PlainTextResponse("not found", status_code=404)
        # plots are content-addressed (never change); a thumbnail changes when its lesion does
        cache = "private, max-age=31536000, immutable" if folder == "plots" else "private, no-cache"
        return Response(data, media_type="image/png", headers={"Cache-Control": cache})

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
                                    exclude_same_patient=q.get("include_same_patient") not in ("1", "true"),
                                    space=q.get("space") or None)
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
            query = await query_from_request(wh, form, roots)
        except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as exc:
            status, message = failure(exc)
            audit_refused(user, "search", {"new_lesion": True}, f"refused: {message}")
            return JSONResponse({"error": message}, status_code=status)
        try:
            answer = similar_answer(wh, None, k, filters, user.name, base(request), warm=warm, query=query,
                                    outcomes=str(form.get("outcomes")) in ("1", "true", "True"),
                                    space=str(form.get("space") or "") or None)
        except (KeyError, ValueError, RuntimeError) as exc:
            status, message = failure(exc)
            return JSONResponse({"error": message}, status_code=status)
        return JSONResponse(answer)

    async def save_cohort(user: Any, form: Any) -> dict[str, Any]:
        """Materialize a cohort in Dagster as ``imaging-assets cohort`` does, as ``user``."""
        from imaging_assets.defs.cohorts import CohortConfig
        from imaging_assets.stages.cohorts import cohort_table_name, stored_cohort_query

        name = str(form.get("name") or "").strip()
        cohort_table_name(name)  # ValueError for a bad name
        if stored_cohort_query(wh, name) is not None and str(form.get("replace") or "") not in ("1", "true", "on"):
            # a name typed twice must not silently replace someone's cohort
            raise ValueError(f"a cohort named {name!r} exists already: choose another name, or ask to replace it "
                             "(replace=1; the page's 'replace it' box)")
        config: dict[str, Any] = {"k": k_of(form, 20)}
        if form.get("reference_lesion_id"):
            config["reference_lesion_id"] = str(form.get("reference_lesion_id")).strip()
        elif form.get("image") and form.get("mask"):
            for n in ("image", "mask", "segment"):
                if form.get(n):
                    config[n] = str(form.get(n))
            inside_roots(config["image"], roots)
            inside_roots(config["mask"], roots)
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
            "--requested-by", user.name, "--json", "--warehouse", wh.files,
            env={**os.environ, **wh.environment()},
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
            columns, rows, n = await run_in_threadpool(run_sql_as, wh, sql, limit, user, warm)
        except Exception as exc:  # noqa: BLE001 - refused, or DuckDB's error: audited by run_sql
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"columns": columns, "rows": rows, "n_rows": n, "truncated": n > len(rows)})

    async def answer_html(request: Request, user: Any, params: Any, new_lesion: bool) -> str:
        """The results (or the error) of a search from the page; a request refused before the search (bad
        k, filters or new-lesion files) is audited here, one that reached the search by the search."""
        try:
            k, filters = k_of(params), search_filters(params)
            query = await query_from_request(wh, params, roots) if new_lesion else None
        except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as exc:
            message = failure(exc)[1]
            audit_refused(user, "search", {"lesion_id": None if new_lesion else params.get("lesion_id"),
                                           "new_lesion": new_lesion}, f"refused: {message}")
            return f"<p class='error'>{html.escape(message)}</p>"
        try:
            answer = similar_answer(wh, None if new_lesion else str(params.get("lesion_id")).strip(), k, filters,
                                    user.name, base(request), warm=warm, query=query, outcomes=True,
                                    space=str(params.get("space") or "") or None)
        except (KeyError, ValueError, RuntimeError) as exc:
            return f"<p class='error'>{html.escape(failure(exc)[1])}</p>"
        saving = save_form(params) if user.can(SAVE_COHORT) and not new_lesion else ""
        return results_html(answer) + saving

    async def search_page(request: Request):
        """GET: the form, and the answer for a lesion id; POST: the answer for a new lesion (files or paths)."""
        user, denied = guard(request, SEARCH, as_page=True)
        if denied is not None:
            return denied
        if request.method == "POST":
            form = await request.form(max_files=2, max_part_size=1 << 20)
            body = nav(user) + search_form({}) + await answer_html(request, user, form, new_lesion=True)
        else:
            q = request.query_params
            body = nav(user) + search_form(q)
            if q.get("lesion_id"):
                body += await answer_html(request, user, q, new_lesion=False)
        body += new_lesion_form()
        return HTMLResponse(page(f"Similar cases — {html.escape(user.name)} ({user.role})", body))

    async def cohorts_page(request: Request):
        user, denied = guard(request, SAVE_COHORT, as_page=True)
        if denied is not None:
            return denied
        form = await request.form(max_files=0)
        try:
            out = await save_cohort(user, form)
        except (ValueError, PermissionError) as exc:
            audit_refused(user, "cohort", {"name": str(form.get("name") or "")}, f"refused: {exc}")
            return HTMLResponse(page("Cohort not saved", nav(user) + f"<p class='error'>{html.escape(str(exc))}</p>"),
                                status_code=400)
        if not out["success"]:
            errors = "".join(f"<li>{html.escape(e)}</li>" for e in out["errors"])
            return HTMLResponse(page("Cohort not saved", nav(user) + f"<p class='error'>the run {out['run_id']} "
                                      f"failed:</p><ul>{errors}</ul>"), status_code=422)
        body = (nav(user) + f"<p class='ok'>Cohort <b>{html.escape(out['name'])}</b> saved as table "
                f"<code>{out['table']}</code> by Dagster run <code>{out['run_id']}</code>: it is in the Dagster UI "
                f"(asset <code>cohort</code>, partition <code>{html.escape(out['name'])}</code>, with its outcome "
                "analysis in <code>cohort_outcomes</code>).</p>")
        if user.can(SQL):
            body += (f"<p><a href='/sql?sql=SELECT+rank,+lesion_id,+patient_key,+distance,+why+FROM+{out['table']}"
                     "+ORDER+BY+rank'>read it with SQL</a></p>")
        return HTMLResponse(page(f"Cohort {html.escape(out['name'])} saved", body), status_code=201)

    async def sql_page(request: Request):
        user, denied = guard(request, SQL, as_page=True)
        if denied is not None:
            return denied
        form = await request.form(max_files=0) if request.method == "POST" else request.query_params
        sql = str(form.get("sql") or "")
        body = nav(user) + sql_form(sql)
        if sql.strip():
            try:
                columns, rows, n = await run_in_threadpool(run_sql_as, wh, sql, 200, user, warm)
                body += table_html(columns, rows, n)
            except Exception as exc:  # noqa: BLE001 - refused, or DuckDB's error: audited by run_sql
                body += f"<p class='error'>{html.escape(str(exc))}</p>"
        return HTMLResponse(page("Read-only SQL", body))

    async def login(request: Request):
        form = await request.form(max_files=0)
        token = str(form.get("token") or "")
        if authenticate(token, users) is None:
            return HTMLResponse(page("Sign in", "<p class='error'>unknown token</p>" + login_form()),
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
        Route("/", search_page, methods=["GET", "POST"]),
        Route("/cohorts", cohorts_page, methods=["POST"]), Route("/sql", sql_page, methods=["GET", "POST"]),
        Route("/login", login, methods=["POST"]), Route("/logout", logout, methods=["POST"]),
        Route("/api/similar/{lesion_id}", api_similar), Route("/api/similar", api_similar_new, methods=["POST"]),
        Route("/api/cohorts", api_cohorts, methods=["POST"]), Route("/api/sql", api_sql, methods=["POST"]),
        Route("/pictures/{folder}/{name}", pictures), Route("/healthz", healthz)])


def serve(wh: Warehouse, host: str = "127.0.0.1", port: int = 8321) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(wh), host=host, port=port, log_level="warning")
