"""The dashboard: static files served by the daemon itself, talking only to the public REST API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
UI_PREFIX = "/ui"

router = APIRouter()


# Not a JSON route: kept out of /openapi.json so that the schema stays the API's contract.
@router.get("/", include_in_schema=False)
async def dashboard() -> FileResponse:
    # no-cache (revalidate, not "never store"): an upgraded daemon's page is picked up at once.
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/ui/`."""
    app.include_router(router)
    app.mount(UI_PREFIX, StaticFiles(directory=WEB_DIR), name="ui")
