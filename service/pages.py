"""The browser side: the web page at ``/`` and the interactive API docs at ``/docs``, both offline.

Everything they load is served by the app from ``service/static`` (vanilla JavaScript, no
build step; Swagger UI's files are vendored, see ``static/swagger-ui/README.md``), so they
work on a host without internet access.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
STATIC_URL = "/static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The web page: score, sample, round trip and the model card."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/docs")
async def docs() -> HTMLResponse:
    """Swagger UI from the app's own copy of its files."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="Glow service - API docs",
        swagger_js_url=f"{STATIC_URL}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_URL}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_URL}/swagger-ui/favicon-32x32.png",
    )


def add_pages(app: FastAPI) -> None:
    """Serve the page, the docs and their static files (the app must be built with ``docs_url=None``)."""
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="static")
