"""/jobs: iterate() jobs, one job, and pause / resume / cancel."""

from __future__ import annotations

from typing import Any, ClassVar

from gae_deferred import admin

from ..base import AdminHandler
from ._actions import OneVerb


class JobList(AdminHandler):
    def get(self) -> None:
        page = admin.list_jobs(cursor=self.arg("cursor") or None, limit=self.limit())
        live = [job for job in page.items if job.state not in ("done", "cancelled")]
        shards = admin.shards_of(live)
        data = {
            "items": [admin.job_json(job, shards.get(job.id)) for job in page.items],
            "next_cursor": page.next_cursor,
        }
        self.respond("jobs.html", data, title="Jobs", duration=admin.format_duration)


class JobDetail(AdminHandler):
    def get(self, job_id: str) -> None:
        data = admin.job_detail(admin.id_from_url(job_id))
        self.respond(
            "job_detail.html", data, title=f"Job {data['name']}", duration=admin.format_duration
        )


class JobAction(OneVerb):
    noun = "job"
    verbs: ClassVar[dict[str, str | None]] = {
        "pause": None,
        "resume": None,
        "cancel": "Cancel job {name}? Its shards stop after their current batch; "
        "finalize never runs.",
    }

    def post(self, job_id: str, verb: str) -> None:
        self.act(job_id, admin.id_from_url(job_id), verb)

    def outcome(self, name: str, result: Any) -> tuple[str, dict[str, Any]]:
        return result.name, {"state": result.state}
