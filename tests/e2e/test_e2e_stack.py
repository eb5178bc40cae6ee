"""The stack itself: env file, key, ports, restarts and crashes with nothing lost, a 2nd process."""

from __future__ import annotations

import os
import pathlib
import shlex
import socket
import stat
import subprocess
import sys
import time

import e2e_tasks
import pytest
from e2e_helpers import payload_exists, wait_for_runs

from gae_deferred import defer
from gae_deferred.cloud_tasks import client as tasks_client, queue_path
from gae_deferred.local.errors import PortInUseError
from gae_deferred.local.stack import LocalStack
from tests.stack_support import ROOT, holds_for, queued_tasks, wait_for

# Real processes: both emulators and gunicorn (the session stack in conftest.py).
pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    status = pathlib.Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_env_file_and_signing_key(e2e: LocalStack) -> None:
    key = e2e.signing_key_file

    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    text = e2e.env_file.read_text()
    for name, value in e2e.env.items():
        assert f"export {name}={shlex.quote(value)}" in text
    assert "unset GAE_DEFERRED_SIGNING_KEY" in text
    assert e2e.log_file("app").exists() and e2e.log_file("datastore").exists()


def test_second_process_defers_a_lambda_after_sourcing_env(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    target = run_dir / "from-second-process.txt"
    one_liner = (
        "import os, pathlib; from gae_deferred import defer; "
        f"p = pathlib.Path({str(target)!r}); "
        "defer(lambda: p.write_text(str(os.getpid())))"
    )
    # A clean environment, as in a new shell: only what `. <base>/env` provides.
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    python = shlex.quote(sys.executable)
    script = f". {shlex.quote(str(e2e.env_file))} && {python} -c {shlex.quote(one_liner)}"
    done = subprocess.run(
        ["bash", "-c", script], cwd=run_dir, env=clean, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr
    pid = wait_for(lambda: target.exists() and target.read_text(), "the lambda to run in the app")
    assert int(pid) in _descendants(e2e.pids()["app"])


def _descendants(root: int) -> set[int]:
    """Processes below ``root`` (gunicorn's workers below its master), from /proc."""
    parents: dict[int, int] = {}
    for stat_file in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat_file.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_emulator_restarts_mid_run_lose_nothing(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    directory = str(run_dir)
    defer(e2e_tasks.record, directory, "before-ds", _countdown=2)
    spilled = defer(e2e_tasks.record, directory, "spilled-ds", os.urandom(300 * 1024), _countdown=2)

    e2e.restart_datastore()
    assert payload_exists(spilled.payload_id)
    e2e.restart_tasks()
    defer(e2e_tasks.record, directory, "after-restarts")

    for label in ("before-ds", "spilled-ds", "after-restarts"):
        wait_for_runs(run_dir, label, 1, timeout=30)
    wait_for(lambda: not payload_exists(spilled.payload_id), "the spilled record to go")


def test_killed_app_is_retried_once_it_is_back(e2e: LocalStack, run_dir: pathlib.Path) -> None:
    e2e.kill_app()
    try:
        defer(e2e_tasks.record, str(run_dir), "while-app-down", _queue="e2e-patient")
        holds_for(
            lambda: e2e_tasks.runs(run_dir, "while-app-down") == [], "no run while app down", 1
        )
    finally:
        e2e.start_app()

    [run] = wait_for_runs(run_dir, "while-app-down", 1, timeout=30)
    assert run["retry_count"] >= 1


def test_pause_resume_and_purge_through_cloud_tasks_client(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    client = tasks_client()
    queue = queue_path("e2e-control")
    client.pause_queue(name=queue)
    try:
        defer(e2e_tasks.record, str(run_dir), "paused", _queue="e2e-control")
        holds_for(lambda: e2e_tasks.runs(run_dir, "paused") == [], "no run while paused", 1)
        client.resume_queue(name=queue)
        wait_for_runs(run_dir, "paused", 1)

        client.pause_queue(name=queue)
        for _ in range(2):
            defer(e2e_tasks.record, str(run_dir), "purged", _queue="e2e-control")
        assert len(queued_tasks("e2e-control")) == 2
        client.purge_queue(name=queue)
        wait_for(lambda: not queued_tasks("e2e-control"), "the queue to be purged")
    finally:
        client.resume_queue(name=queue)
    holds_for(lambda: e2e_tasks.runs(run_dir, "purged") == [], "no purged task runs", 1)


def test_whole_stack_restart_keeps_countdown_task_and_spilled_payload(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    started = time.time()
    directory = str(run_dir)
    # e2e-patient: a loaded machine can take longer to restart than the countdown, and the
    # Cloud Tasks emulator may then deliver before gunicorn listens; the default queue's 3
    # quick retries would drop the task, which says nothing about what a restart keeps.
    defer(e2e_tasks.record, directory, "countdown-restart", _countdown=6, _queue="e2e-patient")
    spilled = defer(
        e2e_tasks.record,
        directory,
        "spill-restart",
        os.urandom(700 * 1024),
        _countdown=6,
        _queue="e2e-patient",
    )
    pids = {*e2e.pids().values(), *_descendants(e2e.pids()["app"])}

    e2e.stop()
    try:
        assert not [pid for pid in pids if _alive(pid)], "processes left after stop()"
        assert e2e_tasks.runs(run_dir, "countdown-restart") == []
        assert e2e_tasks.runs(run_dir, "spill-restart") == []
    finally:
        e2e.start()

    # Both ran after the restart: the task survived in the Cloud Tasks emulator's data dir
    # and the payload in the Datastore emulator's.
    [run] = wait_for_runs(run_dir, "countdown-restart", 1, timeout=30)
    assert run["time"] >= started + 6 - 0.05
    [spill_run] = wait_for_runs(run_dir, "spill-restart", 1, timeout=30)
    assert spill_run["arg_bytes"] == 700 * 1024
    wait_for(lambda: not payload_exists(spilled.payload_id), "the spilled record to go")


def test_port_in_use_is_named(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = LocalStack(
            ROOT / "app.yaml", tmp_path / "stack", app_port=0, datastore_port=port, tasks_port=0
        )

        with pytest.raises(PortInUseError, match=f"port {port} .*datastore emulator"):
            stack.start()
        assert stack.pids() == {}
