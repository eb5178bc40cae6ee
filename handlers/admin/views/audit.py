"""/audit: who did what on the dashboard."""

from __future__ import annotations

from gae_deferred import admin

from ..base import AdminHandler


class AuditPage(AdminHandler):
    def get(self) -> None:
        page = admin.list_audit(cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.audit_total()
        data = {
            "items": [admin.audit_json(entry) for entry in page.items],
            "next_cursor": page.next_cursor,
            "total": total,
            "total_capped": capped,
        }
        self.respond("audit.html", data, title="Audit log")
