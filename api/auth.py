"""Bearer-token auth for the coordinator API.

Mutating routes need `Authorization: Bearer <token>`. The token comes from, in order:

- the environment variable `HYBRIDNAS_TOKEN`;
- else the file `<data_dir>/token`, generated at first start (`secrets.token_urlsafe(32)`) and written with
  mode 0600 (readable by its owner only). Its PATH is logged, never the token.

Reads are public unless `HYBRIDNAS_REQUIRE_TOKEN_FOR_READS=true` (`/api/health` and `/api/ready` stay public
for probes). These two settings are read here (pydantic-settings, prefix `HYBRIDNAS_`, as `api/settings.py`)
so that `Settings` keeps only what the rest of the project shares. Tokens are compared in constant time
(`hmac.compare_digest`, on UTF-8 bytes so a non-ASCII header is a plain mismatch, never an error).

A browser cannot send a bearer header from a form, so the dashboard's log-in page trades the token for a
session cookie (`Auth.new_session`): `<issued>.<nonce>.<HMAC>`, signed with the token itself (a new token ends
every session), HttpOnly, SameSite=Strict, valid for `SESSION_MAX_AGE_S`. A session counts as the token for
reads; a state-changing request with a session also needs its CSRF token (`Auth.csrf_token`, an HMAC of the
session) in the `X-CSRF-Token` header or the form's `csrf_token` field.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("hybridnas.api.auth")

TOKEN_FILE = "token"
SESSION_COOKIE = "hybridnas_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SESSION_MAX_AGE_S = 7 * 24 * 3600


class AuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYBRIDNAS_", env_file=".env", extra="ignore")

    token: SecretStr | None = Field(None, description="the API bearer token (default: <data_dir>/token)")
    require_token_for_reads: bool = Field(
        False,
        description="reads need the token (or a dashboard session) too; /api/health and /api/ready stay "
        "public",
    )


@dataclass(frozen=True)
class Auth:
    token: str
    require_token_for_reads: bool = False
    token_path: Path | None = None  # where the token was read or written (None: from the environment)

    def check(self, given: str | None) -> bool:
        if not given:
            return False
        return hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))

    def _sign(self, purpose: str, message: str) -> str:
        key = self.token.encode("utf-8")
        return hmac.new(key, f"{purpose}:{message}".encode(), hashlib.sha256).hexdigest()

    def new_session(self, now: float | None = None) -> str:
        """A session cookie's value, for a browser that showed the token."""
        body = f"{int(now if now is not None else time.time())}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign('session', body)}"

    def session_ok(self, value: str | None, now: float | None = None) -> bool:
        """A cookie this token signed, not older than SESSION_MAX_AGE_S (nor from the future)."""
        if not value or value.count(".") != 2:
            return False
        body, _, signature = value.rpartition(".")
        if not hmac.compare_digest(
            signature.encode("utf-8", "replace"), self._sign("session", body).encode()
        ):
            return False
        issued = int(body.split(".", 1)[0]) if body.split(".", 1)[0].isdigit() else -1
        age = (now if now is not None else time.time()) - issued
        return issued >= 0 and -60 <= age <= SESSION_MAX_AGE_S

    def csrf_token(self, session: str) -> str:
        """The CSRF token that goes with a session (forms and state-changing fetches carry it)."""
        return self._sign("csrf", session)

    def csrf_ok(self, session: str | None, given: str | None) -> bool:
        if not session or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.csrf_token(session).encode())


def load_or_create_token(data_dir: Path) -> tuple[str, Path]:
    """The token in `<data_dir>/token`, made (mode 0600) if missing or empty."""
    path = Path(data_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("API token file %s was readable by others (mode %o): now 0600", path, mode)
        token = path.read_text(encoding="utf-8").strip()
        if token:
            log.info("API token read from %s", path)
            return token, path
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, but make the mode explicit
        os.write(fd, (token + "\n").encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    log.info("API token generated and written to %s (readable by its owner only)", path)
    return token, path


def build_auth(data_dir: Path, settings: AuthSettings | None = None) -> Auth:
    settings = settings or AuthSettings()
    if settings.token is not None and settings.token.get_secret_value().strip():
        log.info("API token taken from HYBRIDNAS_TOKEN")
        return Auth(settings.token.get_secret_value().strip(), settings.require_token_for_reads)
    token, path = load_or_create_token(data_dir)
    return Auth(token, settings.require_token_for_reads, path)


_bearer = HTTPBearer(auto_error=False, description="HYBRIDNAS_TOKEN, or the token file in the data dir")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=message, headers={"WWW-Authenticate": "Bearer"})


def session_of(request: Request) -> str | None:
    """The request's valid dashboard session cookie, else None."""
    value = request.cookies.get(SESSION_COOKIE)
    return value if request.app.state.auth.session_ok(value) else None


def _verify(
    request: Request, credentials: HTTPAuthorizationCredentials | None, *, changes_state: bool = True
) -> None:
    auth: Auth = request.app.state.auth
    if credentials is None and (session := session_of(request)) is not None:
        if changes_state and not auth.csrf_ok(session, request.headers.get(CSRF_HEADER)):
            raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"missing or invalid {CSRF_HEADER}")
        return
    if credentials is None:
        raise _unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>' (HYBRIDNAS_TOKEN, or the "
            "token file whose path the server logged at start)"
        )
    if not auth.check(credentials.credentials):
        raise _unauthorized("invalid bearer token")


def require_token(request: Request, credentials: BearerCredentials) -> None:
    """Dependency of every mutating route."""
    _verify(request, credentials)


def require_read_token(request: Request, credentials: BearerCredentials) -> None:
    """Dependency of read routes: a no-op unless HYBRIDNAS_REQUIRE_TOKEN_FOR_READS is set."""
    if request.app.state.auth.require_token_for_reads:
        _verify(request, credentials, changes_state=False)
