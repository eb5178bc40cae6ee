"""The Cloud Tasks emulator through the real google-cloud-tasks client and a real HTTP app."""

from __future__ import annotations

import datetime
import http.server
import itertools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.rpc import code_pb2

from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.local.errors import PortInUseError

ROOT = Path(__file__).resolve().parents[2]
QUEUE_YAML = """\
queue:
- name: default
  rate: 100/s
  retry_parameters:
    min_backoff_seconds: 0.1
    max_backoff_seconds: 0.4
- name: limited
  rate: 100/s
  retry_parameters:
    task_retry_limit: 2
    min_backoff_seconds: 0.1
    max_backoff_seconds: 0.2
- name: slow
  rate: 5/s
  bucket_size: 1
- name: narrow
  rate: 100/s
  bucket_size: 20
  max_concurrent_requests: 2
- name: worker
  rate: 10/s
  target: worker-svc
"""


class App:
    """A tiny HTTP app: records requests, answers with programmed statuses."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.statuses: dict[str, list[int]] = {}
        self.delay = 0.0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                name = self.headers.get("X-AppEngine-TaskName") or self.headers.get(
                    "X-CloudTasks-TaskName", ""
                )
                with app.lock:
                    app.active += 1
                    app.max_active = max(app.max_active, app.active)
                    app.requests.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": dict(self.headers),
                            "body": body,
                            "time": time.time(),
                            "task": name,
                        }
                    )
                    queue = app.statuses.get(name) or []
                    status = queue.pop(0) if queue else 200
                time.sleep(app.delay)
                with app.lock:
                    app.active -= 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET = do_PUT = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_task(self, short_name: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["task"] == short_name]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout:.1f}s")


def holds_for(predicate, what: str, seconds: float) -> None:
    """Poll until an explicit deadline; fail the moment ``predicate()`` is false (for "nothing
    happened" assertions: the whole window is watched, not one instant after a sleep)."""
    started = time.monotonic()
    while True:
        if not predicate():
            raise AssertionError(f"{what}: broken after {time.monotonic() - started:.2f}s")
        if time.monotonic() - started >= seconds:
            return
        time.sleep(0.02)


def client_for(port: int) -> tasks_v2.CloudTasksClient:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return tasks_v2.CloudTasksClient(transport=CloudTasksGrpcTransport(channel=channel))


@pytest.fixture
def app() -> Iterator[App]:
    app = App()
    yield app
    app.server.shutdown()
    app.server.server_close()


@pytest.fixture
def queue_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "queue.yaml"
    path.write_text(QUEUE_YAML)
    return path


def _started(queue_yaml: Path, tmp_path: Path, **options: object) -> Iterator[CloudTasksEmulator]:
    emulator = CloudTasksEmulator(
        port=0,
        data_dir=tmp_path / "data",
        queue_yaml=queue_yaml,
        project="test-project",
        location="us-central1",
        **options,
    ).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def emu(app: App, queue_yaml: Path, tmp_path: Path) -> Iterator[CloudTasksEmulator]:
    yield from _started(queue_yaml, tmp_path, app_url=app.url)


@pytest.fixture
def client(emu: CloudTasksEmulator) -> tasks_v2.CloudTasksClient:
    return client_for(emu.port)


def qname(emu: CloudTasksEmulator, queue: str) -> str:
    return f"{emu.parent}/queues/{queue}"


def create(client, emu, queue="default", name=None, body=b"payload", **request):
    task = {"app_engine_http_request": {"relative_uri": "/work", "body": body, **request}}
    if name:
        task["name"] = f"{qname(emu, queue)}/tasks/{name}"
    return client.create_task(parent=qname(emu, queue), task=task)


def short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def test_queues_loaded_from_queue_yaml_and_mapped(client, emu):
    queues = {short(q.name): q for q in client.list_queues(parent=emu.parent)}
    assert set(queues) == {"default", "limited", "slow", "narrow", "worker"}
    limited = queues["limited"]
    assert limited.retry_config.max_attempts == 3
    assert limited.retry_config.min_backoff == datetime.timedelta(seconds=0.1)
    assert queues["slow"].rate_limits.max_dispatches_per_second == 5
    assert queues["slow"].rate_limits.max_burst_size == 1
    assert queues["narrow"].rate_limits.max_concurrent_dispatches == 2
    assert queues["worker"].app_engine_routing_override.service == "worker-svc"
    assert queues["default"].state == tasks_v2.Queue.State.RUNNING
    with pytest.raises(exceptions.NotFound):
        client.get_queue(name=qname(emu, "nope"))


def test_create_get_list_delete_tasks(client, emu, app):
    client.pause_queue(name=qname(emu, "default"))
    created = [create(client, emu, body=f"b{i}".encode()) for i in range(3)]
    assert all(short(t.name).isdigit() for t in created)
    assert created[0].app_engine_http_request.body == b""  # BASIC view
    full = client.get_task(
        request={"name": created[0].name, "response_view": tasks_v2.Task.View.FULL}
    )
    assert full.app_engine_http_request.body == b"b0"
    assert full.view == tasks_v2.Task.View.FULL
    assert full.create_time and full.schedule_time
    pager = client.list_tasks(request={"parent": qname(emu, "default"), "page_size": 2})
    pages = list(pager.pages)
    assert [len(p.tasks) for p in pages] == [2, 1]
    client.delete_task(name=created[1].name)
    with pytest.raises(exceptions.NotFound):
        client.get_task(name=created[1].name)
    with pytest.raises(exceptions.NotFound):
        client.delete_task(name=created[1].name)
    listed = {t.name for t in client.list_tasks(parent=qname(emu, "default"))}
    assert listed == {created[0].name, created[2].name}
    assert emu.rpc_counts["CreateTask"] == 3
    emu.reset_counts()
    assert emu.rpc_counts["CreateTask"] == 0
    assert app.requests == []


def test_dispatch_sends_app_engine_headers(client, emu, app):
    task = create(
        client,
        emu,
        queue="worker",
        name="hello-1",
        headers={"Content-Type": "application/json", "X-Custom": "yes", "X-AppEngine-Fake": "1"},
        app_engine_routing={"service": "other", "version": "v2"},
    )
    wait_for(lambda: app.for_task("hello-1"))
    request = app.for_task("hello-1")[0]
    headers = request["headers"]
    assert request["method"] == "POST" and request["path"] == "/work"
    assert request["body"] == b"payload"
    assert headers["X-AppEngine-QueueName"] == "worker"
    assert headers["X-AppEngine-TaskName"] == "hello-1"
    assert headers["X-AppEngine-TaskRetryCount"] == "0"
    assert headers["X-AppEngine-TaskExecutionCount"] == "0"
    assert float(headers["X-AppEngine-TaskETA"]) == pytest.approx(
        task.schedule_time.timestamp(), abs=1e-5
    )
    assert "X-AppEngine-TaskPreviousResponse" not in headers
    assert "X-AppEngine-TaskRetryReason" not in headers
    assert "X-AppEngine-Fake" not in headers
    assert headers["User-Agent"] == "AppEngine-Google; (+http://code.google.com/appengine)"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Custom"] == "yes"
    wait_for(lambda: not list(client.list_tasks(parent=qname(emu, "worker"))))
    assert emu.dispatch_log[-1]["status"] == 200 and emu.dispatch_log[-1]["task"] == "hello-1"


def test_schedule_time_is_honoured(client, emu, app):
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=0.6)
    task = {
        "name": f"{qname(emu, 'default')}/tasks/later",
        "schedule_time": eta,
        "app_engine_http_request": {"relative_uri": "/later"},
    }
    client.create_task(parent=qname(emu, "default"), task=task)
    # Watched until 0.1 s before its schedule time.
    holds_for(
        lambda: app.for_task("later") == [],
        "no dispatch before the schedule time",
        eta.timestamp() - 0.1 - time.time(),
    )
    wait_for(lambda: app.for_task("later"))
    assert app.for_task("later")[0]["time"] >= eta.timestamp() - 0.01


