"""HTTP-target tasks (Cloud Run): settings, the task defer() builds, and the handler's OIDC proof.

Tokens are real: signed by the Cloud Tasks emulator's issuer (``emulators/cloudtasks/oidc.py``,
served over HTTP), verified by google-auth's ``verify_token`` in the handler; forged ones are
signed with another RSA key, or not at all.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import wsgiref.simple_server

import pytest
import webapp2
import webtest
from google.api_core import exceptions as api_exceptions

import gae_deferred
from gae_deferred import (
    ConfigurationError,
    HttpTarget,
    InvalidTaskError,
    _config as config,
    defer,
    http_target,
    refusals,
)
from gae_deferred.cloud_tasks import TaskSpec, build_task
from gae_deferred.local.cloudtasks.oidc import OidcIssuer
from gae_deferred.webapp2 import deferred_middleware, deferred_routes
from tests.oidc_support import foreign_token, unsigned_token
from tests.stack_support import cloud_tasks_emulator, wait_for

ACCOUNT = "tasks@test-project.iam.gserviceaccount.com"
SERVICE_URL = "https://worker-abc123-ew.a.run.app"
GO_TOGETHER = (
    "GAE_DEFERRED_HTTP_TARGET_URL and GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT go together: set "
    "both (HTTP-target tasks) or neither (App Engine tasks)"
)
CT_TASK = {"X-CloudTasks-QueueName": "default", "X-CloudTasks-TaskName": "task-1"}
RUNS: list = []


def record_run(*args):
    RUNS.append((args, gae_deferred.current_task()))


@pytest.fixture
def issuer(tmp_path):
    started = OidcIssuer(data_dir=tmp_path).start()
    yield started
    started.stop()


@pytest.fixture
def target(issuer, ndb_stub):
    """This process takes HTTP-target tasks whose tokens the emulator's issuer signs."""
    RUNS.clear()
    http_target.reset_keys()
    chosen = HttpTarget(
        url=SERVICE_URL,
        service_account_email=ACCOUNT,
        certs_url=issuer.certs_url,
        issuers=(issuer.issuer,),
    )
    gae_deferred.configure(local_mode=True, http_target=chosen)
    yield chosen
    http_target.reset_keys()


@pytest.fixture
def app(target):
    return webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))


def body_for(headers=CT_TASK):
    return gae_deferred.envelope.build(
        record_run,
        ("ran",),
        {},
        task=headers["X-CloudTasks-TaskName"],
        queue=headers["X-CloudTasks-QueueName"],
    )


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def post(app, headers, body=None):
    return app.post("/_ah/queue/deferred", body or body_for(), headers=headers, status="*")


def _claims(issuer, **changes):
    now = int(time.time())
    claims = {
        "aud": SERVICE_URL,
        "email": ACCOUNT,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        "iss": issuer.issuer,
        "sub": "1234",
    }
    claims.update(changes)
    return claims


def test_a_real_token_runs_the_task_named_by_the_cloud_tasks_headers(app, issuer):
    token = issuer.sign(ACCOUNT, SERVICE_URL)
    headers = {**CT_TASK, "X-CloudTasks-TaskRetryCount": "2", **bearer(token)}

    response = post(app, headers)

    assert response.status_int == 200, response.text
    [(args, task)] = RUNS
    assert args == ("ran",)
    assert (task.name, task.queue, task.retry_count) == ("task-1", "default", 2)
    assert task.app_engine is False


