"""The local stack: Datastore emulator, Cloud Tasks emulator and an app, as real processes.

``gae-deferred-dev app.yaml`` (:mod:`.dev`) runs it for any app; tests use the class on free
ports::

    from gae_deferred.local.stack import LocalStack

    ports = {"app_port": 0, "datastore_port": 0, "tasks_port": 0}
    with LocalStack("app.yaml", base_dir=tmp_path, **ports) as stack:
        requests.get(stack.app_url)          # the front end (.front), then app.yaml's
                                             # entrypoint (gunicorn main:app) behind it
        os.environ.update(stack.env)         # then defer() from this process into the stack
        stack.restart_datastore()            # fault tests: state lives under base_dir
        stack.kill_app(); stack.start_app()  # kill -9 the app and bring it back

The app runs with its folder as working directory and first on ``PYTHONPATH``. State lives
under ``base_dir`` (``<app dir>/.local/`` by default) and survives restarts: ``datastore/``,
``cloudtasks/``, ``signing.key``, ``logs/<child>.log`` and ``env`` (shell exports; ``. .local/env``
lets any Python process in another shell defer() into the running stack).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .. import defaults
from ..queue_config import QueueYamlError, load_queue_yaml
from ._process import spawn
from .app_yaml import AppYaml, load_app_yaml
from .datastore import load_index_yaml
from .errors import IndexYamlError, PortInUseError, StackError
from .front import READY_TEXT as FRONT_READY_TEXT
from .google_datastore import DATASTORE_CHOICES

HOST = "127.0.0.1"
DEFAULT_APP_PORT = 8080
DEFAULT_DATASTORE_PORT = 8081
DEFAULT_TASKS_PORT = 8123
DEFAULT_PROJECT = "gae-deferred-local"
DEFAULT_LOCATION = defaults.LOCATION
#: How a user starts the stack, with ``{args}`` where options go: port-in-use messages suggest
#: this command (gae-deferred-dev sets it; `make run` passes its own through the environment).
DEFAULT_COMMAND = "gae-deferred-dev app.yaml {args}"
COMMAND_ENV = "GAE_DEFERRED_DEV_COMMAND"
#: Variables the stack owns: inherited values would point a child at some other stack or key.
_OWNED_ENV = (
    "DATASTORE_EMULATOR_HOST",
    "CLOUD_TASKS_EMULATOR_HOST",
    "GOOGLE_CLOUD_PROJECT",
    "GAE_DEFERRED_LOCATION",
    "GAE_DEFERRED_SIGNING_KEY",
    "GAE_DEFERRED_SIGNING_KEY_FILE",
    "GAE_DEFERRED_LOCAL",
    "GAE_DEFERRED_QUEUE_YAML",
    "GAE_DEFERRED_LOCAL_PORT",
    "GAE_DEFERRED_CRON_TOKEN",
    "GAE_DEFERRED_HTTP_TARGET_URL",
    "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT",
    "GAE_DEFERRED_HTTP_TARGET_AUDIENCE",
    "GAE_DEFERRED_HTTP_TARGET_CERTS_URL",
    "GAE_DEFERRED_HTTP_TARGET_ISSUER",
)
#: What an index.yaml-less app gets: no composite index, as in production.
_NO_INDEXES = (
    "# {app_dir}/index.yaml does not exist: no composite indexes, as in production.\nindexes: []\n"
)


#: After "(gRPC" in describe(): which Datastore emulator serves.
_DATASTORE_TITLE = {
    "builtin": "",
    "firestore": ", Google's Firestore emulator in Datastore mode; data in memory only",
    "datastore": ", Google's legacy Datastore emulator",
}


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int, what: str, command: str = DEFAULT_COMMAND) -> None:
    """Raise PortInUseError naming the port when something already listens on it.

    SO_REUSEADDR makes the probe ignore TIME_WAIT leftovers of our own previous run, while a
    live listener still makes bind() fail. The probe matters because gRPC servers bind with
    SO_REUSEPORT and could otherwise share a port silently with another emulator.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(_port_message(host, port, what, command)) from exc
            raise StackError(f"cannot use {host}:{port} for the {what}: {exc}") from exc


