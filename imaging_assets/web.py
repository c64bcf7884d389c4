"""``imaging-assets serve``: similar-case search over HTTP, with access control (Starlette + uvicorn).

Who may do what
    Every request but ``/healthz`` carries a token of :mod:`imaging_assets.access` (``Authorization: Bearer
    <token>``, or the ``ia_token`` cookie the login form sets): none or an unknown one gets 401, a role
    without the permission 403. Every search is audited with the user's name (``audit_log.user``).

Pictures
    The Dagster UI shows markdown metadata inline only when it is short, so asset metadata links the
    stored pictures here (``IMAGING_ASSETS_PICTURES_URL``; ``make dev`` runs this server and sets it). A
    browser's ``<img>`` cannot send a bearer token, so those links are **signed**: ``?sig=`` is an HMAC of
    the file's name with the warehouse's picture key (:func:`imaging_assets.stages.thumbnails.picture_url`);
    a signed link opens that one picture only, an unsigned one needs a token. Only ``thumbnails/`` and
    ``plots/`` are served, by names that cannot leave them.

Routes
    ``GET /api/similar/{lesion_id}?k=10&modality=CT&space=&date_from=&date_to=&min_volume=&max_volume=&cluster=``
    (permission ``search``): ``{"reference": {...}, "results": [{"rank", "lesion_id", "patient_key",
    "distance", "modality", ..., "explanation": {...}, "thumbnail_url"}]}``;
    ``GET /`` a small search page (same permission; a login form without a token);
    ``POST /login`` (form field ``token``) sets the cookie; ``GET /pictures/{folder}/{name}``;
    ``GET /healthz``. The server binds to loopback by default (see the README for a reverse proxy).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from imaging_assets.store.warehouse import Warehouse

#: Folders of the warehouse the server publishes.
PICTURE_FOLDERS = ("thumbnails", "plots")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.png$")
COOKIE = "ia_token"


def picture_file(wh: Warehouse, folder: str, name: str) -> Path | None:
    """The file a picture URL names, or None (unknown folder, a name that could leave it, no such file)."""
    if folder not in PICTURE_FOLDERS or not _NAME.match(name) or ".." in name:
        return None
    path = Path(wh.root) / folder / name
    return path if path.is_file() else None


def _filters(params: Any) -> dict[str, Any]:
    """The structured filters of a query string (modality, space, date range, volume range, cluster)."""
    f: dict[str, Any] = {}
    for col in ("modality", "roi_name", "body_part"):
        vals = [v for raw in params.getlist(col) for v in raw.split(",") if v.strip()]
        if vals:
            f[col] = [v.strip() for v in vals]
    clusters = [v for raw in params.getlist("cluster") for v in raw.split(",") if v.strip()]
    if clusters:
        f["cluster"] = [int(v) for v in clusters]
    if params.get("date_from") or params.get("date_to"):
        f["study_date"] = (params.get("date_from") or None, params.get("date_to") or None)
    if params.get("min_volume") or params.get("max_volume"):
        f["volume_mm3"] = (float(params["min_volume"]) if params.get("min_volume") else None,
                           float(params["max_volume"]) if params.get("max_volume") else None)
    return f


def similar_answer(wh: Warehouse, lesion_id: str, k: int, filters: dict[str, Any], user: str,
                   picture_base: str, one_per_patient: bool = True, index: Any = None) -> dict[str, Any]:
    """The JSON answer of ``/api/similar``: the reference and the results with explanations and the
    (signed) URLs of their pictures."""
    from imaging_assets.stages.cohorts import reference_row
    from imaging_assets.stages.similar import explain_similar, find_similar
    from imaging_assets.stages.thumbnails import picture_url

    found = find_similar(lesion_id, k=k, where=filters or None, warehouse=wh, one_per_patient=one_per_patient,
                         user=user, index=index)
    explanations = explain_similar(wh, found, reference_lesion_id=lesion_id)
    ref = reference_row(wh, lesion_id)
    ref["thumbnail_url"] = picture_url(wh, picture_base, "thumbnails", f"{lesion_id}.png")
    ref.pop("thumbnail", None)
    results = []
    for row, e in zip(found.to_dicts(), explanations):
        results.append({**{k: (str(v) if k == "study_date" and v is not None else v) for k, v in row.items()},
                        "explanation": e.to_dict(),
                        "thumbnail_url": picture_url(wh, picture_base, "thumbnails", f"{row['lesion_id']}.png")})
    return {"reference": ref, "results": results}


def create_app(wh: Warehouse, users: str | Path | None = None):
    """The Starlette application over ``wh``; users from ``users`` (default: the settings' users file)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    from imaging_assets.access import SEARCH, authenticate
    from imaging_assets.stages.thumbnails import picture_signature_ok
    from imaging_assets.store.lance.memory import MemoryIndex

    warm: dict[str, Any] = {}

    def memory() -> Any:
        """The vectors kept in memory (loaded on first use; refreshed by each search when the table moved)."""
        if "index" not in warm:
            try:
                warm["index"] = MemoryIndex.load(wh.lance_uri)
            except (FileNotFoundError, ValueError, OSError):  # no vector table yet: searches say so
                return None
        return warm["index"]

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
                return None, HTMLResponse(_page("Not allowed", f"<p>{html.escape(message)}</p>"), status_code=403)
            return None, JSONResponse({"error": message}, status_code=403)
        return user, None

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/pictures"

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
        try:
            k = int(request.query_params.get("k", "10"))
            if not 1 <= k <= 500:
                raise ValueError("k must be between 1 and 500")
            filters = _filters(request.query_params)
            answer = similar_answer(wh, request.path_params["lesion_id"], k, filters, user.name, base(request),
                                    one_per_patient=request.query_params.get("all_lesions") not in ("1", "true"),
                                    index=memory())
        except KeyError as exc:
            return JSONResponse({"error": str(exc.args[0] if exc.args else exc)}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(answer)

    async def search_page(request: Request):
        user, denied = guard(request, SEARCH, page=True)
        if denied is not None:
            return denied
        q = request.query_params
        body = _search_form(q)
        if q.get("lesion_id"):
            try:
                answer = similar_answer(wh, q["lesion_id"].strip(), int(q.get("k") or 10), _filters(q), user.name,
                                        base(request), index=memory())
                body += _results_html(answer)
            except (KeyError, ValueError) as exc:
                body += f"<p class='error'>{html.escape(str(exc.args[0] if exc.args else exc))}</p>"
        return HTMLResponse(_page(f"Similar cases — {html.escape(user.name)} ({user.role})", body))

    async def login(request: Request):
        form = await request.form()
        token = str(form.get("token") or "")
        if authenticate(token, users) is None:
            return HTMLResponse(_page("Sign in", "<p class='error'>unknown token</p>" + _login_form()),
                                status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="lax", secure=request.url.scheme == "https")
        return response

    async def healthz(request: Request):
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/", search_page), Route("/login", login, methods=["POST"]), Route("/api/similar/{lesion_id}", api_similar),
        Route("/pictures/{folder}/{name}", pictures), Route("/healthz", healthz)])


