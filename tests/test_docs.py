"""The docs name real code: every function docs/architecture.md's task flow walks through exists,
so a newcomer can follow it function by function."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

from tests.fixtures import ROOT

#: How the task flow abbreviates modules.
MODULES = {
    "enqueue": "gae_deferred.enqueue",
    "batching": "gae_deferred.batching",
    "envelope": "gae_deferred.envelope",
    "cloud_tasks": "gae_deferred.cloud_tasks",
    "spillover": "gae_deferred.spillover",
    "execution": "gae_deferred.execution",
    "context": "gae_deferred.context",
    "failures": "gae_deferred.failures",
    "metrics": "gae_deferred.metrics",
    "sweeper": "gae_deferred.sweeper",
    "admin": "gae_deferred.admin",
    "_ndb_rpc": "gae_deferred._ndb_rpc",
    "deferred_task": "gae_deferred.webapp2.deferred_task",
    "TaskInfo": "gae_deferred.context:TaskInfo",
    "TaskOutcome": "gae_deferred.execution:TaskOutcome",
}


def _resolve(dotted: str) -> bool:
    head, *rest = dotted.split(".")
    module_name, _, attribute = MODULES[head].partition(":")
    target = importlib.import_module(module_name)
    for name in ([attribute] if attribute else []) + rest:
        fields = getattr(target, "__dataclass_fields__", {})
        if dataclasses.is_dataclass(target) and name in fields:
            return True
        if not hasattr(target, name):
            return False
        target = getattr(target, name)
    return True


def _task_flow() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text.split("## Task flow", 1)[1].split("\n## ", 1)[0]


def test_the_task_flow_names_functions_that_exist():
    flow = _task_flow()
    names = {
        name
        for name in re.findall(r"`([A-Za-z_][\w.]*)(?:\(.*?\))?`", flow)
        if name.split(".")[0] in MODULES and "." in name
    }
    assert len(names) > 30
    missing = sorted(name for name in names if not _resolve(name))
    assert missing == []


#: enqueue.py's functions off the send path the task flow walks: the option checks inside
#: prepare_call's _task_spec, and the re-creation of a kept payload's task (sweeper, dashboard).
OFF_THE_SEND_PATH = {
    "_retry_dict",
    "_checked_headers",
    "_header_namespace",
    "_warn_dropped",
    "task_url",
    "_task_url",
    "enqueue_record",
    "enqueue_envelope",
    "_now_ms",
    "record_spec",
}


def _functions(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    return {
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module_name
    }


def test_the_task_flow_walks_every_function_of_the_send_path():
    """A function added to the send path (enqueue.py, batching.py, cloud_tasks.py's task creation)
    must show up in the walk, so the walk stays the code as it is, not as it was."""
    flow = _task_flow()
    named = set(re.findall(r"`((?:enqueue|batching|cloud_tasks)\.[\w.]+)", flow))
    send_path = {f"enqueue.{name}" for name in _functions("gae_deferred.enqueue")}
    send_path -= {f"enqueue.{name}" for name in OFF_THE_SEND_PATH}
    send_path |= {"batching.Batch.defer", "batching.Batch._send"}
    send_path |= {
        f"cloud_tasks.{name}"
        for name in _functions("gae_deferred.cloud_tasks")
        if "create" in name or name in {"_groups", "_failed_requests", "_as_error", "_refuse"}
    }
    send_path.discard("cloud_tasks.create_queue")  # the queues CLI's, not a task's
    assert len(send_path) > 25
    assert sorted(send_path - named) == []


def test_every_test_reliability_md_names_for_a_promise_exists():
    """docs/reliability.md states each promise of defer() with the test that holds it: those
    tests must exist (a renamed test would leave a promise unbacked)."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = text.split("## What each answer of defer() means", 1)[1].split("\n## ", 1)[0]
    named, undefined = _tests_named_in(section)
    assert len(named) >= 10
    assert undefined == set()


def _tests_named_in(text: str) -> tuple[set[str], set[str]]:
    """The test functions ``text`` names (test files left out), and those no test file defines."""
    files = list((ROOT / "tests").rglob("test_*.py"))
    named = set(re.findall(r"\b(test_\w+)", text)) - {path.stem for path in files}
    defined = {
        match
        for path in files
        for match in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)
    }
    return named, named - defined


def _cloud_run_md() -> str:
    return (ROOT / "docs" / "cloud-run.md").read_text(encoding="utf-8")


def test_every_test_cloud_run_md_names_exists():
    """docs/cloud-run.md backs each claim with tests by name: they must exist."""
    section = _cloud_run_md().split("## What backs this page", 1)[1]
    named, undefined = _tests_named_in(section)
    assert len(named) >= 25
    assert undefined == set()


def test_cloud_run_md_names_real_settings_and_commands():
    from gae_deferred import _config, http_target, refusals
    from gae_deferred.webapp2 import deferred_task

    text = _cloud_run_md()
    # Every HTTP_TARGET variable the page names is read, and each sets its field.
    named = set(re.findall(r"GAE_DEFERRED_HTTP_TARGET_(\w+)", text))
    assert named == {"URL", "SERVICE_ACCOUNT", "AUDIENCE", "CERTS_URL", "ISSUER", "CLOUD_RUN_IAM"}
    env = {
        "GAE_DEFERRED_HTTP_TARGET_URL": "https://w.a.run.app",
        "GAE_DEFERRED_HTTP_TARGET_SERVICE_ACCOUNT": "t@p.iam.gserviceaccount.com",
        "GAE_DEFERRED_HTTP_TARGET_AUDIENCE": "aud",
        "GAE_DEFERRED_HTTP_TARGET_CERTS_URL": "http://127.0.0.1:1/certs",
        "GAE_DEFERRED_HTTP_TARGET_ISSUER": "http://127.0.0.1:1",
        "GAE_DEFERRED_HTTP_TARGET_CLOUD_RUN_IAM": "1",
    }
    assert http_target.from_environment(env) == http_target.HttpTarget(
        "https://w.a.run.app",
        "t@p.iam.gserviceaccount.com",
        "aud",
        "http://127.0.0.1:1/certs",
        ("http://127.0.0.1:1",),
        cloud_run_iam=True,
    )
    # The other settings it names exist.
    source = (ROOT / "lib" / "gae_deferred" / "_config.py").read_text(encoding="utf-8")
    for name in set(re.findall(r"\b(GAE_DEFERRED_\w+)", text)) - {
        f"GAE_DEFERRED_HTTP_TARGET_{field}" for field in named
    }:
        assert f'"{name}"' in source, name
    # The Dockerfile's command and the Procfile's are one, with gunicorn_conf and main:app.
    cmd = re.search(r"^CMD exec (.*?)$(?<!\\)", text.replace("\\\n    ", ""), re.M).group(1)
    procfile = re.search(r"`web: (.*?)`", text).group(1)
    assert cmd == procfile
    assert "-c python:gae_deferred.webapp2.gunicorn_conf" in cmd and cmd.endswith(" main:app")
    importlib.import_module("gae_deferred.webapp2.gunicorn_conf")
    # Numbers and names it states.
    assert "bad-token" in refusals.REASONS and "`bad-token`" in text
    assert _config.Settings().task_deadline_seconds == 600 and "(600)" in text
    assert _config.APP_ENGINE_TASK_LIMIT == 100 * 1024
    assert deferred_task.MAX_BODY_BYTES == 1024 * 1024
    assert http_target.UNKNOWN_KID_REFETCH == 30 and "at most every 30 s" in text
    assert http_target.GOOGLE_CERTS_URL in text
