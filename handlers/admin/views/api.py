"""/api/status and /api/csrf: JSON for scripts that have no HTML twin."""

from __future__ import annotations

from gae_deferred import admin

from ... import _admin_csrf
from ..base import AdminHandler


class StatusApi(AdminHandler):
    """``GET api/status``: the status strip's numbers (what every page shows at its top)."""

    json_api = True

    def get(self) -> None:
        self.send_json(admin.status_strip())


class CsrfToken(AdminHandler):
    """GET /api/csrf: the token for API scripts (the cookie comes with the response)."""

    json_api = True

    def get(self) -> None:
        self.send_json({"csrf_token": self.csrf_token, "header": _admin_csrf.HEADER})