def serve(wh: Warehouse, host: str = "127.0.0.1", port: int = 8321) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(wh), host=host, port=port, log_level="warning")


# ------------------------------------------------------------------------------------------------ pages
_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:1200px}
table{border-collapse:collapse}td,th{padding:.3rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;text-align:left}
img.thumb{width:300px;height:auto;background:#111}.bar{display:inline-block;height:.7rem;background:#4a7}
.error{color:#b00}form.search input{margin:.2rem .4rem .2rem 0}small{color:#555}"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_STYLE}</style>"
            f"</head><body><h1>{title}</h1>{body}</body></html>")


def _login_form() -> str:
    return ("<form method='post' action='/login'><label>Access token <input type='password' name='token' "
            "size='60' autofocus></label> <button type='submit'>Sign in</button></form>"
            "<p><small>An administrator makes one with <code>imaging-assets users add NAME --role viewer</code>."
            "</small></p>")


def _search_form(q: Any) -> str:
    def field(name: str, label: str, size: int = 10) -> str:
        return (f"<label>{label} <input name='{name}' size='{size}' "
                f"value='{html.escape(q.get(name) or '', quote=True)}'></label>")

    return ("<form class='search' method='get' action='/'>" + field("lesion_id", "Lesion id", 20) +
            field("k", "k", 3) + field("modality", "Modality", 6) + field("date_from", "Date from") +
            field("date_to", "to") + field("min_volume", "Volume from (mm³)", 8) + field("max_volume", "to", 8) +
            field("cluster", "Cluster", 4) + " <button type='submit'>Search</button></form>")


def _results_html(answer: dict[str, Any]) -> str:
    from imaging_assets.features.explain import percentile_words as _pct

    ref = answer["reference"]
    out = [f"<h2>Reference {html.escape(str(ref.get('lesion_id')))}</h2><p><img class='thumb' "
           f"src='{html.escape(ref['thumbnail_url'], quote=True)}' alt='reference'><br>{html.escape(str(ref.get('modality')))}"
           f" {html.escape(str(ref.get('roi_name')))}, {(ref.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster "
           f"{ref.get('cluster')}</p><h2>{len(answer['results'])} closest patients</h2><table>"
           "<tr><th>#</th><th>picture</th><th>lesion</th><th>why it is close</th></tr>"]
    for r in answer["results"]:
        e = r["explanation"]
        groups = "".join(f"<div>{html.escape(g)} <span class='bar' style='width:{s * 150:.0f}px'></span> {s:.0%}</div>"
                         for g, s in sorted(e["groups"].items(), key=lambda kv: -kv[1]) if s >= 0.01)

        def items(key: str, e: dict = e) -> str:
            return "".join(
                f"<li>{html.escape(c['name'])}: {_pct(c['reference_percentile'])} vs {_pct(c['neighbour_percentile'])}</li>"
                for c in e[key][:3])

        out.append(
            f"<tr><td>{r['rank']}</td><td><img class='thumb' src='{html.escape(r['thumbnail_url'], quote=True)}' "
            f"alt='lesion {html.escape(r['lesion_id'])}'></td><td><code>{html.escape(r['lesion_id'])}</code><br>"
            f"d = {r['distance']:.2f}<br>{html.escape(str(r.get('modality')))} {html.escape(str(r.get('roi_name')))}<br>"
            f"{(r.get('volume_mm3') or 0) / 1000:.1f} cm³, cluster {r.get('cluster')}<br>"
            f"<small>{html.escape(str(r.get('patient_key')))}</small></td><td>{groups}<b>agree</b><ul>{items('agree')}</ul>"
            f"<b>differ</b><ul>{items('differ')}</ul></td></tr>")
    out.append("</table>")
    return "".join(out)

