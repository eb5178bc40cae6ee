"""Process-wide settings: environment variables first, then whatever the app passes to configure().

An app usually needs nothing but the environment::

    GOOGLE_CLOUD_PROJECT=my-app GAE_DEFERRED_LOCATION=europe-west1
    GAE_DEFERRED_SIGNING_KEY=<64 hex chars>   # or GAE_DEFERRED_SIGNING_KEY_FILE=/path

and code may override any field once at start-up::

    import gae_deferred
    gae_deferred.configure(signing_key_provider=load_key_from_secret_manager,
                           spill_threshold=50_000)
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
from collections.abc import Callable
from typing import Any

from . import defaults
from .errors import ConfigurationError
from .http_target import (
    HttpTarget,
    coerce as _coerce_http_target,
    from_environment as _http_target_from_environment,
)

MIB = 1024 * 1024

#: Cloud Tasks' limit for an App Engine task (body, URL and headers together).
APP_ENGINE_TASK_LIMIT = 100 * 1024
#: Datastore's limit for one entity is 1 MiB - 4 bytes; chunks stay well below it.
DEFAULT_CHUNK_BYTES = 1_000_000
#: Datastore, and Google's Datastore and Firestore emulators, refuse any request over 4 MiB
#: (gRPC's message limit: "gRPC message exceeds maximum size 4194304"), however far below its
#: 10 MiB commit limit the writes are.
DATASTORE_REQUEST_LIMIT = 4 * MIB
#: A spill Commit request is at most this big: 3 chunks of the default size and a record, with
#: room to spare under DATASTORE_REQUEST_LIMIT (smaller requests also keep defer()'s memory low:
#: one commit's request and gRPC's copy of it are alive at once).
DEFAULT_COMMIT_BYTES = 3 * MIB
#: What one chunk's upsert adds to its bytes at most (key with project, database, namespace and
#: payload id; the property's framing): a commit must hold at least one chunk.
CHUNK_MUTATION_OVERHEAD = 2048
#: A payload's chunks at most: a spilled task that ran deletes its record and chunks in one
#: Commit with its done marker, and Datastore allows 500 mutations a commit (the keys of 490
#: chunks are about 50 KB, far under DATASTORE_REQUEST_LIMIT).
MAX_CHUNKS = 490


@dataclasses.dataclass
class Settings:
    """Everything gae_deferred reads from its environment. See :func:`configure`."""

    project: str | None = None
    location: str = defaults.LOCATION
    default_queue: str = defaults.QUEUE
    task_url: str = defaults.TASK_URL
    #: A task whose envelope, URL and headers exceed this many bytes is spilled to Datastore.
    spill_threshold: int = APP_ENGINE_TASK_LIMIT
    #: Hard cap on a serialized payload; defer() refuses anything bigger.
    max_payload_bytes: int = 32 * MIB
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: The largest Commit request a spill sends, in bytes (request framing and keys included):
    #: at most DATASTORE_REQUEST_LIMIT.
    commit_bytes: int = DEFAULT_COMMIT_BYTES
    #: zlib level for bodies of at least compress_min_bytes; 0 turns compression off. Level 1
    #: spills as rarely as 6 or 9 on our corpus at a third of the CPU (docs/performance.md).
    compression_level: int = 1
    compress_min_bytes: int = 1024
    signing_key: bytes | None = None
    #: Older keys still accepted when verifying, for key rotation.
    previous_signing_keys: tuple[bytes, ...] = ()
    #: Called once per process when no signing_key is set, e.g. to read Secret Manager.
    signing_key_provider: Callable[[], bytes] | None = None
    app_version: str = "unknown"
    #: Retry limits per queue (dead letters): GAE_DEFERRED_QUEUE_YAML, else ./queue.yaml.
    queue_yaml: str | None = None
    #: An ndb client to use instead of ``ndb.Client(project=...)`` (tests pass a stub).
    ndb_client: Any = None
    #: How long any Cloud Tasks call waits for its answer (CreateTask, the dashboard's calls).
    cloud_tasks_timeout_seconds: float = defaults.CLOUD_TASKS_TIMEOUT_SECONDS
    #: The deadline of each Datastore call defer() makes (a spill's commits, the lookup that
    #: settles an unanswered commit, the cleanup after a failure), retries included.
    datastore_timeout_seconds: float = 10
    #: How long a running spilled or @idempotent task holds its claim: a duplicate delivery
    #: within it is answered "claimed" (retried later) instead of running. App Engine's
    #: dispatch deadline for a push task (10 minutes) by default; a crashed run's claim ends then.
    task_deadline_seconds: float = defaults.TASK_DEADLINE_SECONDS
    #: How long dead letters and permanent failures keep their payloads.
    dead_letter_retention_seconds: float = 30 * 24 * 3600
    #: A pending spilled/outboxed record this long past its ETA is re-enqueued by the sweeper.
    sweep_grace_seconds: float = 600
    #: Loopback requests are admin, and the demo page is routed. Set by the local stack
    #: (GAE_DEFERRED_LOCAL=1), refused on App Engine (GAE_ENV set).
    local_mode: bool = False
    #: Expected audience of IAP JWTs for the dashboard ("/projects/NUM/apps/PROJECT").
    iap_audience: str | None = None
    #: Extra admin check for the dashboard: callable(environ) -> user email or None.
    admin_hook: Callable[[dict], str | None] | None = None
    #: Local mode: the port the dashboard's Host header must name (GAE_DEFERRED_LOCAL_PORT).
    local_port: int | None = None
    #: Token that lets a request to the cron URL run the sweeper off App Engine (the local
    #: stack's cron sends it as X-Deferred-Cron-Token; GAE_DEFERRED_CRON_TOKEN).
    cron_token: str | None = None
    #: Count runs per function in memory (gae_deferred.metrics); GAE_DEFERRED_METRICS=0 stops it.
    metrics_enabled: bool = True
    #: Each process writes its metrics at most once per this many seconds.
    metrics_flush_seconds: float = 60
    #: The first run after a quiet interval is written this soon (a burst gathers meanwhile),
    #: so the dashboard never says "nothing ran" for a minute while failures show
    #: (GAE_DEFERRED_METRICS_FIRST_FLUSH_SECONDS; at least metrics_flush_seconds turns it off).
    metrics_first_flush_seconds: float = 1.0
    #: Read-only dashboard users: callable(environ) -> user name or None (admin_hook wins).
    viewer_hook: Callable[[dict], str | None] | None = None
    #: IAP users who may act (GAE_DEFERRED_ADMIN_EMAILS, comma-separated emails or @domains).
    #: Empty: every user IAP lets in is an admin, as before roles existed.
    admin_emails: tuple[str, ...] = ()
    #: IAP users who may look but not act (GAE_DEFERRED_VIEWER_EMAILS; ``*`` = anyone IAP
    #: lets in). Only read when admin_emails is set.
    viewer_emails: tuple[str, ...] = ()
    #: Bearer token for scrapers of /_ah/deferred-admin/metrics.prom (GAE_DEFERRED_METRICS_TOKEN),
    #: or the Secret Manager version holding it (GAE_DEFERRED_METRICS_TOKEN_SECRET,
    #: ``projects/P/secrets/S/versions/latest``).
    metrics_token: str | None = None
    metrics_token_secret: str | None = None
    #: On App Engine, the version and service this process runs as (GAE_VERSION, GAE_SERVICE).
    running_version: str | None = None
    running_service: str | None = None
    #: defer() routes a task to the version (and service) that made it, as the legacy task
    #: queue did with the enqueuing request's Host, unless the call routes it itself
    #: (_target, _service, _version, _instance). GAE_DEFERRED_VERSION_AFFINITY=0 turns it off.
    version_affinity: bool = True
    #: During a cut-over from python27: the last day (UTC) the task handler runs the legacy
    #: library's unsigned pickles, only for App Engine's own task requests on App Engine
    #: (GAE_DEFERRED_LEGACY_PICKLES_UNTIL=YYYY-MM-DD; gae_deferred.legacy_pickles). Off: None.
    legacy_pickles_until: datetime.date | None = None
    #: Cloud Run (or any HTTPS host): defer() makes HTTP-target tasks with an OIDC token for
    #: this URL and service account, and the task handler accepts only requests whose token
    #: verifies (GAE_DEFERRED_HTTP_TARGET_URL, _SERVICE_ACCOUNT, _AUDIENCE; docs/cloud-run.md).
    #: None: App Engine tasks.
    http_target: HttpTarget | None = None


_lock = threading.Lock()
_settings: Settings | None = None


def _from_environment() -> Settings:
    env = os.environ
    local_flag = env.get("GAE_DEFERRED_LOCAL", "")
    if local_flag not in ("", "0", "1"):
        raise ConfigurationError(f"GAE_DEFERRED_LOCAL must be 1 or 0, not {local_flag!r}")
    key: bytes | None = None
    if env.get("GAE_DEFERRED_SIGNING_KEY"):
        key = _decode_key(env["GAE_DEFERRED_SIGNING_KEY"], "GAE_DEFERRED_SIGNING_KEY")
    elif env.get("GAE_DEFERRED_SIGNING_KEY_FILE"):
        path = env["GAE_DEFERRED_SIGNING_KEY_FILE"]
        try:
            with open(path, encoding="ascii") as key_file:
                key = _decode_key(key_file.read().strip(), path)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read GAE_DEFERRED_SIGNING_KEY_FILE {path}: {exc}"
            ) from exc
    current = Settings(
        project=env.get("GOOGLE_CLOUD_PROJECT")
        or env.get("GAE_APPLICATION", "").partition("~")[2]
        or None,
        location=env.get("GAE_DEFERRED_LOCATION", defaults.LOCATION),
        signing_key=key,
        app_version=env.get("GAE_VERSION", "unknown"),
        queue_yaml=env.get("GAE_DEFERRED_QUEUE_YAML") or _queue_yaml_beside_app(),
        local_mode=local_flag == "1",
        iap_audience=env.get("GAE_DEFERRED_IAP_AUDIENCE"),
        local_port=_number(env, "GAE_DEFERRED_LOCAL_PORT", int),
        cron_token=env.get("GAE_DEFERRED_CRON_TOKEN") or None,
        metrics_enabled=env.get("GAE_DEFERRED_METRICS", "1") != "0",
        metrics_flush_seconds=_number(env, "GAE_DEFERRED_METRICS_FLUSH_SECONDS", float) or 60.0,
        metrics_first_flush_seconds=_number(env, "GAE_DEFERRED_METRICS_FIRST_FLUSH_SECONDS", float)
        or 1.0,
        admin_emails=_emails(env.get("GAE_DEFERRED_ADMIN_EMAILS")),
        viewer_emails=_emails(env.get("GAE_DEFERRED_VIEWER_EMAILS")),
        metrics_token=env.get("GAE_DEFERRED_METRICS_TOKEN") or None,
        metrics_token_secret=env.get("GAE_DEFERRED_METRICS_TOKEN_SECRET") or None,
        running_version=env.get("GAE_VERSION") or None,
        running_service=env.get("GAE_SERVICE") or None,
        version_affinity=_flag(env, "GAE_DEFERRED_VERSION_AFFINITY", True),
        legacy_pickles_until=_date(
            env.get("GAE_DEFERRED_LEGACY_PICKLES_UNTIL"), "GAE_DEFERRED_LEGACY_PICKLES_UNTIL"
        ),
        http_target=_http_target_from_environment(env),
    )
    _validate(current)
    return current


def _emails(value: str | None) -> tuple[str, ...]:
    """``a@x.com, @y.org,*`` -> ("a@x.com", "@y.org", "*"), lower-cased."""
    return tuple(part.strip().lower() for part in (value or "").split(",") if part.strip())


def _queue_yaml_beside_app() -> str | None:
    """App Engine runs an app from its folder, where queue.yaml sits beside app.yaml."""
    path = os.path.abspath("queue.yaml")
    return path if os.path.isfile(path) else None


def _date(value: Any, source: str) -> datetime.date | None:
    """A day given as "YYYY-MM-DD" (or a date); None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        raise ConfigurationError(f"{source} must be a day (YYYY-MM-DD), not a datetime")
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError as exc:
        raise ConfigurationError(f"{source} must be a day as YYYY-MM-DD, not {value!r}") from exc


