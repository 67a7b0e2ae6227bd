"""A real uvicorn serving the app on a free loopback port, in a thread of the test process (an endless event
stream would hang an in-process test client)."""

from __future__ import annotations

import socket
import threading
import time

from api.app import create_app
from api.auth import Auth
from api.settings import Settings
from search.storage import Storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    def __init__(self, tmp_path, token: str, require_token_for_reads=False, store=None, **settings):
        import uvicorn

        self.owns_store = store is None
        self.store = store or Storage(f"sqlite:///{tmp_path / 'api.db'}")
        self.store.create_schema()
        config = Settings(data_dir=tmp_path / "data", runners=0, scheduler=False, **settings)
        self.app = create_app(config, self.store, auth=Auth(token, require_token_for_reads))
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def middleware(self, cls):
        app = self.app.middleware_stack
        while app is not None and not isinstance(app, cls):
            app = getattr(app, "app", None)
        return app

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        if self.owns_store:
            self.store.close()
