"""/failures: failure groups, the failure list, one failure, and actions on them."""

from __future__ import annotations

from gae_deferred import admin

from ... import _templates
from ..base import PREFIX, AdminHandler, plural
from ._actions import BulkMatching, act_on_selected, delete_one


class FailureGroups(AdminHandler):
    def get(self) -> None:
        view = self.arg("view") or "active"
        page = admin.failure_groups(view, cursor=self.arg("cursor") or None)
        data = {
            "items": [admin.group_json(group) for group in page.items],
            "next_cursor": page.next_cursor,
            "count_cap": admin.GROUP_COUNT_CAP,
        }
        self.respond("failures.html", data, title="Failures", view=view, views=admin.FAILURE_VIEWS)


class FailureList(AdminHandler):
    def get(self) -> None:
        wanted = admin.FailureFilter.parse(self.request.GET)
        counting = admin.list_total_async(wanted)
        page = admin.list_failures(wanted, cursor=self.arg("cursor") or None, limit=self.limit())
        total, capped = admin.list_total(counting)
        estimates = admin.estimated_next_attempts(page.items)
        data = {
            "items": [
                {**admin.failure_json(record), "next_attempt_estimate": estimates.get(record.id)}
                for record in page.items
            ],
            "next_cursor": page.next_cursor,
            "filters": wanted.params(),
            "total": total,
            "total_capped": capped,
        }
        self.respond(
            "failure_list.html",
            data,
            title=_group_title(wanted.group),
            wanted=wanted,
            states=("all", *admin.FAILURE_VIEWS),
            sorts=list(admin.FAILURE_SORTS),
        )


def _group_title(group: str | None) -> str:
    if not group:
        return "Failures"
    function, _, exception_type = group.rpartition("|")
    return f"{function} raised {exception_type.rsplit('.', 1)[-1]}"


class FailureDetail(AdminHandler):
    def get(self, failure_id: str) -> None:
        record = admin.get_failure(admin.id_from_url(failure_id))
        data = {
            **admin.failure_json(record, detail=True),
            "next_attempt": admin.next_attempt(record),
        }
        self.respond("failure_detail.html", data, title=f"Failure {data['id']}", failure=data)


class FailureRetrigger(AdminHandler):
    def post(self, failure_id: str) -> None:
        record_id = admin.id_from_url(failure_id)
        name = admin.retrigger_failure(record_id, self.actor, version=self.field("version"))
        self.finish(
            f"Retrying failure {record_id} as task {name}.",
            f"{PREFIX}/failures/{failure_id}",
            {"task_name": name, "id": record_id},
            [(f"failure {record_id}", f"{PREFIX}/failures/{_templates.segment(record_id)}")],
        )


class FailureDismiss(AdminHandler):
    def post(self, failure_id: str) -> None:
        record_id = admin.id_from_url(failure_id)
        admin.dismiss_failure(record_id, self.actor)
        self.finish(
            f"Dismissed failure {record_id}.",
            f"{PREFIX}/failures/{failure_id}",
            links=[(f"failure {record_id}", f"{PREFIX}/failures/{_templates.segment(record_id)}")],
        )


class FailureDelete(AdminHandler):
    def post(self, failure_id: str) -> None:
        record = admin.get_failure(admin.id_from_url(failure_id))
        delete_one(
            self,
            "failure",
            record.key.id(),
            admin.delete_failure,
            question=f"Delete the failure record of {record.function} and its kept payload?",
            cancel=f"{PREFIX}/failures/{failure_id}",
            after=f"{PREFIX}/failures/list",
        )


class FailureBulk(AdminHandler):
    def post(self) -> None:
        act_on_selected(self, "failure", f"{PREFIX}/failures/list", admin.bulk_failures)


class FailureBulkMatching(BulkMatching):
    """Retrigger, dismiss or delete every failure a filter matches."""

    filter_type = admin.FailureFilter
    list_path = "/failures/list"
    apply = staticmethod(admin.bulk_failures_matching)


class FailureRetryGroup(AdminHandler):
    """Retry a group's failures in the view its button was on: from the dead tab only the dead
    ones ("active", the default, is every retriable state)."""

    def post(self) -> None:
        group, view = self.field("group"), self.field("view") or "active"
        states = admin.retriable_states(view)
        if not self.json_api:
            found = admin.count_group(group, states)
            shown = f"{found}{'+' if found >= admin.MAX_BULK else ''}"
            noun = "failure" if view == "active" else f"{view} failure"
            if self.needs_confirmation(
                f"Retry {plural(shown, noun)} where {_group_title(group)}? "
                f"At most {admin.MAX_BULK} are retried, newest first.",
                f"{PREFIX}/failures?view={view}",
                f"Retry {plural(shown, noun)}",
                group=group,
                view=view,
            ):
                return
        result = admin.retry_group(group, self.actor, states=states)
        self.finish(
            f"Retried {plural(len(result.done), 'failure')} where {_group_title(group)}; "
            f"{len(result.errors)} could not be retried.",
            f"{PREFIX}/failures?view={view}",
            {"done": result.done, "errors": result.errors},
        )
