"""Google's own Datastore emulators from the Google Cloud SDK, started and stopped for us.

Two of them speak the same ``google.datastore.v1`` gRPC API as ours (:mod:`.datastore`):

``firestore``
    The Firestore emulator in Datastore mode (``cloud_firestore_emulator start
    --database-mode=datastore-mode``): what production Datastore is today. Data lives in memory
    only; it does not enforce composite indexes.
``datastore``
    The legacy Cloud Datastore emulator (``cloud_datastore_emulator start``), run with
    ``--firestore_in_datastore_mode`` (strong consistency, as production), ``--store_on_disk``
    and ``--require_indexes`` with the app's index.yaml. It writes its data to disk only when
    asked to stop with ``POST /shutdown``, which :meth:`GoogleDatastoreEmulator.stop` does.

::

    from gae_deferred.local.google_datastore import GoogleDatastoreEmulator

    with GoogleDatastoreEmulator("firestore", port=0) as emulator:
        os.environ["DATASTORE_EMULATOR_HOST"] = emulator.address

The SDK is found through ``gcloud`` on PATH (or ``sdk_root``); Java through ``$JAVA`` or PATH.
When either is missing, :class:`GoogleEmulatorUnavailable` says in one line what to install.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import IO, Any

from ._process import spawn, with_parent_death_signal
from .errors import GoogleEmulatorUnavailable

#: The choices of ``gae-deferred-dev --datastore`` that are Google's emulators.
GOOGLE_MODES = ("firestore", "datastore")
#: Every choice of ``--datastore``: ours (no Java needed) first, the default.
DATASTORE_CHOICES = ("builtin", *GOOGLE_MODES)

_COMPONENTS = {
    # mode: (folder under <sdk>/platform, script, gcloud component, Debian package)
    "firestore": (
        "cloud-firestore-emulator",
        "cloud_firestore_emulator",
        "cloud-firestore-emulator",
        "google-cloud-cli-firestore-emulator",
    ),
    "datastore": (
        "cloud-datastore-emulator",
        "cloud_datastore_emulator",
        "cloud-datastore-emulator",
        "google-cloud-cli-datastore-emulator",
    ),
}
_TITLE = {
    "firestore": "Google's Firestore emulator (Datastore mode)",
    "datastore": "Google's legacy Cloud Datastore emulator",
}
#: What both print once they serve (their health check, GET /, answers "Ok" from then on).
READY_TEXT = "Dev App Server is now running"


def find_sdk(sdk_root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The Google Cloud SDK folder: ``sdk_root`` if given, else the one of ``gcloud`` on PATH."""
    if sdk_root is not None:
        root = pathlib.Path(sdk_root).expanduser().resolve()
        if not (root / "platform").is_dir() and not (root / "bin" / "gcloud").exists():
            raise GoogleEmulatorUnavailable(
                f"{root} is not a Google Cloud SDK folder (no bin/gcloud, no platform/)"
            )
        return root
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise GoogleEmulatorUnavailable(
            "Google Cloud SDK not found: no `gcloud` on PATH; install it "
            "(https://cloud.google.com/sdk/docs/install) or name its folder "
            "(gae-deferred-dev --gcloud-sdk DIR)"
        )
    # <sdk>/bin/gcloud, often behind a symlink such as /usr/bin/gcloud.
    return pathlib.Path(gcloud).resolve().parent.parent


def find_java() -> str:
    """The ``java`` the SDK's scripts would run (``$JAVA`` or PATH)."""
    java = os.environ.get("JAVA") or shutil.which("java")
    if not java or shutil.which(java) is None:
        raise GoogleEmulatorUnavailable(
            "Java not found (no `java` on PATH, $JAVA unset): Google's Datastore emulators need "
            "a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"
        )
    return shutil.which(java) or java