def test_retry_with_backoff_then_success(client, emu, app):
    app.statuses["flaky"] = [500, 503]
    create(client, emu, name="flaky")
    wait_for(lambda: len(app.for_task("flaky")) == 3)
    attempts = app.for_task("flaky")
    assert [a["headers"]["X-AppEngine-TaskRetryCount"] for a in attempts] == ["0", "1", "2"]
    assert [a["headers"]["X-AppEngine-TaskExecutionCount"] for a in attempts] == ["0", "1", "2"]
    assert attempts[1]["headers"]["X-AppEngine-TaskPreviousResponse"] == "500"
    assert attempts[2]["headers"]["X-AppEngine-TaskPreviousResponse"] == "503"
    assert attempts[2]["headers"]["X-AppEngine-TaskRetryReason"] == "HTTP 503"
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19  # 0.1 s, then doubled
    wait_for(lambda: [e["status"] for e in emu.dispatch_log if e["task"] == "flaky"][-1:] == [200])
    with pytest.raises(exceptions.NotFound):
        client.get_task(name=f"{qname(emu, 'default')}/tasks/flaky")


def test_task_state_fields_track_attempts(client, emu, app):
    app.statuses["tracked"] = [500, 500, 500, 500, 500, 500]
    client.pause_queue(name=qname(emu, "default"))
    name = create(client, emu, name="tracked").name
    client.run_task(name=name)
    wait_for(lambda: client.get_task(name=name).response_count == 1)
    task = client.get_task(name=name)
    assert task.dispatch_count == 1
    assert task.first_attempt.dispatch_time
    assert task.last_attempt.response_time >= task.last_attempt.dispatch_time
    assert task.last_attempt.response_status.code == 13
    assert task.schedule_time > task.last_attempt.dispatch_time  # rescheduled with backoff


