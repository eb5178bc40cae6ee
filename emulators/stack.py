"""The local stack: Datastore emulator, Cloud Tasks emulator and the app, as real processes.

``make run`` runs ``python -m gae_deferred.local.stack``; tests use the same class on free ports::

    from gae_deferred.local.stack import LocalStack

    with LocalStack(base_dir=tmp_path, app_port=0, datastore_port=0, tasks_port=0) as stack:
        requests.get(stack.app_url)          # gunicorn main:app, like app.yaml's entrypoint
        os.environ.update(stack.env)         # then defer() from this process into the stack
        stack.restart_datastore()            # fault tests: state lives under base_dir
        stack.kill_app(); stack.start_app()  # kill -9 the app and bring it back

State lives under ``base_dir`` (``.local/`` for ``make run``) and survives restarts:
``datastore/``, ``cloudtasks/``, ``signing.key``, ``logs/<child>.log`` and ``env`` (shell exports;
``. .local/env`` lets any Python process in another shell defer() into the running stack).
"""

from __future__ import annotations

import argparse
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
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_APP_PORT = 8080
DEFAULT_DATASTORE_PORT = 8081
DEFAULT_TASKS_PORT = 8123
DEFAULT_PROJECT = "gae-deferred-local"
DEFAULT_LOCATION = "us-central1"
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
)


class StackError(RuntimeError):
    """The stack could not start (or a child died); the message says which part and why."""


