"""HTTP-target tasks with OIDC tokens: the same defer() on Cloud Run (or any HTTPS host).

On App Engine, Cloud Tasks delivers to the app with App Engine's task headers, which its front
end strips from outside requests. Cloud Run has no such headers: Cloud Tasks POSTs to a URL
with an OIDC token signed by Google for a service account, and that token is what proves the
request came from the queue. One setting switches the app over::

    gae_deferred.configure(http_target=HttpTarget(
        url="https://worker-abc123-ew.a.run.app",
        service_account_email="tasks@my-app.iam.gserviceaccount.com",
    ))
    # or GAE_DEFERRED_HTTP_TARGET_URL / GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT
    # (and _AUDIENCE, default: the URL)

Then defer() builds ``http_request`` tasks (``url`` + the task path, ``oidc_token`` with the
service account and audience) and the task handler refuses (403, counted as ``bad-token``)
every request whose ``Authorization: Bearer`` token does not verify: signature against the
issuer's keys (Google's, cached per their ``Cache-Control``), ``aud``, ``iss``, ``email``,
``email_verified`` and expiry, before any of the body is read. See docs/cloud-run.md.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from ._key_cache import KeyCache, token_kid
from .errors import ConfigurationError, InvalidTaskError

#: Google's signing keys for OIDC tokens, as PEM certificates by key id.
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
#: The ``iss`` of Google-signed ID tokens (both spellings occur).
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
#: Keys are kept this long when the certificate response says nothing about caching.
DEFAULT_MAX_AGE = 300
#: A token naming a key we do not have refetches the keys at most this often, so forged key
#: ids cannot turn every request into a fetch.
UNKNOWN_KID_REFETCH = 30
#: Seconds of clock difference allowed on ``iat`` and ``exp``.
CLOCK_SKEW = 10
#: What Cloud Run puts in place of the signature of the ID token it verified for IAM before
#: the request reaches the container (https://cloud.google.com/run/docs/troubleshooting).
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
_ENV_PREFIX = "GAE_DEFERRED_HTTP_TARGET_"


class Unproven(Exception):
    """An HTTP-target request whose token could not be verified (see :func:`outcome_for`)."""


class TokenRefused(Unproven):
    """An HTTP-target request without a valid OIDC token: the handler answers 403."""


class CertsUnavailable(Unproven):
    """The issuer's keys could not be fetched: the handler answers 503 (Cloud Tasks retries)."""


def outcome_for(exc: Unproven) -> Any:
    """The handler's answer (an ``execution.TaskOutcome``) to a request ``TaskInfo`` refused:
    403 counted as ``bad-token``, or 503 when the keys could not be fetched (not the caller's
    fault: Cloud Tasks retries)."""
    from . import execution, refusals

    if isinstance(exc, CertsUnavailable):
        execution.logger.error("HTTP-target task not verified: %s", exc)
        return execution.TaskOutcome(execution.UNAVAILABLE, "unavailable", str(exc))
    refusals.record("bad-token", None, str(exc))
    return execution.TaskOutcome(execution.FORBIDDEN, "forbidden", str(exc))


