"""Who may use /_ah/deferred-admin: default deny, then the first check that says yes.

1. Local mode (``settings().local_mode``) and a loopback client: admin, "local mode" badge.
2. An IAP JWT in ``x-goog-iap-jwt-assertion`` that verifies for ``settings().iap_audience``.
3. App Engine's ``X-Appengine-User-Is-Admin: 1`` (``login: admin`` in app.yaml), trusted only
   on App Engine (``GAE_ENV`` set), where the front end strips it from outside requests.
4. ``settings().admin_hook(environ)`` returning a user name.

Tests (or apps behind another proxy) can swap how IAP certificates are fetched::

    from gae_deferred.webapp2 import _admin_auth
    _admin_auth.iap_transport = lambda: MyRequest()   # a google.auth.transport.Request
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

from gae_deferred import settings

logger = logging.getLogger("gae_deferred.admin")

IAP_HEADER = "x-goog-iap-jwt-assertion"
IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key"
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


def _default_transport() -> Any:
    import google.auth.transport.requests

    return google.auth.transport.requests.Request()


#: Makes the google.auth transport that fetches IAP's public keys (replaceable in tests).
iap_transport: Callable[[], Any] = _default_transport


@dataclasses.dataclass(frozen=True)
class Admin:
    """An authenticated dashboard user; ``actor`` is what the audit log records."""

    actor: str
    via: str
    local_mode: bool = False


def verify_iap_jwt(token: str, audience: str) -> dict[str, Any]:
    """The claims of a valid IAP JWT for ``audience``; raises ValueError (or a google.auth
    error) when the signature, audience, issuer or expiry is wrong."""
    from google.oauth2 import id_token

    claims = id_token.verify_token(
        token, iap_transport(), audience=audience, certs_url=IAP_CERTS_URL
    )
    if claims.get("iss") != "https://cloud.google.com/iap":
        raise ValueError(f"IAP JWT has issuer {claims.get('iss')!r}")
    return dict(claims)


def _on_app_engine() -> bool:
    return bool(os.environ.get("GAE_ENV"))


def authenticate(environ: dict[str, Any]) -> Admin | None:
    """The admin making this request, or None (the caller answers 403)."""
    current = settings()
    if current.local_mode and environ.get("REMOTE_ADDR") in _LOOPBACK:
        return Admin(f"local ({environ['REMOTE_ADDR']})", "local", local_mode=True)
    token = environ.get("HTTP_X_GOOG_IAP_JWT_ASSERTION")
    if token and current.iap_audience:
        try:
            claims = verify_iap_jwt(token, current.iap_audience)
        except Exception as exc:  # any verification failure is a plain "not admin"
            logger.warning("rejected IAP JWT: %s", exc)
        else:
            return Admin(str(claims.get("email") or claims.get("sub")), "iap", current.local_mode)
    if _on_app_engine() and environ.get("HTTP_X_APPENGINE_USER_IS_ADMIN") == "1":
        user = environ.get("HTTP_X_APPENGINE_USER_EMAIL") or "app engine admin"
        return Admin(user, "appengine", current.local_mode)
    if current.admin_hook is not None:
        user = current.admin_hook(environ)
        if user:
            return Admin(str(user), "hook", current.local_mode)
    return None


def is_cron(environ: dict[str, Any]) -> bool:
    """App Engine cron: the header is set by App Engine and stripped from outside requests."""
    return _on_app_engine() and environ.get("HTTP_X_APPENGINE_CRON") == "true"