class PortInUseError(StackError):
    """A port the stack needs is taken by another process."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int, what: str) -> None:
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
                raise PortInUseError(_port_message(host, port, what)) from exc
            raise StackError(f"cannot use {host}:{port} for the {what}: {exc}") from exc


def _port_message(host: str, port: int, what: str) -> str:
    return (
        f"port {port} on {host} (the {what}) is already in use: stop the other process "
        f"(`lsof -i :{port}` or `ss -ltnp 'sport = :{port}'` shows it), or pick another port, "
        f"e.g. `python -m gae_deferred.local.stack --{what.split()[0]}-port 0`"
    )


# Run before the child's own program: Linux then sends it SIGTERM when the stack dies, even by
# kill -9. A launcher rather than preexec_fn: preexec_fn forces fork() in a process that may
# have gRPC threads, and gRPC's fork handlers can abort the child before it execs.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('the local stack exited while starting this process')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    if sys.platform != "linux":
        return list(argv)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


class _Child:
    """One child process: its output goes to a log file (and to the console when echoing)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
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
        self.process = subprocess.Popen(
            _with_parent_death_signal(argv),
            cwd=ROOT,
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
    """Both emulators and the app as subprocesses; see the module docstring for usage.

    Ports of 0 mean "any free port", chosen once in start() and kept across restarts so the
    clients of other processes reconnect to the same address.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] = ROOT / ".local",
        *,
        app_port: int = DEFAULT_APP_PORT,
        datastore_port: int = DEFAULT_DATASTORE_PORT,
        tasks_port: int = DEFAULT_TASKS_PORT,
        host: str = HOST,
        project: str = DEFAULT_PROJECT,
        location: str = DEFAULT_LOCATION,
        queue_yaml: str | os.PathLike[str] = ROOT / "queue.yaml",
        index_yaml: str | os.PathLike[str] = ROOT / "index.yaml",
        reload: bool = False,
        workers: int = 2,
        threads: int = 4,
        extra_pythonpath: Sequence[str | os.PathLike[str]] = (),
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        echo: IO[str] | None = None,
    ) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        self.host = host
        self.project = project
        self.location = location
        self.queue_yaml = pathlib.Path(queue_yaml).resolve()
        self.index_yaml = pathlib.Path(index_yaml).resolve()
        self.reload = reload
        self.workers = workers
        self.threads = threads
        self.extra_pythonpath = [str(pathlib.Path(p).resolve()) for p in extra_pythonpath]
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.echo = echo
        self._requested = {"app": app_port, "datastore": datastore_port, "tasks": tasks_port}
        self.app_port = app_port
        self.datastore_port = datastore_port
        self.tasks_port = tasks_port
        self._children: dict[str, _Child] = {}

    # -- addresses and environment -------------------------------------------------------

    @property
    def app_url(self) -> str:
        return f"http://{self.host}:{self.app_port}"

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

    def log_file(self, child: str) -> pathlib.Path:
        """``base/logs/<child>.log`` for child in ``datastore``, ``cloudtasks``, ``app``."""
        return self.logs_dir / f"{child}.log"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to defer() into this stack (the same values as ``base/env``)."""
        return {
            "DATASTORE_EMULATOR_HOST": self.datastore_host,
            "CLOUD_TASKS_EMULATOR_HOST": self.tasks_host,
            "GOOGLE_CLOUD_PROJECT": self.project,
            "GAE_DEFERRED_LOCATION": self.location,
            "GAE_DEFERRED_SIGNING_KEY_FILE": str(self.signing_key_file),
            "GAE_DEFERRED_LOCAL": "1",
            "GAE_DEFERRED_QUEUE_YAML": str(self.queue_yaml),
            "PYTHONPATH": os.pathsep.join([str(ROOT), *self.extra_pythonpath]),
        }

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _OWNED_ENV}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def write_env_file(self) -> pathlib.Path:
        """Write ``base/env``: shell exports for ``. .local/env`` in another shell."""
        lines = [
            "# Written by `make run` (python -m gae_deferred.local.stack). Use: . .local/env",
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

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LocalStack:
        """Start whatever is not running: datastore, then Cloud Tasks, then the app."""
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
                check_port_free(self.host, port, what)
            chosen.add(port)

    def _running(self, key: str) -> bool:
        child = self._children.get({"tasks": "cloudtasks"}.get(key, key))
        return child is not None and child.alive()

    def start_datastore(self) -> None:
        """Start the Datastore emulator (data in base/datastore) and wait for its listening line."""
        check_port_free(self.host, self.datastore_port, "datastore emulator")
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
                str(self.index_yaml),
            ],
            ready_text="datastore emulator listening on",
            what="datastore emulator",
            port=self.datastore_port,
        )

    def start_tasks(self) -> None:
        """Start the Cloud Tasks emulator (queues from queue_yaml, dispatching to app_url)."""
        check_port_free(self.host, self.tasks_port, "tasks emulator")
        self._spawn(
            "cloudtasks",
            [
                sys.executable,
                "-m",
                "gae_deferred.local.cloudtasks",
                "--host",
                self.host,
                "--port",
                str(self.tasks_port),
                "--data-dir",
                str(self.base_dir / "cloudtasks"),
                "--queue-yaml",
                str(self.queue_yaml),
                "--project",
                self.project,
                "--location",
                self.location,
                "--app-url",
                self.app_url,
            ],
            ready_text="cloud tasks emulator listening on",
            what="tasks emulator",
            port=self.tasks_port,
        )

    def start_app(self) -> None:
        """gunicorn main:app, as app.yaml's entrypoint, with --reload for ``make run``."""
        check_port_free(self.host, self.app_port, "app")
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "--bind",
            f"{self.host}:{self.app_port}",
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
            argv.append("--reload")
        self._spawn("app", argv, ready_text=None, what="app", port=self.app_port)

    def _spawn(
        self, name: str, argv: list[str], *, ready_text: str | None, what: str, port: int
    ) -> None:
        child = _Child(name, argv, self._child_env(), self.log_file(name), ready_text, self.echo)
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
            if child.ready.is_set() or (child.name == "app" and self._app_answers()):
                return
            code = child.process.poll()
            if code is not None:
                child.stop(self.stop_timeout)
                text = child.output()
                if "already in use" in text or "Connection in use" in text:
                    raise PortInUseError(_port_message(self.host, port, what) + "\n" + text)
                raise StackError(
                    f"the {what} exited with code {code} while starting; its output "
                    f"({child.log_path}):\n{text}"
                )
            child.ready.wait(0.1)
        raise StackError(
            f"the {what} did not become ready on {self.host}:{port} within "
            f"{self.startup_timeout:.0f}s; its output ({child.log_path}):\n{child.output()}"
        )

    def _app_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.app_url + "/", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Stop the app first (no new task runs), then Cloud Tasks, then Datastore."""
        for name in ("app", "cloudtasks", "datastore"):
            child = self._children.pop(name, None)
            if child is not None:
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
        """Stop gunicorn gracefully (SIGTERM); start_app() brings it back."""
        self._stop_child("app")

    def kill_app(self) -> None:
        """kill -9 gunicorn's master and workers (fault tests); start_app() brings it back."""
        child = self._children.pop("app", None)
        if child is not None:
            child.stop(self.stop_timeout, force=True)

    def _stop_child(self, name: str) -> None:
        child = self._children.pop(name, None)
        if child is not None:
            child.stop(self.stop_timeout)

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
        """The lines `make run` prints once everything is up."""
        rel = str(self.base_dir)
        with contextlib.suppress(ValueError):
            rel = str(self.base_dir.relative_to(pathlib.Path.cwd()))
        return "\n".join(
            [
                "",
                "gae_deferred local stack is up:",
                f"  app        {self.app_url}/",
                f"  demo       {self.app_url}/",
                f"  dashboard  {self.dashboard_url}",
                f"  datastore  {self.datastore_host} (gRPC)",
                f"  tasks      {self.tasks_host} (gRPC)",
                f"  state      {rel}/   logs {rel}/logs/",
                f"  another shell: . {rel}/env   then defer() from any Python process",
                "Ctrl-C stops everything.",
                "",
            ]
        )


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