def emulator_script(mode: str, sdk_root: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The SDK's launcher script of ``mode`` (``firestore`` or ``datastore``); checks Java too."""
    if mode not in _COMPONENTS:
        raise ValueError(f"mode must be one of {', '.join(GOOGLE_MODES)}, not {mode!r}")
    root = find_sdk(sdk_root)
    folder, script, component, package = _COMPONENTS[mode]
    path = root / "platform" / folder / script
    if not path.is_file():
        raise GoogleEmulatorUnavailable(
            f"{_TITLE[mode]} is not installed in the Google Cloud SDK at {root}: "
            f"`gcloud components install {component}` (or apt-get install {package})"
        )
    find_java()
    return path


def unavailable_reason(mode: str, sdk_root: str | os.PathLike[str] | None = None) -> str | None:
    """None when ``mode``'s emulator can run here, else the one line saying what to install."""
    try:
        emulator_script(mode, sdk_root)
    except GoogleEmulatorUnavailable as exc:
        return str(exc)
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def java_with_parent_death(folder: pathlib.Path) -> pathlib.Path:
    """A ``$JAVA`` for the SDK's scripts: the real java behind the parent-death launcher.

    The scripts run ``$JAVA`` as a child of bash rather than exec it; without this, a bash
    killed with its parent would leave its java running.
    """
    java = find_java()
    argv = with_parent_death_signal([java])
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "java"
    if argv == [java]:  # not Linux: nothing to add
        body = f'exec {_sh_quote(java)} "$@"\n'
    else:
        python, flag, code, _pid, real = argv
        body = f'exec {_sh_quote(python)} {flag} {_sh_quote(code)} "$PPID" {_sh_quote(real)} "$@"\n'
    wrapper.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    wrapper.chmod(0o755)
    return wrapper


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def command(
    mode: str,
    *,
    host: str,
    port: int,
    data_dir: pathlib.Path | None = None,
    index_yaml: str | os.PathLike[str] | None = None,
    project: str | None = None,
    sdk_root: str | os.PathLike[str] | None = None,
    store_on_disk: bool = True,
) -> list[str]:
    """The command line that starts ``mode``'s emulator (the legacy one needs ``data_dir``)."""
    script = str(emulator_script(mode, sdk_root))
    if mode == "firestore":
        argv = [script, "start", "--host", host, "--port", str(port)]
        argv.append("--database-mode=datastore-mode")
        if project:
            argv.append(f"--project_id={project}")
        return argv
    if data_dir is None:
        raise ValueError("the legacy Datastore emulator needs a data_dir")
    argv = [
        script,
        "start",
        f"--host={host}",
        f"--port={port}",
        f"--store_on_disk={str(store_on_disk).lower()}",
        "--firestore_in_datastore_mode",
        # The app's index.yaml as it is: nothing auto-generated, queries without one fail.
        "--store_index_configuration_on_disk=false",
    ]
    if index_yaml is not None:
        argv += ["--require_indexes", f"--index_file={pathlib.Path(index_yaml).resolve()}"]
    argv.append(str(data_dir))
    return argv


def prepare_data_dir(
    data_dir: pathlib.Path, sdk_root: str | os.PathLike[str] | None = None
) -> None:
    """``cloud_datastore_emulator create`` on an empty ``data_dir`` (kept when it has data)."""
    if (data_dir / "WEB-INF").is_dir():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    script = str(emulator_script("datastore", sdk_root))
    done = subprocess.run(
        [script, "create", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"`{script} create {data_dir}` failed ({done.returncode}): {done.stdout}{done.stderr}"
        )


def answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether the emulator's health check (GET /) answers "Ok"."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=timeout) as answer:
            return answer.read().strip() == b"Ok"
    except (urllib.error.URLError, OSError):
        return False


def request_shutdown(host: str, port: int, timeout: float = 10.0) -> bool:
    """``POST /shutdown``: the emulator saves its data (the legacy one) and exits."""
    request = urllib.request.Request(f"http://{host}:{port}/shutdown", data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
        return True
    except (urllib.error.URLError, OSError):
        return False


def reset(host: str, port: int, timeout: float = 10.0) -> None:
    """``POST /reset``: forget every entity (the legacy emulator only when it keeps its data in
    memory: ``store_on_disk=False``)."""
    request = urllib.request.Request(f"http://{host}:{port}/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        answer.read()


def stop_process_group(
    process: subprocess.Popen[Any], host: str, port: int, timeout: float
) -> None:
    """Stop an emulator started in its own session: ``POST /shutdown`` (data saved), then
    SIGTERM, then SIGKILL to the whole group, so the script's java child goes too."""
    if process.poll() is None and request_shutdown(host, port):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
    # The java child may outlive its bash parent for a moment.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class GoogleDatastoreEmulator:
    """One of Google's emulators as a child process (its own process group), on ``address``.

    ``port=0`` picks a free port. ``data_dir`` is where the legacy emulator keeps its data (a
    temporary folder by default; ``store_on_disk=False`` keeps it in memory, which
    :meth:`reset` needs) and where both keep their ``java`` wrapper and log.
    """

    def __init__(
        self,
        mode: str = "firestore",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        index_yaml: str | os.PathLike[str] | None = None,
        project: str | None = None,
        sdk_root: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        store_on_disk: bool = True,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        echo: IO[str] | None = None,
    ) -> None:
        if mode not in GOOGLE_MODES:
            raise ValueError(f"mode must be one of {', '.join(GOOGLE_MODES)}, not {mode!r}")
        self.mode = mode
        self.host = host
        self.port = port
        self.index_yaml = index_yaml
        self.project = project
        self.sdk_root = sdk_root
        self.env = dict(env if env is not None else os.environ)
        self.store_on_disk = store_on_disk
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.echo = echo
        self._tmp: Any = None
        if data_dir is None:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix=f"google-{mode}-")
            data_dir = self._tmp.name
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.process: subprocess.Popen[str] | None = None
        self._tail: list[str] = []
        self._pump: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``host:port``, the value for ``DATASTORE_EMULATOR_HOST``."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> pathlib.Path:
        return self.data_dir / "emulator.log"

    def argv(self) -> list[str]:
        """The command line (after the port is chosen)."""
        return command(
            self.mode,
            host=self.host,
            port=self.port,
            data_dir=self.data_dir / "data",
            index_yaml=self.index_yaml,
            project=self.project,
            sdk_root=self.sdk_root,
            store_on_disk=self.store_on_disk,
        )

    def start(self) -> GoogleDatastoreEmulator:
        """Start it and wait until its health check answers; raises with its output if not."""
        if self.port == 0:
            self.port = _free_port(self.host)
        if self.mode == "datastore":
            prepare_data_dir(self.data_dir / "data", self.sdk_root)
        argv = self.argv()
        env = {**self.env, "JAVA": str(java_with_parent_death(self.data_dir / "bin"))}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = spawn(
            argv,
            env=env,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._copy_output, daemon=True)
        self._pump.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self._tail = [*self._tail[-39:], line]
                if self.echo is not None:
                    self.echo.write(f"[{self.mode}] {line}")

    def output(self) -> str:
        """The last lines it printed."""
        return "".join(self._tail) or "(no output)"

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{_TITLE[self.mode]} exited with code {self.process.returncode} while "
                    f"starting ({self.log_path}):\n{self.output()}"
                )
            if answers(self.host, self.port, timeout=1.0):
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"{_TITLE[self.mode]} did not answer on {self.address} within "
            f"{self.startup_timeout:.0f}s ({self.log_path}):\n{self.output()}"
        )

    def reset(self) -> None:
        """Forget every entity."""
        reset(self.host, self.port)

    def stop(self) -> None:
        """Graceful ``POST /shutdown`` (the legacy emulator saves its data), then the group."""
        if self.process is not None:
            stop_process_group(self.process, self.host, self.port, self.stop_timeout)
            if self._pump is not None:
                self._pump.join(5)
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> GoogleDatastoreEmulator:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gae_deferred.local.google_datastore firestore``: say what is missing."""
    modes = list(argv if argv is not None else sys.argv[1:]) or list(GOOGLE_MODES)
    code = 0
    for mode in modes:
        reason = unavailable_reason(mode)
        print(f"{mode}: {reason or 'available'}")
        code = code or (1 if reason else 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
