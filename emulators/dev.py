"""``gae-deferred-dev path/to/app.yaml``: an app on the local stack, like ``dev_appserver.py`` was.

Runs the Datastore and Cloud Tasks emulators and the app of app.yaml (its entrypoint's
``module:app`` under gunicorn, behind the front end that also serves app.yaml's static
handlers), with the app's queue.yaml, index.yaml and cron.yaml. Errors are one line (exit 2);
a child that dies is started again (``_supervise``), and only one that keeps dying stops the
stack (exit 1); Ctrl-C or SIGTERM stops everything (exit 0). See docs/local-stack.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import os
import shlex
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .app_yaml import deploy_problems
from .errors import AppYamlError, CronYamlError, IndexYamlError, StackError
from .google_datastore import DATASTORE_CHOICES, GOOGLE_MODES, unavailable_reason
from .index_watch import IndexWatch

if TYPE_CHECKING:
    from .datastore._index_rules import CompositeIndex

PROG = "gae-deferred-dev"
#: The header the cron timer authenticates with; its value is the app's GAE_DEFERRED_CRON_TOKEN.
CRON_TOKEN_HEADER = "X-Deferred-Cron-Token"
#: What the `[local]` extra installs (module names), checked before anything imports them.
LOCAL_EXTRA = ("grpc", "gunicorn", "inmemory_datastore_stub")


def package_indexes() -> list[CompositeIndex]:
    """gae_deferred's own Datastore indexes (the dashboard's and the sweeper's queries)."""
    from .datastore import load_index_yaml

    resource = importlib.resources.files("gae_deferred").joinpath("index.yaml")
    with importlib.resources.as_file(resource) as path:
        return load_index_yaml(path)


def missing_package_indexes(index_yaml: Path | None) -> list[CompositeIndex]:
    """The indexes of gae_deferred that ``index_yaml`` (None: no file) does not declare."""
    from .datastore import load_index_yaml

    declared = set(load_index_yaml(index_yaml)) if index_yaml is not None else set()
    return [index for index in package_indexes() if index not in declared]


def _index_problem(index_yaml: Path | None) -> str | None:
    """What IndexWatch prints of a changed index.yaml: the package's indexes it lacks."""
    missing = missing_package_indexes(index_yaml)
    return missing_indexes_warning(index_yaml, missing) if missing else None


def missing_indexes_warning(index_yaml: Path | None, missing: list[CompositeIndex]) -> str:
    """One warning naming the missing indexes, as YAML to paste under ``indexes:``."""
    where = str(index_yaml) if index_yaml is not None else "the app has no index.yaml, so it"
    return (
        f"warning: {where} lacks {len(missing)} of gae_deferred's Datastore indexes; the "
        "dashboard fails on their queries here exactly as in production. Add under `indexes:` "
        "(then `gcloud app deploy index.yaml`):\n" + "\n\n".join(i.to_yaml() for i in missing)
    )


