"""The API's routers (thin: validation in api/schemas.py, state through search.storage.Storage)."""

from api.routes import candidates, jobs, meta, schedules, searches, studies, views

ROUTERS = (
    meta.router,
    searches.router,
    views.router,
    candidates.router,
    jobs.router,
    schedules.router,
    studies.router,
)
