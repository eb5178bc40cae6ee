"""Each default value is written once, in gae_deferred.defaults: no other module of the core or
the webapp2 layer spells it out again (a copy drifts when the default changes)."""

import ast
import pathlib

import pytest

from gae_deferred import _config, defaults, queue_config, task_backoff
from gae_deferred.admin import _common
from gae_deferred.webapp2 import _admin_guard

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "lib" / "gae_deferred").rglob("*.py")) + sorted(
    (ROOT / "handlers").rglob("*.py")
)
HOME = ROOT / "lib" / "gae_deferred" / "defaults.py"


def _string_constants(path: pathlib.Path) -> set[str]:
    """Every string literal of the module that is a whole value (not a docstring's text)."""
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


@pytest.mark.parametrize(
    "value", [defaults.LOCATION, defaults.TASK_URL, defaults.ADMIN_PREFIX, defaults.QUEUE]
)
def test_a_default_string_is_written_only_in_defaults(value):
    written = [
        str(path.relative_to(ROOT))
        for path in SOURCES
        if path != HOME and value in _string_constants(path)
    ]
    assert written == []


def test_the_settings_routes_and_dashboard_start_from_the_defaults():
    current = _config.Settings()
    assert (current.location, current.default_queue, current.task_url) == (
        defaults.LOCATION,
        defaults.QUEUE,
        defaults.TASK_URL,
    )
    assert current.cloud_tasks_timeout_seconds == defaults.CLOUD_TASKS_TIMEOUT_SECONDS
    assert current.task_deadline_seconds == defaults.TASK_DEADLINE_SECONDS
    assert _admin_guard.PREFIX == _common.PREFIX == defaults.ADMIN_PREFIX
    assert _admin_guard.TASK_PATH == defaults.TASK_URL
    assert queue_config.DEFAULT_QUEUE == defaults.QUEUE
    retry = queue_config.RetryParameters()
    assert {
        "min_backoff_seconds": retry.min_backoff_seconds,
        "max_backoff_seconds": retry.max_backoff_seconds,
        "max_doublings": retry.max_doublings,
    } == task_backoff.DEFAULTS


def test_the_local_stack_and_benchmarks_take_the_default_location_from_defaults():
    others = sorted((ROOT / "emulators").rglob("*.py")) + sorted(
        (ROOT / "benchmarks").rglob("*.py")
    )
    written = [
        str(path.relative_to(ROOT))
        for path in others
        if defaults.LOCATION in _string_constants(path)
    ]
    assert written == []