def test_retry_limit_exhausted_deletes_task(client, emu, app):
    app.statuses["doomed"] = [500] * 10
    name = create(client, emu, queue="limited", name="doomed").name
    wait_for(lambda: len(app.for_task("doomed")) == 3)
    wait_for(lambda: not list(client.list_tasks(parent=qname(emu, "limited"))))
    # max_attempts = task_retry_limit + 1
    holds_for(lambda: len(app.for_task("doomed")) == 3, "no attempt past the limit", 0.5)
    with pytest.raises(exceptions.NotFound):
        client.get_task(name=name)


def test_connection_error_is_retried(client, emu, app, queue_yaml, tmp_path):
    dead_port = socket.socket()
    dead_port.bind(("127.0.0.1", 0))
    port = dead_port.getsockname()[1]
    dead_port.close()
    with CloudTasksEmulator(
        port=0, queue_yaml=queue_yaml, project="p", location="l", app_url=f"http://127.0.0.1:{port}"
    ) as other:
        c = client_for(other.port)
        c.create_task(
            parent=f"{other.parent}/queues/default",
            task={"app_engine_http_request": {"relative_uri": "/x"}},
        )
        wait_for(lambda: len(other.dispatch_log) >= 2)
        assert other.dispatch_log[0]["status"] is None
        assert other.dispatch_log[0]["error"].startswith("connection error")
        assert other.dispatch_log[1]["retry_count"] == 1


def test_dispatch_deadline_exceeded_is_a_retry(app, queue_yaml):
    app.delay = 0.6
    with CloudTasksEmulator(
        port=0, queue_yaml=queue_yaml, app_url=app.url, default_dispatch_deadline=0.2
    ) as other:
        client_for(other.port).create_task(
            parent=f"{other.parent}/queues/default",
            task={"app_engine_http_request": {"relative_uri": "/slow"}},
        )
        wait_for(lambda: other.dispatch_log)
        assert other.dispatch_log[0]["status"] is None
        assert other.dispatch_log[0]["error"] == "deadline exceeded"


def test_named_task_dedup_and_tombstone(client, emu, app):
    client.pause_queue(name=qname(emu, "default"))
    create(client, emu, name="once")
    with pytest.raises(exceptions.AlreadyExists):
        create(client, emu, name="once")
    client.resume_queue(name=qname(emu, "default"))
    wait_for(lambda: app.for_task("once"))
    wait_for(lambda: not list(client.list_tasks(parent=qname(emu, "default"))))
    with pytest.raises(exceptions.AlreadyExists):  # completed within the hour
        create(client, emu, name="once")
    client.pause_queue(name=qname(emu, "default"))
    name = create(client, emu, name="deleted").name
    client.delete_task(name=name)
    with pytest.raises(exceptions.AlreadyExists):
        create(client, emu, name="deleted")


def test_invalid_requests_are_rejected_and_server_keeps_serving(client, emu):
    parent = qname(emu, "default")
    bad = [
        {"name": f"{parent}/tasks/bad name", "app_engine_http_request": {}},
        {"name": f"{qname(emu, 'slow')}/tasks/wrong-queue", "app_engine_http_request": {}},
        {"app_engine_http_request": {"relative_uri": "no-slash"}},
        {"app_engine_http_request": {"http_method": "GET", "body": b"x"}},
        {"http_request": {"url": "example.com/no-scheme"}},
        # An OIDC token, but this emulator runs no issuer to sign it (no oidc_port).
        {
            "http_request": {
                "url": "https://x.test/",
                "oidc_token": {"service_account_email": "a@b"},
            }
        },
        {},
    ]
    for task in bad:
        with pytest.raises(exceptions.InvalidArgument):
            client.create_task(parent=parent, task=task)
    with pytest.raises(exceptions.InvalidArgument):
        client.list_tasks(request={"parent": parent, "page_token": "garbage"}).pages.__next__()
    with pytest.raises(exceptions.InvalidArgument):
        client.list_queues(parent="not-a-parent").pages.__next__()
    with pytest.raises(exceptions.NotFound):
        client.create_task(parent=qname(emu, "missing"), task={"app_engine_http_request": {}})
    assert client.get_queue(name=parent).name == parent


@pytest.fixture
def emu_oidc(queue_yaml: Path, tmp_path: Path) -> Iterator[CloudTasksEmulator]:
    """An emulator that signs HTTP-target tasks' OIDC tokens (its issuer on any free port)."""
    yield from _started(queue_yaml, tmp_path, app_url="http://127.0.0.1:9", oidc_port=0)


