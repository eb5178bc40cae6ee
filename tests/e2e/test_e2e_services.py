"""Several services on the local stack: ``gae-deferred-dev default/app.yaml worker/app.yaml``.

Each service runs in its own processes, from its own folder, on its own port; the Cloud Tasks
emulator delivers a task to the service its App Engine routing names (``_target`` /
``_service``), to the default service when it names none, and, as App Engine's soft routing
does, to the default service when the service does not exist.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests

import gae_deferred
from gae_deferred.local.cloudtasks.routing import ServiceRoutes
from gae_deferred.local.services import ServiceStack, service_stack
from gae_deferred.local.stack import LocalStack
from tests.stack_support import pointed_at, wait_for

pytestmark = pytest.mark.e2e

MAIN_PY = """\
import os

import webapp2

from gae_deferred.webapp2 import deferred_middleware, deferred_routes


class Whoami(webapp2.RequestHandler):
    def get(self):
        self.response.write(os.environ.get("GAE_SERVICE", "?") + " " + str(os.getpid()))


app = deferred_middleware(webapp2.WSGIApplication([("/whoami", Whoami), *deferred_routes()]))
"""
#: Importable by both services (the stack's extra PYTHONPATH) and by this process.
SVC_TASKS_PY = """\
import json
import os
import pathlib


def where(run_dir, label):
    data = {"service": os.environ.get("GAE_SERVICE"), "pid": os.getpid(), "cwd": os.getcwd()}
    (pathlib.Path(run_dir) / f"{label}.json").write_text(json.dumps(data))
