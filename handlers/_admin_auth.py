"""Who may use /_ah/deferred-admin: default deny, then the first check that says yes.

1. Local mode (``settings().local_mode``), a loopback client and a loopback ``Host``
   (``127.0.0.1``, ``localhost``, ``[::1]``; with ``settings().local_port`` that port): admin,
   "local mode" badge. The Host check keeps a DNS-rebinding page off the dashboard.
2. An IAP JWT in ``x-goog-iap-jwt-assertion`` that verifies for ``settings().iap_audience``
   against IAP's public keys, fetched once per their ``Cache-Control: max-age``.
3. App Engine's ``X-Appengine-User-Is-Admin: 1`` (``login: admin`` in app.yaml), trusted only
   on App Engine (``GAE_ENV`` set), where the front end strips it from outside requests.
4. ``settings().admin_hook(environ)`` returning a user name; then
   ``settings().viewer_hook(environ)`` (a read-only user).

Roles: a viewer sees every page, an admin may also act. IAP users are admins unless
``GAE_DEFERRED_ADMIN_EMAILS`` is set; then admins are the listed emails (or ``@domain``) and
viewers those on ``GAE_DEFERRED_VIEWER_EMAILS`` (``*``: anyone IAP lets in); others are refused.

The cron URL has its own check (:func:`cron_caller`). Tests (or apps behind another proxy) can
swap how IAP certificates are fetched::

    from gae_deferred.webapp2 import _admin_auth
    _admin_auth.iap_transport = lambda: MyRequest()   # a google.auth.transport.Request
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from gae_deferred import settings
from gae_deferred._key_cache import KeyCache

logger = logging.getLogger("gae_deferred.admin")

IAP_HEADER = "x-goog-iap-jwt-assertion"
IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key"
#: Keys are kept this long when the certificate response says nothing about caching.
IAP_DEFAULT_MAX_AGE = 300
#: A token naming a key we do not have refetches the keys at most this often.
IAP_UNKNOWN_KID_REFETCH = 30
_LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
_LOCAL_HOST = re.compile(r"^(127\.0\.0\.1|localhost|\[::1\])(?::(\d{1,5}))?$")


def _default_transport() -> Any:
    import google.auth.transport.requests

    return google.auth.transport.requests.Request()


#: Makes the google.auth transport that fetches IAP's public keys (replaceable in tests).
iap_transport: Callable[[], Any] = _default_transport


class KeysUnavailable(Exception):
    """IAP's public keys could not be fetched: the dashboard answers 503, not 403."""


ADMIN, VIEWER = "admin", "viewer"
#: Local mode only: a request with this header set to "viewer" is served as a viewer (to see
#: what read-only users see). It can only take rights away.
ROLE_HEADER = "HTTP_X_DEFERRED_ROLE"


@dataclasses.dataclass(frozen=True)
class Admin:
    """An authenticated dashboard user; ``actor`` is what the audit log records. A ``viewer``
    sees every page; only an ``admin`` may act (POST)."""

    actor: str
    via: str
    local_mode: bool = False
    role: str = ADMIN

    @property
    def can_act(self) -> bool:
        return self.role == ADMIN


def _listed(email: str, entries: tuple[str, ...]) -> bool:
    email = email.lower()
    return any(
        entry == "*" or entry == email or (entry.startswith("@") and email.endswith(entry))
        for entry in entries
    )


def iap_role(email: str) -> str | None:
    """The role of an IAP user: admin when no admin list is configured (everyone IAP lets in,
    as before roles existed); else admin if on GAE_DEFERRED_ADMIN_EMAILS, viewer if on
    GAE_DEFERRED_VIEWER_EMAILS, None (refused) otherwise."""
    current = settings()
    if not current.admin_emails or _listed(email, current.admin_emails):
        return ADMIN
    if _listed(email, current.viewer_emails):
        return VIEWER
    return None


def _fetch_iap_keys() -> tuple[bytes, dict[str, Any], str]:
    try:
        response = iap_transport()(url=IAP_CERTS_URL, method="GET")
        status = response.status
        certs = json.loads(response.data) if status == 200 else None
    except Exception as exc:  # network, TLS, JSON: all mean "no keys now"
        raise KeysUnavailable(f"cannot fetch IAP's public keys: {exc}") from exc
    if not isinstance(certs, dict):
        raise KeysUnavailable(f"cannot fetch IAP's public keys: HTTP {status}")
    control = {k.lower(): v for k, v in dict(response.headers or {}).items()}
    return (
        response.data,
        {str(k): str(v) for k, v in certs.items()},
        control.get("cache-control", ""),
    )


