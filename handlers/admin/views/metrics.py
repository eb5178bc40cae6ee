"""/metrics: functions by runs, failures or p95; /metrics.prom: the same for Prometheus."""

from __future__ import annotations

from gae_deferred import admin, metrics

from ... import _admin_auth, _scrape_auth
from ..base import AdminHandler


class MetricsPage(AdminHandler):
    """Functions sorted by runs, failures or p95 in a window; ``function=`` shows one."""

    def get(self) -> None:
        window, sort = self.arg("window") or "24h", self.arg("sort") or "runs"
        function = self.arg("function")
        if function:
            data = admin.function_metrics(function, window)
            self.respond("metrics_function.html", data, title=f"Metrics of {function}")
            return
        page = admin.list_metrics(
            window, sort, cursor=self.arg("cursor") or None, limit=self.limit()
        )
        self.respond(
            "metrics.html",
            page,
            title="Metrics",
            windows=list(metrics.WINDOWS),
            sorts=metrics.SORTS,
        )


class MetricsProm(AdminHandler):
    """``GET metrics.prom``: OpenMetrics text for Prometheus (any dashboard user, or a scraper
    with the bearer token of ``_scrape_auth``); ``?window=1h|24h|7d``."""

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _scrape_auth.scraper(self.request.environ) or super()._authenticate()

    def get(self) -> None:
        window = self.arg("window") or "1h"
        if window not in metrics.WINDOWS:
            raise admin.BadRequest(f"window must be one of {', '.join(metrics.WINDOWS)}")
        self.response.headers["Content-Type"] = admin.OPENMETRICS_CONTENT_TYPE
        self.response.write(admin.openmetrics_text(window))
