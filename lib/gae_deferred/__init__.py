"""gae_deferred: App Engine's ``deferred`` library for Python 3, on Cloud Tasks.

    from gae_deferred import defer

    defer(report.build, account_id, _queue="reports", _countdown=30)
    defer(lambda: self.cleanup(tmp))      # closures, lambdas, methods of local classes

Payloads over the task size limit spill into Datastore; the webapp2 task handler
(``gae_deferred.webapp2``) runs them; ``/_ah/deferred-admin`` shows what is pending or failed.
This module imports no web framework.
"""

from . import _config, _datastore, cloud_tasks
from ._config import Settings, configure, settings
from ._datastore import ndb_context
from .batch import batch
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
    AdminError,
    BatchDeferError,
    ConfigurationError,
    DatastoreUnavailableError,
    DeferError,
    EnqueueError,
    EnqueueOutcomeUnknown,
    Error,
    PayloadLoadError,
    PayloadTooLargeError,
    PermanentTaskFailure,
    QueueNotFoundError,
    SerializationError,
    SingularTaskFailure,
    SpilledPayloadMissing,
    TaskAlreadyExistsError,
    UnverifiedEnvelope,
)
from .execution import TaskOutcome, execute_task, run, set_log_level
from .failures import FailureState
from .idempotency import idempotent
from .spillover import PayloadState
from .sweeper import SweepReport, sweep


def reset_clients() -> None:
    """Forget configure() calls and cached clients; the next use reads the environment again.

    For tests and tools that point one process at another emulator or project.
    """
    _config.reset()
    cloud_tasks.reset_client()
    _datastore.reset_client()


__all__ = [
    "AdminError",
    "BatchDeferError",
    "ConfigurationError",
    "DatastoreUnavailableError",
    "DeferError",
    "DeferredTask",
    "EnqueueError",
    "EnqueueOutcomeUnknown",
    "Error",
    "FailureState",
    "PayloadLoadError",
    "PayloadState",
    "PayloadTooLargeError",
    "PermanentTaskFailure",
    "QueueNotFoundError",
    "SerializationError",
    "Settings",
    "SingularTaskFailure",
    "SpilledPayloadMissing",
    "SweepReport",
    "TaskAlreadyExistsError",
    "TaskInfo",
    "TaskOutcome",
    "UnverifiedEnvelope",
    "batch",
    "cloud_tasks",
    "configure",
    "current_task",
    "defer",
    "execute_task",
    "idempotent",
    "ndb_context",
    "queue_name",
    "reset_clients",
    "run",
    "serialize",
    "set_log_level",
    "settings",
    "sweep",
    "task_execution_count",
    "task_name",
    "task_retry_count",
]
