"""The overview (the dashboard's front page) and /refused, its refused-deliveries card in full."""

from __future__ import annotations

from gae_deferred import admin, refusals

from ..base import AdminHandler


class OverviewPage(AdminHandler):
    def get(self) -> None:
        data = admin.overview_json(admin.overview(), admin.queue_overview())
        self.respond("overview.html", data, title="Overview", refused=refusals.summary())


class RefusedPage(AdminHandler):
    """Refused deliveries (403s of the task handler) per reason, with the latest examples."""

    def get(self) -> None:
        self.respond("refused.html", refusals.summary(), title="Refused deliveries")
