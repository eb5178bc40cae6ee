"""The docs name real code: every function docs/architecture.md's task flow walks through exists,
so a newcomer can follow it function by function."""

from __future__ import annotations

import dataclasses
import importlib
import re

from tests.conftest import ROOT

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
