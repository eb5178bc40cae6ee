"""``gae-deferred-dev app.yaml`` on a small app of its own: the command as a user runs it.

The app lives in a tmp dir (its own module name, app.yaml, queue.yaml, cron.yaml, a static
folder, no index.yaml); the command runs from another directory, on free ports, with an
inherited PYTHONPATH.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import requests
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

from tests.stack_support import wait_for

pytestmark = pytest.mark.e2e

DEV = str(pathlib.Path(sys.executable).parent / "gae-deferred-dev")

WEB_PY = """
import json, os, sys

SEEN = ("GAE_DEFERRED_LOCAL", "GAE_DEFERRED_LOCAL_PORT", "GAE_DEFERRED_CRON_TOKEN",
        "GAE_DEFERRED_QUEUE_YAML", "PYTHONPATH", "TINY_SETTING", "DATASTORE_EMULATOR_HOST",
        "GAE_DEFERRED_HTTP_TARGET_URL", "GAE_DEFERRED_HTTP_TARGET_CERTS_URL")


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/cron/tick":
        with open("cron-calls.txt", "a") as calls:
            calls.write(environ.get("HTTP_X_DEFERRED_CRON_TOKEN", "-") + "\\n")
    body = json.dumps({
        "path": path,
        "cwd": os.getcwd(),
        "host": environ.get("HTTP_HOST"),
        "env": {name: os.environ.get(name) for name in SEEN},
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""

APP_YAML = """
runtime: python311
entrypoint: gunicorn -b :$PORT -w 1 web:application
env_variables:
  TINY_SETTING: from-app-yaml
handlers:
- url: /static
  static_dir: static
- url: /.*
  script: auto
"""


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    app_dir = tmp_path_factory.mktemp("tiny-app")
    (app_dir / "web.py").write_text(textwrap.dedent(WEB_PY))
    (app_dir / "app.yaml").write_text(APP_YAML)
    (app_dir / "queue.yaml").write_text("queue:\n- name: tiny-q\n  rate: 1/s\n")
    (app_dir / "cron.yaml").write_text("cron:\n- url: /cron/tick\n  schedule: every 1 minutes\n")
    (app_dir / "static").mkdir()
    (app_dir / "static" / "hello.txt").write_text("hello, static")
    return app_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_dev(args: list[str], cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DEV, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


class Dev:
    """gae-deferred-dev running in the background; ``lines`` is what it printed so far."""

    def __init__(self, app_yaml: pathlib.Path, cwd: pathlib.Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": "/inherited/path"}
        env.pop("GAE_DEFERRED_SIGNING_KEY", None)
        self.process = subprocess.Popen(
            [DEV, str(app_yaml), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                return
        raise AssertionError(f"gae-deferred-dev exited: {self.process.communicate()}")

    def url_of(self, name: str) -> str:
        found = re.search(rf"^  {name}\s+(\S+)", "".join(self.lines), re.M)
        assert found, self.lines
        return found.group(1).rstrip("/")

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        return self.process.returncode, err


@pytest.fixture(scope="module")
def dev(tiny_app: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    args = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0"]
    running = Dev(tiny_app / "app.yaml", elsewhere, *args, "--no-reload", "--quiet")
    yield running
    if running.process.poll() is None:
        running.stop()


def _get(dev: Dev, path: str) -> dict[str, Any]:
    answer = requests.get(dev.url_of("app") + path, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_app_runs_from_its_folder_with_its_environment(dev: Dev, tiny_app: pathlib.Path):
    seen = _get(dev, "/env")
    port = dev.url_of("app").rsplit(":", 1)[1]
    assert seen["cwd"] == str(tiny_app)
    assert seen["host"] == f"127.0.0.1:{port}"  # the Host header as the client sent it
    env = seen["env"]
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tiny_app), "/inherited/path"]
    assert env["GAE_DEFERRED_LOCAL"] == "1" and env["GAE_DEFERRED_LOCAL_PORT"] == port
    assert len(env["GAE_DEFERRED_CRON_TOKEN"]) >= 32
    assert env["TINY_SETTING"] == "from-app-yaml"
    assert env["GAE_DEFERRED_QUEUE_YAML"] == str(tiny_app / "queue.yaml")
    # The second shell's exports: no token and no app-only settings.
    exports = (tiny_app / ".local" / "env").read_text()
    assert "CRON_TOKEN" not in exports and "LOCAL_PORT" not in exports
    assert f"export PYTHONPATH={shlex.quote(str(tiny_app))}" in exports
    assert "demo" not in "".join(dev.lines)


def test_static_handlers_are_served(dev: Dev):
    hello = requests.get(dev.url_of("app") + "/static/hello.txt", timeout=10)
    assert hello.text == "hello, static" and hello.headers["Content-Type"] == "text/plain"
    assert requests.get(dev.url_of("app") + "/static/nope.txt", timeout=10).status_code == 404


def test_the_queues_of_queue_yaml_exist(dev: Dev):
    tasks_host = re.search(r"^  tasks\s+(\S+)", "".join(dev.lines), re.M).group(1)
    channel = grpc.insecure_channel(tasks_host)
    client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    parent = "projects/gae-deferred-local/locations/us-central1"
    names = {queue.name.rsplit("/", 1)[1] for queue in client.list_queues(parent=parent)}
    assert names == {"default", "tiny-q"}


def test_sigterm_stops_it_after_one_index_warning_with_the_yaml_to_paste(dev: Dev):
    """Last of the tests on the module's server: it stops it."""
    returncode, err = dev.stop()
    assert returncode == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "no index.yaml" in warnings[0] and "gae_deferred's Datastore indexes" in warnings[0]
    assert "- kind: _DeferredPayload\n  properties:\n  - name: state\n  - name: eta" in err
    assert "Traceback" not in err
    with pytest.raises(requests.ConnectionError):
        requests.get(dev.url_of("app") + "/env", timeout=5)


def test_cron_calls_carry_the_apps_token(tiny_app: pathlib.Path, tmp_path: pathlib.Path):
    calls = tiny_app / "cron-calls.txt"
    calls.unlink(missing_ok=True)
    ports = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0"]
    running = Dev(tiny_app / "app.yaml", tmp_path, *ports, "--quiet", "--cron-every", "0.5")
    try:
        token = _get(running, "/env")["env"]["GAE_DEFERRED_CRON_TOKEN"]
        wait_for(lambda: calls.exists() and calls.read_text(), "a cron call", timeout=15)
        assert set(calls.read_text().split()) == {token}
    finally:
        assert running.stop()[0] == 0


def test_http_target_flag_serves_the_emulators_keys_to_the_app(
    tiny_app: pathlib.Path, tmp_path: pathlib.Path
):
    # A copy of its own: the module's stack holds the tiny app's .local/ state.
    app = shutil.copytree(tiny_app, tmp_path / "app", ignore=shutil.ignore_patterns(".local"))
    ports = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0"]
    running = Dev(app / "app.yaml", tmp_path, *ports, "--quiet", "--http-target")
    try:
        env = _get(running, "/env")["env"]
        tokens = running.url_of("tokens")
        assert env["GAE_DEFERRED_HTTP_TARGET_CERTS_URL"] == f"{tokens}/oauth2/v1/certs"
        assert env["GAE_DEFERRED_HTTP_TARGET_URL"].startswith("http://127.0.0.1:")
        certs = requests.get(env["GAE_DEFERRED_HTTP_TARGET_CERTS_URL"], timeout=10).json()
        [pem] = certs.values()
        assert pem.startswith("-----BEGIN CERTIFICATE-----")
    finally:
        assert running.stop()[0] == 0


def test_http_target_takes_one_app_yaml(tmp_path: pathlib.Path):
    done = _run_dev(["a/app.yaml", "b/app.yaml", "--http-target"], tmp_path)
    err = _one_line_error(done)
    assert err.startswith("gae-deferred-dev: --http-target takes one app.yaml")


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stderr


def test_missing_app_yaml(tmp_path: pathlib.Path):
    err = _one_line_error(_run_dev([str(tmp_path / "app.yaml")], tmp_path))
    missing = tmp_path / "app.yaml"
    assert err == f"gae-deferred-dev: {missing} not found: give the app.yaml of the app to run\n"


@pytest.mark.parametrize(
    ("entrypoint", "reason"),
    [
        ("python main.py", "does not run gunicorn"),
        ("gunicorn -b :$PORT -w 2", "names no module:app"),
        ("gunicorn 'unterminated", "cannot parse entrypoint"),
    ],
)
def test_unusable_entrypoint(tmp_path: pathlib.Path, entrypoint: str, reason: str):
    (tmp_path / "app.yaml").write_text(f"runtime: python311\nentrypoint: {entrypoint}\n")
    err = _one_line_error(_run_dev(["app.yaml"], tmp_path))
    assert len(err.splitlines()) == 1 and reason in err and "main:app" in err


def test_broken_queue_yaml_names_file_and_line(tmp_path: pathlib.Path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.yaml").write_text(APP_YAML)
    (app / "queue.yaml").write_text("queue:\n- name: q\n  rate: 5/x\n")
    err = _one_line_error(_run_dev([str(app / "app.yaml"), "--port", "0"], tmp_path))
    last = err.splitlines()[-1]
    assert last.startswith(f"gae-deferred-dev: {app / 'queue.yaml'}:3: invalid rate '5/x'")


def test_port_in_use(tiny_app: pathlib.Path, tmp_path: pathlib.Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run_dev([str(tiny_app / "app.yaml"), "--port", str(port)], tmp_path)
    err = _one_line_error(done)
    assert f"gae-deferred-dev: port {port} on 127.0.0.1 (the app) is already in use" in err
    command = f"gae-deferred-dev {tiny_app / 'app.yaml'}"
    assert f"`{command} --port 0 --datastore-port 0 --tasks-port 0 --backend-port 0`" in err


def test_refuses_to_run_where_gae_env_is_set(tiny_app: pathlib.Path, tmp_path: pathlib.Path):
    done = _run_dev([str(tiny_app / "app.yaml"), "--port", "0"], tmp_path, GAE_ENV="standard")
    err = _one_line_error(done)
    assert "GAE_ENV is set ('standard')" in err and "must never run" in err
    assert not (tmp_path / ".local").exists()


def test_invalid_index_yaml(tmp_path: pathlib.Path):
    (tmp_path / "app.yaml").write_text(APP_YAML)
    (tmp_path / "index.yaml").write_text("indexes:\n- kind: K\n  properties: []\n")
    err = _one_line_error(_run_dev(["app.yaml"], tmp_path))
    assert "needs a non-empty 'properties' list" in err and len(err.splitlines()) == 1


def test_a_queue_yaml_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: pathlib.Path):
    (tmp_path / "app.yaml").write_text(APP_YAML)
    (tmp_path / "queue.yaml").write_bytes(b"# queues\nqueue:\n- name: caf\xe9\n")
    err = _one_line_error(_run_dev(["app.yaml", "--port", "0"], tmp_path))
    last = err.splitlines()[-1]
    assert last == (
        f"gae-deferred-dev: {tmp_path / 'queue.yaml'}:3: not valid UTF-8 "
        "(byte 0xe9 in column 12): save the file as UTF-8"
    )


def test_an_index_yaml_changed_while_it_runs_is_checked_again(
    tiny_app: pathlib.Path, tmp_path: pathlib.Path
):
    """An upgrade's new indexes: pasted while the stack runs, they are checked at once, and
    the stack says to restart (its Datastore emulator read index.yaml when it started)."""
    from gae_deferred.local.dev import package_indexes

    app_dir = tmp_path / "app"
    shutil.copytree(tiny_app, app_dir, ignore=shutil.ignore_patterns(".local", "__pycache__"))
    first, *others = package_indexes()
    (app_dir / "index.yaml").write_text("indexes:\n" + first.to_yaml() + "\n")
    args = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0", "--no-reload"]
    running = Dev(app_dir / "app.yaml", tmp_path, *args, "--quiet")
    time.sleep(1.5)  # unchanged: nothing more is said
    (app_dir / "index.yaml").write_text("indexes: []\n")
    time.sleep(1.5)
    everything = "\n".join(index.to_yaml() for index in (first, *others))
    (app_dir / "index.yaml").write_text("indexes:\n" + everything + "\n")
    time.sleep(1.5)
    returncode, err = running.stop()
    assert returncode == 0
    start, *changes = err.split("restart gae-deferred-dev to use it")
    assert len(changes) == 2, err
    assert start.count("lacks") == 2
    assert f"lacks {len(others)} of gae_deferred's Datastore indexes" in start
    assert f"lacks {len(others) + 1} of gae_deferred's Datastore indexes" in start
    # The last version has every index: only the restart is asked for.
    assert "lacks" not in changes[0] and "Traceback" not in err
