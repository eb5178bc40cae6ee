"""Every answer gae_deferred's routes give is well-formed and carries the security headers.

Walks every route (each dashboard page and action, HTML and API, the task path bare and with a
function name) with ordinary and hostile methods and with hostile path suffixes: undecodable
bytes, traversal, control characters. Whatever answers (a handler, webapp2 before routing, the
middleware's guard), the answer has a status line, a Content-Type, a Content-Length that matches
its body, no 5xx, and the security headers.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import re
import struct
import urllib.parse

import pytest
import webapp2
import webtest

import gae_deferred
from gae_deferred import cloud_tasks, metrics
from gae_deferred.webapp2 import _admin_auth, deferred_middleware, deferred_routes
from tests.dashboard.support import LOOPBACK, P as PREFIX, form_token, make_failure, pause

METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "PROPFIND")
SUFFIXES = ("", "/%ff", "%ff", "/%2e%2e/%2e%2e/x", "/%00", "/%E2%98%83", "/%7f", "/..;/x")
REQUIRED = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options")


def every_route_path() -> list[str]:
    """One concrete path per route: each ``(?P<name>...)`` segment becomes a plain id."""
    (dashboard,) = [route for route in deferred_routes() if hasattr(route, "routes")]
    paths = [re.sub(r"\(\?P<\w+>[^)]*\)", "x", route.template) for route in dashboard.routes]
    return [*paths, "/_ah/queue/deferred", "/_ah/queue/deferred/tests.callables.add"]


@dataclasses.dataclass
class Answer:
    status: str
    headers: dict[str, str]
    body: bytes

    @property
    def status_int(self) -> int:
        return int(self.status[:3])

    @property
    def text(self) -> str:
        return self.body.decode()


class Client:
    """Calls the WSGI app as a server would: the raw path percent-decoded into PATH_INFO as
    bytes held in latin-1 (PEP 3333), which WebTest cannot do for paths that are not UTF-8."""

    def __init__(self, wsgi: webapp2.WSGIApplication) -> None:
        self.wsgi = wsgi

    def request(self, path: str, method: str = "GET", body: bytes = b"") -> Answer:
        environ = {
            **LOOPBACK,
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "HTTP_HOST": "localhost",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": io.StringIO(),
            "wsgi.url_scheme": "http",
            "wsgi.version": (1, 0),
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        started: list = []

        def start_response(status, headers, exc_info=None):
            started.append((status, headers))

        chunks = self.wsgi(environ, start_response)
        try:
            data = b"".join(chunks)
        finally:
            getattr(chunks, "close", lambda: None)()
        status, headers = started[-1]
        names = [name.lower() for name, _ in headers]
        assert len(names) == len(set(names)), (method, path, headers)
        return Answer(status, {name.title(): value for name, value in headers}, data)


@pytest.fixture
def app(ndb_stub, fresh_tasks_emulator):
    gae_deferred.configure(local_mode=True)
    _admin_auth.reset_iap_keys()
    metrics.discard_pending()
    return Client(deferred_middleware(webapp2.WSGIApplication(deferred_routes())))


@pytest.fixture
def dashboard(ndb_stub, fresh_tasks_emulator):
    """The same app through WebTest (cookies, forms), for requests whose path is UTF-8."""
    gae_deferred.configure(local_mode=True)
    _admin_auth.reset_iap_keys()
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)


def assert_well_formed(response: Answer, what: str, method: str) -> None:
    assert re.fullmatch(r"[1-5]\d\d [A-Za-z][\w ,'-]*", response.status), (what, response.status)
    assert response.status_int < 500, (what, response.status, response.body[:200])
    assert response.headers.get("Content-Type"), what
    declared = response.headers.get("Content-Length")
    if declared is not None and method != "HEAD":
        assert int(declared) == len(response.body), what
    for header in REQUIRED:
        assert response.headers.get(header), (what, header)
    assert response.headers["X-Content-Type-Options"] == "nosniff", what


def test_every_route_every_method_every_hostile_suffix(app):
    paths = every_route_path()
    assert len(paths) > 60  # the dashboard's pages, their API twins, the task path
    tried = 0
    for path in paths:
        for suffix in SUFFIXES:
            for method in METHODS:
                what = f"{method} {path}{suffix}"
                assert_well_formed(app.request(path + suffix, method), what, method)
                tried += 1
    assert tried == len(paths) * len(SUFFIXES) * len(METHODS)


def test_unknown_method_on_the_task_path_is_405_with_allow(app):
    for path in ("/_ah/queue/deferred", "/_ah/queue/deferred/x"):
        response = app.request(path, "PATCH")
        assert response.status_int == 405 and response.headers["Allow"] == "POST"
        assert response.text == "PATCH is not allowed; tasks are POSTed\n"


def test_undecodable_task_path_is_400_not_500(app):
    response = app.request("/_ah/queue/deferred/%ff", "POST")
    assert (response.status_int, response.text) == (400, "The path is not valid UTF-8.\n")


BACKS = {
    # A page of the dashboard: kept, with what is not printable ASCII percent-encoded.
    f"{PREFIX}/failures/list?q=%E2%98%83": f"{PREFIX}/failures/list?q=%E2%98%83",
    f"{PREFIX}/failures/list?q=\u2603": f"{PREFIX}/failures/list?q=%E2%98%83",
    f"{PREFIX}/queues/default/tasks/a%2Fb": f"{PREFIX}/queues/default/tasks/a%2Fb",
    # Anything else: where the action goes without a back field.
    f"{PREFIX}/failures/list?q=\x7f": None,
    f"{PREFIX}/%2e%2e/%2e%2e/x": None,
    f"{PREFIX}/%2E%2e/x": None,
    f"{PREFIX}/./x": None,
    f"{PREFIX}/../x": None,
    f"{PREFIX}/%5c%5cevil.example": None,
    f"{PREFIX}/x%0d%0aSet-Cookie:a=b": None,
    "//evil.example/_ah/deferred-admin": None,
    "https://evil.example/_ah/deferred-admin": None,
    "/_ah/deferred-adminx": None,
}


def test_a_hostile_back_field_redirects_inside_the_dashboard_with_headers(dashboard):
    def dismiss(number: int, **back: str) -> tuple[webtest.TestResponse, str]:
        record = make_failure(f"back-{number}")
        page = dashboard.get(f"{PREFIX}/failures/list")
        form = {"csrf_token": form_token(page), **back}
        answer = dashboard.post(f"{PREFIX}/failures/{record.id}/dismiss", form, status="*")
        return answer, f"{PREFIX}/failures/{record.id}"

    answer, own_page = dismiss(0)
    assert answer.headers["Location"] == f"http://localhost{own_page}"
    for number, (back, location) in enumerate(BACKS.items(), 1):
        answer, own_page = dismiss(number, back=back)
        assert answer.status_int == 303, (back, answer.status, answer.body[:200])
        assert answer.headers["Location"] == f"http://localhost{location or own_page}", back
        for header in REQUIRED:
            assert answer.headers.get(header), (back, header)


@pytest.mark.parametrize(
    "created_ms", ["1e20", "100000000000000000000", "-1" + "0" * 30, "1" + "0" * 400, "NaN"]
)
def test_task_detail_of_a_task_whose_unsigned_header_has_an_absurd_time(dashboard, created_ms):
    """The header is readable without the key, so anyone who can create a task can put
    anything there: the page and the API still answer, with no time."""
    pause("reports")
    header = b'{"function": "x.y", "created_ms": %s}' % created_ms.encode()
    body = struct.pack(">6sBBI", b"GAEDEF", 1, 0, len(header)) + header + b"\0" * 32
    eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    spec = cloud_tasks.TaskSpec("reports", "/_ah/queue/deferred", {}, eta, name="absurd")
    cloud_tasks.create_task(spec, body)
    api = dashboard.get(f"{PREFIX}/api/queues/reports/tasks/absurd")
    assert api.json["envelope"]["created"] is None
    assert api.json["envelope"]["function"] == "x.y"
    page = dashboard.get(f"{PREFIX}/queues/reports/tasks/absurd")
    assert page.status_int == 200 and "x.y" in page.text
