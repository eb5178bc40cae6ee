"""The dashboard's bulk delete of spilled payloads deletes their queued tasks in BatchDeleteTasks
calls (one per queue for up to 1,000), not one DeleteTask each."""

from __future__ import annotations

from gae_deferred import audit
from tests.dashboard.support import P, csrf_token, make_spilled, pause, queued_tasks


def test_bulk_delete_removes_the_queued_tasks_in_one_batch_call(app, fresh_tasks_emulator):
    pause("default")
    ids = [f"q{number}" for number in range(3)]
    for payload_id in ids:
        make_spilled(payload_id)
    headers = {"X-CSRF-Token": csrf_token(app)}
    app.post_json(f"{P}/api/spillover/bulk", {"action": "retrigger", "ids": ids}, headers=headers)
    assert len(queued_tasks("default")) == 3
    fresh_tasks_emulator.reset_counts()
    result = app.post_json(
        f"{P}/api/spillover/bulk", {"action": "delete", "ids": [*ids, "missing"]}, headers=headers
    ).json
    assert result["done"] == ids and "missing" in result["errors"]
    assert queued_tasks("default") == []
    counts = fresh_tasks_emulator.rpc_counts
    assert (counts["BatchDeleteTasks"], counts["DeleteTask"]) == (1, 0)
    entries, _ = audit.recent(50)
    deleted = [entry for entry in entries if entry.action == "delete"]
    assert sorted(entry.target for entry in deleted) == [f"spillover/{i}" for i in ids]
