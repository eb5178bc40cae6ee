"""Who may read ``/_ah/deferred-admin/metrics.prom``: any dashboard user (viewer or admin), or
a scraper sending ``Authorization: Bearer <token>``.

The token is ``settings().metrics_token`` (GAE_DEFERRED_METRICS_TOKEN) or the Secret Manager
secret version ``settings().metrics_token_secret`` (GAE_DEFERRED_METRICS_TOKEN_SECRET,
``projects/P/secrets/S/versions/latest``), read with the app's default credentials and kept
for :data:`SECRET_TTL` seconds. A scraper is a viewer: it can read this page, never act.
Tests swap how the secret is fetched::

    from gae_deferred.webapp2 import _scrape_auth
    _scrape_auth.secret_session = lambda: MySession()   # .get(url) -> .status_code, .json()
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gae_deferred import settings

from ._admin_auth import VIEWER, Admin

logger = logging.getLogger("gae_deferred.admin")

SECRET_URL = "https://secretmanager.googleapis.com/v1/{name}:access"
#: A token read from Secret Manager is reused this long (rotations take effect within it).
SECRET_TTL = 300


def _default_session() -> Any:
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return AuthorizedSession(credentials)


#: Makes the HTTP session that reads the secret (replaceable in tests).
secret_session: Callable[[], Any] = _default_session

_lock = threading.Lock()
_cached: tuple[str, str, float] | None = None  # (secret name, token, expires)


def _secret_token(name: str) -> str | None:
    global _cached
    with _lock:
        now = time.monotonic()
        if _cached is not None and _cached[0] == name and now < _cached[2]:
            return _cached[1]
        try:
            response = secret_session().get(SECRET_URL.format(name=name), timeout=10)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            token = base64.b64decode(response.json()["payload"]["data"]).decode().strip()
        except Exception as exc:  # network, auth, shape: no token now, try again next time
            logger.error("cannot read the metrics token from %s: %s", name, exc)
            return None
        _cached = (name, token, now + SECRET_TTL)
        return token


def reset() -> None:
    """Forget the token read from Secret Manager (tests; a process that rotated it)."""
    global _cached
    with _lock:
        _cached = None


def expected_token() -> str | None:
    """The bearer token scrapers must send, or None when none is configured."""
    current = settings()
    if current.metrics_token:
        return current.metrics_token
    if current.metrics_token_secret:
        return _secret_token(current.metrics_token_secret)
    return None


def scraper(environ: dict[str, Any]) -> Admin | None:
    """A viewer for a request with the right bearer token, else None."""
    header = environ.get("HTTP_AUTHORIZATION") or ""
    if not header.startswith("Bearer "):
        return None
    sent = header[len("Bearer ") :].strip()
    expected = expected_token()
    if expected and sent and hmac.compare_digest(sent.encode(), expected.encode()):
        return Admin("metrics scraper", "token", role=VIEWER)
    return None
