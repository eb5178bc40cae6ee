"""CSRF protection for the dashboard: a random secret in a cookie, an HMAC of it in forms.

The cookie (HttpOnly, SameSite=Strict, Secure on https) holds a random secret; the token
is HMAC(server key, secret), so a page of another origin can neither read nor compute it::

    secret, fresh = csrf.cookie_secret(request)
    token = csrf.token_for(secret)            # put in forms / send as X-CSRF-Token
    csrf.valid(request)                       # on every POST
"""

from __future__ import annotations

import hmac
import re
import secrets

import webob

from gae_deferred import admin, defaults

COOKIE = "deferred_admin_csrf"
HEADER = "X-CSRF-Token"
FIELD = "csrf_token"
_SECRET = re.compile(r"^[0-9a-f]{64}$")


def cookie_secret(request: webob.Request) -> tuple[str, bool]:
    """The request's secret, or a new one; the bool says the cookie must be (re)set."""
    secret = request.cookies.get(COOKIE, "")
    if _SECRET.match(secret):
        return secret, False
    return secrets.token_hex(32), True


def set_cookie(response: webob.Response, request: webob.Request, secret: str) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        path=defaults.ADMIN_PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.scheme == "https",
    )


def token_for(secret: str) -> str:
    # An attacker who can plant a cookie still cannot compute its token (admin.csrf_token).
    return admin.csrf_token(secret)


def valid(request: webob.Request) -> bool:
    """True when the POST carries the token of its own cookie (form field or header)."""
    secret = request.cookies.get(COOKIE, "")
    if not _SECRET.match(secret):
        return False
    sent = request.headers.get(HEADER) or request.POST.get(FIELD) or ""
    return hmac.compare_digest(sent.encode(), token_for(secret).encode())