class _Cron:
    """Calls cron.yaml's URLs on the app every ``every`` seconds, like App Engine cron.

    Locally the schedule is compressed to one interval so the sweeper repairs lost tasks
    within a minute; the request comes from loopback, which the dashboard treats as admin.
    """

    def __init__(self, app_url: str, cron_yaml: pathlib.Path, every: float) -> None:
        self.app_url = app_url
        self.every = every
        jobs = (yaml.safe_load(cron_yaml.read_text()) or {}).get("cron") or []
        self.urls = [job["url"] for job in jobs if isinstance(job, dict) and job.get("url")]
        self.next_run = time.monotonic() + every

    def tick(self) -> None:
        if not self.every or time.monotonic() < self.next_run:
            return
        self.next_run = time.monotonic() + self.every
        for url in self.urls:
            request = urllib.request.Request(
                self.app_url + url, headers={"X-Appengine-Cron": "true"}
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answer.read()
            except OSError as exc:  # the app may be reloading; the next tick tries again
                print(f"cron {url}: {exc}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gae_deferred.local.stack``: run the stack until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m gae_deferred.local.stack",
        description="Run the Datastore emulator, the Cloud Tasks emulator and the app (gunicorn).",
    )
    parser.add_argument("--base-dir", default=str(ROOT / ".local"), help="state (default .local)")
    parser.add_argument("--app-port", type=int, default=DEFAULT_APP_PORT)
    parser.add_argument("--datastore-port", type=int, default=DEFAULT_DATASTORE_PORT)
    parser.add_argument("--tasks-port", type=int, default=DEFAULT_TASKS_PORT)
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    parser.add_argument("--location", default=DEFAULT_LOCATION)
    parser.add_argument("--queue-yaml", default=str(ROOT / "queue.yaml"))
    parser.add_argument("--index-yaml", default=str(ROOT / "index.yaml"))
    parser.add_argument("--no-reload", action="store_true", help="no gunicorn --reload")
    parser.add_argument("--quiet", action="store_true", help="child output to logs only")
    parser.add_argument(
        "--cron-every",
        type=float,
        default=60.0,
        help="seconds between calls of cron.yaml's URLs, as App Engine cron would (0: never)",
    )
    args = parser.parse_args(argv)

    stack = LocalStack(
        args.base_dir,
        app_port=args.app_port,
        datastore_port=args.datastore_port,
        tasks_port=args.tasks_port,
        project=args.project,
        location=args.location,
        queue_yaml=args.queue_yaml,
        index_yaml=args.index_yaml,
        reload=not args.no_reload,
        echo=None if args.quiet else sys.stdout,
    )
    try:
        with _stop_on_signals():
            stack.start()
            print(stack.describe(), flush=True)
            cron = _Cron(stack.app_url, ROOT / "cron.yaml", args.cron_every)
            while True:
                cron.tick()
                dead = stack.dead_children()
                if dead:
                    print(
                        f"{dead[0]} exited unexpectedly; see {stack.log_file(dead[0])}:\n"
                        f"{stack.child_output(dead[0])}",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(0.5)
    except StackError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        print("\nstopping the local stack...", flush=True)
        return 0
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
