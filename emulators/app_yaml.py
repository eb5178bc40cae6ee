"""What the local stack reads from an app's ``app.yaml`` (python3 runtimes).

::

    app = load_app_yaml("app.yaml")        # raises AppYamlError with a one-line reason
    app.wsgi_app                           # "main:app", from `entrypoint: gunicorn ... main:app`
    app.env_variables                      # {"GAE_DEFERRED_LOCATION": "us-central1"}
    found = match_handler(app.handlers, "/static/deferred_admin/admin.css")
    static_file(found, "/static/deferred_admin/admin.css")   # Path, or None: 404

    deploy_problems(app.document)          # why App Engine's python3 runtime would refuse it

Handlers follow App Engine: the first whose ``url`` regex matches the whole path wins;
``static_dir`` serves the files under a directory at ``url/<path>``, ``static_files`` the
file its template names (``\\1``... from the url's groups) if it matches ``upload``;
``script: auto`` goes to the app. Without handlers every request goes to the app; with
handlers, a path none matches is a 404.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import AppYamlError

#: gunicorn's APP_MODULE: ``module:variable`` or an app factory call ``module:create_app()``.
_WSGI_APP = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(.*\))?$")
DEFAULT_WSGI_APP = "main:app"

#: app.yaml fields of the python27 runtime that python3 runtimes refuse or ignore.
PYTHON27_ONLY = ("api_version", "threadsafe", "libraries", "builtins", "skip_files", "application")
PYTHON27_ONLY_HANDLER = ("application_readable",)
#: Handler fields the python3 runtimes accept only with the legacy bundled services.
BUNDLED_SERVICES_HANDLER = ("login", "auth_fail_action")


@dataclass(frozen=True)
class ScriptHandler:
    """A handler the app answers (``script: auto``)."""

    url: re.Pattern[str]


@dataclass(frozen=True)
class StaticHandler:
    """Files served without the app: ``target`` names a file relative to ``app_dir``."""

    url: re.Pattern[str]
    target: str
    upload: re.Pattern[str]
    #: Files must resolve inside this directory (static_dir's directory, else the app's).
    root: Path
    app_dir: Path
    mime_type: str | None = None
    http_headers: dict[str, str] = field(default_factory=dict)


Handler = ScriptHandler | StaticHandler


@dataclass(frozen=True)
class AppYaml:
    path: Path
    app_dir: Path
    wsgi_app: str
    env_variables: dict[str, str]
    handlers: tuple[Handler, ...]
    document: dict[str, Any]


def load_app_yaml(path: str | os.PathLike[str]) -> AppYaml:
    """Parse ``path``; AppYamlError says what is wrong in one line."""
    path = Path(path).resolve()
    if not path.is_file():
        raise AppYamlError(f"{path} not found: give the app.yaml of the app to run")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise AppYamlError(f"{path} is not valid YAML: {reason}") from exc
    if not isinstance(document, dict):
        raise AppYamlError(f"{path}: expected a mapping (runtime:, entrypoint:, handlers: ...)")
    env = document.get("env_variables") or {}
    if not isinstance(env, dict):
        raise AppYamlError(f"{path}: env_variables must be a mapping")
    raw_handlers = document.get("handlers") or []
    if not isinstance(raw_handlers, list):
        raise AppYamlError(f"{path}: handlers must be a list")
    app_dir = path.parent
    handlers = tuple(
        _handler(entry, position, path, app_dir)
        for position, entry in enumerate(raw_handlers, start=1)
    )
    return AppYaml(
        path=path,
        app_dir=app_dir,
        wsgi_app=wsgi_app_of(document.get("entrypoint"), path),
        env_variables={str(k): "" if v is None else str(v) for k, v in env.items()},
        handlers=handlers,
        document=document,
    )


def wsgi_app_of(entrypoint: object, where: Path | str = "app.yaml") -> str:
    """The ``module:app`` a gunicorn entrypoint serves (``main:app`` without an entrypoint)."""
    if entrypoint is None:
        return DEFAULT_WSGI_APP
    hint = "gae-deferred-dev serves WSGI apps with gunicorn, e.g. `gunicorn -b :$PORT main:app`"
    try:
        words = shlex.split(str(entrypoint))
    except ValueError as exc:
        message = f"{where}: cannot parse entrypoint {entrypoint!r} ({exc}); {hint}"
        raise AppYamlError(message) from exc
    program = words[1:3] == ["-m", "gunicorn"] if words and "python" in words[0] else False
    if not words or not (Path(words[0]).name == "gunicorn" or program):
        raise AppYamlError(f"{where}: entrypoint {entrypoint!r} does not run gunicorn; {hint}")
    candidates = [w for w in words[1:] if not w.startswith("-") and _WSGI_APP.match(w)]
    if len(candidates) != 1:
        found = "no" if not candidates else f"several ({', '.join(candidates)})"
        raise AppYamlError(f"{where}: entrypoint {entrypoint!r} names {found} module:app; {hint}")
    return candidates[0]


def _handler(entry: object, position: int, path: Path, app_dir: Path) -> Handler:
    where = f"{path}: handler #{position}"
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise AppYamlError(f"{where} needs a 'url'")
    url_text = entry["url"]
    if "static_dir" in entry:
        directory = str(entry["static_dir"]).strip("/")
        url = _regex(url_text.rstrip("/") + "/(.*)", where)
        root = (app_dir / directory).resolve()
        target, upload = directory + r"/\1", _regex(re.escape(directory) + "/.*", where)
    elif "static_files" in entry:
        if not isinstance(entry.get("upload"), str):
            raise AppYamlError(f"{where}: static_files needs an 'upload' regex")
        url, root = _regex(url_text, where), app_dir
        target, upload = str(entry["static_files"]), _regex(entry["upload"], where)
    else:
        return ScriptHandler(_regex(url_text, where))
    headers = entry.get("http_headers") or {}
    if not isinstance(headers, dict):
        raise AppYamlError(f"{where}: http_headers must be a mapping")
    return StaticHandler(
        url=url,
        target=target,
        upload=upload,
        root=root,
        app_dir=app_dir,
        mime_type=entry.get("mime_type"),
        http_headers={str(k): str(v) for k, v in headers.items()},
    )


def _regex(text: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as exc:
        raise AppYamlError(f"{where}: invalid url/upload regex {text!r}: {exc}") from exc


def match_handler(handlers: tuple[Handler, ...], path: str) -> tuple[Handler, re.Match[str]] | None:
    """The first handler whose url matches all of ``path`` (decoded, without the query)."""
    for handler in handlers:
        found = handler.url.fullmatch(path)
        if found is not None:
            return handler, found
    return None


def static_file(handler: StaticHandler, found: re.Match[str]) -> Path | None:
    """The file a static handler serves for a url match, or None (then the answer is 404).

    None also for anything outside the handler's directory (``..``, symlinks out), files
    ``upload`` does not allow, directories and missing files.
    """
    relative = found.expand(handler.target)
    if "\x00" in relative or "\\" in relative:
        return None
    candidate = (handler.app_dir / relative).resolve()
    if not candidate.is_relative_to(handler.root) or not candidate.is_file():
        return None
    if not handler.upload.fullmatch(candidate.relative_to(handler.app_dir).as_posix()):
        return None
    return candidate


def deploy_problems(document: dict[str, Any]) -> list[str]:
    """Why App Engine's python3 runtimes would refuse (or silently ignore) this app.yaml."""
    problems = [
        f"'{name}' is a python27 field; python3 runtimes do not accept it"
        for name in PYTHON27_ONLY
        if name in document
    ]
    runtime = str(document.get("runtime", ""))
    if not re.fullmatch(r"python3\d+", runtime):
        problems.append(f"runtime {runtime!r} is not a python3 runtime (e.g. python311)")
    bundled = document.get("app_engine_apis") is True
    for position, handler in enumerate(document.get("handlers") or [], start=1):
        if not isinstance(handler, dict):
            continue
        url = handler.get("url", "?")
        problems += [
            f"handler #{position} ({url}): '{name}' is a python27 field"
            for name in PYTHON27_ONLY_HANDLER
            if name in handler
        ]
        if "script" in handler and handler["script"] != "auto":
            problems.append(
                f"handler #{position} ({url}): script must be 'auto' on python3 runtimes"
            )
        if not bundled:
            problems += [
                f"handler #{position} ({url}): '{name}' needs app_engine_apis: true on "
                "python3 runtimes (or protect the URL with IAP / the app's own check)"
                for name in BUNDLED_SERVICES_HANDLER
                if name in handler
            ]
    return problems