@dataclasses.dataclass(frozen=True)
class HttpTarget:
    """Where HTTP-target tasks go and who may send them.

    ``url``: the service's base URL (``https://...run.app``); a task's URL is this plus its
    path (``/_ah/queue/deferred/...`` or the call's ``_url``). ``service_account_email``: the
    account Cloud Tasks signs the token for (the enqueuer needs
    ``roles/iam.serviceAccountUser`` on it, the service grants it ``roles/run.invoker``).
    ``audience``: the token's ``aud`` (default: ``url``). ``certs_url`` and ``issuers``:
    Google's; only the local stack points them at its emulator (local mode only).

    ``cloud_run_iam``: the service requires authentication (``--no-allow-unauthenticated``),
    so Cloud Run itself verifies the token's signature and the caller's ``run.invoker`` role
    and hands the token on with its signature replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``;
    such a token is then accepted on its claims (audience, issuer, account, verified email,
    expiry). Off (the default), only a token whose signature verifies here is accepted, and
    a signature-removed one is refused with a message naming this setting. Never turn it on
    for a service that allows unauthenticated requests: anyone could then write the claims.
    """

    url: str
    service_account_email: str
    audience: str = ""
    certs_url: str = GOOGLE_CERTS_URL
    issuers: tuple[str, ...] = GOOGLE_ISSUERS
    cloud_run_iam: bool = False

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", self.url or ""):
            raise ConfigurationError(
                f"http_target url must be an absolute http(s) URL such as "
                f"https://worker-abc123-ew.a.run.app, not {self.url!r}"
            )
        if "@" not in (self.service_account_email or ""):
            raise ConfigurationError(
                "http_target service_account_email must be the email of the service account "
                f"Cloud Tasks signs tokens for, not {self.service_account_email!r}"
            )
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "audience", self.audience or self.url.rstrip("/"))
        object.__setattr__(self, "issuers", tuple(self.issuers))

    @property
    def google(self) -> bool:
        """Tokens are checked against Google's keys and issuer (production)."""
        return self.certs_url == GOOGLE_CERTS_URL and self.issuers == GOOGLE_ISSUERS

    def task_url(self, path: str) -> str:
        """The full URL of a task whose path is ``path``."""
        return self.url + path

    def verify(self, authorization: str | None) -> dict[str, Any]:
        """The claims of the request's ``Authorization: Bearer`` token; raises TokenRefused
        when there is none or it does not verify, CertsUnavailable when the keys cannot be
        fetched."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise TokenRefused("no OIDC token (Authorization: Bearer)")
        if token.endswith("." + SIGNATURE_REMOVED):
            return self._checked_claims(self._claims_verified_by_cloud_run(token))
        from google.auth import exceptions as auth_exceptions
        from google.oauth2 import id_token

        try:
            claims = id_token.verify_token(
                token,
                _transport_for(self.certs_url, token),
                audience=self.audience,
                certs_url=self.certs_url,
                clock_skew_in_seconds=CLOCK_SKEW,
            )
        except CertsUnavailable:
            raise
        except (ValueError, TypeError, KeyError, auth_exceptions.GoogleAuthError) as exc:
            raise TokenRefused(f"OIDC token does not verify: {_short(exc)}") from None
        return self._checked_claims(claims)

    def _claims_verified_by_cloud_run(self, token: str) -> Mapping[str, Any]:
        """The claims of a token Cloud Run verified and took the signature off (see
        ``cloud_run_iam``): audience and expiry are checked here, as verify_token would."""
        if not self.cloud_run_iam:
            raise TokenRefused(
                "OIDC token's signature was removed by Google (Cloud Run verified it: the "
                "service requires authentication); set http_target cloud_run_iam=True "
                "(GAE_DEFERRED_HTTP_TARGET_CLOUD_RUN_IAM=1) to accept such tokens"
            )
        from google.auth import jwt

        try:
            claims = jwt.decode(token, verify=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise TokenRefused(f"OIDC token cannot be read: {_short(exc)}") from None
        if claims.get("aud") != self.audience:
            raise TokenRefused(f"OIDC token has audience {_short(claims.get('aud'))}")
        expiry = claims.get("exp")
        if not isinstance(expiry, int | float) or expiry + CLOCK_SKEW < time.time():
            raise TokenRefused("OIDC token expired")
        return claims

    def _checked_claims(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """The claims, if they name the issuer, the tasks account and a verified email."""
        if claims.get("iss") not in self.issuers:
            raise TokenRefused(f"OIDC token has issuer {_short(claims.get('iss'))}")
        if claims.get("email") != self.service_account_email:
            raise TokenRefused(
                f"OIDC token is for {_short(claims.get('email'))}, not the tasks account"
            )
        if claims.get("email_verified") is not True:
            raise TokenRefused("OIDC token's email is not verified")
        return dict(claims)


def _short(value: object) -> str:
    return repr(str(value)[:120])


def from_environment(env: Mapping[str, str]) -> HttpTarget | None:
    """``GAE_DEFERRED_HTTP_TARGET_`` + ``URL``, ``SERVICE_ACCOUNT``, ``AUDIENCE``,
    ``CERTS_URL``, ``ISSUER`` and ``CLOUD_RUN_IAM`` (1 or 0); None without a URL. A service
    account without a URL (or the other way round) is an error."""
    url = env.get(_ENV_PREFIX + "URL", "")
    account = env.get(_ENV_PREFIX + "SERVICE_ACCOUNT", "")
    if not url and not account:
        return None
    if not (url and account):
        raise ConfigurationError(
            f"{_ENV_PREFIX}URL and {_ENV_PREFIX}SERVICE_ACCOUNT go together: set both (HTTP-"
            "target tasks) or neither (App Engine tasks)"
        )
    issuer = env.get(_ENV_PREFIX + "ISSUER")
    iam = env.get(_ENV_PREFIX + "CLOUD_RUN_IAM", "").strip().lower()
    if iam not in ("", "0", "1", "true", "false"):
        raise ConfigurationError(f"{_ENV_PREFIX}CLOUD_RUN_IAM must be 1 or 0, not {iam!r}")
    return HttpTarget(
        url=url,
        service_account_email=account,
        audience=env.get(_ENV_PREFIX + "AUDIENCE", ""),
        certs_url=env.get(_ENV_PREFIX + "CERTS_URL") or GOOGLE_CERTS_URL,
        issuers=(issuer,) if issuer else GOOGLE_ISSUERS,
        cloud_run_iam=iam in ("1", "true"),
    )


def coerce(value: Any) -> HttpTarget | None:
    """What ``configure(http_target=...)`` takes: an HttpTarget, a dict of its fields, or None."""
    if value is None or isinstance(value, HttpTarget):
        return value
    if isinstance(value, Mapping):
        names = {field.name for field in dataclasses.fields(HttpTarget)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigurationError(f"unknown http_target field(s): {', '.join(unknown)}")
        return HttpTarget(**value)
    raise ConfigurationError(
        f"http_target must be an HttpTarget, a dict of its fields or None, not {value!r}"
    )


class _Response:
    """What google.auth's verify_token reads of a certificate response."""

    def __init__(self, data: bytes) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self.data = data


