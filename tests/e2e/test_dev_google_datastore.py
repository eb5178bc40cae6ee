"""``gae-deferred-dev --datastore {builtin,firestore,datastore}``: Google's emulators, run."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import e2e_tasks
import pytest
from e2e_helpers import wait_for_runs
from google.cloud import ndb

from gae_deferred import defer
from gae_deferred.local import dev
from tests.stack_support import ROOT, clear_clients

pytestmark = pytest.mark.e2e

DEV = str(pathlib.Path(sys.executable).parent / "gae-deferred-dev")
E2E_DIR = pathlib.Path(__file__).resolve().parent
MIB = 1024 * 1024


class DevGoogleThing(ndb.Model):
    n = ndb.IntegerProperty()


def _parse(*argv: str):
    defaults = {
        "app_port": 1,
        "datastore_port": 2,
        "tasks_port": 3,
        "project": "p",
        "location": "l",
    }
    return dev._parser(defaults).parse_args(["app.yaml", *argv])


def test_datastore_and_datastore_port_are_never_taken_for_each_other():
    args = _parse("--datastore-port", "0")
    assert (args.datastore, args.datastore_port) == ("builtin", 0)
    args = _parse("--datastore", "firestore", "--datastore-port", "9")
    assert (args.datastore, args.datastore_port) == ("firestore", 9)
    assert _parse("--datastore=datastore").datastore == "datastore"
    # Prefixes are refused rather than guessed.
    for abbreviation in ("--datastore-p", "--datas", "--gcloud"):
        with pytest.raises(SystemExit):
            _parse(abbreviation, "0")


def test_missing_java_is_one_line_before_anything_starts(tmp_path: pathlib.Path):
    done = subprocess.run(
        [DEV, str(ROOT / "app.yaml"), "--datastore", "firestore", "--port", "0"],
        cwd=tmp_path,
        env={**os.environ, "JAVA": "/nonexistent/java"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("gae-deferred-dev: --datastore firestore: Java not found")
    assert len(done.stderr.splitlines()) == 1


APP_YAML = "runtime: python311\nentrypoint: gunicorn -b :$PORT -w 1 main:app\n"


def _app(base: pathlib.Path) -> pathlib.Path:
    """This repository's main:app (imported from ROOT), with its folder and .local/ in ``base``."""
    app = base / "app"
    if not app.is_dir():
        app.mkdir()
        (app / "app.yaml").write_text(APP_YAML)
        (app / "index.yaml").write_text((ROOT / "index.yaml").read_text())
        (app / "queue.yaml").write_text((E2E_DIR / "queue.yaml").read_text())
    return app


class Running:
    """gae-deferred-dev on this repository's app, state in ``base``; ``lines`` it printed."""

    def __init__(self, base: pathlib.Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(E2E_DIR)])}
        env.pop("GAE_DEFERRED_SIGNING_KEY", None)
        ports = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0"]
        self.app = _app(base)
        self.process = subprocess.Popen(
            [DEV, str(self.app / "app.yaml"), *ports, "--no-reload", "--cron-every", "0", *args],
            cwd=base,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                return
        raise AssertionError(f"gae-deferred-dev exited: {self.process.communicate()}")

    def address(self, name: str) -> str:
        found = re.search(rf"^  {name}\s+(\S+)", "".join(self.lines), re.M)
        assert found, self.lines
        return found.group(1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=60)
        return self.process.returncode


def _java_serving(port: str) -> list[str]:
    listing = subprocess.run(["pgrep", "-af", "java"], capture_output=True, text=True).stdout
    return [
        line for line in listing.splitlines() if f"--port {port}" in line or f"={port} " in line
    ]


@pytest.fixture
def pointed(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("GAE_DEFERRED_SIGNING_KEY", raising=False)
    yield monkeypatch
    clear_clients()


def _point_at(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process defers into ``running``, as a shell would after ``. .local/env``."""
    for line in (running.app / ".local" / "env").read_text().splitlines():
        if line.startswith("export ") and not line.startswith("export PYTHONPATH"):
            name, value = line[len("export ") :].split("=", 1)
            monkeypatch.setenv(name, value.strip("'"))
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", running.address("datastore"))
    clear_clients()


def test_firestore_runs_spilled_and_transactional_defers(
    tmp_path: pathlib.Path, pointed: pytest.MonkeyPatch
):
    (tmp_path / "runs").mkdir()
    running = Running(tmp_path, "--datastore", "firestore", "--quiet")
    port = running.address("datastore").rsplit(":", 1)[1]
    try:
        assert "Google's Firestore emulator in Datastore mode" in "".join(running.lines)
        assert _java_serving(port)
        _point_at(running, pointed)
        runs = str(tmp_path / "runs")
        # Spilled (random bytes: incompressible), each over the 4 MiB Google's emulator takes
        # in one request: every Commit and Lookup stays within it.
        sizes = {"spilled-5": 5 * MIB, "spilled-9": 9 * MIB, "spilled-20": 20 * MIB}
        for label, size in sizes.items():
            assert defer(e2e_tasks.record, runs, label, os.urandom(size)).spilled
        client = ndb.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"])
        with client.context():
            ndb.transaction(
                lambda: defer(e2e_tasks.record, runs, "in-transaction", _transactional=True)
            )
            # Over commit_bytes: its chunks are written first, the record in the transaction.
            ndb.transaction(
                lambda: defer(
                    e2e_tasks.record,
                    runs,
                    "spilled-in-transaction",
                    os.urandom(5 * MIB),
                    _transactional=True,
                )
            )
        for label, size in sizes.items():
            [spilled] = wait_for_runs(tmp_path / "runs", label, 1, timeout=120)
            assert spilled["arg_bytes"] == size
        wait_for_runs(tmp_path / "runs", "in-transaction", 1, timeout=60)
        [spilled] = wait_for_runs(tmp_path / "runs", "spilled-in-transaction", 1, timeout=60)
        assert spilled["arg_bytes"] == 5 * MIB
    finally:
        assert running.stop() == 0
    assert _java_serving(port) == []


def test_legacy_emulator_keeps_data_across_runs(
    tmp_path: pathlib.Path, pointed: pytest.MonkeyPatch
):
    running = Running(tmp_path, "--datastore", "datastore", "--quiet")
    port = running.address("datastore").rsplit(":", 1)[1]
    try:
        _point_at(running, pointed)
        with ndb.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"]).context():
            DevGoogleThing(id="kept", n=5).put()
    finally:
        assert running.stop() == 0
    assert _java_serving(port) == []
    again = Running(tmp_path, "--datastore", "datastore", "--quiet")
    try:
        _point_at(again, pointed)
        with ndb.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"]).context():
            assert DevGoogleThing.get_by_id("kept").n == 5
    finally:
        assert again.stop() == 0