_OPTION = {
    "app": "port",
    "datastore emulator": "datastore-port",
    "tasks emulator": "tasks-port",
    "app's internal port": "backend-port",
}
#: Every port option: the suggestion moves them all, so the next clash is not the next port's.
_ALL_PORTS = "--port 0 --datastore-port 0 --tasks-port 0 --backend-port 0"


def _port_message(host: str, port: int, what: str, command: str = DEFAULT_COMMAND) -> str:
    option = _OPTION.get(what, "port")
    return (
        f"port {port} on {host} (the {what}) is already in use: stop the other process "
        f"(`lsof -i :{port}` or `ss -ltnp 'sport = :{port}'` shows it), or pick another "
        f"--{option}, or let the stack pick every port: "
        f"`{command.format(args=_ALL_PORTS).strip()}`"
    )


class _Child:
    """One child process: its output goes to a log file (and to the console when echoing)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: pathlib.Path,
        log_path: pathlib.Path,
        ready_text: str | None,
        echo: IO[str] | None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._ready_text = ready_text
        self._echo = echo
        self.ready = threading.Event()
        self._tail: list[str] = []
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the pump
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n")
        self._log.flush()
        self.process = spawn(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            # Own process group: Ctrl-C reaches only the stack, which stops children in order,
            # and kill_app() can kill gunicorn's master and workers together.
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy_output, name=f"{name}-output", daemon=True)
        self._pump.start()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        with self._log:
            for line in self.process.stdout:
                self._log.write(line)
                self._log.flush()
                self._tail = [*self._tail[-39:], line]
                if self._echo is not None:
                    self._echo.write(f"[{self.name}] {line}")
                    self._echo.flush()
                if self._ready_text and self._ready_text in line:
                    self.ready.set()

    def output(self) -> str:
        """The last lines the child printed, for error messages."""
        return "".join(self._tail) or "(no output)"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float, *, force: bool = False) -> None:
        """SIGTERM (or SIGKILL with force) the child's process group, wait, then SIGKILL."""
        if self.alive():
            self._signal_group(signal.SIGKILL if force else signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        # Workers of a killed gunicorn master may linger briefly in the same group.
        self._signal_group(signal.SIGKILL)
        self._pump.join(5)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


class LocalStack:
    """Both emulators and the app of ``app_yaml`` as subprocesses; see the module docstring.

    Ports of 0 mean "any free port", chosen once in start() and kept across restarts so the
    clients of other processes reconnect to the same address. ``queue_yaml`` and
    ``index_yaml`` default to the files next to app.yaml; without a queue.yaml there is only
    the ``default`` queue, without an index.yaml no composite index (as in production).
    """

    def __init__(
        self,
        app_yaml: str | os.PathLike[str],
        base_dir: str | os.PathLike[str] | None = None,
        *,
        app_port: int = DEFAULT_APP_PORT,
        datastore_port: int = DEFAULT_DATASTORE_PORT,
        tasks_port: int = DEFAULT_TASKS_PORT,
        backend_port: int = 0,
        host: str = HOST,
        project: str = DEFAULT_PROJECT,
        location: str = DEFAULT_LOCATION,
        queue_yaml: str | os.PathLike[str] | None = None,
        index_yaml: str | os.PathLike[str] | None = None,
        reload: bool = False,
        workers: int = 2,
        threads: int = 4,
        extra_pythonpath: Sequence[str | os.PathLike[str]] = (),
        front_options: Sequence[str] = (),
        tasks_via_front: bool = False,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        echo: IO[str] | None = None,
        command: str = DEFAULT_COMMAND,
        datastore: str = "builtin",
        gcloud_sdk: str | os.PathLike[str] | None = None,
        http_target: bool = False,
        oidc_port: int = 0,
    ) -> None:
        if datastore not in DATASTORE_CHOICES:
            raise ValueError(f"datastore must be one of {DATASTORE_CHOICES}, not {datastore!r}")
        self.app: AppYaml = load_app_yaml(app_yaml)
        self.app_dir = self.app.app_dir
        self.base_dir = pathlib.Path(base_dir or self.app_dir / ".local").resolve()
        self.host = host
        self.project = project
        self.location = location
        self.queue_yaml = self._beside_app(queue_yaml, "queue.yaml")
        self.index_yaml = self._beside_app(index_yaml, "index.yaml")
        self.reload = reload
        self.workers = workers
        self.threads = threads
        self.extra_pythonpath = [str(pathlib.Path(p).resolve()) for p in extra_pythonpath]
        #: Extra ``python -m gae_deferred.local.front`` options, e.g. shorter body timeouts.
        self.front_options = list(front_options)
        #: Cloud Tasks dispatches to gunicorn's internal port, as production's dispatch comes
        #: through Google's front end, which does not run on the instance: the local front end
        #: is for browsers and other clients (slow bodies, static files, Host checks). True
        #: sends tasks through the front end instead (the throughput benchmark compares both).
        self.tasks_via_front = tasks_via_front
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.echo = echo
        #: Which Datastore emulator runs: ``builtin`` (ours), or Google's ``firestore``
        #: (Firestore emulator in Datastore mode) or ``datastore`` (legacy emulator); see
        #: :mod:`.google_datastore`. ``gcloud_sdk``: the SDK folder (default: gcloud's).
        self.datastore = datastore
        self.gcloud_sdk = gcloud_sdk
        self._requested = {"app": app_port, "datastore": datastore_port, "tasks": tasks_port}
        self.app_port = app_port
        self.datastore_port = datastore_port
        self.tasks_port = tasks_port
        #: gunicorn's internal loopback port, behind the front end and where Cloud Tasks
        #: dispatches: 0 chooses one once in start(), kept across restarts like the others.
        self.backend_port = backend_port
        #: Cloud Run's way (``--http-target``): defer() makes HTTP-target tasks for the app's
        #: URL, the Cloud Tasks emulator signs their OIDC tokens with its own key and serves
        #: it on ``oidc_port`` (0: one chosen in start()), and the app verifies them there.
        self.http_target = http_target
        self.oidc_port = oidc_port
        #: The command port-in-use messages suggest (``{args}``: where options go).
        self.command = command
        #: Authenticates the cron timer's requests to the app; new for every stack object.
        self.cron_token = secrets.token_urlsafe(32)
        self._children: dict[str, _Child] = {}
        self._child_extra_env: dict[str, str] = {}

    def _beside_app(self, given: str | os.PathLike[str] | None, name: str) -> pathlib.Path | None:
        if given is not None:
            return pathlib.Path(given).resolve()
        default = self.app_dir / name
        return default if default.is_file() else None

    # -- addresses and environment -------------------------------------------------------

    @property
    def app_url(self) -> str:
        return f"http://{self.host}:{self.app_port}"

    @property
    def dispatch_url(self) -> str:
        """Where the Cloud Tasks emulator delivers tasks (see ``tasks_via_front``)."""
        if self.tasks_via_front:
            return self.app_url
        return f"http://{self.host}:{self.backend_port}"

    @property
    def dashboard_url(self) -> str:
        return f"{self.app_url}/_ah/deferred-admin"

    @property
    def datastore_host(self) -> str:
        return f"{self.host}:{self.datastore_port}"

    @property
    def tasks_host(self) -> str:
        return f"{self.host}:{self.tasks_port}"

    @property
    def signing_key_file(self) -> pathlib.Path:
        return self.base_dir / "signing.key"

    @property
    def env_file(self) -> pathlib.Path:
        return self.base_dir / "env"

    @property
    def logs_dir(self) -> pathlib.Path:
        return self.base_dir / "logs"

    @property
    def cron_yaml(self) -> pathlib.Path | None:
        """The app's cron.yaml, if it has one."""
        path = self.app_dir / "cron.yaml"
        return path if path.is_file() else None

    def log_file(self, child: str) -> pathlib.Path:
        """``base/logs/<child>.log`` for child in ``datastore``, ``cloudtasks``, ``app``."""
        return self.logs_dir / f"{child}.log"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to defer() into this stack (the same values as ``base/env``).

        ``PYTHONPATH`` holds the app's folder (and ``extra_pythonpath``) only: children get it
        in front of the inherited one, ``base/env`` in front of the shell's.
        """
        env = {
            "DATASTORE_EMULATOR_HOST": self.datastore_host,
            "CLOUD_TASKS_EMULATOR_HOST": self.tasks_host,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "GAE_DEFERRED_LOCATION": self.location,
            "GAE_DEFERRED_SIGNING_KEY_FILE": str(self.signing_key_file),
            "GAE_DEFERRED_LOCAL": "1",
            "PYTHONPATH": os.pathsep.join([str(self.app_dir), *self.extra_pythonpath]),
        }
        if self.queue_yaml is not None:
            env["GAE_DEFERRED_QUEUE_YAML"] = str(self.queue_yaml)
        if self.http_target:
            issuer = f"http://{self.host}:{self.oidc_port}"
            env["GAE_DEFERRED_HTTP_TARGET_URL"] = self.dispatch_url
            env["GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT"] = self.tasks_service_account
            # The emulator's keys, never Google's: settings refuse these outside local mode.
            env["GAE_DEFERRED_HTTP_TARGET_CERTS_URL"] = f"{issuer}/oauth2/v1/certs"
            env["GAE_DEFERRED_HTTP_TARGET_ISSUER"] = issuer
        return env

    @property
    def tasks_service_account(self) -> str:
        """The service account HTTP-target tasks carry tokens for (``--http-target``)."""
        return f"tasks@{self.project}.iam.gserviceaccount.com"

    def _child_env(self, *, app: bool = False) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k not in _OWNED_ENV}
        # app.yaml's env_variables win over the shell's, as on App Engine; the stack's over both.
        env = {**inherited, **self.app.env_variables} if app else inherited
        own = self.env
        if inherited.get("PYTHONPATH"):
            own["PYTHONPATH"] += os.pathsep + inherited["PYTHONPATH"]
        env.update(own)
        if app:
            # For the app only: the Host its local-mode checks accept, and the cron token.
            env["GAE_DEFERRED_LOCAL_PORT"] = str(self.app_port)
            env["GAE_DEFERRED_CRON_TOKEN"] = self.cron_token
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write_env_file(self) -> pathlib.Path:
        """Write ``base/env``: shell exports for ``. .local/env`` in another shell."""
        lines = [
            "# Written by gae-deferred-dev (the local stack). Use: . .local/env",
            # A key in the environment would win over the file and fail every signature check.
            "unset GAE_DEFERRED_SIGNING_KEY",
        ]
        for name, value in self.env.items():
            if name == "PYTHONPATH":
                keep = '"${PYTHONPATH:+:$PYTHONPATH}"'
                lines.append(f"export PYTHONPATH={shlex.quote(value)}{keep}")
            else:
                lines.append(f"export {name}={shlex.quote(value)}")
        self.env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self.env_file

    def _ensure_signing_key(self) -> None:
        """32 random bytes, hex, created once with mode 0600 and kept across restarts."""
        try:
            fd = os.open(self.signing_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w", encoding="ascii") as key_file:
            key_file.write(secrets.token_hex(32) + "\n")

    def _index_yaml_for_emulator(self) -> pathlib.Path:
        if self.index_yaml is not None:
            return self.index_yaml
        path = self.base_dir / "no-index.yaml"
        path.write_text(_NO_INDEXES.format(app_dir=self.app_dir), encoding="utf-8")
        return path

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalStack:
        """Start whatever is not running: datastore, then Cloud Tasks, then the app."""
        if os.environ.get("GAE_ENV"):
            raise StackError(
                f"GAE_ENV is set ({os.environ['GAE_ENV']!r}): this looks like App Engine, where "
                "the local stack (local mode, emulators) must never run; unset GAE_ENV locally"
            )
        self._check_config()
        try:
            self.base_dir.mkdir(parents=True, exist_ok=True)
            self._ensure_signing_key()
            self._resolve_ports()
            self.write_env_file()
            if "datastore" not in self._children:
                self.start_datastore()
            if "cloudtasks" not in self._children:
                self.start_tasks()
            if "app" not in self._children:
                self.start_app()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_config(self) -> None:
        """queue.yaml and index.yaml errors, with file:line, before any process starts."""
        try:
            if self.queue_yaml is not None:
                load_queue_yaml(self.queue_yaml)
            if self.index_yaml is not None:
                load_index_yaml(self.index_yaml)
        except QueueYamlError as exc:
            raise StackError(exc.format()) from exc
        except (IndexYamlError, OSError) as exc:
            raise StackError(str(exc)) from exc

    def _resolve_ports(self) -> None:
        """Pick free ports for 0s, once; check the fixed ones before any child starts."""
        chosen: set[int] = set()
        for key, what in (
            ("app", "app"),
            ("datastore", "datastore emulator"),
            ("tasks", "tasks emulator"),
        ):
            port = getattr(self, f"{key}_port")
            if port == 0:
                port = free_port(self.host)
                while port in chosen:
                    port = free_port(self.host)
                setattr(self, f"{key}_port", port)
            elif self._requested[key] != 0 and not self._running(key):
                check_port_free(self.host, port, what, self.command)
            chosen.add(port)
        if self.backend_port == 0:
            port = free_port(self.host)
            while port in chosen:
                port = free_port(self.host)
            self.backend_port = port
        elif self.backend_port in chosen:
            raise StackError(f"the app's internal port {self.backend_port} is also another port")
        elif not self._running("app"):
            check_port_free(self.host, self.backend_port, "app's internal port", self.command)
        chosen.add(self.backend_port)
        if self.http_target and self.oidc_port == 0:
            port = free_port(self.host)
            while port in chosen:
                port = free_port(self.host)
            self.oidc_port = port

    def _running(self, key: str) -> bool:
        child = self._children.get({"tasks": "cloudtasks"}.get(key, key))
        return child is not None and child.alive()

    def start_datastore(self) -> None:
        """Start the Datastore emulator (data in base/datastore) and wait for its listening line."""
        check_port_free(self.host, self.datastore_port, "datastore emulator", self.command)
        if self.datastore != "builtin":
            self._start_google_datastore()
            return
        self._spawn(
            "datastore",
            [
                sys.executable,
                "-m",
                "gae_deferred.local.datastore",
                "--host",
                self.host,
                "--port",
                str(self.datastore_port),
                "--data-dir",
                str(self.base_dir / "datastore"),
                "--index-yaml",
                str(self._index_yaml_for_emulator()),
            ],
            ready_text="datastore emulator listening on",
            what="datastore emulator",
            port=self.datastore_port,
        )

    def _start_google_datastore(self) -> None:
        """Google's emulator of ``self.datastore`` (the legacy one keeps its data in
        base/google-datastore, saved by the POST /shutdown of stop())."""
        from . import google_datastore

        try:
            data_dir = self.base_dir / "google-datastore"
            argv = google_datastore.command(
                self.datastore,
                host=self.host,
                port=self.datastore_port,
                data_dir=data_dir,
                index_yaml=self._index_yaml_for_emulator(),
                project=self.project,
                sdk_root=self.gcloud_sdk,
            )
            if self.datastore == "datastore":
                google_datastore.prepare_data_dir(data_dir, self.gcloud_sdk)
            java = google_datastore.java_with_parent_death(self.base_dir / "bin")
        except (google_datastore.GoogleEmulatorUnavailable, RuntimeError) as exc:
            raise StackError(f"--datastore {self.datastore}: {exc}") from exc
        self._child_extra_env["JAVA"] = str(java)
        self._spawn(
            "datastore",
            argv,
            ready_text=google_datastore.READY_TEXT,
            what="datastore emulator",
            port=self.datastore_port,
        )

    def _stop_datastore(self, child: _Child) -> None:
        """Google's emulators first get POST /shutdown (the legacy one saves its data then)."""
        if self.datastore != "builtin" and child.alive():
            from . import google_datastore

            if google_datastore.request_shutdown(self.host, self.datastore_port):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(self.stop_timeout)
        child.stop(self.stop_timeout)

    def start_tasks(self) -> None:
        """Start the Cloud Tasks emulator (the app's queues, dispatching to app_url)."""
        check_port_free(self.host, self.tasks_port, "tasks emulator", self.command)
        argv = [
            sys.executable,
            "-m",
            "gae_deferred.local.cloudtasks",
            "--host",
            self.host,
            "--port",
            str(self.tasks_port),
            "--data-dir",
            str(self.base_dir / "cloudtasks"),
            "--project",
            self.project,
            "--location",
            self.location,
            "--app-url",
            self.dispatch_url,
        ]
        if self.queue_yaml is not None:
            argv += ["--queue-yaml", str(self.queue_yaml)]
        for service, url in self.service_urls().items():
            argv += ["--service-url", f"{service}={url}"]
        if self.http_target:
            argv += ["--oidc-port", str(self.oidc_port)]
        self._spawn(
            "cloudtasks",
            argv,
            ready_text="cloud tasks emulator listening on",
            what="tasks emulator",
            port=self.tasks_port,
        )

    def service_urls(self) -> dict[str, str]:
        """The app's other services, where Cloud Tasks delivers tasks routed to them (one
        service here; services.ServiceStack runs several)."""
        return {}

    def start_app(self) -> None:
        """The front end on app_port, with app.yaml's entrypoint (gunicorn) behind it."""
        check_port_free(self.host, self.app_port, "app", self.command)
        self._wait_backend_port_free()
        gunicorn = [
            sys.executable,
            "-m",
            "gunicorn",
            self.app.wsgi_app,
            "--bind",
            f"{self.host}:{self.backend_port}",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            # A 3 MB spilled task can take a while on a slow laptop; a stop must not hang.
            "--timeout",
            "120",
            "--graceful-timeout",
            "5",
            # gunicorn's control socket is one path per user: two stacks would fight over it.
            "--no-control-socket",
            "--access-logfile",
            "-",
            "--error-logfile",
            "-",
        ]
        if self.reload:
            gunicorn.append("--reload")
        front = [
            sys.executable,
            "-m",
            "gae_deferred.local.front",
            "--host",
            self.host,
            "--port",
            str(self.app_port),
            "--backend-port",
            str(self.backend_port),
            "--app-yaml",
            str(self.app.path),
            *self.front_options,
            "--",
            *gunicorn,
        ]
        self._spawn("app", front, ready_text=FRONT_READY_TEXT, what="app", port=self.app_port)

    def _wait_backend_port_free(self) -> None:
        """The same internal port after a restart (Cloud Tasks dispatches there): wait out a
        killed gunicorn's last workers, which hold its socket for a moment."""
        deadline = time.monotonic() + self.stop_timeout
        while True:
            try:
                check_port_free(self.host, self.backend_port, "app's internal port", self.command)
                return
            except PortInUseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _spawn(
        self, name: str, argv: list[str], *, ready_text: str | None, what: str, port: int
    ) -> None:
        env = self._child_env(app=name == "app")
        if name == "datastore":
            env.update(self._child_extra_env)
        log = self.log_file(name)
        child = _Child(name, argv, env, self.app_dir, log, ready_text, self.echo)
        self._children[name] = child
        try:
            self._wait_ready(child, what, port)
        except BaseException:
            child.stop(self.stop_timeout)
            del self._children[name]
            raise

    def _wait_ready(self, child: _Child, what: str, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            # The app: the front end's listening line, then gunicorn bound behind it.
            if child.ready.is_set() and (child.name != "app" or self._app_listening()):
                return
            code = child.process.poll()
            if code is not None:
                child.stop(self.stop_timeout)
                text = child.output()
                if "already in use" in text or "Connection in use" in text:
                    message = _port_message(self.host, port, what, self.command)
                    raise PortInUseError(message + "\n" + text)
                raise StackError(
                    f"the {what} exited with code {code} while starting; its output "
                    f"({child.log_path}):\n{text}"
                )
            child.ready.wait(0.1)
        raise StackError(
            f"the {what} did not become ready on {self.host}:{port} within "
            f"{self.startup_timeout:.0f}s; its output ({child.log_path}):\n{child.output()}"
        )

    def _app_listening(self) -> bool:
        """Whether gunicorn listens on its internal port: nothing is sent, so no route of the
        app runs and the front end logs nothing (a request held in gunicorn's backlog while
        its workers import the app is answered once they have)."""
        try:
            check_port_free(self.host, self.backend_port, "app's internal port")
        except StackError:
            return True
        return False

    def stop(self) -> None:
        """Stop the app first (no new task runs), then Cloud Tasks, then Datastore."""
        for name in ("app", "cloudtasks", "datastore"):
            child = self._children.pop(name, None)
            if child is not None and name == "datastore":
                self._stop_datastore(child)
            elif child is not None:
                child.stop(self.stop_timeout)

    def restart_datastore(self) -> None:
        """Stop and start the Datastore emulator on the same port and data dir."""
        self._stop_child("datastore")
        self.start_datastore()

    def restart_tasks(self) -> None:
        """Stop and start the Cloud Tasks emulator on the same port and data dir."""
        self._stop_child("cloudtasks")
        self.start_tasks()

    def stop_app(self) -> None:
        """Stop the app (front end and gunicorn) gracefully; start_app() brings it back."""
        self._stop_child("app")

    def kill_app(self) -> None:
        """kill -9 the front end and gunicorn (fault tests); start_app() brings them back."""
        child = self._children.pop("app", None)
        if child is not None:
            child.stop(self.stop_timeout, force=True)

    def _stop_child(self, name: str) -> None:
        child = self._children.pop(name, None)
        if child is not None and name == "datastore":
            self._stop_datastore(child)
        elif child is not None:
            child.stop(self.stop_timeout)

    #: How each child is started again (restart_child).
    _STARTERS: dict[str, str] = {
        "datastore": "start_datastore",
        "cloudtasks": "start_tasks",
        "app": "start_app",
    }

    def restart_child(self, name: str) -> None:
        """Clean up what is left of child ``name`` (its process group) and start it again, on
        the same ports and state. Raises StackError when it does not come up."""
        self._stop_child(name)
        getattr(self, self._STARTERS[name])()

    def exit_code(self, name: str) -> int | None:
        """The exit code of child ``name`` (None while it runs or when there is none)."""
        child = self._children.get(name)
        return None if child is None else child.process.poll()

    def describe_child(self, name: str) -> str:
        """What child ``name`` is, for messages: "the datastore emulator (127.0.0.1:8081)"."""
        what, port = {
            "datastore": ("datastore emulator", self.datastore_port),
            "cloudtasks": ("tasks emulator", self.tasks_port),
            "app": ("app", self.app_port),
        }.get(name, (name, 0))
        return f"the {what} ({self.host}:{port})"

    def dead_children(self) -> list[str]:
        """Names of children that exited on their own."""
        return [name for name, child in self._children.items() if not child.alive()]

    def child_output(self, name: str) -> str:
        """The last lines a running child printed ("" when it is not running)."""
        child = self._children.get(name)
        return child.output() if child else ""

    def pids(self) -> dict[str, int]:
        """Process ids of the running children (tests check nothing is left behind)."""
        return {name: child.process.pid for name, child in self._children.items()}

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def describe(self) -> str:
        """The lines gae-deferred-dev prints once everything is up."""
        rel = str(self.base_dir)
        with contextlib.suppress(ValueError):
            rel = str(self.base_dir.relative_to(pathlib.Path.cwd()))
        # This repository's demo app (demo/ beside app.yaml) serves its page at /.
        demo = [f"  demo       {self.app_url}/"] if (self.app_dir / "demo").is_dir() else []
        return "\n".join(
            [
                "",
                "gae_deferred local stack is up:",
                f"  app        {self.app_url}/",
                *demo,
                f"  dashboard  {self.dashboard_url}",
                f"  datastore  {self.datastore_host} (gRPC{_DATASTORE_TITLE[self.datastore]})",
                f"  tasks      {self.tasks_host} (gRPC)",
                *(
                    [f"  tokens     http://{self.host}:{self.oidc_port}/ (HTTP-target OIDC keys)"]
                    if self.http_target
                    else []
                ),
                f"  state      {rel}/   logs {rel}/logs/",
                f"  another shell: . {rel}/env   then defer() from any Python process",
                "Ctrl-C stops everything.",
                "",
            ]
        )