def _fetch_keys(url: str) -> tuple[bytes, dict[str, Any], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read()
            control = response.headers.get("Cache-Control") or ""
        keys = json.loads(data)
    except (OSError, ValueError) as exc:
        raise CertsUnavailable(f"cannot fetch the token keys at {url}: {exc}") from exc
    if not isinstance(keys, dict):
        raise CertsUnavailable(f"the token keys at {url} are not a JSON object")
    return data, keys, control


_keys: dict[str, KeyCache] = {}
_keys_lock = threading.Lock()


def _transport_for(url: str, token: str) -> Any:
    """A google.auth transport answering the certificate URL from the cache of its keys (see
    :class:`~gae_deferred._key_cache.KeyCache`): verify_token fetches them on every call."""
    with _keys_lock:
        cache = _keys.get(url)
        if cache is None:
            cache = _keys[url] = KeyCache(
                lambda: _fetch_keys(url),
                default_max_age=DEFAULT_MAX_AGE,
                unknown_kid_refetch=UNKNOWN_KID_REFETCH,
            )
    data, _ = cache.get(token_kid(token))

    def answer(url: str, method: str = "GET", **_: Any) -> _Response:
        return _Response(data)

    return answer


def reset_keys() -> None:
    """Forget every cached key set (tests)."""
    with _keys_lock:
        _keys.clear()


def build_request(task: Any, target: HttpTarget, path: str, routing: Mapping[str, str]) -> Any:
    """Fill ``task`` (a raw ``tasks_v2.Task`` protobuf) as an HTTP-target task for ``path`` and
    return its ``http_request`` (the caller adds method, headers and body). App Engine routing
    means nothing to a URL: a call that routes its task is refused."""
    if routing:
        fields = ", ".join(f"{key}={value!r}" for key, value in sorted(routing.items()))
        raise InvalidTaskError(
            f"App Engine routing ({fields}: _target, _service, _version, _instance) has no "
            f"meaning for HTTP-target tasks, which go to {target.url}: drop it, or configure "
            "another http_target url for that service"
        )
    request = task.http_request
    request.url = target.task_url(path)
    request.oidc_token.service_account_email = target.service_account_email
    request.oidc_token.audience = target.audience
    return request