def _flag(env: Any, name: str, default: bool) -> bool:
    text = env.get(name, "")
    if text == "":
        return default
    if text not in ("0", "1"):
        raise ConfigurationError(f"{name} must be 1 or 0, not {text!r}")
    return text == "1"


def _number(env: Any, name: str, kind: type[int] | type[float]) -> Any:
    text = env.get(name)
    if not text:
        return None
    try:
        return kind(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name} must be a number, not {text!r}") from exc


def _decode_key(text: str, source: str) -> bytes:
    """Keys are hex (64+ chars recommended); anything else is rejected rather than guessed at."""
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigurationError(f"signing key from {source} is not hex") from exc
    if len(key) < 16:
        raise ConfigurationError(f"signing key from {source} is {len(key)} bytes; use at least 16")
    return key


def settings() -> Settings:
    """The current settings, read from the environment on first use."""
    global _settings
    current = _settings
    if current is None:
        with _lock:
            if _settings is None:
                _settings = _from_environment()
            current = _settings
    return current


def configure(**changes: Any) -> Settings:
    """Override settings for this process; unknown names raise ConfigurationError.

    >>> configure(spill_threshold=50_000, default_queue="work")  # doctest: +SKIP
    """
    global _settings
    names = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigurationError(f"unknown setting(s): {', '.join(unknown)}")
    if "legacy_pickles_until" in changes:
        changes["legacy_pickles_until"] = _date(changes["legacy_pickles_until"], "configure()")
    if "http_target" in changes:
        changes["http_target"] = _coerce_http_target(changes["http_target"])
    if "signing_key" in changes and isinstance(changes["signing_key"], str):
        changes["signing_key"] = _decode_key(changes["signing_key"], "configure()")
    with _lock:
        _settings = dataclasses.replace(_settings or _from_environment(), **changes)
        _validate(_settings)
        current = _settings
    return current


