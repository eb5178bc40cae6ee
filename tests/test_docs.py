"""The docs name real code: every function docs/architecture.md's task flow walks through exists,
so a newcomer can follow it function by function."""

from __future__ import annotations

import dataclasses
import importlib
import re

from tests.fixtures import ROOT

#: How the task flow abbreviates modules.
MODULES = {
    "enqueue": "gae_deferred.enqueue",
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


def test_the_task_flow_names_functions_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    flow = text.split("## Task flow", 1)[1].split("\n## ", 1)[0]
    names = {
        name
        for name in re.findall(r"`([A-Za-z_][\w.]*)(?:\(.*?\))?`", flow)
        if name.split(".")[0] in MODULES and "." in name
    }
    assert len(names) > 30
    missing = sorted(name for name in names if not _resolve(name))
    assert missing == []


def test_every_test_reliability_md_names_for_a_promise_exists():
    """docs/reliability.md states each promise of defer() with the test that holds it: those
    tests must exist (a renamed test would leave a promise unbacked)."""
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = text.split("## What each answer of defer() means", 1)[1].split("\n## ", 1)[0]
    files = list((ROOT / "tests").rglob("test_*.py"))
    named = set(re.findall(r"\b(test_\w+)", section)) - {path.stem for path in files}
    defined = {
        match
        for path in files
        for match in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)
    }
    assert len(named) >= 10
    assert named - defined == set()
