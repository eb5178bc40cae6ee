"""GET /_ah/deferred-admin/metrics.prom: OpenMetrics text a strict parser accepts, with the
numbers the records hold; readable by dashboard users or a scraper's bearer token."""

from __future__ import annotations

import base64
import math
import re

import pytest

import gae_deferred
from gae_deferred import FailureState, PayloadState, metrics, refusals
from gae_deferred.webapp2 import _scrape_auth
from tests.dashboard.support import P, make_failure, make_spilled

URL = f"{P}/metrics.prom"
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_SAMPLE = re.compile(rf"^({_NAME})(\{{.*\}})? (\S+)$")
_SUFFIXES = {
    "gauge": ("",),
    "counter": ("_total", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}


def parse(text: str) -> dict[str, dict]:
    """A strict reader of the OpenMetrics text format (the parts this exporter uses): every
    sample under its family's TYPE with an allowed suffix, labels well-formed and unique, values
    numbers, UNIT matching the name, families declared once, ``# EOF`` last."""
    assert text.endswith("# EOF\n"), "must end with # EOF and a newline"
    families: dict[str, dict] = {}
    current = None
    for line in text[: -len("# EOF\n")].split("\n")[:-1]:
        if line.startswith("# "):
            keyword, name, *rest = line[2:].split(" ", 2)
            assert re.fullmatch(_NAME, name), line
            if keyword == "TYPE":
                assert name not in families, f"family {name} declared twice"
                assert rest and rest[0] in _SUFFIXES, line
                current = families[name] = {"type": rest[0], "samples": [], "unit": None}
            else:
                assert current is not None and name in families and families[name] is current, line
                if keyword == "UNIT":
                    assert name.endswith("_" + rest[0]), f"{name} does not end with its unit"
                    current["unit"] = rest[0]
                else:
                    assert keyword == "HELP", line
            continue
        match = _SAMPLE.match(line)
        assert match and current is not None, f"not a sample: {line!r}"
        sample, labels_text, value = match.groups()
        family = next(n for n, f in families.items() if f is current)
        assert sample in {family + s for s in _SUFFIXES[current["type"]]}, (sample, family)
        labels = {}
        if labels_text:
            body = labels_text[1:-1]
            pairs = _LABEL.findall(body)
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == body, labels_text
            for key, raw in pairs:
                assert key not in labels, f"label {key} twice"
                labels[key] = raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        number = float(value)
        assert not math.isnan(number), line
        current["samples"].append((sample, labels, number))
    return families


def values(families, family: str, sample: str | None = None, **labels) -> list[float]:
    return [
        v
        for name, found, v in families[family]["samples"]
        if name == (sample or family) and all(found.get(k) == w for k, w in labels.items())
    ]


def test_metrics_prom_parses_and_carries_the_numbers(app):
    for _ in range(3):
        metrics.observe('odd "name"\\x', "reports", 0.0278, ok=True, retried=False)
    metrics.observe('odd "name"\\x', "reports", 2.0, ok=False, retried=True)
    metrics.flush()
    make_spilled("m1", size=2000)
    make_spilled("m2", state=PayloadState.DEAD)
    make_failure("t-d", state=FailureState.DEAD)
    make_failure("t-r", state=FailureState.RETRYING)
    refusals.discard_pending()
    for _ in range(2):
        refusals.record("bad-signature", None, "envelope signature does not match")
    try:
        answer = app.get(URL)
    finally:
        refusals.discard_pending()
    assert answer.headers["Content-Type"] == (
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    families = parse(answer.text)
    name = 'odd "name"\\x'
    assert values(families, "gae_deferred_function_runs", function=name, window="1h") == [4]
    assert values(families, "gae_deferred_function_failures", function=name) == [1]
    assert values(families, "gae_deferred_function_retries", function=name) == [1]
    assert values(families, "gae_deferred_queue_runs", queue="reports") == [4]
    hist = "gae_deferred_function_duration_seconds"
    assert families[hist]["type"] == "gaugehistogram" and families[hist]["unit"] == "seconds"
    buckets = [
        (labels["le"], v)
        for sample, labels, v in families[hist]["samples"]
        if sample == hist + "_bucket" and labels["function"] == name
    ]
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 4
    assert dict(buckets)["0.03"] == 3 and dict(buckets)["0.02"] == 0
    assert values(families, hist, hist + "_gcount", function=name) == [4]
    assert values(families, "gae_deferred_spilled_payloads", state="pending") == [1]
    assert values(families, "gae_deferred_spilled_payloads", state="dead") == [1]
    assert values(families, "gae_deferred_spilled_payload_bytes")[0] > 2000
    assert values(families, "gae_deferred_failure_records", state="dead") == [1]
    assert values(families, "gae_deferred_failure_records", state="retrying") == [1]
    assert values(families, "gae_deferred_failure_records", state="resolved") == [0]
    refused = families["gae_deferred_refused_deliveries"]
    assert refused["type"] == "counter"
    assert values(
        families,
        "gae_deferred_refused_deliveries",
        "gae_deferred_refused_deliveries_total",
        reason="bad-signature",
    ) == [2]
    assert values(
        families, "gae_deferred_legacy_pickle_runs", "gae_deferred_legacy_pickle_runs_total"
    ) == [0]
    day = parse(app.get(URL, {"window": "24h"}).text)
    assert values(day, "gae_deferred_function_runs", function=name, window="24h") == [4]
    assert app.get(URL, {"window": "2y"}, expect_errors=True).status_int == 400


OUTSIDE = {"REMOTE_ADDR": "203.0.113.7"}


def test_scrapers_need_the_bearer_token_or_a_dashboard_login(app, monkeypatch):
    gae_deferred.configure(local_mode=False, metrics_token="s3cret-token")
    assert app.get(URL, extra_environ=OUTSIDE, expect_errors=True).status_int == 403
    wrong = {**OUTSIDE, "HTTP_AUTHORIZATION": "Bearer nope"}
    assert app.get(URL, extra_environ=wrong, expect_errors=True).status_int == 403
    right = {**OUTSIDE, "HTTP_AUTHORIZATION": "Bearer s3cret-token"}
    assert app.get(URL, extra_environ=right).text.endswith("# EOF\n")
    # The token reads this page only: it is not a dashboard login.
    assert app.get(P, extra_environ=right, expect_errors=True).status_int == 403
    gae_deferred.configure(viewer_hook=lambda environ: "looker@example.com")
    assert app.get(URL, extra_environ=OUTSIDE).status_int == 200


class _SecretResponse:
    def __init__(self, status: int, token: str) -> None:
        self.status_code = status
        self._token = token

    def json(self) -> dict:
        return {"payload": {"data": base64.b64encode(self._token.encode()).decode()}}


@pytest.fixture
def secret_manager(monkeypatch):
    """Google's Secret Manager endpoint, answered here: the requests it got."""
    asked: list[str] = []

    class Session:
        def get(self, url: str, timeout: float) -> _SecretResponse:
            asked.append(url)
            return _SecretResponse(200, "from-secret-manager\n")

    monkeypatch.setattr(_scrape_auth, "secret_session", Session)
    _scrape_auth.reset()
    yield asked
    _scrape_auth.reset()


def test_the_token_can_come_from_secret_manager_read_once(app, secret_manager):
    name = "projects/p/secrets/metrics-token/versions/latest"
    gae_deferred.configure(local_mode=False, metrics_token_secret=name)
    right = {**OUTSIDE, "HTTP_AUTHORIZATION": "Bearer from-secret-manager"}
    for _ in range(3):
        assert app.get(URL, extra_environ=right).status_int == 200
    assert secret_manager == [f"https://secretmanager.googleapis.com/v1/{name}:access"]
    wrong = {**OUTSIDE, "HTTP_AUTHORIZATION": "Bearer from-secret"}
    assert app.get(URL, extra_environ=wrong, expect_errors=True).status_int == 403


def test_the_documented_scrape_config_and_families_match(app):
    import yaml

    from tests.fixtures import ROOT

    text = (ROOT / "docs" / "dashboard.md").read_text()
    config = yaml.safe_load(text.split("# prometheus.yml\n", 1)[1].split("```", 1)[0])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == URL and job["authorization"]["type"] == "Bearer"
    metrics.observe("a.b", "default", 0.01, ok=True, retried=False)
    metrics.flush()
    families = parse(app.get(URL).text)
    documented = set(re.findall(r"`(gae_deferred_[a-z_]+)`", text))
    assert set(families) == documented
    assert (ROOT / "docs" / "dashboard-overview.png").stat().st_size > 10_000
    assert "](dashboard-overview.png)" in text
