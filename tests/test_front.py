"""The dev server's front end over real sockets: deadlines, size cap, static handlers, forwarding.

The front end runs in a thread of this process, in front of a small echo app (http.server)
that answers with what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from gae_deferred.local.app_yaml import load_app_yaml
from gae_deferred.local.front import UNAVAILABLE_HEADER, FrontServer, content_type

APP_YAML = r"""
runtime: python311
handlers:
- url: /assets
  static_dir: public
- url: /robots\.txt
  static_files: public/robots.txt
  upload: public/robots\.txt
  mime_type: text/x-robots
  http_headers:
    X-Served-By: static
- url: /(.*\.(png|txt))$
  static_files: files/\1
  upload: files/.*\.(png|txt)$
- url: /.*
  script: auto
"""


class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        echoed = {
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body.decode("latin-1"),
        }
        data = json.dumps(echoed).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "app.yaml").write_text(APP_YAML)
    (tmp_path / "public" / "css").mkdir(parents=True)
    (tmp_path / "public" / "css" / "site.css").write_text("body { color: red }")
    (tmp_path / "public" / "app.js").write_text("console.log(1)")
    (tmp_path / "public" / "font.woff2").write_bytes(b"wOF2")
    (tmp_path / "public" / "robots.txt").write_text("User-agent: *")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "logo.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.txt").write_text("not for the web")
    (tmp_path / "files" / "notes.md").write_text("not uploaded")
    return tmp_path


class Running:
    """A FrontServer on a free port in a thread, in front of an Echo app (or nothing)."""

    def __init__(self, app_dir: pathlib.Path, backend: bool = True, **options: float) -> None:
        self.backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
        backend_port = self.backend.server_port
        self.serving = backend
        if backend:
            threading.Thread(target=self.backend.serve_forever, daemon=True).start()
        else:
            self.backend.server_close()  # nothing listens there any more
        handlers = load_app_yaml(app_dir / "app.yaml").handlers
        self.front = FrontServer(handlers, backend_port, **options)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start() -> None:
            self.server = await asyncio.start_server(self.front.handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        started.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.serving:
            self.backend.shutdown()
            self.backend.server_close()


@pytest.fixture
def front(app_dir: pathlib.Path) -> Iterator[Running]:
    running = Running(app_dir, body_idle_timeout=0.5, body_timeout=2.0, max_body_bytes=1000)
    yield running
    running.close()


def _raw(front: Running, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", front.port), timeout=wait) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def test_forwards_method_target_host_and_body_as_sent(front: Running) -> None:
    answer = requests.post(
        front.url + "/_ah/queue/deferred?x=1%202",
        data=b"payload",
        headers={"Host": "localhost:8080", "X-AppEngine-QueueName": "default"},
        timeout=5,
    )
    echoed = answer.json()
    assert answer.status_code == 200 and answer.headers["Connection"] == "close"
    assert echoed["method"] == "POST" and echoed["path"] == "/_ah/queue/deferred?x=1%202"
    assert echoed["body"] == "payload"
    headers = echoed["headers"]
    assert headers["Host"] == "localhost:8080"
    assert headers["X-AppEngine-QueueName"] == "default"
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["Content-Length"] == "7" and headers["Connection"] == "close"


def test_chunked_body_arrives_whole_with_a_content_length(front: Running) -> None:
    answer = requests.put(front.url + "/up", data=iter([b"ab", b"cde"]), timeout=5)
    echoed = answer.json()
    assert echoed["body"] == "abcde" and echoed["headers"]["Content-Length"] == "5"
    assert "Transfer-Encoding" not in echoed["headers"]


def test_expect_100_continue(front: Running) -> None:
    head = b"POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as conn:
        conn.sendall(head)
        assert conn.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.sendall(b"abc")
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.0 200") or received.startswith(b"HTTP/1.1 200")
    assert b'"body": "abc"' in received


def test_slow_body_is_408_and_does_not_hold_up_others(front: Running) -> None:
    slow = socket.create_connection(("127.0.0.1", front.port), timeout=5)
    slow.sendall(b"POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    try:
        started = time.monotonic()
        assert requests.get(front.url + "/quick", timeout=5).status_code == 200
        assert time.monotonic() - started < 0.5
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout")
        assert b"3 bytes received" in answer
    finally:
        slow.close()


def test_trickling_body_is_408_at_the_overall_deadline(front: Running) -> None:
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as conn:
        conn.sendall(b"POST /t HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - started < 4:
            conn.sendall(b"x")  # one byte per 0.2 s: never idle for 0.5 s
            time.sleep(0.2)
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answer = conn.recv(65536)
            conn.setblocking(True)
    assert answer.startswith(b"HTTP/1.1 408")
    assert 1.8 < time.monotonic() - started < 3.5


def test_too_big_or_malformed_requests_are_refused_at_once(front: Running) -> None:
    started = time.monotonic()
    assert _raw(front, b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n").startswith(
        b"HTTP/1.1 413"
    )
    assert _raw(front, b"GET /\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(front, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505")
    assert _raw(front, b"GET / HTTP/1.1\r\n bad\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(front, b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert _raw(front, b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").startswith(
        b"HTTP/1.1 501"
    )
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"
    assert _raw(front, big).startswith(b"HTTP/1.1 431")
    chunked_over = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n"
    assert _raw(front, chunked_over).startswith(b"HTTP/1.1 413")
    assert time.monotonic() - started < 5


def test_what_gunicorn_would_refuse_is_refused_here_with_the_security_headers(
    front: Running,
) -> None:
    """Finding: gunicorn's own 414 for a URL over 4,094 bytes had no CSP or X-Frame-Options.
    The front refuses at gunicorn's limits first, and all its own answers carry them."""
    at_limit = b"GET /" + b"a" * (4094 - len("GET / HTTP/1.1") - 1) + b" HTTP/1.1\r\n\r\n"
    assert json.loads(_raw(front, at_limit).split(b"\r\n\r\n", 1)[1])["method"] == "GET"
    over = b"GET /" + b"a" * 4090 + b" HTTP/1.1\r\n\r\n"
    answers = {
        over: b"HTTP/1.1 414 URI Too Long",
        b"GET / HTTP/1.1\r\nX: " + b"a" * 8200 + b"\r\n\r\n": b"HTTP/1.1 431",
        b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n": b"HTTP/1.1 431",
        b"GET /\r\n\r\n": b"HTTP/1.1 400",
        b"GET / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n": b"HTTP/1.1 413",
    }
    for request, status in answers.items():
        head = _raw(front, request).split(b"\r\n\r\n", 1)[0]
        assert head.startswith(status), (request[:40], head)
        for header in (b"Content-Security-Policy: default-src 'none'", b"X-Frame-Options: DENY"):
            assert header in head, (request[:40], header)
        assert b"X-Content-Type-Options: nosniff" in head


