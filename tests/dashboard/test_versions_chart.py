"""Version markers: which app version (GAE_VERSION) ran each minute's tasks, drawn on the
charts where it changes, and a per-version breakdown on the metrics page and metrics.prom."""

from __future__ import annotations

import re

import gae_deferred
from gae_deferred import metrics
from tests.dashboard.support import P


def _runs(version: str, minutes_ago: int, runs: int, failed: int = 0) -> None:
    """``runs`` counted by a process of app ``version``, ``minutes_ago`` minutes back (the
    minute of what this process counted is moved back before the flush writes it)."""
    gae_deferred.configure(app_version=version)
    for number in range(runs):
        metrics.observe("reports.build", "reports", 0.01, ok=number >= failed, retried=False)
    metrics._recorder.add_up()
    pending = metrics._recorder.pending
    for key, by_minute in pending.items():
        pending[key] = {minute - minutes_ago: slot for minute, slot in by_minute.items()}
    metrics.flush()


def test_charts_mark_where_the_version_changes_and_metrics_break_it_down(app):
    _runs("v1", 10, 4, failed=1)
    _runs("v1", 5, 2)
    _runs("v2", 2, 3, failed=2)
    gae_deferred.configure(local_mode=True)
    overview = app.get(P).text
    lines = re.findall(
        r'<line class="version"[^>]*><title>version ([^<]+) from here</title>', overview
    )
    assert lines == ["v2"]
    assert re.search(r"\d\d:\d\d: version <code>v2</code>", overview)
    function = app.get(f"{P}/api/metrics", {"function": "reports.build", "window": "1h"}).json
    marks = function["marks_by_minute"]
    assert [version for _, version in marks] == ["v2"]
    assert function["by_minute"][marks[0][0]]["runs"] == 3
    assert function["versions"] == [
        {"version": "v1", "runs": 6, "failures": 1},
        {"version": "v2", "runs": 3, "failures": 2},
    ]
    page = app.get(f"{P}/metrics", {"window": "1h"}).text
    assert re.search(r"<code>v1</code></td><td[^>]*>6</td><td[^>]*>1</td>", page)
    assert re.search(r"<code>v2</code></td><td[^>]*>3</td><td[^>]*>2</td>", page)
    prom = app.get(f"{P}/metrics.prom").text
    assert 'gae_deferred_version_runs{version="v2",window="1h"} 3' in prom
    assert 'gae_deferred_version_failures{version="v1",window="1h"} 1' in prom


def test_one_version_draws_no_marker(app):
    for _ in range(2):
        metrics.observe("reports.build", "reports", 0.01, ok=True, retried=False)
    metrics.flush()
    assert '<line class="version"' not in app.get(P).text
