"""The dashboard: server-rendered pages (Jinja2, `web/templates/`) with a little JavaScript
(`web/static/`), plotted with the plotly.js that the `plotly` package ships, updated live from the API's
event stream. Everything it loads is served by the app itself (the machine may be offline).

`web.pages` holds the routes (thin: they read through `search.storage.Storage` and the API's own
functions), `web.views` what the templates show, `web.assets` the static files and the offline API docs.
"""
