"""gae_deferred: App Engine's ``deferred`` library for Python 3, on Cloud Tasks.

    from gae_deferred import defer

    defer(report.build, account_id, _queue="reports", _countdown=30)
    defer(lambda: self.cleanup(tmp))      # closures, lambdas, methods of local classes

Payloads over the task size limit spill into Datastore; the webapp2 task handler in
``handlers/deferred_task.py`` runs them; ``/_ah/deferred-admin`` shows what is pending or failed.
"""

from ._config import Settings, configure, settings
from .context import (
    TaskInfo,
    current_task,
    queue_name,
    task_execution_count,
    task_name,
    task_retry_count,
)
from .enqueue import DeferredTask, defer
from .envelope import serialize
from .errors import (
    ConfigurationError,
    DatastoreUnavailableError,
    DeferError,
    EnqueueError,
    EnqueueOutcomeUnknown,
    Error,
    PayloadTooLargeError,
    PermanentTaskFailure,
    QueueNotFoundError,
    SerializationError,
    SingularTaskFailure,
    TaskAlreadyExistsError,
)
from .execution import TaskOutcome, execute_task, run, set_log_level
from .idempotency import idempotent
from .sweeper import SweepReport, sweep

__all__ = [
    "ConfigurationError",
    "DatastoreUnavailableError",
    "DeferError",
    "DeferredTask",
    "EnqueueError",
    "EnqueueOutcomeUnknown",
    "Error",
    "PayloadTooLargeError",
    "PermanentTaskFailure",
    "QueueNotFoundError",
    "SerializationError",
    "Settings",
    "SingularTaskFailure",
    "SweepReport",
    "TaskAlreadyExistsError",
    "TaskInfo",
    "TaskOutcome",
    "configure",
    "current_task",
    "defer",
    "execute_task",
    "idempotent",
    "queue_name",
    "run",
    "serialize",
    "set_log_level",
    "settings",
    "sweep",
    "task_execution_count",
    "task_name",
    "task_retry_count",
]
