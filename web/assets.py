"""The dashboard's static files and the offline API docs.

`/static/` serves `web/static/`, with plotly.js in `web/static/vendor/plotly-basic.min.js`: the official
"basic" bundle of plotly.js 4.1.1 (scatter, bar and pie traces; MIT, its licence beside it), the same release
that the `plotly` Python package ships as its full bundle. The full bundle is four times larger and took 1.7 s
to evaluate on a 2-core machine against 0.45 s for the basic one (benchmarks/results/dashboard_load.md);
the pages draw scatter traces only. The major is pinned: plotly.js changes its title and event formats
across majors. `/static/vendor/docs/` serves the Swagger UI and ReDoc bundles of `fastapi-standalone-docs`,
which `/docs` and `/redoc` load, so both work without a network.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
PLOTLY_JS = STATIC_DIR / "vendor" / "plotly-basic.min.js"
PLOTLY_MAJOR = 4  # the plotly.js major the dashboard is written for


def plotly_js_major(path: Path) -> int:
    """The major version in the bundle's banner ('plotly.js (basic - minified) v4.1.1')."""
    banner = re.search(r"plotly\.js[^\n]* v(\d+)\.", path.read_bytes()[:200].decode("ascii", "replace"))
    return int(banner.group(1)) if banner else -1


def docs_assets() -> Path:
    return Path(str(files("fastapi_standalone_docs") / "static"))


def install_assets(app: FastAPI) -> None:
    """Static files (plotly.js among them), and /docs + /redoc served from local files."""
    if plotly_js_major(PLOTLY_JS) != PLOTLY_MAJOR:
        raise RuntimeError(f"{PLOTLY_JS} is not plotly.js {PLOTLY_MAJOR}.x")
    docs = docs_assets()
    if not (docs / "swagger" / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(
            f"the Swagger UI bundle is missing under {docs}: pip install fastapi-standalone-docs"
        )
    app.mount("/static/vendor/docs", StaticFiles(directory=docs), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    def _swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url="/static/vendor/docs/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/docs/swagger/swagger-ui.css",
            swagger_favicon_url="/static/vendor/docs/fastapi/favicon.png",
        )

    @app.get("/redoc/logo-mini.svg", include_in_schema=False)
    def _redoc_logo() -> FileResponse:  # ReDoc asks for it beside the page
        return FileResponse(docs / "redoc" / "logo-mini.svg", media_type="image/svg+xml")

    @app.get("/redoc", include_in_schema=False)
    def _redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url="/static/vendor/docs/redoc/redoc.standalone.js",
            redoc_favicon_url="/static/vendor/docs/fastapi/favicon.png",
            with_google_fonts=False,
        )