def test_incomplete_headers_are_408_after_the_header_deadline(app_dir: pathlib.Path) -> None:
    running = Running(app_dir, header_timeout=0.3)
    try:
        started = time.monotonic()
        assert _raw(running, b"GET / HTTP/1.1\r\nHost: h\r\n").startswith(b"HTTP/1.1 408")
        assert 0.25 < time.monotonic() - started < 2
    finally:
        running.close()


def test_static_dir_and_static_files(front: Running) -> None:
    css = requests.get(front.url + "/assets/css/site.css", timeout=5)
    assert css.status_code == 200 and css.text == "body { color: red }"
    assert css.headers["Content-Type"] == "text/css"
    assert css.headers["Cache-Control"] == "no-cache"
    assert requests.get(front.url + "/assets/app.js", timeout=5).headers["Content-Type"] == (
        "text/javascript"
    )
    png = requests.get(front.url + "/logo.png", timeout=5)
    assert png.content == b"\x89PNG" and png.headers["Content-Type"] == "image/png"
    robots = requests.get(front.url + "/robots.txt", timeout=5)
    assert robots.headers["Content-Type"] == "text/x-robots"
    assert robots.headers["X-Served-By"] == "static"
    head = requests.head(front.url + "/assets/css/site.css", timeout=5)
    assert head.status_code == 200 and head.headers["Content-Length"] == "19" and not head.text
    assert requests.post(front.url + "/assets/app.js", timeout=5).status_code == 405
    # Not the app's: a missing static file is a 404 from the front end.
    assert requests.get(front.url + "/assets/missing.css", timeout=5).status_code == 404
    assert requests.get(front.url + "/assets/css", timeout=5).status_code == 404


@pytest.mark.parametrize(
    "target",
    [
        "/assets/../secret.txt",
        "/assets/%2e%2e/secret.txt",
        "/assets/..%2fsecret.txt",
        "/assets/css/../../app.yaml",
        "/../secret.txt",
        "/%2e%2e/%2e%2e/etc/hostname.txt",
        "/notes.txt/../../secret.txt",
    ],
)
def test_no_file_outside_a_static_handler_is_served(front: Running, target: str) -> None:
    answer = _raw(front, f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b"not for the web" not in answer and b"runtime" not in answer


def test_upload_regex_limits_static_files(front: Running) -> None:
    # files/notes.md exists but `upload` allows only png and txt; /notes.md goes to the app.
    assert requests.get(front.url + "/notes.md", timeout=5).json()["path"] == "/notes.md"


def test_app_down_is_a_marked_502(app_dir: pathlib.Path) -> None:
    running = Running(app_dir, backend=False)
    try:
        answer = requests.get(running.url + "/x", timeout=15)
        assert answer.status_code == 502 and answer.headers[UNAVAILABLE_HEADER]
        assert "not answering" in answer.text
    finally:
        running.close()


def test_no_handler_matches_is_404(tmp_path: pathlib.Path) -> None:
    (tmp_path / "app.yaml").write_text(
        "runtime: python311\nhandlers:\n- url: /only\n  script: auto\n"
    )
    running = Running(tmp_path)
    try:
        assert requests.get(running.url + "/only", timeout=5).status_code == 200
        assert requests.get(running.url + "/other", timeout=5).status_code == 404
    finally:
        running.close()


def test_content_types() -> None:
    cases = {
        "a.css": "text/css",
        "a.js": "text/javascript",
        "a.html": "text/html",
        "a.svg": "image/svg+xml",
        "a.woff2": "font/woff2",
        "a.json": "application/json",
        "a.unknownext": "application/octet-stream",
    }
    for name, expected in cases.items():
        assert content_type(pathlib.Path(name)) == expected
