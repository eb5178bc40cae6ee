"""The launcher of Google's Datastore emulators (gae_deferred.local.google_datastore)."""

from __future__ import annotations

import os
import subprocess

import pytest
from google.cloud import ndb

from gae_deferred.local import google_datastore
from gae_deferred.local.errors import GoogleEmulatorUnavailable
from gae_deferred.local.google_datastore import GoogleDatastoreEmulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GoogleEmuThing(ndb.Model):
    n = ndb.IntegerProperty()


def _client(address: str, monkeypatch: pytest.MonkeyPatch) -> ndb.Client:
    monkeypatch.setenv("DATASTORE_EMULATOR_HOST", address)
    return ndb.Client(project="test-project")


def _group_members(pgid: int) -> str:
    return subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout


def test_firestore_fixture_serves_ndb(firestore_emulator, monkeypatch):
    client = _client(firestore_emulator.address, monkeypatch)
    with client.context():
        GoogleEmuThing(id="launcher", n=7, namespace="launcher").put()
        assert GoogleEmuThing.get_by_id("launcher", namespace="launcher").n == 7
    assert google_datastore.answers(firestore_emulator.host, firestore_emulator.port)


def test_firestore_reset_forgets_entities(tmp_path, monkeypatch):
    with GoogleDatastoreEmulator("firestore", data_dir=tmp_path, project="test-project") as emu:
        client = _client(emu.address, monkeypatch)
        with client.context():
            GoogleEmuThing(id="a", n=1).put()
        emu.reset()
        with client.context():
            assert GoogleEmuThing.get_by_id("a") is None


def test_stop_ends_the_script_and_its_java_child(tmp_path):
    emulator = GoogleDatastoreEmulator("firestore", data_dir=tmp_path).start()
    pgid = emulator.process.pid
    members = _group_members(pgid).split()
    commands = [
        subprocess.run(["ps", "-o", "comm=", "-p", pid], capture_output=True, text=True).stdout
        for pid in members
    ]
    assert any("java" in name for name in commands), commands
    emulator.stop()
    assert _group_members(pgid) == ""
    assert not google_datastore.answers("127.0.0.1", int(emulator.port), timeout=0.5)


def test_java_dies_with_the_process_that_started_it(tmp_path):
    """kill -9 of the starting process: the java behind the SDK's bash script exits too."""
    script = (
        "import sys, time\n"
        "from gae_deferred.local.google_datastore import GoogleDatastoreEmulator\n"
        f"e = GoogleDatastoreEmulator('firestore', data_dir={str(tmp_path)!r}).start()\n"
        "print(e.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    starter = subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "python"), "-c", script],
        stdout=subprocess.PIPE,
        text=True,
    )
    pgid = int(starter.stdout.readline())
    assert (
        "java"
        in subprocess.run(["pgrep", "-g", str(pgid), "-a"], capture_output=True, text=True).stdout
    )
    starter.kill()
    starter.wait()
    for _ in range(100):
        if _group_members(pgid) == "":
            break
        subprocess.run(["sleep", "0.1"])
    assert _group_members(pgid) == ""


def test_legacy_emulator_keeps_data_across_a_graceful_stop(tmp_path, monkeypatch):
    options = {"data_dir": tmp_path, "index_yaml": os.path.join(ROOT, "index.yaml")}
    with GoogleDatastoreEmulator("datastore", **options) as emulator:
        client = _client(emulator.address, monkeypatch)
        with client.context():
            GoogleEmuThing(id="kept", n=3).put()
    assert (tmp_path / "data" / "WEB-INF" / "appengine-generated" / "local_db.bin").is_file()
    with GoogleDatastoreEmulator("datastore", **options) as emulator:
        client = _client(emulator.address, monkeypatch)
        with client.context():
            assert GoogleEmuThing.get_by_id("kept").n == 3
            # --require_indexes with our index.yaml: a query it lacks fails as in production.
            with pytest.raises(Exception, match="index"):
                GoogleEmuThing.query(GoogleEmuThing.n == 3).order(-GoogleEmuThing.key).fetch()


def test_missing_java_is_one_line(monkeypatch):
    monkeypatch.setenv("JAVA", "/nonexistent/java")
    with pytest.raises(GoogleEmulatorUnavailable, match=r"^Java not found .*openjdk") as caught:
        google_datastore.emulator_script("firestore")
    assert "\n" not in str(caught.value)


def test_missing_component_names_what_to_install(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gcloud").write_text("")
    (tmp_path / "platform").mkdir()
    reason = google_datastore.unavailable_reason("datastore", sdk_root=tmp_path)
    assert reason == (
        f"Google's legacy Cloud Datastore emulator is not installed in the Google Cloud SDK at "
        f"{tmp_path}: `gcloud components install cloud-datastore-emulator` (or apt-get install "
        "google-cloud-cli-datastore-emulator)"
    )


def test_missing_sdk_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = google_datastore.unavailable_reason("firestore")
    assert reason.startswith("Google Cloud SDK not found: no `gcloud` on PATH")
    assert google_datastore.unavailable_reason("firestore", sdk_root=tmp_path / "nope") == (
        f"{tmp_path / 'nope'} is not a Google Cloud SDK folder (no bin/gcloud, no platform/)"
    )