def test_http_target_tasks_go_to_their_url_with_cloud_tasks_headers_and_a_token(app, emu_oidc):
    from google.auth.transport.requests import Request
    from google.oauth2 import id_token

    client = client_for(emu_oidc.port)
    parent = qname(emu_oidc, "default")
    app.statuses["http-1"] = [500]
    request = {
        "url": f"{app.url}/run?x=1",
        "body": b"payload",
        "headers": {"X-Custom": "yes", "Authorization": "Bearer forged", "X-CloudTasks-Fake": "1"},
        "oidc_token": {"service_account_email": "tasks@p.iam.gserviceaccount.com"},
    }
    client.create_task(
        parent=parent, task={"name": f"{parent}/tasks/http-1", "http_request": request}
    )

    wait_for(lambda: len(app.for_task("http-1")) == 2)
    first, second = app.for_task("http-1")
    assert first["headers"]["X-CloudTasks-TaskRetryCount"] == "0"
    headers = second["headers"]
    assert second["method"] == "POST" and second["path"] == "/run?x=1"
    assert second["body"] == b"payload"
    assert headers["X-CloudTasks-QueueName"] == "default"
    assert headers["X-CloudTasks-TaskRetryCount"] == "1"
    assert headers["X-CloudTasks-TaskPreviousResponse"] == "500"
    assert headers["User-Agent"] == "Google-Cloud-Tasks"
    assert headers["X-Custom"] == "yes"
    assert "X-CloudTasks-Fake" not in headers
    assert not [name for name in headers if name.lower().startswith("x-appengine-")]
    scheme, token = headers["Authorization"].split(" ")
    assert scheme == "Bearer" and token != "forged"
    claims = id_token.verify_token(
        token, Request(), audience=request["url"], certs_url=emu_oidc.oidc.certs_url
    )
    assert claims["email"] == "tasks@p.iam.gserviceaccount.com"
    assert claims["email_verified"] is True and claims["iss"] == emu_oidc.oidc.issuer
    assert claims["exp"] - claims["iat"] == 3600


def test_the_issuer_serves_its_key_and_keeps_it_across_restarts(app, queue_yaml, tmp_path):
    import requests

    options = {"port": 0, "data_dir": tmp_path / "data", "queue_yaml": queue_yaml, "oidc_port": 0}
    with CloudTasksEmulator(**options) as emulator:
        issuer = emulator.oidc
        kid = issuer.kid
        certs = requests.get(issuer.certs_url, timeout=5)
        jwks = requests.get(f"{issuer.issuer}/oauth2/v3/certs", timeout=5).json()
        discovery = requests.get(f"{issuer.issuer}/.well-known/openid-configuration", timeout=5)
    assert list(certs.json()) == [kid]
    assert certs.json()[kid].startswith("-----BEGIN CERTIFICATE-----")
    assert certs.headers["Cache-Control"] == "public, max-age=300"
    assert [(key["kid"], key["kty"], key["alg"]) for key in jwks["keys"]] == [(kid, "RSA", "RS256")]
    assert discovery.json()["jwks_uri"] == f"{issuer.issuer}/oauth2/v3/certs"
    assert discovery.json()["issuer"] == issuer.issuer
    assert (tmp_path / "data" / "oidc-key.pem").stat().st_mode & 0o777 == 0o600
    with CloudTasksEmulator(**options) as again:
        assert again.oidc.kid == kid


def test_basic_view_of_an_http_target_task_has_no_body(client, emu):
    client.pause_queue(name=qname(emu, "default"))
    task = {"http_request": {"url": "https://x.test/run", "body": b"secret"}}
    created = client.create_task(parent=qname(emu, "default"), task=task)

    assert created.http_request.url == "https://x.test/run"
    assert created.http_request.body == b""
    full = client.get_task(request={"name": created.name, "response_view": "FULL"})
    assert full.http_request.body == b"secret"


def test_oversize_task_rejected(client, emu):
    with pytest.raises(exceptions.InvalidArgument, match="Task size too large"):
        create(client, emu, body=b"x" * 102400)
    # headers and the URI count towards the limit too
    with pytest.raises(exceptions.InvalidArgument, match="Task size too large"):
        create(client, emu, body=b"x" * 102000, headers={"X-Big": "y" * 500})
    assert create(client, emu, body=b"x" * 102000).name


def test_pause_resume_purge(client, emu, app):
    name = qname(emu, "default")
    paused = client.pause_queue(name=name)
    assert paused.state == tasks_v2.Queue.State.PAUSED
    tasks = [create(client, emu, name=f"p{i}") for i in range(3)]
    holds_for(lambda: app.requests == [], "no dispatch from a paused queue", 0.3)
    resumed = client.resume_queue(name=name)
    assert resumed.state == tasks_v2.Queue.State.RUNNING
    wait_for(lambda: len(app.requests) == 3)
    client.pause_queue(name=name)
    for i in range(4):
        create(client, emu, name=f"q{i}")
    purged = client.purge_queue(name=name)
    assert purged.purge_time
    assert list(client.list_tasks(parent=name)) == []
    client.resume_queue(name=name)
    holds_for(lambda: len(app.requests) == 3, "no purged task dispatched", 0.3)
    assert tasks[0].name.endswith("/p0")


def test_rate_limit_is_observable(client, emu, app):
    for i in range(5):
        create(client, emu, queue="slow", name=f"r{i}")
    wait_for(lambda: len(app.requests) == 5, timeout=4)
    times = sorted(r["time"] for r in app.requests)
    # 5/s with a bucket of 1: one dispatch every 0.2 s
    assert times[-1] - times[0] >= 0.7


def test_max_concurrent_honoured(client, emu, app):
    app.delay = 0.25
    for i in range(6):
        create(client, emu, queue="narrow", name=f"c{i}")
    wait_for(lambda: len(app.requests) == 6, timeout=5)
    assert app.max_active == 2