# Each builds the Authorization header of a request that must be refused.
REFUSED = {
    "no token": lambda issuer: {},
    "not a bearer token": lambda issuer: {"Authorization": "Basic dGFza3M6eA=="},
    "garbage": lambda issuer: bearer("not.a.token"),
    "forged with another key, same key id": lambda issuer: bearer(
        foreign_token(_claims(issuer), issuer.kid)
    ),
    "forged with another key and key id": lambda issuer: bearer(
        foreign_token(_claims(issuer), "other-kid")
    ),
    "expired": lambda issuer: bearer(issuer.sign(ACCOUNT, SERVICE_URL, now=time.time() - 7200)),
    "wrong audience": lambda issuer: bearer(issuer.sign(ACCOUNT, "https://other.a.run.app")),
    "wrong account": lambda issuer: bearer(
        issuer.sign("intruder@test-project.iam.gserviceaccount.com", SERVICE_URL)
    ),
    "email not verified": lambda issuer: bearer(
        issuer.sign(ACCOUNT, SERVICE_URL, email_verified=False)
    ),
    "another issuer": lambda issuer: bearer(
        issuer.sign(ACCOUNT, SERVICE_URL, iss="https://evil.example")
    ),
    "unsigned (alg none)": lambda issuer: bearer(unsigned_token(_claims(issuer))),
}
#: How each refusal's recorded message starts (google-auth's words after "does not verify").
MESSAGES = {
    "no token": "no OIDC token (Authorization: Bearer)",
    "not a bearer token": "no OIDC token (Authorization: Bearer)",
    "garbage": "OIDC token does not verify: '",
    "forged with another key, same key id": (
        "OIDC token does not verify: 'Could not verify token signature."
    ),
    "forged with another key and key id": (
        "OIDC token does not verify: 'Certificate for key id other-kid not found."
    ),
    "expired": "OIDC token does not verify: 'Token expired",
    "wrong audience": 'OIDC token does not verify: "Token has wrong audience',
    "wrong account": (
        "OIDC token is for 'intruder@test-project.iam.gserviceaccount.com', not the tasks account"
    ),
    "email not verified": "OIDC token's email is not verified",
    "another issuer": "OIDC token has issuer 'https://evil.example'",
    "unsigned (alg none)": "OIDC token does not verify: 'Unsupported signature algorithm none",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_tokens_are_403_counted_and_run_nothing(app, issuer, case):
    response = post(app, {**CT_TASK, **REFUSED[case](issuer)})

    assert response.status_int == 403
    assert response.text == "forbidden\n"
    assert RUNS == []
    summary = refusals.summary()
    assert summary["counts"]["bad-token"] == 1
    assert summary["total"] == 1
    [example] = summary["examples"]
    assert example["message"].startswith(MESSAGES[case]), example["message"]


@pytest.mark.parametrize(
    "headers",
    [
        CT_TASK,
        {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"},
        {**CT_TASK, "X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"},
    ],
    ids=["cloud-tasks-headers", "app-engine-headers", "both"],
)
def test_task_headers_alone_are_refused_on_an_http_target(app, headers):
    """Cloud Run strips neither family from outside requests: only the token proves anything."""
    assert post(app, headers).status_int == 403
    assert RUNS == []
    assert refusals.summary()["counts"]["bad-token"] == 1


def test_a_bad_token_is_refused_before_the_body_is_read(app, issuer):
    """A body over any task's size would be a 413 if it were looked at."""
    oversized = b"x" * (2 * 1024 * 1024)
    headers = {**CT_TASK, **bearer(issuer.sign(ACCOUNT, "https://other.a.run.app"))}

    assert post(app, headers, oversized).status_int == 403
    assert (
        post(app, {**CT_TASK, **bearer(issuer.sign(ACCOUNT, SERVICE_URL))}, oversized).status_int
        == 413
    )


def test_a_verified_token_without_task_headers_is_not_from_the_queue(app, issuer):
    response = post(app, bearer(issuer.sign(ACCOUNT, SERVICE_URL)))

    assert response.status_int == 403
    assert refusals.summary()["counts"]["not-from-queue"] == 1


def test_tokens_are_refused_once_past_the_clock_skew(app, issuer):
    now = int(time.time())
    late = issuer.sign(ACCOUNT, SERVICE_URL, exp=now - http_target.CLOCK_SKEW - 1)
    within = issuer.sign(ACCOUNT, SERVICE_URL, exp=now - http_target.CLOCK_SKEW + 2)

    assert post(app, {**CT_TASK, **bearer(late)}).status_int == 403
    assert post(app, {**CT_TASK, **bearer(within)}).status_int == 200


def test_keys_are_fetched_again_when_their_max_age_is_over(app, issuer, monkeypatch):
    from gae_deferred.local.cloudtasks import oidc

    monkeypatch.setattr(oidc, "CERTS_MAX_AGE", 0)
    for _ in range(2):
        assert post(app, {**CT_TASK, **bearer(issuer.sign(ACCOUNT, SERVICE_URL))}).status_int == 200
    assert issuer.key_fetches == 2


def test_keys_that_cannot_be_read_are_unavailable_with_the_reason(issuer, monkeypatch):
    token = issuer.sign(ACCOUNT, SERVICE_URL)
    monkeypatch.setattr(issuer, "documents", lambda: {"/oauth2/v1/certs": ["not", "keys"]})
    with pytest.raises(http_target.CertsUnavailable) as caught:
        http_target._transport_for(issuer.certs_url, token)
    assert str(caught.value) == f"the token keys at {issuer.certs_url} are not a JSON object"

    issuer.stop()
    with pytest.raises(http_target.CertsUnavailable) as caught:
        http_target._transport_for(issuer.certs_url, token)
    assert str(caught.value).startswith(f"cannot fetch the token keys at {issuer.certs_url}: ")


def test_keys_are_fetched_once_and_again_only_for_an_unknown_key_id(app, issuer):
    for _ in range(3):
        assert post(app, {**CT_TASK, **bearer(issuer.sign(ACCOUNT, SERVICE_URL))}).status_int == 200
    assert issuer.key_fetches == 1

    forged = foreign_token(_claims(issuer), "rotated-kid")
    for _ in range(3):
        assert post(app, {**CT_TASK, **bearer(forged)}).status_int == 403
    # One refetch for the unknown key id, then none for UNKNOWN_KID_REFETCH seconds.
    assert issuer.key_fetches == 2


def test_unreachable_keys_answer_503_not_a_counted_refusal(app, issuer):
    token = issuer.sign(ACCOUNT, SERVICE_URL)
    issuer.stop()

    response = post(app, {**CT_TASK, **bearer(token)})

    assert response.status_int == 503
    assert response.text == "unavailable\n"
    assert RUNS == []
    assert refusals.summary()["total"] == 0


def test_app_engine_own_headers_still_prove_tasks_on_app_engine(ndb_stub, monkeypatch):
    """An App Engine app switching to HTTP targets still runs the App Engine tasks queued
    before (its front end strips X-AppEngine-* from outside requests)."""
    RUNS.clear()
    monkeypatch.setenv("GAE_ENV", "standard")
    gae_deferred.configure(http_target=HttpTarget(url=SERVICE_URL, service_account_email=ACCOUNT))
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    headers = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "task-1"}
    body = gae_deferred.envelope.build(record_run, ("ae",), {}, task="task-1", queue="default")

    assert app.post("/_ah/queue/deferred", body, headers=headers).status_int == 200
    assert RUNS[0][1].app_engine is True
    # ...while Cloud Tasks' headers alone are still refused there.
    assert post(app, CT_TASK).status_int == 403


# -- settings -----------------------------------------------------------------------------


def test_environment_variables_configure_the_target(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_HTTP_TARGET_URL", SERVICE_URL + "/")
    monkeypatch.setenv("GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT", ACCOUNT)
    config.reset()

    chosen = gae_deferred.settings().http_target

    assert chosen == HttpTarget(url=SERVICE_URL, service_account_email=ACCOUNT)
    assert chosen.audience == SERVICE_URL
    assert chosen.certs_url == "https://www.googleapis.com/oauth2/v1/certs"
    assert chosen.issuers == ("https://accounts.google.com", "accounts.google.com")


def test_the_local_stack_points_the_keys_and_issuer_at_its_emulator(monkeypatch):
    variables = {
        "GAE_DEFERRED_LOCAL": "1",
        "GAE_DEFERRED_HTTP_TARGET_URL": SERVICE_URL,
        "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": ACCOUNT,
        "GAE_DEFERRED_HTTP_TARGET_CERTS_URL": "http://127.0.0.1:8124/oauth2/v1/certs",
        "GAE_DEFERRED_HTTP_TARGET_ISSUER": "http://127.0.0.1:8124",
    }
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config.reset()

    chosen = gae_deferred.settings().http_target

    assert chosen.certs_url == "http://127.0.0.1:8124/oauth2/v1/certs"
    assert chosen.issuers == ("http://127.0.0.1:8124",)
    assert not chosen.google


def test_an_audience_can_differ_from_the_url(monkeypatch):
    monkeypatch.setenv("GAE_DEFERRED_HTTP_TARGET_URL", SERVICE_URL)
    monkeypatch.setenv("GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT", ACCOUNT)
    monkeypatch.setenv("GAE_DEFERRED_HTTP_TARGET_AUDIENCE", "tasks-audience")
    config.reset()

    assert gae_deferred.settings().http_target.audience == "tasks-audience"


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"GAE_DEFERRED_HTTP_TARGET_URL": SERVICE_URL}, GO_TOGETHER),
        ({"GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": ACCOUNT}, GO_TOGETHER),
        (
            {
                "GAE_DEFERRED_HTTP_TARGET_URL": "worker.a.run.app",
                "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": ACCOUNT,
            },
            "http_target url must be an absolute http(s) URL such as "
            "https://worker-abc123-ew.a.run.app, not 'worker.a.run.app'",
        ),
        (
            {
                "GAE_DEFERRED_HTTP_TARGET_URL": SERVICE_URL,
                "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": "tasks",
            },
            "http_target service_account_email must be the email of the service account "
            "Cloud Tasks signs tokens for, not 'tasks'",
        ),
        (
            {
                "GAE_DEFERRED_HTTP_TARGET_URL": SERVICE_URL,
                "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": ACCOUNT,
                "GAE_DEFERRED_HTTP_TARGET_CERTS_URL": "http://127.0.0.1:1/certs",
            },
            "http_target's certs_url and issuer are Google's everywhere but on the local stack",
        ),
    ],
)
def test_bad_target_settings_are_clear_errors(monkeypatch, variables, message):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    config.reset()

    with pytest.raises(ConfigurationError) as caught:
        gae_deferred.settings()
    assert str(caught.value).startswith(message), caught.value


