"""Datastore namespaces: a task runs in the namespace of the code that deferred it, while
gae_deferred's own records stay in one namespace (the default one) where the handler and the
dashboard find them. Real ndb and Cloud Tasks clients over gRPC against the local emulators,
the handler and the dashboard through WebTest."""

from __future__ import annotations

import random

import pytest
import webapp2
import webtest
from google.cloud import ndb

import gae_deferred
from gae_deferred import FailureState, PayloadState, failures, spillover
from gae_deferred.webapp2 import deferred_middleware, deferred_routes
from tests.dashboard.support import LOOPBACK, P, csrf_token, pause, queued_tasks

TENANTS = ("tenant-a", "tenant-b")
SPILL_THRESHOLD = 4000


class Written(ndb.Model):
    """What a task writes: its label, in whatever namespace the task runs in."""

    label = ndb.StringProperty()


class Switch(ndb.Model):
    """Present in a namespace: ``flaky`` succeeds there."""


def write(label: str, padding: bytes = b"") -> None:
    Written(id=label, label=label).put()


def flaky(label: str, padding: bytes = b"") -> None:
    if Switch.get_by_id("on") is None:
        raise RuntimeError(f"switch is off in {ndb.get_context().get_namespace()!r}")
    Written(id=label, label=label).put()