def _new_iap_keys() -> KeyCache:
    """IAP's public keys (kid -> PEM), fetched at most once per cache period."""
    return KeyCache(
        _fetch_iap_keys,
        default_max_age=IAP_DEFAULT_MAX_AGE,
        unknown_kid_refetch=IAP_UNKNOWN_KID_REFETCH,
    )


_iap_keys = _new_iap_keys()


def reset_iap_keys() -> None:
    """Forget the cached IAP keys (tests; a process that changed iap_transport)."""
    global _iap_keys
    _iap_keys = _new_iap_keys()


def _token_kid(token: str) -> str:
    header = token.split(".", 1)[0]
    try:
        data = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except ValueError as exc:
        raise ValueError("IAP JWT header is not base64 JSON") from exc
    if not isinstance(data, dict):
        raise ValueError("IAP JWT header is not a JSON object")
    return str(data.get("kid", ""))


def verify_iap_jwt(token: str, audience: str) -> dict[str, Any]:
    """The claims of a valid IAP JWT for ``audience``; raises ValueError (or a google.auth
    error) when the signature, audience, issuer or expiry is wrong, KeysUnavailable when the
    keys cannot be fetched."""
    from google.auth import jwt

    _, certs = _iap_keys.get(_token_kid(token))
    claims = jwt.decode(token, certs=certs, audience=audience)
    if claims.get("iss") != "https://cloud.google.com/iap":
        raise ValueError(f"IAP JWT has issuer {claims.get('iss')!r}")
    return dict(claims)


def _on_app_engine() -> bool:
    return bool(os.environ.get("GAE_ENV"))


def local_host_ok(environ: dict[str, Any]) -> bool:
    """The Host header names this machine (and the local port, when one is configured)."""
    match = _LOCAL_HOST.match((environ.get("HTTP_HOST") or "").lower())
    if not match:
        return False
    port = settings().local_port
    return port is None or int(match.group(2) or 80) == port


def denial(environ: dict[str, Any]) -> str:
    """Why :func:`authenticate` said no, for the 403 page."""
    if settings().local_mode and environ.get("REMOTE_ADDR") in _LOOPBACK:
        return (
            "Local mode answers only requests for 127.0.0.1, localhost or [::1]"
            + (f" on port {settings().local_port}" if settings().local_port else "")
            + f", not for Host {environ.get('HTTP_HOST')!r}."
        )
    return "Admins only: this dashboard needs an administrator login."


def authenticate(environ: dict[str, Any]) -> Admin | None:
    """The admin making this request, or None (the caller answers 403).

    Raises KeysUnavailable when an IAP token came but IAP's keys cannot be fetched.
    """
    current = settings()
    if current.local_mode and environ.get("REMOTE_ADDR") in _LOOPBACK and local_host_ok(environ):
        role = VIEWER if environ.get(ROLE_HEADER) == VIEWER else ADMIN
        return Admin(f"local ({environ['REMOTE_ADDR']})", "local", local_mode=True, role=role)
    token = environ.get("HTTP_X_GOOG_IAP_JWT_ASSERTION")
    if token and current.iap_audience:
        try:
            claims = verify_iap_jwt(token, current.iap_audience)
        except KeysUnavailable:
            raise
        except Exception as exc:  # any verification failure is a plain "not admin"
            logger.warning("rejected IAP JWT: %s", exc)
        else:
            email = str(claims.get("email") or claims.get("sub"))
            role = iap_role(email)
            if role is not None:
                return Admin(email, "iap", current.local_mode, role)
    if _on_app_engine() and environ.get("HTTP_X_APPENGINE_USER_IS_ADMIN") == "1":
        user = environ.get("HTTP_X_APPENGINE_USER_EMAIL") or "app engine admin"
        return Admin(user, "appengine", current.local_mode)
    if current.admin_hook is not None:
        user = current.admin_hook(environ)
        if user:
            return Admin(str(user), "hook", current.local_mode)
    if current.viewer_hook is not None:
        user = current.viewer_hook(environ)
        if user:
            return Admin(str(user), "viewer hook", current.local_mode, VIEWER)
    return None


def cron_caller(environ: dict[str, Any]) -> Admin | None:
    """App Engine cron (its header, trusted only where GAE_ENV is set and App Engine strips it
    from outside requests) or a caller holding ``settings().cron_token`` (the local stack)."""
    if _on_app_engine() and environ.get("HTTP_X_APPENGINE_CRON") == "true":
        return Admin("cron", "cron")
    expected = settings().cron_token
    sent = environ.get("HTTP_X_DEFERRED_CRON_TOKEN") or ""
    if expected and sent and hmac.compare_digest(sent.encode(), expected.encode()):
        return Admin("cron (token)", "cron-token")
    return None