def test_only_trailing_slashes_are_dropped_and_issuers_become_a_tuple():
    chosen = HttpTarget("https://w.example/WORKX/", ACCOUNT, issuers=["https://a.example"])

    assert (chosen.url, chosen.audience) == ("https://w.example/WORKX",) * 2
    assert chosen.issuers == ("https://a.example",)


def test_configure_takes_a_dict_and_names_unknown_fields():
    chosen = gae_deferred.configure(
        http_target={"url": SERVICE_URL, "service_account_email": ACCOUNT}
    ).http_target
    assert chosen == HttpTarget(SERVICE_URL, ACCOUNT)

    with pytest.raises(
        ConfigurationError, match=r"^unknown http_target field\(s\): account, other$"
    ):
        gae_deferred.configure(http_target={"url": SERVICE_URL, "account": ACCOUNT, "other": 1})
    with pytest.raises(
        ConfigurationError,
        match=r"^http_target must be an HttpTarget, a dict of its fields or None, not 'https://",
    ):
        gae_deferred.configure(http_target=SERVICE_URL)
    assert gae_deferred.configure(http_target=None).http_target is None


# -- the task defer() builds --------------------------------------------------------------


def test_build_task_makes_an_http_request_with_an_oidc_token():
    gae_deferred.configure(
        project="test-project",
        http_target=HttpTarget(SERVICE_URL, ACCOUNT, audience="tasks-audience"),
    )
    eta = time.time()
    spec = TaskSpec(
        queue="default",
        url="/_ah/queue/deferred/tests.f",
        headers={"Content-Type": "application/octet-stream", "X-Custom": "1"},
        eta=datetime.datetime.fromtimestamp(eta, datetime.UTC),
        name="named-1",
    )

    task = build_task(spec, b"body")

    assert "app_engine_http_request" not in task
    request = task.http_request
    assert request.url == SERVICE_URL + "/_ah/queue/deferred/tests.f"
    assert request.http_method.name == "POST"
    assert request.body == b"body"
    assert dict(request.headers) == spec.headers
    assert request.oidc_token.service_account_email == ACCOUNT
    assert request.oidc_token.audience == "tasks-audience"
    assert task.name.endswith("/queues/default/tasks/named-1")
    assert abs(task.schedule_time.timestamp() - eta) < 1e-3


