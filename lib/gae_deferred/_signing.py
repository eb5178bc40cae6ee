"""Signing keys: which key signs new envelopes and which keys verify them.

Production sets ``GAE_DEFERRED_SIGNING_KEY`` (hex) or ``GAE_DEFERRED_SIGNING_KEY_FILE``, or passes
``configure(signing_key_provider=...)`` to fetch it from Secret Manager once per process. The
local stack (``make run``) generates ``.local/signing.key`` and exports its path in ``.local/env``,
so every process on the stack signs with the same key. With no key at all, defer() and the task
handler refuse to work rather than run unsigned code.
"""

from __future__ import annotations

import hashlib
import threading

from ._config import Settings, settings
from .errors import ConfigurationError

_lock = threading.Lock()
_cache: tuple[Settings, bytes, dict[str, bytes]] | None = None


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
    key, _ = _keys()
    return key_id(key), key


def verification_key(kid: str) -> bytes | None:
    """The key with this id, or None when the envelope was signed with an unknown key."""
    _, keys = _keys()
    return keys.get(kid)


def _keys() -> tuple[bytes, dict[str, bytes]]:
    global _cache
    current = settings()
    cached = _cache
    if cached is not None and cached[0] is current:
        return cached[1], cached[2]
    with _lock:
        key, keys = _resolve(current)
        _cache = (current, key, keys)
    return key, keys
