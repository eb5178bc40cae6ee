"""What the dashboard tests share: records built straight in Datastore, queue helpers, the
escaping check, and a local IAP signer.

The ``app`` fixture (the dashboard behind the middleware, in local mode) is in conftest.py.
"""

from __future__ import annotations

import datetime
import pathlib
import random
import re

import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import (
    FailureState,
    PayloadState,
    envelope,
    failures,
    spillover,
)
from gae_deferred.cloud_tasks import client as tasks_client

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
P = "/_ah/deferred-admin"
XSS = '<script>alert("x")</script>'
LOOPBACK = {"REMOTE_ADDR": "127.0.0.1"}


def sample(*args: object) -> None:
    """The deferred function of the records the tests build."""


def csrf_token(test_app: webtest.TestApp) -> str:
    """Fetch the API token (sets the cookie in the TestApp's jar)."""
    return test_app.get(f"{P}/api/csrf").json["csrf_token"]


def form_token(page: webtest.TestResponse) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert match, "page carries no CSRF token"
    return match.group(1)


def make_spilled(
    payload_id: str,
    *,
    function: str | None = None,
    args: tuple = (1, 2),
    queue: str = "default",
    state: str = PayloadState.PENDING,
    size: int = 0,
    created: datetime.datetime | None = None,
) -> spillover.DeferredPayload:
    """A spilled record with real chunks, as defer() would write it."""
    # Random bytes: compression must not shrink the payload the test sized.
    data = envelope.build(sample, (*args, random.Random(payload_id).randbytes(size)), {})
    header = envelope.read_header(data)
    if function is not None:
        header["function"] = function
    record, chunks = spillover.build_record(
        payload_id,
        data,
        header,
        queue=queue,
        task_name=f"d-{payload_id}",
        eta=spillover.now(),
        task={
            "url": "/_ah/queue/deferred/test_admin.sample",
            "headers": {"Content-Type": "application/octet-stream"},
            "routing": {},
        },
    )
    record.state = state
    if created is not None:
        record.created = created
    spillover.write_many([(record, chunks)])
    return record


def make_failure(
    task_name: str,
    *,
    record_id: str | None = None,
    function: str = "test_admin.sample",
    exception_type: str = "ValueError",
    message: str = "boom",
    traceback: str = "Traceback (most recent call last):\nValueError: boom",
    state: str = FailureState.DEAD,
    queue: str = "default",
    payload_id: str | None = None,
    args_preview: str = "(1, 2)",
) -> failures.DeferredFailure:
    """A failure record; without payload_id its inline envelope is kept as a child.

    ``record_id`` writes it under any id, as older versions did with a header's value.
    """
    record_id = record_id or failures.failure_id(queue, task_name)
    data = envelope.build(sample, (1, 2), {})
    meta = {**envelope.read_header(data), "function": function, "args": args_preview}
    record = failures.update(
        None,
        record_id,
        function=function,
        exception_type=exception_type,
        message=message,
        traceback=traceback,
        state=state,
        task_name=task_name,
        queue=queue,
        meta=meta,
        payload_id=payload_id,
        when=spillover.now(),
    )
    entities: list[ndb.Model] = [record, failures.group_entity(record)]
    if payload_id is None:
        entities.append(failures.kept_payload(record_id, data))
    ndb.put_multi(entities)
    return record


def pause(queue: str) -> None:
    tasks_client().pause_queue(name=gae_deferred.cloud_tasks.queue_path(queue))


def queued_tasks(queue: str) -> list:
    from google.cloud import tasks_v2

    return list(
        tasks_client().list_tasks(
            request={
                "parent": gae_deferred.cloud_tasks.queue_path(queue),
                "response_view": tasks_v2.Task.View.FULL,
            }
        )
    )


def run_as_cloud_tasks_would(test_app: webtest.TestApp, task) -> None:
    """Deliver a queued task to the app's task handler with the headers Cloud Tasks adds."""
    request = task.app_engine_http_request
    queue, name = task.name.split("/")[-3], task.name.rsplit("/", 1)[-1]
    headers = {
        **dict(request.headers),
        "X-AppEngine-QueueName": queue,
        "X-AppEngine-TaskName": name,
    }
    answer = test_app.post(request.relative_uri, request.body, headers=headers)
    assert answer.status_int == 200, answer.text


def assert_inert(page: webtest.TestResponse) -> None:
    """The XSS string is shown escaped, never as markup."""
    assert XSS not in page.text
    assert "&lt;script&gt;alert(" in page.text


def chunk_reads(stub_client) -> list:
    """Record every Lookup/RunQuery that touches payload chunks (the budget says: none)."""
    from inmemory_datastore_stub._request_wrapper import _RequestWrapper

    seen: list = []
    stub = stub_client.stub
    for name in ("lookup", "run_query"):
        original = getattr(stub, name)

        def recording(request, *args, _original=original, **kwargs):
            if "_DeferredPayloadChunk" in str(request):
                seen.append(request)
            return _original(request, *args, **kwargs)

        wrapper = _RequestWrapper(recording)
        setattr(stub, name, wrapper)
        setattr(stub, name.title().replace("_", ""), wrapper)
    return seen


class CertsResponse:
    def __init__(self, body: bytes) -> None:
        self.status = 200
        self.data = body
        self.headers: dict[str, str] = {}


def iap_claims(audience: str, email: str) -> dict[str, object]:
    """The claims of a valid IAP JWT for ``audience``, issued now, valid ten minutes."""
    import time

    now = int(time.time())
    return {
        "iss": "https://cloud.google.com/iap",
        "aud": audience,
        "sub": "accounts.google.com:1",
        "email": email,
        "iat": now,
        "exp": now + 600,
    }


def iap_signer(key_id: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from google.auth import crypt

    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return crypt.ES256Signer.from_string(private, key_id=key_id), public.decode()