def padding(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.fixture
def app(ndb_emulator, fresh_tasks_emulator):
    """The task handler and the dashboard (local mode, from loopback) behind the middleware;
    the default queue paused, so the tests deliver its tasks themselves."""
    gae_deferred.configure(local_mode=True, spill_threshold=SPILL_THRESHOLD)
    pause("default")
    wsgi = deferred_middleware(webapp2.WSGIApplication(deferred_routes()))
    return webtest.TestApp(wsgi, extra_environ=LOOPBACK)


def in_namespace(namespace: str):
    return ndb.get_context().new(namespace=namespace).use()


def deliver_all(test_app: webtest.TestApp) -> list[int]:
    """Deliver every queued task as Cloud Tasks would, then delete it; the statuses."""
    statuses = []
    for task in queued_tasks("default"):
        request = task.app_engine_http_request
        headers = {
            **dict(request.headers),
            "X-AppEngine-QueueName": "default",
            "X-AppEngine-TaskName": task.name.rsplit("/", 1)[-1],
        }
        answer = test_app.post(request.relative_uri, request.body, headers=headers, status="*")
        statuses.append(answer.status_int)
        gae_deferred.cloud_tasks.client().delete_task(name=task.name)
    return statuses


def written(namespace: str) -> list[str]:
    return sorted(entity.label for entity in Written.query(namespace=namespace).fetch())


def test_tasks_run_in_the_namespace_they_were_deferred_from(app):
    for tenant in TENANTS:
        with in_namespace(tenant):
            inline = gae_deferred.defer(write, f"{tenant}-inline")
            spilled = gae_deferred.defer(write, f"{tenant}-spilled", padding(3 * SPILL_THRESHOLD))
        assert not inline.spilled and spilled.spilled
    # The spilled payloads are gae_deferred's records: in its one namespace, not the tenant's.
    assert len(spillover.DeferredPayload.query().fetch()) == 2
    for tenant in TENANTS:
        assert ndb.Key("_DeferredPayload", spilled.payload_id, namespace=tenant).get() is None
    assert deliver_all(app) == [200, 200, 200, 200]
    for tenant in TENANTS:
        assert written(tenant) == [f"{tenant}-inline", f"{tenant}-spilled"]
    assert written("") == []
    # Each spilled payload was found, run, and deleted with its done marker left.
    assert spillover.DeferredPayload.query().fetch() == []
    assert len(spillover.DeferredPayloadDone.query().fetch()) == 2


def test_legacy_namespace_manager_environment_value_is_carried(app, monkeypatch):
    # The ndb context of a request under the middleware has no namespace of its own set.
    monkeypatch.setenv("HTTP_X_APPENGINE_CURRENT_NAMESPACE", "legacy-tenant")
    task = gae_deferred.defer(write, "from-env")
    monkeypatch.delenv("HTTP_X_APPENGINE_CURRENT_NAMESPACE")
    assert gae_deferred.envelope.read_header(task.payload)["namespace"] == "legacy-tenant"
    assert deliver_all(app) == [200]
    assert written("legacy-tenant") == ["from-env"]


def test_failures_of_every_tenant_are_listed_filtered_and_retriggered_into_their_namespace(app):
    for tenant in TENANTS:
        with in_namespace(tenant):
            gae_deferred.defer(flaky, f"{tenant}-inline")
            gae_deferred.defer(flaky, f"{tenant}-spilled", padding(3 * SPILL_THRESHOLD))
    assert deliver_all(app) == [500, 500, 500, 500]
    # Recorded in gae_deferred's namespace, whatever the tenant, with the tenant shown.
    for tenant in TENANTS:
        assert failures.DeferredFailure.query(namespace=tenant).fetch() == []
    listed = app.get(f"{P}/api/failures").json["items"]
    assert sorted(item["namespace"] for item in listed) == sorted(TENANTS * 2)
    only_b = app.get(f"{P}/api/failures", {"namespace": "tenant-b"}).json["items"]
    assert {item["namespace"] for item in only_b} == {"tenant-b"} and len(only_b) == 2
    assert all("switch is off in 'tenant-b'" in item["message"] for item in only_b)
    page = app.get(f"{P}/failures/list", {"namespace": "tenant-a"})
    assert page.text.count("namespace <code>tenant-a</code>") == 2
    assert "tenant-b" not in page.text.replace('value="tenant-a"', "")
    spilled = app.get(f"{P}/api/spillover", {"state": "retrying"}).json["items"]
    assert sorted(item["namespace"] for item in spilled) == sorted(TENANTS)
    spill_page = app.get(f"{P}/spillover", {"state": "retrying", "namespace": "tenant-b"})
    assert "<code>tenant-b</code>" in spill_page.text and "tenant-a" not in spill_page.text

    # Only tenant-b is fixed; retrying its failures from the dashboard runs them there.
    with in_namespace("tenant-b"):
        Switch(id="on").put()
    token = csrf_token(app)
    for item in only_b:
        app.post_json(
            f"{P}/api/failures/{item['id']}/retrigger", {}, headers={"X-CSRF-Token": token}
        )
    assert deliver_all(app) == [200, 200]
    assert written("tenant-b") == ["tenant-b-inline", "tenant-b-spilled"]
    assert written("tenant-a") == [] and written("") == []
    states = {item["id"]: item["state"] for item in app.get(f"{P}/api/failures").json["items"]}
    for item in listed:
        expected = FailureState.RESOLVED if item["namespace"] == "tenant-b" else "retrying"
        assert states[item["id"]] == expected
    assert [r.namespace for r in spillover.DeferredPayload.query().fetch()] == ["tenant-a"]
    assert spillover.DeferredPayload.query().fetch()[0].state == PayloadState.RETRYING


def test_library_records_are_found_from_any_namespace(app):
    gae_deferred.metrics.discard_pending()
    with in_namespace("tenant-a"):
        gae_deferred.defer(flaky, "a", padding(3 * SPILL_THRESHOLD))
        assert deliver_all(app) == [500]
        gae_deferred.metrics.flush()
    with in_namespace("tenant-c"):
        # The admin queries, gae_deferred's lookups and the metrics see tenant-a's records.
        (record,) = spillover.DeferredPayload.query().fetch()
        assert spillover.get(record.id).namespace == "tenant-a"
        (failure,) = gae_deferred.admin.list_failures().items
        assert failures.get(failure.id).payload_id == record.id
        assert gae_deferred.metrics.get_series("function", failure.function) is not None
    for namespace in ("tenant-a", "tenant-c"):
        for kind in ("_DeferredPayload", "_DeferredFailure", "_DeferredMetricSeries"):
            assert ndb.Query(kind=kind, namespace=namespace).fetch() == []


@gae_deferred.idempotent(key=lambda order: order)
def charge(order: str) -> None:
    Written(id=order, label=order).put()


def test_idempotency_keys_of_the_callers_are_kept_apart_per_namespace(app):
    for tenant in TENANTS:
        with in_namespace(tenant):
            charge("order-1")
            charge("order-1")
    for tenant in TENANTS:
        assert written(tenant) == ["order-1"]
    markers = sorted(key.id() for key in ndb.Query(kind="_DeferredDone").fetch(keys_only=True))
    assert markers == [f"{charge.__module__}.charge:{tenant}/order-1" for tenant in TENANTS]


def test_a_transactional_defer_from_a_namespace_commits_with_the_tenants_writes(app):
    with in_namespace("tenant-t"):

        @ndb.transactional()
        def place_order():
            Written(id="order", label="order").put()
            gae_deferred.defer(write, "after-commit", _transactional=True)

        place_order()
    # Its payload joined the tenant's transaction, in gae_deferred's namespace.
    (record,) = spillover.DeferredPayload.query().fetch()
    assert record.transactional and record.namespace == "tenant-t"
    assert deliver_all(app) == [200]
    assert written("tenant-t") == ["after-commit", "order"]