def test_app_engine_routing_is_refused_for_http_targets():
    gae_deferred.configure(project="test-project", http_target=HttpTarget(SERVICE_URL, ACCOUNT))
    spec = TaskSpec(
        "default",
        "/x",
        {},
        datetime.datetime.now(datetime.UTC),
        None,
        {"service": "w", "instance": "1"},
    )

    with pytest.raises(InvalidTaskError) as refused:
        build_task(spec, b"")
    assert str(refused.value) == (
        "App Engine routing (instance='1', service='w': _target, _service, _version, _instance) "
        f"has no meaning for HTTP-target tasks, which go to {SERVICE_URL}: drop it, or "
        "configure another http_target url for that service"
    )


def test_version_affinity_adds_no_routing_to_http_targets():
    gae_deferred.configure(
        http_target=HttpTarget(SERVICE_URL, ACCOUNT), running_version="v1", running_service="s"
    )
    from gae_deferred.enqueue import affinity_routing

    assert affinity_routing() == {}


# -- through the Cloud Tasks emulator, over real HTTP ---------------------------------------


@pytest.fixture
def served_app(ndb_stub):
    """The task handler behind deferred_middleware on a real HTTP port (wsgiref)."""
    application = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))

    class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
        def log_message(self, *args):
            pass

    server = wsgiref.simple_server.make_server("127.0.0.1", 0, application, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def emulator_with_issuer():
    with cloud_tasks_emulator(oidc_port=0) as emulator:
        yield emulator


def test_the_emulator_delivers_http_target_tasks_with_tokens_the_handler_verifies(
    emulator_with_issuer, served_app
):
    RUNS.clear()
    http_target.reset_keys()
    oidc = emulator_with_issuer.oidc
    gae_deferred.configure(
        local_mode=True,
        http_target=HttpTarget(
            served_app, ACCOUNT, certs_url=oidc.certs_url, issuers=(oidc.issuer,)
        ),
    )

    task = defer(record_run, "over-http")

    wait_for(lambda: RUNS, "the HTTP-target task to run")
    [(args, info)] = RUNS
    assert args == ("over-http",)
    assert (info.name, info.queue, info.app_engine) == (task.name, "default", False)
    [attempt] = [entry for entry in emulator_with_issuer.dispatch_log if entry["task"] == task.name]
    assert attempt["status"] == 200


def test_the_emulator_refuses_oidc_tasks_when_it_signs_no_tokens(tasks_emulator, ndb_stub):
    gae_deferred.configure(http_target=HttpTarget(SERVICE_URL, ACCOUNT))

    with pytest.raises(api_exceptions.InvalidArgument, match="signs no OIDC tokens"):
        gae_deferred.cloud_tasks.client().create_task(
            parent=gae_deferred.cloud_tasks.queue_path("default"),
            task=build_task(TaskSpec("default", "/_ah/queue/deferred", {}, _now()), b"x"),
        )


def _now():
    return datetime.datetime.now(datetime.UTC)


def test_the_dashboard_shows_a_queued_http_target_task(emulator_with_issuer, ndb_stub):
    from gae_deferred.admin import queued

    gae_deferred.configure(http_target=HttpTarget(SERVICE_URL, ACCOUNT))
    gae_deferred.cloud_tasks.pause_queue("default")
    task = defer(record_run, "queued")

    detail = queued.task_detail("default", task.name)

    function = f"{record_run.__module__}.record_run"
    assert detail["url"] == f"{SERVICE_URL}/_ah/queue/deferred/{function}"
    assert detail["function"] == function
    assert detail["method"] == "POST" and detail["routing"] == {}
    assert detail["body_bytes"] > 0 and detail["envelope"]["function"] == function


def _signature_removed(token: str) -> str:
    """The token as Cloud Run hands it on after verifying it for IAM."""
    header, claims, _ = token.split(".")
    return f"{header}.{claims}.{http_target.SIGNATURE_REMOVED}"


@pytest.fixture
def iam_app(target):
    """The service requires authentication: Cloud Run verified the token before the app."""
    gae_deferred.configure(http_target=dataclasses.replace(target, cloud_run_iam=True))
    return webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))


