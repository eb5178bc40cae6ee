"""``gae-deferred-dev`` keeps the stack running, on the ports it is given, quietly.

An app folder with only app.yaml and main.py (no queue.yaml, index.yaml or cron.yaml) is run
with every port pinned (``--backend-port`` included); the tests kill -9 children and watch the
stack bring them back, and check that readiness never ran the app's own routes.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
import requests
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

from gae_deferred.local._supervise import Supervisor
from gae_deferred.local.errors import StackError
from gae_deferred.local.stack import LocalStack
from tests.stack_support import wait_for

pytestmark = pytest.mark.e2e

DEV = str(pathlib.Path(sys.executable).parent / "gae-deferred-dev")

MAIN_PY = """
import os

def app(environ, start_response):
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as calls:
        calls.write(environ["PATH_INFO"] + "\\n")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello from main"]
"""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _children(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``: process id -> command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        commands[int(entry.name)] = command
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found[child] = commands[child]
                todo.append(child)
    return found


def _pid_of(dev: subprocess.Popen, needle: str) -> int:
    def find() -> int | None:
        pids = [pid for pid, cmd in _children(dev.pid).items() if needle in cmd]
        return min(pids) if pids else None

    return wait_for(find, f"a child running {needle}")


class Output:
    """Collects a process's output lines in a thread."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.fixture
def bare_app(tmp_path: pathlib.Path) -> pathlib.Path:
    app_dir = tmp_path / "bare"
    app_dir.mkdir()
    (app_dir / "app.yaml").write_text("runtime: python311\n")
    (app_dir / "main.py").write_text(MAIN_PY)
    return app_dir


@pytest.fixture
def dev(bare_app: pathlib.Path) -> Iterator[tuple[subprocess.Popen, Output, list[int]]]:
    ports = _free_ports(4)
    args = ["--port", "--datastore-port", "--tasks-port", "--backend-port"]
    pinned = [x for pair in zip(args, map(str, ports), strict=True) for x in pair]
    argv = [DEV, "app.yaml", *pinned]
    env = {**os.environ}
    env.pop("GAE_DEFERRED_SIGNING_KEY", None)
    process = subprocess.Popen(
        [*argv, "--no-reload", "--cron-every", "0"],
        cwd=bare_app,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process.stdout)
    try:
        wait_for(lambda: "Ctrl-C stops everything" in output.text(), "the stack to be up", 60)
        yield process, output, ports
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def test_bare_app_starts_on_pinned_ports_quietly_and_keeps_running(dev, bare_app):
    process, output, (app_port, datastore_port, tasks_port, backend_port) = dev
    text = output.text()
    # The first lines are not an error, and readiness ran none of the app's routes. A whole
    # word, since a random port such as 50233 holds "502".
    assert not re.search(r"\b502\b", text), text
    assert "not answering" not in text and "rror" not in text, text
    assert not (bare_app / "calls.txt").exists()
    assert f"datastore  127.0.0.1:{datastore_port} (gRPC)" in text
    assert f"tasks      127.0.0.1:{tasks_port} (gRPC)" in text
    answer = requests.get(f"http://127.0.0.1:{app_port}/", timeout=20)
    assert answer.text == "hello from main"
    assert requests.get(f"http://127.0.0.1:{backend_port}/x", timeout=20).ok  # gunicorn
    # No queue.yaml: the stack runs with App Engine's default queue.
    channel = grpc.insecure_channel(f"127.0.0.1:{tasks_port}")
    client = tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))
    queues = client.list_queues(parent="projects/gae-deferred-local/locations/us-central1")
    assert [queue.name.rsplit("/", 1)[1] for queue in queues] == ["default"]

    os.kill(_pid_of(process, "gae_deferred.local.datastore"), signal.SIGKILL)
    back = f"(127.0.0.1:{datastore_port}) is running again"
    wait_for(lambda: back in output.text(), "the datastore emulator back", 30)
    assert (
        f"gae-deferred-dev: the datastore emulator (127.0.0.1:{datastore_port}) was killed by "
        "signal 9; restarting it in 1s" in output.text()
    )
    os.kill(_pid_of(process, "gunicorn main:app"), signal.SIGKILL)
    wait_for(lambda: f"(127.0.0.1:{app_port}) is running again" in output.text(), "app", 30)
    assert requests.get(f"http://127.0.0.1:{app_port}/", timeout=20).text == "hello from main"
    assert process.poll() is None


def test_a_child_that_keeps_dying_stops_the_stack(bare_app: pathlib.Path, tmp_path):
    lines: list[str] = []

    class Lines:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    ports = {"app_port": 0, "datastore_port": 0, "tasks_port": 0}
    with LocalStack(bare_app / "app.yaml", tmp_path / "state", **ports) as stack:
        supervisor = Supervisor(stack, out=Lines(), first_delay=0, max_deaths=2, window=600)
        first = stack.pids()["datastore"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "datastore" in stack.dead_children(), "the emulator to die")
        supervisor.check()
        assert stack.pids()["datastore"] != first and supervisor.restarts == {"datastore": 1}
        os.kill(stack.pids()["datastore"], signal.SIGKILL)
        wait_for(lambda: "datastore" in stack.dead_children(), "the emulator to die again")
        with pytest.raises(StackError) as raised:
            supervisor.check()
    assert str(raised.value).startswith(
        f"the datastore emulator (127.0.0.1:{stack.datastore_port}) keeps dying "
        "(2 times in 600s); stopping."
    )
    assert "".join(lines).startswith(
        f"gae-deferred-dev: the datastore emulator (127.0.0.1:{stack.datastore_port}) was "
        "killed by signal 9; restarting it in 0s"
    )


def test_port_in_use_suggests_the_command_that_was_run(bare_app: pathlib.Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [DEV, "app.yaml", "--port", "0", "--backend-port", str(port)],
            cwd=bare_app,
            env={**os.environ, "GAE_DEFERRED_DEV_COMMAND": 'make run ARGS="{args}"'},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"gae-deferred-dev: port {port} on 127.0.0.1 (the app's internal port) is already in "
        f"use: stop the other process (`lsof -i :{port}` or `ss -ltnp 'sport = :{port}'` shows "
        "it), or pick another --backend-port, or let the stack pick every port: `make run "
        'ARGS="--port 0 --datastore-port 0 --tasks-port 0 --backend-port 0"`'
    )
