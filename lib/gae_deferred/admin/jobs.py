"""The dashboard's Jobs page: iterate() jobs, their shards and skipped entities; pause, resume
and cancel (each audited).

    from gae_deferred import admin

    page = admin.list_jobs()
    admin.job_json(page.items[0])           # state, shards, processed, rate, ETA, finalize
    admin.pause_job(job_id, actor="ops@example.com")

A list page reads one page of ``_DeferredJob`` records (newest first: the built-in index on
``created``) and the shard records of the jobs not finished (by key); a job's
own page adds up to :data:`FAILURES_SHOWN` skipped entities (the ``job``/``at`` index).
"""

from __future__ import annotations

from typing import Any

from google.cloud import ndb

from .. import audit, iteration
from ..errors import Conflict, DeferError, NotFound
from ._common import Page, _fetch_page, _iso, _key_name, _now, url_id

#: Skipped entities a job's page lists (the newest).
FAILURES_SHOWN = 100
#: Datastore's limit of keys per Lookup.
LOOKUP_KEYS = 1000


def list_jobs(cursor: str | None = None, limit: int = 50) -> Page:
    """One page of jobs, newest first."""
    query = iteration.DeferredJob.query(namespace=iteration.RECORDS_NAMESPACE).order(
        -iteration.DeferredJob.created
    )
    return _fetch_page(query, "jobs", cursor, limit)


def get_job(job_id: str) -> iteration.DeferredJob:
    job = iteration._job_key(_key_name(job_id, "job")).get()
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def shards_of(jobs: list[iteration.DeferredJob]) -> dict[str, list[iteration.DeferredJobShard]]:
    """The shards of every job listed, read by key (one Lookup per 1,000)."""
    keys = [iteration._shard_key(job.id, index) for job in jobs for index in range(job.shards or 0)]
    found: dict[str, list[iteration.DeferredJobShard]] = {job.id: [] for job in jobs}
    for start in range(0, len(keys), LOOKUP_KEYS):
        for shard in ndb.get_multi(keys[start : start + LOOKUP_KEYS]):
            if shard is not None:
                found[shard.job].append(shard)
    return found


def job_json(
    job: iteration.DeferredJob,
    shards: list[iteration.DeferredJobShard] | None = None,
    failures: list[iteration.DeferredJobFailure] | None = None,
) -> dict[str, Any]:
    """A job as the dashboard shows it; ``shards`` give live counts while it runs."""
    final = job.state in iteration.JobState.FINAL
    if shards and not final:
        processed = sum(shard.processed for shard in shards)
        failed = sum(shard.failed for shard in shards)
    else:
        processed, failed = job.processed or 0, job.failed or 0
    end = job.finished if final or job.finished else _now()
    elapsed = (end - job.started).total_seconds() if job.started else 0.0
    rate = processed / elapsed if elapsed > 0 else None
    total = _estimated_total(job)
    eta = None
    if not final and rate and total is not None and job.state != iteration.JobState.PAUSED:
        eta = max(0.0, (total - processed - failed) / rate)
    data: dict[str, Any] = {
        "id": job.id,
        "url_id": url_id(job.id),
        "name": job.name,
        "function": job.function,
        "kind": job.entity_kind,
        "query": job.query_text,
        "queue": job.queue,
        "state": job.state,
        "batched": bool(job.batched),
        "batch_size": job.batch_size,
        "time_budget": job.time_budget,
        "shards": job.shards or 0,
        "shards_requested": job.shards_requested,
        "shards_done": job.shards_done or 0,
        "sharding": job.sharding,
        "processed": processed,
        "failed": failed,
        "estimated_total": total,
        "rate": round(rate, 2) if rate is not None else None,
        "eta_seconds": round(eta) if eta is not None else None,
        "created": _iso(job.created),
        "started": _iso(job.started),
        "finished": _iso(job.finished),
        "finalize": job.finalize_function,
        "finalize_state": job.finalize_state,
        "finalize_error": job.finalize_error,
        "actions": _actions(job.state),
    }
    if shards is not None:
        data["shard_list"] = [_shard_json(shard) for shard in shards]
    if failures is not None:
        data["failed_entities"] = [_failure_json(failure) for failure in failures]
    return data


def _estimated_total(job: iteration.DeferredJob) -> int | None:
    """The entities the job's query matched when planned: the keys the planner read when it
    read them all, else the count it asked Datastore for (None where it could not count)."""
    if iteration.read_every_key(job.sharding, job.sample_size):
        return job.sample_size
    return job.counted


def _actions(state: str) -> list[str]:
    if state == iteration.JobState.RUNNING:
        return ["pause", "cancel"]
    if state == iteration.JobState.PAUSED:
        return ["resume", "cancel"]
    if state == iteration.JobState.PLANNING:
        return ["cancel"]
    return []


def _shard_json(shard: iteration.DeferredJobShard) -> dict[str, Any]:
    return {
        "index": shard.index,
        "start": _key_text(shard.start),
        "end": _key_text(shard.end),
        "last": _key_text(shard.last),
        "done": bool(shard.done),
        "processed": shard.processed or 0,
        "failed": shard.failed or 0,
        "batches": shard.batches or 0,
        "tasks": (shard.tasks or 0) + 1,
        "updated": _iso(shard.updated),
    }


def _failure_json(failure: iteration.DeferredJobFailure) -> dict[str, Any]:
    return {
        "id": failure.key.id(),
        "entity": _key_text(failure.entity),
        "entity_urlsafe": failure.entity.urlsafe().decode() if failure.entity else None,
        "shard": failure.shard,
        "exception_type": failure.exception_type,
        "message": failure.message,
        "traceback": failure.traceback,
        "attempts": failure.attempts,
        "at": _iso(failure.at),
    }


def _key_text(key: ndb.Key | None) -> str | None:
    if key is None:
        return None
    return ", ".join(f"{kind} {ident!r}" for kind, ident in key.pairs())


def job_detail(job_id: str) -> dict[str, Any]:
    """A job with its shards and the entities it skipped (newest first)."""
    job = get_job(job_id)
    shards = shards_of([job])[job.id]
    return job_json(job, shards, iteration.job_failures(job.id, FAILURES_SHOWN))


def _control(action: str, job_id: str, actor: str) -> iteration.DeferredJob:
    get_job(job_id)
    change = {
        "pause": iteration.pause_job,
        "resume": iteration.resume_job,
        "cancel": iteration.cancel_job,
    }[action]
    try:
        job = change(job_id)
    except DeferError as exc:
        raise Conflict(str(exc)) from exc
    audit.record(actor, f"{action} job", f"job/{job_id}", job.name or "")
    return job


def pause_job(job_id: str, actor: str) -> iteration.DeferredJob:
    """Pause a running job (its shards stop after their current batch); audited."""
    return _control("pause", job_id, actor)


def resume_job(job_id: str, actor: str) -> iteration.DeferredJob:
    """Resume a paused job from each shard's last committed key; audited."""
    return _control("resume", job_id, actor)


def cancel_job(job_id: str, actor: str) -> iteration.DeferredJob:
    """Cancel a job for good (no finalize); audited."""
    return _control("cancel", job_id, actor)


def format_duration(seconds: float | None) -> str:
    """``3h 04m``, ``5m 12s``, ``42s``; "—" when unknown."""
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"