class Cron:
    """Calls cron.yaml's URLs on the app every ``every`` seconds, like App Engine cron.

    Locally the schedule is compressed to one interval so the sweeper repairs lost tasks
    within a minute. Each request carries App Engine's ``X-Appengine-Cron: true`` and the
    stack's per-run ``X-Deferred-Cron-Token`` (the app has the same value in
    ``GAE_DEFERRED_CRON_TOKEN``): off App Engine the token, not the header, proves the caller.
    """

    def __init__(self, app_url: str, cron_yaml: Path | None, every: float, token: str) -> None:
        self.app_url = app_url
        self.every = every
        self.token = token
        self.urls = _cron_urls(cron_yaml) if cron_yaml is not None else []
        self.next_run = time.monotonic() + every

    def tick(self) -> None:
        if not self.every or time.monotonic() < self.next_run:
            return
        self.next_run = time.monotonic() + self.every
        for url in self.urls:
            request = urllib.request.Request(
                self.app_url + url,
                headers={"X-Appengine-Cron": "true", CRON_TOKEN_HEADER: self.token},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answer.read()
            except OSError as exc:  # the app may be reloading; the next tick tries again
                print(f"cron {url}: {exc}", file=sys.stderr, flush=True)


def _cron_urls(cron_yaml: Path) -> list[str]:
    try:
        document = yaml.safe_load(cron_yaml.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise CronYamlError(f"{cron_yaml} is not valid YAML: {reason}") from exc
    jobs = document.get("cron") if isinstance(document, dict) else None
    if not isinstance(jobs, list | type(None)):
        raise CronYamlError(f"{cron_yaml}: expected a `cron:` list")
    return [job["url"] for job in jobs or [] if isinstance(job, dict) and job.get("url")]


class _Stop(Exception):
    """Raised by the signal handler so the main loop unwinds through stop()."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then never
    # raises KeyboardInterrupt.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _parser(defaults: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run an App Engine python3 app locally with the Datastore and Cloud Tasks "
        "emulators (state in .local/ next to app.yaml).",
        # No prefixes: `--datastore` and `--datastore-port` must never stand for each other.
        allow_abbrev=False,
    )
    parser.add_argument(
        "app_yaml",
        nargs="+",
        help="the app's app.yaml; several services: one app.yaml each, the default among them",
    )
    parser.add_argument("--port", type=int, default=defaults["app_port"], help="the app's port")
    parser.add_argument(
        "--datastore",
        choices=DATASTORE_CHOICES,
        default="builtin",
        help="the Datastore emulator: builtin (gae_deferred's, no Java needed), firestore "
        "(Google's Firestore emulator in Datastore mode, data in memory only) or datastore "
        "(Google's legacy emulator with --require_indexes; data kept in .local/); Google's "
        "need the Google Cloud SDK and Java",
    )
    parser.add_argument(
        "--gcloud-sdk",
        metavar="DIR",
        help="the Google Cloud SDK folder for --datastore firestore|datastore "
        "(default: the one of `gcloud` on PATH)",
    )
    parser.add_argument("--datastore-port", type=int, default=defaults["datastore_port"])
    parser.add_argument("--tasks-port", type=int, default=defaults["tasks_port"])
    parser.add_argument(
        "--backend-port",
        type=int,
        default=0,
        help="gunicorn's internal port, where Cloud Tasks dispatches (default: any free port)",
    )
    parser.add_argument(
        "--http-target",
        action="store_true",
        help="Cloud Run's way: HTTP-target tasks with OIDC tokens the Cloud Tasks emulator "
        "signs, which the app verifies (docs/cloud-run.md)",
    )
    parser.add_argument(
        "--oidc-port",
        type=int,
        default=0,
        help="with --http-target: where the emulator serves its token keys (default: any free)",
    )
    parser.add_argument("--project", default=defaults["project"])
    parser.add_argument("--location", default=defaults["location"])
    parser.add_argument("--no-reload", action="store_true", help="no gunicorn --reload")
    parser.add_argument("--quiet", action="store_true", help="child output to logs only")
    parser.add_argument(
        "--cron-every",
        type=float,
        default=60.0,
        help="seconds between calls of cron.yaml's URLs, as App Engine cron would (0: never)",
    )
    return parser


def _command(app_yamls: Sequence[str]) -> str:
    """The command port-in-use messages suggest: how this run was started (`make run` says so
    in GAE_DEFERRED_DEV_COMMAND), with ``{args}`` where options go."""
    from .stack import COMMAND_ENV

    files = " ".join(shlex.quote(path) for path in app_yamls)
    return os.environ.get(COMMAND_ENV) or f"{PROG} {files} {{args}}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stack until Ctrl-C or SIGTERM; returns the exit code."""
    missing_modules = [name for name in LOCAL_EXTRA if importlib.util.find_spec(name) is None]
    if missing_modules:
        print(
            f"{PROG}: {', '.join(missing_modules)} not installed: the local stack needs "
            "gae_deferred's [local] extra: pip install the gae_deferred wheel again with it, "
            "e.g. pip install './wheels/gae_deferred-<version>-py3-none-any.whl[local]'",
            file=sys.stderr,
        )
        return 2
    # Imported once the extra is known to be there (the emulators need it).
    from . import stack as local_stack
    from ._supervise import Supervisor
    from .services import service_stack

    args = _parser(
        {
            "app_port": local_stack.DEFAULT_APP_PORT,
            "datastore_port": local_stack.DEFAULT_DATASTORE_PORT,
            "tasks_port": local_stack.DEFAULT_TASKS_PORT,
            "project": local_stack.DEFAULT_PROJECT,
            "location": local_stack.DEFAULT_LOCATION,
        }
    ).parse_args(argv)
    if args.datastore in GOOGLE_MODES:
        reason = unavailable_reason(args.datastore, args.gcloud_sdk)
        if reason is not None:
            print(f"{PROG}: --datastore {args.datastore}: {reason}", file=sys.stderr)
            return 2
    if args.http_target and len(args.app_yaml) > 1:
        print(
            f"{PROG}: --http-target takes one app.yaml: HTTP-target tasks go to one URL, the "
            "service's own (on Cloud Run, one service per URL)",
            file=sys.stderr,
        )
        return 2
    try:
        stack = service_stack(
            args.app_yaml,
            app_port=args.port,
            datastore_port=args.datastore_port,
            tasks_port=args.tasks_port,
            backend_port=args.backend_port,
            project=args.project,
            location=args.location,
            reload=not args.no_reload,
            echo=None if args.quiet else sys.stdout,
            command=_command(args.app_yaml),
            datastore=args.datastore,
            gcloud_sdk=args.gcloud_sdk,
            http_target=args.http_target,
            oidc_port=args.oidc_port,
        )
        for app in [stack.app, *(s.app for s in getattr(stack, "services", {}).values())]:
            for problem in deploy_problems(app.document):
                print(f"{PROG}: warning: {app.path}: {problem}", file=sys.stderr)
        missing = missing_package_indexes(stack.index_yaml)
        cron = Cron(stack.app_url, stack.cron_yaml, args.cron_every, stack.cron_token)
    except (AppYamlError, IndexYamlError, CronYamlError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if missing:
        print(f"{PROG}: {missing_indexes_warning(stack.index_yaml, missing)}", file=sys.stderr)
    index_watch = IndexWatch(stack.index_yaml or stack.app_dir / "index.yaml", _index_problem)
    try:
        with _stop_on_signals():
            stack.start()
            cron.app_url = stack.app_url  # a port of 0 is chosen in start()
            print(stack.describe(), flush=True)
            supervisor = Supervisor(stack, prog=PROG)
            while True:
                cron.tick()
                index_note = index_watch.changed()
                if index_note:
                    print(f"{PROG}: {index_note}", file=sys.stderr, flush=True)
                try:
                    supervisor.check()
                except StackError as exc:
                    print(f"{PROG}: {exc}", file=sys.stderr)
                    return 1
                time.sleep(0.5)
    except StackError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        print("\nstopping the local stack...", flush=True)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
