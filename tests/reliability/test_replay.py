"""Replays: a task body posted again as another task must neither run nor harm the real task.

Locally nothing strips X-AppEngine-* headers, so these posts reach the handler exactly as a
replay by someone who captured a task body (and could create tasks) would.
"""

from __future__ import annotations

import os

import requests

from gae_deferred import cloud_tasks, defer
from gae_deferred.local.stack import LocalStack
from tests.reliability import rel_tasks
from tests.reliability.rel_helpers import failure_records, wait_for_ids

QUEUE = "outbox"


def _body(task_path: str) -> bytes:
    request = {"name": task_path, "response_view": "FULL"}
    return cloud_tasks.client().get_task(request=request).app_engine_http_request.body


def test_replayed_spilled_reference_cannot_consume_the_real_tasks_payload(
    rel: LocalStack, log: str
) -> None:
    cloud_tasks.pause_queue(QUEUE)
    try:
        real = defer(rel_tasks.mark, log, "replay-real", os.urandom(300_000), _queue=QUEUE)
        assert real.spilled
        body = _body(real.path)
        url = rel.app_url + "/_ah/queue/deferred"
        for name, queue in (("replay-1", QUEUE), (real.name, "default"), ("replay-2", "default")):
            headers = {"X-AppEngine-QueueName": queue, "X-AppEngine-TaskName": name}
            assert requests.post(url, data=body, headers=headers, timeout=30).status_code == 403
    finally:
        cloud_tasks.resume_queue(QUEUE)
    # The real task still finds its payload and runs, once, with every byte.
    wait_for_ids(log, {"replay-real"})
    assert rel_tasks.read_log(log)["replay-real"] == 1
    assert [r for r in failure_records(QUEUE) if r.task_name == real.name] == []
