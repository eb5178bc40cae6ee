"""The stack with ``--http-target`` (Cloud Run's way): HTTP-target tasks whose OIDC tokens the
Cloud Tasks emulator signs with its own key and the app verifies against it, over real HTTP.

One scenario set of test_e2e_tasks.py runs again here: the functions are imported, and this
module's ``e2e`` fixture (which wins over conftest.py's) points them at the HTTP-target stack.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import e2e_tasks
import pytest
import requests
from e2e_helpers import wait_for_runs
from test_e2e_tasks import (  # noqa: F401 (collected here, on the HTTP-target stack)
    test_600kb_argument_spills_and_its_record_goes_after_success,
    test_countdown_task_does_not_run_before_its_time,
    test_failing_task_is_retried_with_backoff_then_resolved,
    test_small_task_runs_inline_in_the_app,
    test_spilled_defers_inside_a_transaction_on_the_stack,
)

import gae_deferred
from gae_deferred import defer
from gae_deferred.local.cloudtasks.oidc import OidcIssuer
from gae_deferred.local.stack import LocalStack
from tests.oidc_support import foreign_token, unsigned_token
from tests.stack_support import holds_for, pointed_at, stack_fixture

pytestmark = pytest.mark.e2e

E2E_DIR = pathlib.Path(__file__).resolve().parent
QUEUE_YAML = E2E_DIR / "queue.yaml"

http_stack = stack_fixture(
    "http-stack", queue_yaml=QUEUE_YAML, extra_pythonpath=[E2E_DIR], http_target=True
)


@pytest.fixture
def e2e(http_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalStack]:
    """The HTTP-target stack, with this process's gae_deferred pointed at it (its defer()
    makes HTTP-target tasks: the stack's environment configures http_target)."""
    with pointed_at(http_stack, monkeypatch):
        yield http_stack


def test_tasks_arrive_as_http_targets_with_verified_tokens(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    target = gae_deferred.settings().http_target
    assert target is not None and target.url == e2e.dispatch_url

    task = defer(e2e_tasks.record, str(run_dir), "http-target")

    [run] = wait_for_runs(run_dir, "http-target", 1)
    assert run["app_engine"] is False
    assert (run["task_name"], run["queue"]) == (task.name, "default")


def _stack_issuer(stack: LocalStack) -> OidcIssuer:
    """The emulator's issuer as the test process sees it: the same key (read from the stack's
    state) and the same ``iss``, to sign tokens wrong in one claim only."""
    issuer = OidcIssuer(stack.host, 0, stack.base_dir / "cloudtasks")
    issuer.port = stack.oidc_port
    return issuer


def _claims(stack: LocalStack) -> dict[str, object]:
    now = int(time.time())
    return {
        "aud": stack.dispatch_url,
        "email": stack.tasks_service_account,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        "iss": f"http://{stack.host}:{stack.oidc_port}",
    }


def test_forged_expired_foreign_and_unsigned_tokens_get_403_and_run_nothing(
    e2e: LocalStack, run_dir: pathlib.Path
) -> None:
    issuer = _stack_issuer(e2e)
    account, audience = e2e.tasks_service_account, e2e.dispatch_url
    task = {"X-CloudTasks-QueueName": "default", "X-CloudTasks-TaskName": "forged-1"}
    body = gae_deferred.envelope.build(
        e2e_tasks.record, (str(run_dir), "forged"), {}, task="forged-1", queue="default"
    )
    tokens = {
        "forged": foreign_token(_claims(e2e), issuer.kid),
        "expired": issuer.sign(account, audience, now=time.time() - 7200),
        "wrong audience": issuer.sign(account, "https://elsewhere.a.run.app"),
        "wrong account": issuer.sign("intruder@example.iam.gserviceaccount.com", audience),
        "unsigned": unsigned_token(_claims(e2e)),
    }
    url = e2e.app_url + "/_ah/queue/deferred"

    answers = {
        case: requests.post(
            url, data=body, headers={**task, "Authorization": f"Bearer {token}"}, timeout=10
        ).status_code
        for case, token in tokens.items()
    }
    answers["X-CloudTasks-* alone"] = requests.post(
        url, data=body, headers=task, timeout=10
    ).status_code
    app_engine = {"X-AppEngine-QueueName": "default", "X-AppEngine-TaskName": "forged-1"}
    answers["X-AppEngine-* alone"] = requests.post(
        url, data=body, headers=app_engine, timeout=10
    ).status_code

    assert answers == dict.fromkeys(answers, 403)
    holds_for(lambda: e2e_tasks.runs(run_dir, "forged") == [], "no forged task runs", 0.5)
    # The same request with a real token runs: only the token was wrong above.
    real = issuer.sign(account, audience)
    posted = requests.post(
        url, data=body, headers={**task, "Authorization": f"Bearer {real}"}, timeout=10
    )
    assert posted.status_code == 200, posted.text
    [run] = wait_for_runs(run_dir, "forged", 1)
    assert run["app_engine"] is False
