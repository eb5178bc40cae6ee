"""/spillover: spilled payloads (listed, one by one, and in bulk)."""

from __future__ import annotations

from gae_deferred import admin

from ... import _templates
from ..base import PREFIX, AdminHandler
from ._actions import BulkMatching, act_on_selected, delete_one


class SpilloverList(AdminHandler):
    def get(self) -> None:
        wanted = admin.SpillFilter.parse(self.request.GET)
        counting = admin.list_total_async(wanted)
        page = admin.list_spillover(wanted, cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.list_total(counting)
        data = {
            "items": [admin.spillover_json(record) for record in page.items],
            "next_cursor": page.next_cursor,
            "filters": wanted.params(),
            "total": total,
            "total_capped": capped,
        }
        self.respond(
            "spillover.html",
            data,
            title="Spilled payloads",
            wanted=wanted,
            states=list(admin.PayloadState),
            sorts=list(admin.SPILL_SORTS),
        )


class SpilloverDetail(AdminHandler):
    def get(self, payload_id: str) -> None:
        record = admin.get_spillover(admin.id_from_url(payload_id))
        data = admin.spillover_json(record, detail=True)
        self.respond("spillover_detail.html", data, title=f"Spilled payload {data['id']}")


class SpilloverRetrigger(AdminHandler):
    def post(self, payload_id: str) -> None:
        record_id = admin.id_from_url(payload_id)
        name = admin.retrigger_spillover(record_id, self.actor, version=self.field("version"))
        # Back to the list: the task may run and delete this record before the next page loads.
        self.finish(
            f"Retriggered spilled payload {record_id} as task {name}.",
            f"{PREFIX}/spillover",
            {"task_name": name, "id": record_id},
            [
                (
                    f"spilled payload {record_id}",
                    f"{PREFIX}/spillover/{_templates.segment(record_id)}",
                )
            ],
        )


class SpilloverDelete(AdminHandler):
    def post(self, payload_id: str) -> None:
        record = admin.get_spillover(admin.id_from_url(payload_id))
        delete_one(
            self,
            "spilled payload",
            record.key.id(),
            admin.delete_spillover,
            question=f"Delete the spilled payload of {record.function} "
            f"({admin.format_bytes(record.stored_bytes)}) and its queued task?",
            cancel=f"{PREFIX}/spillover/{payload_id}",
            after=f"{PREFIX}/spillover",
        )


class SpilloverBulk(AdminHandler):
    def post(self) -> None:
        act_on_selected(self, "spilled payload", f"{PREFIX}/spillover", admin.bulk_spillover)


class SpilloverBulkMatching(BulkMatching):
    """Retrigger or delete every spilled payload a filter matches."""

    filter_type = admin.SpillFilter
    list_path = "/spillover"
    apply = staticmethod(admin.bulk_spillover_matching)
