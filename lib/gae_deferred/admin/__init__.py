"""What the admin dashboard reads and does, without any web framework.

The webapp2 handlers in ``handlers/admin/`` only parse requests and render; every
query, action and JSON shape lives in this package (``spilled``, ``failed``, ``queued``,
``overview``, ``filters``, ``jobs``, and what they share in ``_common``) so it can be tested
and scripted directly (inside an ndb context)::

    from gae_deferred import admin

    wanted = admin.SpillFilter.parse({"state": "dead", "function": "reports", "sort": "largest"})
    page = admin.list_spillover(wanted)
    page.items, page.next_cursor           # records, and an opaque token for the next page
    admin.retrigger_spillover(page.items[0].id, actor="ops@example.com")
    admin.count_matching(wanted)           # what "retrigger everything this filter matches" hits
    admin.queue_overview()                 # queue.yaml merged with the Cloud Tasks API

Cost rules (docs/design.md, "Budgets"): a list reads one page of records through a query that a
composite index in index.yaml serves (filters are equality filters on the records' ``facets``
list, see :mod:`gae_deferred._facets`), and never touches ``_DeferredPayloadChunk``. Overview
numbers use ``count()`` (keys only, capped at :data:`COUNT_CAP`) and projection queries
capped at :data:`SCAN_CAP` index entries, so their cost is bounded whatever the data size.
Errors a user can cause (bad id, bad cursor, unknown queue) raise :class:`AdminError`
subclasses that carry an HTTP status.
"""

from __future__ import annotations

from ..errors import AdminError, BadRequest, Conflict, CountChanged, NotFound, Unavailable
from ..failures import FailureState
from ..spillover import PayloadState
from ._common import (
    COUNT_CAP,
    FAILURE_SORTS,
    FAILURE_VIEWS,
    GROUP_COUNT_CAP,
    GROUP_PAGE_SIZE,
    LIST_COUNT_CAP,
    MAX_BULK,
    MAX_MATCHING,
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    SCAN_CAP,
    SPILL_SORTS,
    TASK_SCAN,
    BulkResult,
    FailureGroup,
    Page,
    QueueInfo,
    check_queue_name,
    csrf_token,
    decode_cursor,
    deferred_by,
    encode_cursor,
    format_bytes,
    id_from_url,
    open_message,
    page_size,
    seal_message,
    url_id,
    url_segment,
)
from .failed import (
    bulk_failures,
    bulk_failures_matching,
    count_group,
    delete_failure,
    dismiss_failure,
    estimated_next_attempts,
    failure_groups,
    failure_json,
    get_failure,
    group_json,
    list_failures,
    next_attempt,
    retriable_states,
    retrigger_failure,
    retry_delay,
    retry_group,
)
from .filters import (
    FailureFilter,
    SpillFilter,
    count_matching,
    list_total,
    list_total_async,
    parse_time,
)
from .header import header_rows
from .jobs import (
    FAILURES_SHOWN,
    cancel_job,
    format_duration,
    job_detail,
    job_json,
    list_jobs,
    pause_job,
    resume_job,
    shards_of,
)
from .openmetrics import CONTENT_TYPE as OPENMETRICS_CONTENT_TYPE, render as openmetrics_text
from .overview import (
    Overview,
    audit_json,
    audit_total,
    function_metrics,
    list_audit,
    list_metrics,
    overview,
    overview_json,
    run_sweeper,
    series_json,
    target_link,
)
from .queued import (
    delete_task,
    envelope_summary,
    get_queue,
    list_tasks,
    pause_queue,
    purge_queue,
    queue_json,
    queue_overview,
    resume_queue,
    run_task,
    task_detail,
    task_json,
)
from .spilled import (
    bulk_spillover,
    bulk_spillover_matching,
    delete_spillover,
    get_spillover,
    list_spillover,
    retrigger_spillover,
    spillover_json,
)
from .status import STATUS_TTL, forget as forget_status, status as status_strip

__all__ = [
    "COUNT_CAP",
    "FAILURES_SHOWN",
    "FAILURE_SORTS",
    "FAILURE_VIEWS",
    "GROUP_COUNT_CAP",
    "GROUP_PAGE_SIZE",
    "LIST_COUNT_CAP",
    "MAX_BULK",
    "MAX_MATCHING",
    "MAX_PAGE_SIZE",
    "OPENMETRICS_CONTENT_TYPE",
    "PAGE_SIZE",
    "SCAN_CAP",
    "SPILL_SORTS",
    "STATUS_TTL",
    "TASK_SCAN",
    "AdminError",
    "BadRequest",
    "BulkResult",
    "Conflict",
    "CountChanged",
    "FailureFilter",
    "FailureGroup",
    "FailureState",
    "NotFound",
    "Overview",
    "Page",
    "PayloadState",
    "QueueInfo",
    "SpillFilter",
    "Unavailable",
    "audit_json",
    "audit_total",
    "bulk_failures",
    "bulk_failures_matching",
    "bulk_spillover",
    "bulk_spillover_matching",
    "cancel_job",
    "check_queue_name",
    "count_group",
    "count_matching",
    "csrf_token",
    "decode_cursor",
    "deferred_by",
    "delete_failure",
    "delete_spillover",
    "delete_task",
    "dismiss_failure",
    "encode_cursor",
    "envelope_summary",
    "estimated_next_attempts",
    "failure_groups",
    "failure_json",
    "forget_status",
    "format_bytes",
    "format_duration",
    "function_metrics",
    "get_failure",
    "get_queue",
    "get_spillover",
    "group_json",
    "header_rows",
    "id_from_url",
    "job_detail",
    "job_json",
    "list_audit",
    "list_failures",
    "list_jobs",
    "list_metrics",
    "list_spillover",
    "list_tasks",
    "list_total",
    "list_total_async",
    "next_attempt",
    "open_message",
    "openmetrics_text",
    "overview",
    "overview_json",
    "page_size",
    "parse_time",
    "pause_job",
    "pause_queue",
    "purge_queue",
    "queue_json",
    "queue_overview",
    "resume_job",
    "resume_queue",
    "retriable_states",
    "retrigger_failure",
    "retrigger_spillover",
    "retry_delay",
    "retry_group",
    "run_sweeper",
    "run_task",
    "seal_message",
    "series_json",
    "shards_of",
    "spillover_json",
    "status_strip",
    "target_link",
    "task_detail",
    "task_json",
    "url_id",
    "url_segment",
]
