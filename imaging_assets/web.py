"""``imaging-assets serve``: the warehouse's pictures over HTTP (Starlette + uvicorn; no Dagster here).

The Dagster UI shows markdown metadata inline only when it is short (under 1,000 characters), so a plot
carried as a data URI sits behind "Show Markdown". With this server running and
``IMAGING_ASSETS_PICTURES_URL`` pointing at it (``make dev`` does both), asset metadata links the stored
file instead and the UI shows the picture on the asset page.

Routes: ``GET /pictures/thumbnails/<lesion_id>.png`` (one lesion), ``GET /pictures/plots/<name>.png`` (plots
and montages, content-addressed), ``GET /healthz``. Only those two folders of the warehouse are served, by
names that cannot leave them. The server binds to loopback by default.
"""

from __future__ import annotations

import re
from pathlib import Path

from imaging_assets.store.warehouse import Warehouse

#: Folders of the warehouse the server publishes.
PICTURE_FOLDERS = ("thumbnails", "plots")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.png$")


def picture_file(wh: Warehouse, folder: str, name: str) -> Path | None:
    """The file a picture URL names, or None (unknown folder, a name that could leave it, no such file)."""
    if folder not in PICTURE_FOLDERS or not _NAME.match(name) or ".." in name:
        return None
    path = Path(wh.root) / folder / name
    return path if path.is_file() else None


def create_app(wh: Warehouse):
    """The Starlette application serving ``wh``'s pictures."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def pictures(request):
        path = picture_file(wh, request.path_params["folder"], request.path_params["name"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        # plots are content-addressed (never change); a thumbnail changes when its lesion does
        cache = "public, max-age=31536000, immutable" if request.path_params["folder"] == "plots" else "no-cache"
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": cache})

    async def healthz(request):
        return JSONResponse({"ok": True, "warehouse": str(wh.root)})

    return Starlette(routes=[Route("/pictures/{folder}/{name}", pictures), Route("/healthz", healthz)])


def serve(wh: Warehouse, host: str = "127.0.0.1", port: int = 8321) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(wh), host=host, port=port, log_level="warning")