def test_run_task_dispatches_now_even_when_paused(client, emu, app):
    name = qname(emu, "default")
    client.pause_queue(name=name)
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    task = client.create_task(
        parent=name,
        task={"name": f"{name}/tasks/manual", "schedule_time": eta, "app_engine_http_request": {}},
    )
    ran = client.run_task(name=task.name)
    assert ran.dispatch_count == 1
    wait_for(lambda: app.for_task("manual"))
    wait_for(lambda: not list(client.list_tasks(parent=name)))
    with pytest.raises(exceptions.NotFound):
        client.run_task(name=task.name)


def test_queue_admin_rpcs(client, emu):
    created = client.create_queue(
        parent=emu.parent,
        queue={"name": qname(emu, "made"), "rate_limits": {"max_dispatches_per_second": 3}},
    )
    assert created.rate_limits.max_concurrent_dispatches == 1000
    assert created.retry_config.max_attempts == 100
    with pytest.raises(exceptions.AlreadyExists):
        client.create_queue(parent=emu.parent, queue={"name": qname(emu, "made")})
    updated = client.update_queue(
        queue={"name": qname(emu, "made"), "retry_config": {"max_attempts": 7}},
        update_mask={"paths": ["retry_config.max_attempts"]},
    )
    assert updated.retry_config.max_attempts == 7
    assert updated.rate_limits.max_dispatches_per_second == 3
    with pytest.raises(exceptions.InvalidArgument):
        client.update_queue(queue={"name": qname(emu, "made")}, update_mask={"paths": ["state"]})
    paused = client.list_queues(request={"parent": emu.parent, "filter": "state: PAUSED"})
    assert list(paused) == []
    client.delete_queue(name=qname(emu, "made"))
    with pytest.raises(exceptions.NotFound):
        client.get_queue(name=qname(emu, "made"))


