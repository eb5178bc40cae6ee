"""Signing keys: which key signs new envelopes and which keys verify them.

Production sets ``GAE_DEFERRED_SIGNING_KEY`` (hex) or ``GAE_DEFERRED_SIGNING_KEY_FILE``, or passes
``configure(signing_key_provider=...)`` to fetch it from Secret Manager once per process. The
local stack (``make run``) generates ``.local/signing.key`` and exports its path in ``.local/env``,
so every process on the stack signs with the same key. With no key at all, defer() and the task
handler refuse to work rather than run unsigned code.
"""

from __future__ import annotations

import hashlib
import secrets
import threading

from ._config import Settings, settings
from .errors import ConfigurationError

_lock = threading.Lock()
_cache: tuple[Settings, bytes, dict[str, bytes], str] | None = None
#: Stands in for the signing key in derive_key() while none is configured (one process only).
_fallback_secret = secrets.token_bytes(32)


def key_id(key: bytes) -> str:
    """A short public name for a key, stored in envelopes so rotation can pick the right one."""
    return hashlib.sha256(b"gae_deferred key id:" + key).hexdigest()[:12]


def _resolve(current: Settings) -> tuple[bytes, dict[str, bytes]]:
    key = current.signing_key
    if key is None and current.signing_key_provider is not None:
        key = current.signing_key_provider()
        if isinstance(key, str):
            key = key.encode()
    if not key:
        raise ConfigurationError(
            "no signing key: set GAE_DEFERRED_SIGNING_KEY (hex), GAE_DEFERRED_SIGNING_KEY_FILE, "
            "or configure(signing_key_provider=...); on the local stack run `. .local/env`"
        )
    keys = {key_id(k): k for k in (key, *current.previous_signing_keys)}
    return key, keys


def signing_key() -> tuple[str, bytes]:
    """The (key id, key) that signs new envelopes."""
    cached = _cache
    if cached is None or cached[0] is not settings():
        cached = _cached()
    return cached[3], cached[1]


def verification_key(kid: str) -> bytes | None:
    """The key with this id, or None when the envelope was signed with an unknown key."""
    return _cached()[2].get(kid)


def _cached() -> tuple[Settings, bytes, dict[str, bytes], str]:
    """(settings, signing key, keys by id, the signing key's id) for the current settings:
    every defer() signs, so the id's SHA-256 is computed once per key, not per envelope."""
    global _cache
    current = settings()
    cached = _cache
    if cached is not None and cached[0] is current:
        return cached
    with _lock:
        key, keys = _resolve(current)
        cached = _cache = (current, key, keys, key_id(key))
    return cached


def derive_key(purpose: str) -> bytes:
    """A key for one purpose (``"admin csrf"``, ``"admin cursor"``) derived from the signing key.

    Every instance shares the signing key, so a derived token made by one verifies on all; without
    a signing key the process uses a random secret of its own.
    """
    try:
        secret = signing_key()[1]
    except ConfigurationError:
        secret = _fallback_secret
    return hashlib.sha256(b"gae_deferred " + purpose.encode() + b"\0" + secret).digest()