def test_a_token_cloud_run_verified_runs_the_task_when_the_service_requires_authentication(
    iam_app, issuer
):
    stripped = _signature_removed(issuer.sign(ACCOUNT, SERVICE_URL))
    response = post(iam_app, {**CT_TASK, **bearer(stripped)})
    assert response.status_int == 200, response.text
    assert [args for args, _ in RUNS] == [("ran",)]
    # A fully signed token (no IAM in front, or a direct call) still verifies as ever.
    RUNS.clear()
    signed = bearer(issuer.sign(ACCOUNT, SERVICE_URL))
    assert post(iam_app, {**CT_TASK, **signed}).status_int == 200


def test_a_signature_removed_token_is_refused_unless_the_service_requires_authentication(
    app, issuer
):
    stripped = _signature_removed(issuer.sign(ACCOUNT, SERVICE_URL))
    assert post(app, {**CT_TASK, **bearer(stripped)}).status_int == 403
    assert RUNS == []
    [example] = refusals.summary()["examples"]
    assert "set http_target cloud_run_iam=True" in example["message"]


# Claims Cloud Run would never have passed on (it checks audience, expiry and signature); the
# app checks them again, and the account and verified email Cloud Run does not know about.
STRIPPED_REFUSED = {
    "wrong audience": (
        lambda issuer: issuer.sign(ACCOUNT, "https://other.a.run.app"),
        "OIDC token has audience 'https://other.a.run.app'",
    ),
    "expired": (
        lambda issuer: issuer.sign(ACCOUNT, SERVICE_URL, now=time.time() - 7200),
        "OIDC token expired",
    ),
    "wrong account": (
        lambda issuer: issuer.sign("intruder@test-project.iam.gserviceaccount.com", SERVICE_URL),
        "OIDC token is for 'intruder@test-project.iam.gserviceaccount.com'",
    ),
    "email not verified": (
        lambda issuer: issuer.sign(ACCOUNT, SERVICE_URL, email_verified=False),
        "OIDC token's email is not verified",
    ),
    "another issuer": (
        lambda issuer: issuer.sign(ACCOUNT, SERVICE_URL, iss="https://evil.example"),
        "OIDC token has issuer 'https://evil.example'",
    ),
    "not a token": (lambda issuer: "x.y.z", "OIDC token cannot be read"),
}


@pytest.mark.parametrize("case", sorted(STRIPPED_REFUSED))
def test_signature_removed_tokens_with_wrong_claims_are_refused(iam_app, issuer, case):
    make, message = STRIPPED_REFUSED[case]
    response = post(iam_app, {**CT_TASK, **bearer(_signature_removed(make(issuer)))})
    assert response.status_int == 403
    assert RUNS == []
    [example] = refusals.summary()["examples"]
    assert example["message"].startswith(message), example["message"]


def test_cloud_run_iam_from_the_environment():
    base = {
        "GAE_DEFERRED_HTTP_TARGET_URL": SERVICE_URL,
        "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": ACCOUNT,
    }
    assert http_target.from_environment(base).cloud_run_iam is False
    on = {**base, "GAE_DEFERRED_HTTP_TARGET_CLOUD_RUN_IAM": "1"}
    assert http_target.from_environment(on).cloud_run_iam is True
    with pytest.raises(ConfigurationError, match="CLOUD_RUN_IAM must be 1 or 0, not 'yes'"):
        http_target.from_environment({**base, "GAE_DEFERRED_HTTP_TARGET_CLOUD_RUN_IAM": "yes"})