"""


def write_service(folder: pathlib.Path, service: str | None) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(MAIN_PY)
    lines = ["runtime: python311", "entrypoint: gunicorn -b :$PORT main:app"]
    if service:
        lines.insert(0, f"service: {service}")
    (folder / "app.yaml").write_text("\n".join(lines) + "\n")
    return folder / "app.yaml"


@pytest.fixture(scope="module")
def app_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("two-services")
    shared = root / "shared"
    shared.mkdir()
    (shared / "svc_tasks.py").write_text(SVC_TASKS_PY)
    write_service(root / "default", None)
    # App-wide, beside the default service's app.yaml.
    (root / "default" / "queue.yaml").write_text(
        "queue:\n- name: default\n  rate: 20/s\n- name: to-worker\n  rate: 20/s\n  target: worker\n"
    )
    write_service(root / "worker", "worker")
    return {"root": root, "shared": shared}


@pytest.fixture(scope="module")
def services(app_dirs: dict[str, pathlib.Path]) -> Iterator[LocalStack]:
    root = app_dirs["root"]
    stack = service_stack(
        [root / "worker" / "app.yaml", root / "default" / "app.yaml"],
        app_port=0,
        datastore_port=0,
        tasks_port=0,
        workers=1,
        extra_pythonpath=[app_dirs["shared"]],
    )
    assert isinstance(stack, ServiceStack)
    with stack:
        yield stack


@pytest.fixture
def svc_tasks(
    services: LocalStack, app_dirs: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[object]:
    monkeypatch.syspath_prepend(str(app_dirs["shared"]))
    import svc_tasks

    with pointed_at(services, monkeypatch):
        yield svc_tasks


def whoami(url: str) -> tuple[str, int]:
    service, pid = requests.get(url + "/whoami", timeout=10).text.split()
    return service, int(pid)


def ran(run_dir: pathlib.Path, label: str) -> dict:
    path = run_dir / f"{label}.json"
    wait_for(path.is_file, f"task {label} to run", 30)
    return json.loads(path.read_text())


def test_each_service_runs_in_its_own_processes_and_folder(services: ServiceStack, app_dirs):
    worker = services.services["worker"]
    assert worker.app_port not in (services.app_port, 0)
    assert whoami(services.app_url)[0] == "default"
    assert whoami(worker.app_url)[0] == "worker"
    assert whoami(services.app_url)[1] != whoami(worker.app_url)[1]
    assert f"  worker     {worker.app_url}/" in services.describe()
    # One .local/ (the default service's), the worker's log in it.
    assert worker.signing_key_file == services.signing_key_file
    assert "GET /whoami" in (services.base_dir / "services/worker/logs/app.log").read_text()


@pytest.mark.parametrize(
    ("options", "service"),
    [
        ({"_target": "worker"}, "worker"),
        ({"_service": "worker"}, "worker"),
        ({"_target": "v7.worker"}, "worker"),  # locally one process serves every version
        ({}, "default"),
        ({"_target": "default"}, "default"),
        ({"_target": "no-such-service"}, "default"),  # App Engine's soft routing
        ({"_queue": "to-worker"}, "worker"),  # queue.yaml's target: the queue's override
        ({"_queue": "to-worker", "_target": "default"}, "worker"),
    ],
)
def test_tasks_run_in_the_service_their_routing_names(
    services: ServiceStack, svc_tasks, app_dirs, tmp_path, options, service
):
    label = "-".join(f"{k}{v}" for k, v in options.items()) or "unrouted"
    label = re.sub(r"[^A-Za-z0-9_-]", "-", label)
    gae_deferred.defer(svc_tasks.where, str(tmp_path), label, **options)
    seen = ran(tmp_path, label)
    assert seen["service"] == service
    assert seen["cwd"] == str(app_dirs["root"] / service)
    url = services.app_url if service == "default" else services.services[service].app_url
    # The process that ran it is one of that service's gunicorn workers (one each here).
    assert whoami(url)[1] == seen["pid"]


def test_an_unknown_service_is_logged_as_soft_routed(services: ServiceStack, svc_tasks, tmp_path):
    task = gae_deferred.defer(svc_tasks.where, str(tmp_path), "lost", _target="lost-service")
    ran(tmp_path, "lost")
    line = f"task {task.name}: service 'lost-service' does not exist: routed to the default"
    # The emulator's output reaches its log file through the stack's pump thread.
    wait_for(lambda: line in services.log_file("cloudtasks").read_text(), "the log line", 10)


def test_version_specific_addresses_win_over_the_service():
    routes = ServiceRoutes("http://d", {"worker": "http://w", "v2.worker": "http://w2"})
    assert routes.resolve("worker", "v2") == ("http://w2", None)
    assert routes.resolve("worker", "v3") == ("http://w", None)
    assert routes.resolve("", "v2") == ("http://d", None)
    url, note = routes.resolve("gone", "")
    assert url == "http://d" and "does not exist" in note
    with pytest.raises(ValueError, match="SERVICE=http"):
        ServiceRoutes.parse("http://d", ["worker"])


def test_gae_deferred_dev_takes_one_app_yaml_per_service(app_dirs, tmp_path):
    root = tmp_path / "app"
    ignore = shutil.ignore_patterns(".local", "__pycache__")
    for service in ("default", "worker"):
        shutil.copytree(app_dirs["root"] / service, root / service, ignore=ignore)
    env = {**os.environ, "PYTHONPATH": str(app_dirs["shared"])}
    env.pop("GAE_DEFERRED_SIGNING_KEY", None)
    dev = pathlib.Path(sys.executable).with_name("gae-deferred-dev")
    args = ["--port", "0", "--datastore-port", "0", "--tasks-port", "0", "--no-reload", "--quiet"]
    process = subprocess.Popen(
        [dev, str(root / "default" / "app.yaml"), str(root / "worker" / "app.yaml"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(lines)
        assert "worker" in text, text + process.stderr.read()
        worker_url = re.search(r"^  worker\s+(\S+)/", text, re.M).group(1)
        app_url = re.search(r"^  app\s+(\S+)/", text, re.M).group(1)
        assert whoami(worker_url)[0] == "worker" and whoami(app_url)[0] == "default"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_a_stack_without_the_default_service_is_refused(app_dirs, tmp_path):
    from gae_deferred.local.errors import AppYamlError

    other = write_service(tmp_path / "other", "other")
    with pytest.raises(AppYamlError, match=r"none of the app\.yaml files is the default service"):
        service_stack([app_dirs["root"] / "worker" / "app.yaml", other])
    with pytest.raises(AppYamlError, match=r"service 'worker' is in more than one app\.yaml"):
        service_stack(
            [app_dirs["root"] / "worker" / "app.yaml", app_dirs["root"] / "worker" / "app.yaml"]
        )
