"""A token issuer's public keys (a JSON object by key id), fetched at most once per cache period.

Both token checks use it: the task handler's for OIDC tokens on HTTP targets
(:mod:`gae_deferred.http_target`) and the dashboard's for IAP's signed header. Keys are kept for
the ``Cache-Control: max-age`` of their response; a token naming a key id not seen yet refetches
them, at most once per ``unknown_kid_refetch`` seconds, so forged key ids cannot turn every
request into a fetch.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

_MAX_AGE = re.compile(r"max-age=(\d+)")


class KeyCache:
    """The caching of one issuer's keys. ``fetch()`` returns (raw JSON, the keys by id, the
    response's Cache-Control) and raises its caller's own error when the keys cannot be had."""

    def __init__(
        self,
        fetch: Callable[[], tuple[bytes, dict[str, Any], str]],
        *,
        default_max_age: float,
        unknown_kid_refetch: float,
    ) -> None:
        self._fetch_keys = fetch
        self._default_max_age = default_max_age
        self._unknown_kid_refetch = unknown_kid_refetch
        self._lock = threading.Lock()
        self._data = b""
        self._keys: dict[str, Any] = {}
        self._expires = 0.0
        self._unknown_refetch = -float(unknown_kid_refetch)

    def get(self, kid: str) -> tuple[bytes, dict[str, Any]]:
        """(raw JSON, keys by id), fetched again when stale or when ``kid`` is new to them."""
        with self._lock:
            now = time.monotonic()
            if now >= self._expires:
                self._fetch(now)
            elif kid not in self._keys and now - self._unknown_refetch >= self._unknown_kid_refetch:
                self._unknown_refetch = now
                self._fetch(now)
            return self._data, self._keys

    def _fetch(self, now: float) -> None:
        data, keys, control = self._fetch_keys()
        match = _MAX_AGE.search(control)
        self._data = data
        self._keys = {str(kid): value for kid, value in keys.items()}
        self._expires = now + (int(match.group(1)) if match else self._default_max_age)


def token_kid(token: str) -> str:
    """The ``kid`` of a JWT's header; "" when it has none or the header cannot be read."""
    from google.auth import jwt

    try:
        return str(jwt.decode_header(token).get("kid") or "")
    except (ValueError, TypeError, AttributeError):
        return ""
