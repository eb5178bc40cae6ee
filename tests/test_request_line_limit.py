"""Finding 9: gunicorn's own 414 for a URL over 4,094 bytes had no CSP or X-Frame-Options.

``gae_deferred.webapp2.gunicorn_conf`` lifts gunicorn's request-line limit and
``deferred_middleware`` answers past it itself, with the security headers, on every path.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import requests
import webapp2
import webob
import webtest

from gae_deferred.local.stack import free_port
from gae_deferred.webapp2 import deferred_middleware
from tests.stack_support import wait_for

GUNICORN = pathlib.Path(sys.executable).with_name("gunicorn")
CONFIG = "python:gae_deferred.webapp2.gunicorn_conf"
#: What the app serves: main.py's shape, the middleware around a webapp2 app.
APP_MODULE = """\
import webapp2
from gae_deferred.webapp2 import deferred_middleware, deferred_routes

app = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
"""
#: A 5,000-byte URL under the dashboard (the request line is longer still).
LONG_TARGET = "/_ah/deferred-admin/" + "a" * (5000 - len("/_ah/deferred-admin/"))
CSP = "Content-Security-Policy"


class Hello(webapp2.RequestHandler):
    def get(self, *args: str) -> None:
        self.response.write("hello")


def test_middleware_answers_a_request_line_over_4094_bytes_with_414_and_the_headers(
    ndb_stub: object,
) -> None:
    app = webtest.TestApp(deferred_middleware(webapp2.WSGIApplication([(r"/(.*)", Hello)])))
    # "GET " + target + " HTTP/1.1": at 4,094 bytes the app answers, one byte more is a 414.
    at_limit = "/" + "a" * (4094 - len("GET / HTTP/1.1"))
    assert app.get(at_limit).text == "hello"
    answers = [
        app.get(at_limit + "b", status=414),
        app.get("/x?q=" + "a" * 5000, status=414),
        app.post("/_ah/queue/deferred/" + "a" * 5000, params=b"x" * 10, status=414),
        app.get(LONG_TARGET, status=414),
    ]
    for answer in answers:
        assert answer.status == "414 URI Too Long"
        assert "frame-ancestors 'none'" in answer.headers[CSP]
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"
    assert answers[2].headers[CSP] == "default-src 'none'; frame-ancestors 'none'"


def test_a_request_line_over_the_limit_is_refused_without_reading_the_body() -> None:
    class Unreadable:
        def read(self, *args: object) -> bytes:
            raise AssertionError("the body was read")

    request = webob.Request.blank(LONG_TARGET, method="POST")
    request.environ.update({"wsgi.input": Unreadable(), "CONTENT_LENGTH": "10"})
    answer = request.get_response(deferred_middleware(webapp2.WSGIApplication([])))
    assert answer.status == "414 URI Too Long"
    assert answer.text == "Error 414: The request line is over 4094 bytes.\n"
    assert answer.headers["X-Frame-Options"] == "DENY"


@pytest.fixture
def serve(tmp_path: pathlib.Path) -> Iterator[Callable[..., str]]:
    """``serve(*options)``: the app under the real gunicorn on a free loopback port; its URL."""
    (tmp_path / "app_main.py").write_text(APP_MODULE)
    processes: list[subprocess.Popen] = []

    def start(*options: str) -> str:
        port = free_port("127.0.0.1")
        argv = [str(GUNICORN), *options, "-b", f"127.0.0.1:{port}", "-w", "1"]
        argv += ["--no-control-socket", "app_main:app"]
        process = subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        processes.append(process)

        def listening() -> bool:
            assert process.poll() is None, f"gunicorn exited with {process.returncode}"
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, "gunicorn to listen")
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_under_gunicorn_with_the_config_a_5000_byte_url_gets_414_with_the_headers(
    serve: Callable[..., str],
) -> None:
    bare = requests.get(serve() + LONG_TARGET, timeout=20)
    assert bare.status_code == 414
    assert CSP not in bare.headers and "X-Frame-Options" not in bare.headers  # gunicorn's page

    answer = requests.get(serve("-c", CONFIG) + LONG_TARGET, timeout=20)
    assert answer.status_code == 414
    assert "frame-ancestors 'none'" in answer.headers[CSP]
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.text == "Error 414: The request line is over 4094 bytes.\n"


def test_middleware_answers_a_header_field_over_8190_bytes_with_431_and_the_headers(
    ndb_stub: object,
) -> None:
    app = webtest.TestApp(deferred_middleware(webapp2.WSGIApplication([(r"/(.*)", Hello)])))
    # "X-Big: " + value + CRLF: at 8,190 bytes the app answers, one byte more is a 431.
    at_limit = "v" * (8190 - len("X-Big: ") - 2)
    assert app.get("/", headers={"X-Big": at_limit}).text == "hello"
    for path in ("/", "/_ah/deferred-admin/", "/_ah/queue/deferred"):
        answer = app.get(path, headers={"X-Big": at_limit + "v"}, status=431)
        assert answer.status == "431 Request Header Fields Too Large"
        assert "frame-ancestors 'none'" in answer.headers[CSP]
        assert answer.headers["X-Frame-Options"] == "DENY"


def test_under_gunicorn_with_the_config_a_9000_byte_header_gets_431_with_the_headers(
    serve: Callable[..., str],
) -> None:
    big = {"X-Big": "v" * 9000}
    bare = requests.get(serve() + "/_ah/deferred-admin/", headers=big, timeout=20)
    assert bare.status_code == 431
    assert CSP not in bare.headers and "X-Frame-Options" not in bare.headers  # gunicorn's page

    answer = requests.get(serve("-c", CONFIG) + "/_ah/deferred-admin/", headers=big, timeout=20)
    assert answer.status_code == 431
    assert "frame-ancestors 'none'" in answer.headers[CSP]
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.text == "Error 431: A header field is over 8190 bytes.\n"
