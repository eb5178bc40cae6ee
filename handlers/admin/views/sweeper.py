"""/sweep (an admin's POST) and /cron/sweep (cron's GET): run the sweeper once."""

from __future__ import annotations

from gae_deferred import admin

from ... import _admin_auth
from ..base import PREFIX, AdminHandler


class SweepNow(AdminHandler):
    def post(self) -> None:
        report = admin.run_sweeper(self.actor)
        summary = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in report.items())
        self.finish(f"Sweeper ran. {summary}", PREFIX, {"report": report})


class CronSweep(AdminHandler):
    """GET by App Engine cron, or with the local stack's cron token: runs the sweeper once.

    Nothing else may: a GET never changes state for a person, even an admin on loopback.
    """

    json_api = True

    def _authenticate(self) -> _admin_auth.Admin | None:
        return _admin_auth.cron_caller(self.request.environ)

    def _denial(self) -> str:
        return (
            "Cron only (App Engine's X-Appengine-Cron, or X-Deferred-Cron-Token): "
            f"admins run the sweeper with POST {PREFIX}/sweep."
        )

    def get(self) -> None:
        self.send_json({"ok": True, "report": admin.run_sweeper(self.actor, audit_idle=False)})