def test_state_survives_in_process_restart(app, queue_yaml, tmp_path):
    data = tmp_path / "persist"
    first = CloudTasksEmulator(port=0, data_dir=data, queue_yaml=queue_yaml, app_url=app.url)
    first.start()
    c = client_for(first.port)
    c.pause_queue(name=f"{first.parent}/queues/slow")
    c.pause_queue(name=f"{first.parent}/queues/default")
    c.create_task(
        parent=f"{first.parent}/queues/default",
        task={"name": f"{first.parent}/queues/default/tasks/kept", "app_engine_http_request": {}},
    )
    first.stop()
    second = CloudTasksEmulator(port=0, data_dir=data, queue_yaml=queue_yaml, app_url=app.url)
    second.start()
    try:
        c = client_for(second.port)
        assert c.get_queue(name=f"{second.parent}/queues/slow").state.name == "PAUSED"
        names = [short(t.name) for t in c.list_tasks(parent=f"{second.parent}/queues/default")]
        assert names == ["kept"]
        c.resume_queue(name=f"{second.parent}/queues/default")
        wait_for(lambda: app.for_task("kept"))
    finally:
        second.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cli(args: list[str], cwd: pathlib.Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "gae_deferred.local.cloudtasks", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_survives_kill_9_and_exits_cleanly(app, queue_yaml, tmp_path):
    port = free_port()
    args = [
        "--port", str(port), "--data-dir", str(tmp_path / "cli"), "--queue-yaml", str(queue_yaml),
        "--project", "cli-project", "--location", "europe-west1", "--app-url", app.url,
    ]  # fmt: skip
    parent = "projects/cli-project/locations/europe-west1/queues/default"
    proc = start_cli(args)
    try:
        assert (
            proc.stdout.readline().strip() == f"cloud tasks emulator listening on 127.0.0.1:{port}"
        )
        c = client_for(port)
        c.pause_queue(name=parent)
        c.create_task(
            parent=parent, task={"name": f"{parent}/tasks/survivor", "app_engine_http_request": {}}
        )
    finally:
        proc.kill()
        proc.wait()
    busy = start_cli(args)
    try:
        assert busy.stdout.readline().startswith("cloud tasks emulator listening")
        clash = start_cli(args)
        _, err = clash.communicate(timeout=20)
        assert clash.returncode == 2 and str(port) in err
        c = client_for(port)
        assert c.get_queue(name=parent).state == tasks_v2.Queue.State.PAUSED
        assert [short(t.name) for t in c.list_tasks(parent=parent)] == ["survivor"]
    finally:
        busy.send_signal(signal.SIGTERM)
        busy.communicate(timeout=20)
    assert busy.returncode == 0


def test_cli_rejects_invalid_queue_yaml(tmp_path):
    bad = tmp_path / "queue.yaml"
    bad.write_text("queue:\n- name: x\n  rate: 5/x\n")
    proc = start_cli(["--port", str(free_port()), "--queue-yaml", str(bad)])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert f"{bad}:3: invalid rate '5/x'" in err


def test_cli_without_queue_yaml_has_the_default_queue(tmp_path):
    """Finding: an app folder without queue.yaml did not start ("queue.yaml not found")."""
    port = free_port()
    proc = start_cli(["--port", str(port), "--project", "p", "--data-dir", "state"], tmp_path)
    try:
        assert proc.stdout.readline() == f"cloud tasks emulator listening on 127.0.0.1:{port}\n"
        queues = client_for(port).list_queues(parent="projects/p/locations/us-central1")
        assert [short(queue.name) for queue in queues] == ["default"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    missing = start_cli(["--port", "0", "--queue-yaml", "nowhere.yaml"], tmp_path)
    _, err = missing.communicate(timeout=20)
    assert (missing.returncode, err) == (2, "error: queue.yaml not found: nowhere.yaml\n")


def test_port_in_use_in_process(emu, queue_yaml):
    with pytest.raises(PortInUseError):
        CloudTasksEmulator(port=emu.port, queue_yaml=queue_yaml).start()


def batch_request(emu, queue="default", name=None, uri="/work", **task):
    """One CreateTaskRequest of a BatchCreateTasks call."""
    task = {"app_engine_http_request": {"relative_uri": uri, "body": b"payload"}, **task}
    if name:
        task["name"] = f"{qname(emu, queue)}/tasks/{name}"
    return {"parent": qname(emu, queue), "task": task}


def failures(operation) -> dict[int, tuple[int, str]]:
    return {i: (s.code, s.message) for i, s in operation.metadata.failed_requests.items()}


CreateState = tasks_v2.BatchCreateTasksMetadata.State
DeleteState = tasks_v2.BatchDeleteTasksMetadata.State


def test_batch_create_100_tasks_in_one_rpc_all_dispatched(client, emu, app):
    requests = [batch_request(emu, name=f"t-{i}") for i in range(100)]
    operation = client.batch_create_tasks(parent=qname(emu, "default"), requests=requests)
    # Cloud Tasks answers with the operation already done: no GetOperation needed.
    assert operation.operation.done
    assert operation.operation.name.startswith(f"{emu.parent}/operations/")
    created = operation.result()
    assert [short(task.name) for task in created.tasks] == [f"t-{i}" for i in range(100)]
    assert created.tasks[0].app_engine_http_request.body == b""  # BASIC view by default
    assert operation.metadata.state == CreateState.SUCCEEDED
    assert operation.metadata.failed_requests == {}
    assert operation.metadata.end_time >= operation.metadata.start_time
    wait_for(lambda: len(app.requests) == 100, timeout=15)
    assert sorted(r["task"] for r in app.requests) == sorted(f"t-{i}" for i in range(100))
    assert {r["body"] for r in app.requests} == {b"payload"}
    assert emu.rpc_counts == {"BatchCreateTasks": 1}


def test_batch_create_refuses_what_the_api_refuses(client, emu):
    default = qname(emu, "default")
    with pytest.raises(exceptions.InvalidArgument, match=r"at most 100 tasks .* got 101"):
        client.batch_create_tasks(parent=default, requests=[batch_request(emu) for _ in range(101)])
    with pytest.raises(exceptions.InvalidArgument, match="requests must not be empty"):
        client.batch_create_tasks(parent=default, requests=[])
    with pytest.raises(exceptions.InvalidArgument, match=r"requests\[1\].parent .* same queue"):
        client.batch_create_tasks(
            parent=default, requests=[batch_request(emu), batch_request(emu, queue="slow")]
        )
    with pytest.raises(exceptions.NotFound, match="Queue does not exist"):
        client.batch_create_tasks(
            parent=qname(emu, "nope"), requests=[batch_request(emu, queue="nope")]
        )
    # A refused call creates nothing, not even its valid tasks.
    assert list(client.list_tasks(parent=default)) == []
    assert list(client.list_tasks(parent=qname(emu, "slow"))) == []


def test_batch_create_is_not_atomic_each_task_fails_on_its_own(client, emu, app):
    default = qname(emu, "default")
    client.pause_queue(name=default)
    create(client, emu, name="existing")
    gone = create(client, emu, name="deleted")
    client.delete_task(name=gone.name)  # tombstoned for an hour
    requests = [
        batch_request(emu, name="fresh"),
        batch_request(emu, name="existing"),
        batch_request(emu, uri="no-slash"),
        batch_request(emu, name="deleted"),
        {**batch_request(emu), "response_view": tasks_v2.Task.View.FULL},
        batch_request(emu, name="fresh"),  # the same name twice in one batch
        batch_request(emu, name="bad name!"),
    ]
    operation = client.batch_create_tasks(parent=default, requests=requests)
    created = operation.result()
    assert len(created.tasks) == 2
    assert short(created.tasks[0].name) == "fresh" and short(created.tasks[1].name).isdigit()
    assert created.tasks[1].app_engine_http_request.body == b"payload"  # its FULL view
    assert operation.metadata.state == CreateState.PARTIALLY_SUCCEEDED
    failed = failures(operation)
    assert sorted(failed) == [1, 2, 3, 5, 6]
    assert {i: code for i, (code, _) in failed.items()} == {
        1: code_pb2.ALREADY_EXISTS,
        2: code_pb2.INVALID_ARGUMENT,
        3: code_pb2.ALREADY_EXISTS,
        5: code_pb2.ALREADY_EXISTS,
        6: code_pb2.INVALID_ARGUMENT,
    }
    assert "invalid relative_uri 'no-slash'" in failed[2][1]
    assert f"already exists: {default}/tasks/deleted" in failed[3][1]
    assert "invalid task name" in failed[6][1]
    listed = {short(t.name) for t in client.list_tasks(parent=default)}
    assert listed == {"existing", "fresh", short(created.tasks[1].name)}
    # The batch's tasks are dispatched like CreateTask's once the queue runs.
    client.resume_queue(name=default)
    wait_for(lambda: len(app.requests) == 3)
    assert sorted(r["task"] for r in app.requests) == sorted(listed)


def test_batch_create_with_every_task_failing_is_an_aborted_operation(client, emu):
    default = qname(emu, "default")
    operation = client.batch_create_tasks(
        parent=default, requests=[batch_request(emu, uri="x"), batch_request(emu, uri="y")]
    )
    with pytest.raises(exceptions.Aborted, match="None of the requests succeeded"):
        operation.result()
    assert operation.metadata.state == CreateState.PARTIALLY_SUCCEEDED
    assert {i: code for i, (code, _) in failures(operation).items()} == {
        0: code_pb2.INVALID_ARGUMENT,
        1: code_pb2.INVALID_ARGUMENT,
    }


def test_batch_create_request_id_makes_a_retry_return_the_first_outcome(client, emu):
    default = qname(emu, "default")
    client.pause_queue(name=default)
    request = {
        "parent": default,
        "requests": [batch_request(emu), batch_request(emu, name="once")],
        "request_id": "retry-1",
    }
    first = client.batch_create_tasks(request=request)
    again = client.batch_create_tasks(request=request)
    assert first.operation.name == again.operation.name == f"{emu.parent}/operations/retry-1"
    assert again.result() == first.result()
    assert again.metadata.failed_requests == {}
    assert len(list(client.list_tasks(parent=default))) == 2
    with pytest.raises(exceptions.InvalidArgument, match="already used by a BatchCreateTasks"):
        client.batch_delete_tasks(
            request={"parent": default, "names": [f"{default}/tasks/once"], "request_id": "retry-1"}
        )
    assert emu.rpc_counts["BatchCreateTasks"] == 2


def test_batch_create_tasks_survive_a_restart(app, queue_yaml, tmp_path):
    args = {"port": 0, "data_dir": tmp_path / "d", "queue_yaml": queue_yaml, "app_url": app.url}
    with CloudTasksEmulator(**args) as first:
        c = client_for(first.port)
        c.pause_queue(name=qname(first, "default"))
        requests = [batch_request(first, name=f"kept-{i}") for i in range(3)]
        c.batch_create_tasks(parent=qname(first, "default"), requests=requests).result()
    with CloudTasksEmulator(**args) as second:
        tasks = client_for(second.port).list_tasks(parent=qname(second, "default"))
        assert sorted(short(t.name) for t in tasks) == ["kept-0", "kept-1", "kept-2"]


def test_batch_delete_tasks(client, emu):
    default, slow = qname(emu, "default"), qname(emu, "slow")
    client.pause_queue(name=default)
    client.pause_queue(name=slow)
    tasks = [create(client, emu, name=f"d-{i}") for i in range(3)]
    elsewhere = create(client, emu, queue="slow", name="elsewhere")
    names = [tasks[0].name, f"{default}/tasks/missing", tasks[2].name, elsewhere.name]
    operation = client.batch_delete_tasks(parent=default, names=names)
    assert operation.operation.done
    assert operation.result() == empty_pb2.Empty()
    assert operation.metadata.state == DeleteState.PARTIALLY_SUCCEEDED
    failed = failures(operation)
    assert {i: code for i, (code, _) in failed.items()} == {
        1: code_pb2.NOT_FOUND,
        3: code_pb2.INVALID_ARGUMENT,
    }
    assert f"Task does not exist: {default}/tasks/missing" == failed[1][1]
    assert [t.name for t in client.list_tasks(parent=default)] == [tasks[1].name]
    assert [t.name for t in client.list_tasks(parent=slow)] == [elsewhere.name]
    with pytest.raises(exceptions.AlreadyExists):  # deleted names are tombstoned
        create(client, emu, name="d-0")
    everything = client.batch_delete_tasks(parent=default, names=[tasks[1].name])
    assert everything.result() == empty_pb2.Empty()
    assert everything.metadata.state == DeleteState.SUCCEEDED
    none = client.batch_delete_tasks(parent=default, names=[tasks[1].name])
    with pytest.raises(exceptions.Aborted, match="None of the requests succeeded"):
        none.result()
    assert failures(none)[0][0] == code_pb2.NOT_FOUND


def test_batch_delete_refuses_what_the_api_refuses(client, emu):
    default = qname(emu, "default")
    many = [f"{default}/tasks/t{i}" for i in range(1001)]
    with pytest.raises(exceptions.InvalidArgument, match=r"at most 1000 tasks .* got 1001"):
        client.batch_delete_tasks(parent=default, names=many)
    with pytest.raises(exceptions.InvalidArgument, match="names must not be empty"):
        client.batch_delete_tasks(parent=default, names=[])
    with pytest.raises(exceptions.NotFound, match="Queue does not exist"):
        client.batch_delete_tasks(parent=qname(emu, "nope"), names=many[:1])
    # 1,000 names are allowed (none of them exist here).
    operation = client.batch_delete_tasks(parent=default, names=many[:1000])
    assert len(operation.metadata.failed_requests) == 1000


def _op_request(name: str) -> operations_pb2.GetOperationRequest:
    return operations_pb2.GetOperationRequest(name=name)


def test_get_operation(client, emu):
    client.pause_queue(name=qname(emu, "default"))
    operation = client.batch_create_tasks(
        parent=qname(emu, "default"), requests=[batch_request(emu), batch_request(emu, uri="x")]
    )
    fetched = client.get_operation(_op_request(operation.operation.name))
    assert fetched == operation.operation
    assert fetched.done and fetched.metadata.Is(tasks_v2.BatchCreateTasksMetadata.pb().DESCRIPTOR)
    unknown = f"{emu.parent}/operations/never-started"
    with pytest.raises(exceptions.NotFound, match=f"Operation does not exist: {unknown}"):
        client.get_operation(_op_request(unknown))
    assert emu.rpc_counts["GetOperation"] == 2


def _timed(call) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_latency_delays_every_rpc_in_parallel(app, queue_yaml):
    latency = 0.3
    with CloudTasksEmulator(
        port=0, queue_yaml=queue_yaml, app_url=app.url, latency_ms=latency * 1000
    ) as slow:
        c = client_for(slow.port)
        default = qname(slow, "default")
        c.get_queue(name=default)  # connects the channel
        assert latency <= _timed(lambda: c.get_queue(name=default)) < latency + 0.25
        assert latency <= _timed(lambda: create(c, slow)) < latency + 0.25
        assert latency <= _timed(lambda: list(c.list_queues(parent=slow.parent))) < latency + 0.25
        paused = qname(slow, "slow")
        c.pause_queue(name=paused)
        batch = [{"parent": paused, "task": {"app_engine_http_request": {}}}]
        started = time.monotonic()
        operation = c.batch_create_tasks(parent=paused, requests=batch)
        assert latency <= time.monotonic() - started < latency + 0.25
        request = operations_pb2.GetOperationRequest(name=operation.operation.name)
        assert latency <= _timed(lambda: c.get_operation(request)) < latency + 0.25
        names = [operation.result().tasks[0].name]
        delete = c.batch_delete_tasks
        assert latency <= _timed(lambda: delete(parent=paused, names=names)) < latency + 0.25
        # The delay is a round trip, not a queue: 32 concurrent calls take about one delay.
        with futures.ThreadPoolExecutor(32) as pool:
            elapsed = _timed(lambda: list(pool.map(lambda _: create(c, slow), range(32))))
        assert latency <= elapsed < 2 * latency
        wait_for(lambda: len(app.requests) == 33)  # dispatch itself is not delayed
    with CloudTasksEmulator(port=0, queue_yaml=queue_yaml, app_url=app.url) as fast:
        c = client_for(fast.port)
        c.get_queue(name=qname(fast, "default"))
        assert _timed(lambda: c.get_queue(name=qname(fast, "default"))) < 0.1


def test_latency_must_be_a_non_negative_number(queue_yaml):
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency_ms"):
            CloudTasksEmulator(queue_yaml=queue_yaml, latency_ms=bad)
    proc = start_cli(["--port", "0", "--queue-yaml", str(queue_yaml), "--latency-ms", "-5"])
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert "--latency-ms: expected milliseconds >= 0, got '-5'" in err


def test_cli_latency_option(app, queue_yaml, tmp_path):
    port = free_port()
    args = [
        "--port", str(port), "--queue-yaml", str(queue_yaml), "--latency-ms", "250",
        "--project", "lat", "--location", "us-central1", "--app-url", app.url,
    ]  # fmt: skip
    proc = start_cli(args)
    try:
        assert proc.stdout.readline().startswith("cloud tasks emulator listening")
        c = client_for(port)
        name = "projects/lat/locations/us-central1/queues/default"
        c.get_queue(name=name)
        assert 0.25 <= _timed(lambda: c.get_queue(name=name)) < 0.5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_crashing_attempt_is_logged_not_lost_silently(client, emu, monkeypatch, caplog):
    from gae_deferred.local.cloudtasks import dispatch

    def crash(*args: object) -> None:
        raise RuntimeError("boom in send")

    monkeypatch.setattr(dispatch, "send", crash)
    create(client, emu, name="crashes")
    wait_for(lambda: "dispatch attempt crashed" in caplog.text)
    assert "boom in send" in caplog.text