def reset() -> None:
    """Forget configure() calls and re-read the environment on next use (tests)."""
    global _settings
    with _lock:
        _settings = None


def _validate(current: Settings) -> None:
    if current.local_mode and os.environ.get("GAE_ENV"):
        raise ConfigurationError(
            "local mode (GAE_DEFERRED_LOCAL=1) makes loopback requests admin and is refused where "
            "GAE_ENV is set (App Engine): unset one of them"
        )
    if current.http_target is not None and not (current.http_target.google or current.local_mode):
        raise ConfigurationError(
            "http_target's certs_url and issuer are Google's everywhere but on the local stack "
            "(GAE_DEFERRED_LOCAL=1), whose Cloud Tasks emulator signs its own tokens"
        )
    if not 0 <= current.compression_level <= 9:
        raise ConfigurationError("compression_level must be 0..9")
    if current.chunk_bytes <= 0 or current.chunk_bytes > 1_040_000:
        raise ConfigurationError(
            "chunk_bytes must be between 1 and 1,040,000 (Datastore's 1 MiB limit)"
        )
    if current.spill_threshold <= 0 or current.max_payload_bytes <= 0:
        raise ConfigurationError("spill_threshold and max_payload_bytes must be positive")
    for name in ("datastore_timeout_seconds", "task_deadline_seconds"):
        value = getattr(current, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
            raise ConfigurationError(f"{name} must be a positive number of seconds, not {value!r}")
    if current.metrics_flush_seconds <= 0:
        raise ConfigurationError("metrics_flush_seconds must be positive")
    _validate_commit_bytes(current.commit_bytes, current.chunk_bytes)
    if -(-current.max_payload_bytes // current.chunk_bytes) > MAX_CHUNKS:
        raise ConfigurationError(
            f"max_payload_bytes / chunk_bytes must be at most {MAX_CHUNKS} chunks (a spilled "
            f"task's record and chunks are deleted in one Datastore commit of at most 500 "
            f"mutations): raise chunk_bytes to at least "
            f"{-(-current.max_payload_bytes // MAX_CHUNKS):,} or lower max_payload_bytes"
        )


def _validate_commit_bytes(commit_bytes: Any, chunk_bytes: int) -> None:
    least = chunk_bytes + CHUNK_MUTATION_OVERHEAD
    if (
        isinstance(commit_bytes, bool)
        or not isinstance(commit_bytes, int)
        or not least <= commit_bytes <= DATASTORE_REQUEST_LIMIT
    ):
        raise ConfigurationError(
            f"commit_bytes is the size of one Datastore Commit request, so it must be between "
            f"{least:,} (one chunk of chunk_bytes={chunk_bytes:,} with its key) and "
            f"{DATASTORE_REQUEST_LIMIT:,} (4 MiB: Datastore and Google's emulators refuse any "
            f"larger request), not {commit_bytes!r}"
        )
