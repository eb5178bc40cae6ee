"""gae_deferred: App Engine's ``deferred`` library for Python 3, on Cloud Tasks.

    from gae_deferred import defer

    defer(report.build, account_id, _queue="reports", _countdown=30)
    defer(lambda: self.cleanup(tmp))      # closures, lambdas, methods of local classes

Legacy code keeps its names with one import swap::

    import gae_deferred as deferred       # was: from google.appengine.ext import deferred

    deferred.defer(fn, 1, _transactional=True)
    app = deferred.application            # or subclass deferred.TaskHandler (webapp2)

Payloads over the task size limit spill into Datastore; the webapp2 task handler
(``gae_deferred.webapp2``) runs them; ``/_ah/deferred-admin`` shows what is pending or failed.

Every name is imported on first use: ``import gae_deferred`` costs nothing until code touches
``defer`` or the like (the pytest plugin relies on that), and only ``TaskHandler`` brings in
webapp2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        BadTransactionStateError,
        BatchDeferError,
        ConfigurationError,
        DatastoreRefusedError,
        DatastoreUnavailableError,
        DeferError,
        DuplicateDeliveryRunning,
        EnqueueError,
        EnqueueOutcomeUnknown,
        Error,
        InvalidTaskError,
        InvalidTaskNameError,
        InvalidTaskRetryOptionsError,
        PayloadLoadError,
        PayloadTooLargeError,
        PermanentTaskFailure,
        QueueNotFoundError,
        SerializationError,
        SingularTaskFailure,
        SpilledPayloadMissing,
        TaskAlreadyExistsError,
        TaskFailed,
        TombstonedTaskError,
        UnknownQueueError,
        UnverifiedEnvelope,
        VersionSkewError,
    )
    from .execution import TaskOutcome, execute_task, run, set_log_level
    from .failures import FailureState
    from .http_target import HttpTarget
    from .idempotency import idempotent
    from .iteration import (
        Job,
        JobState,
        JobTotals,
        cancel_job,
        current_job,
        iterate,
        once_per_entity,
        pause_job,
        resume_job,
    )
    from .legacy import Handler, application, invoke_member, run_from_datastore
    from .retry import TaskRetryOptions
    from .spillover import PayloadState
    from .sweeper import SweepReport, sweep

    # Not in __all__: a star import must not bring in webapp2.
    from .webapp2 import TaskHandler as TaskHandler

#: Where each public name lives, relative to this package.
_EXPORTS = {
    "Settings": "._config",
    "configure": "._config",
    "settings": "._config",
    "ndb_context": "._datastore",
    "batch": ".batch",
    "TaskInfo": ".context",
    "HttpTarget": ".http_target",
    "current_task": ".context",
    "queue_name": ".context",
    "task_execution_count": ".context",
    "task_name": ".context",
    "task_retry_count": ".context",
    "DeferredTask": ".enqueue",
    "defer": ".enqueue",
    "serialize": ".envelope",
    "AdminError": ".errors",
    "BadTransactionStateError": ".errors",
    "BatchDeferError": ".errors",
    "ConfigurationError": ".errors",
    "DatastoreRefusedError": ".errors",
    "DatastoreUnavailableError": ".errors",
    "DeferError": ".errors",
    "DuplicateDeliveryRunning": ".errors",
    "EnqueueError": ".errors",
    "EnqueueOutcomeUnknown": ".errors",
    "Error": ".errors",
    "InvalidTaskError": ".errors",
    "InvalidTaskNameError": ".errors",
    "InvalidTaskRetryOptionsError": ".errors",
    "PayloadLoadError": ".errors",
    "PayloadTooLargeError": ".errors",
    "PermanentTaskFailure": ".errors",
    "QueueNotFoundError": ".errors",
    "SerializationError": ".errors",
    "SingularTaskFailure": ".errors",
    "SpilledPayloadMissing": ".errors",
    "TaskAlreadyExistsError": ".errors",
    "TaskFailed": ".errors",
    "TombstonedTaskError": ".errors",
    "UnknownQueueError": ".errors",
    "UnverifiedEnvelope": ".errors",
    "VersionSkewError": ".errors",
    "TaskOutcome": ".execution",
    "execute_task": ".execution",
    "run": ".execution",
    "set_log_level": ".execution",
    "FailureState": ".failures",
    "idempotent": ".idempotency",
    "Job": ".iteration",
    "JobState": ".iteration",
    "JobTotals": ".iteration",
    "cancel_job": ".iteration",
    "current_job": ".iteration",
    "iterate": ".iteration",
    "once_per_entity": ".iteration",
    "pause_job": ".iteration",
    "resume_job": ".iteration",
    "TaskRetryOptions": ".retry",
    "Handler": ".legacy",
    "application": ".legacy",
    "invoke_member": ".legacy",
    "run_from_datastore": ".legacy",
    "PayloadState": ".spillover",
    "SweepReport": ".sweeper",
    "sweep": ".sweeper",
    # The legacy webapp2 handler class: the one name that imports webapp2.
    "TaskHandler": ".webapp2",
}


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``gae_deferred.cloud_tasks``), on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def reset_clients() -> None:
    """Forget configure() calls and cached clients; the next use reads the environment again.

    For tests and tools that point one process at another emulator or project.
    """
    from . import _config, _datastore, cloud_tasks

    _config.reset()
    cloud_tasks.reset_client()
    _datastore.reset_client()


__all__ = [
    "AdminError",
    "BadTransactionStateError",
    "BatchDeferError",
    "ConfigurationError",
    "DatastoreRefusedError",
    "DatastoreUnavailableError",
    "DeferError",
    "DeferredTask",
    "DuplicateDeliveryRunning",
    "EnqueueError",
    "EnqueueOutcomeUnknown",
    "Error",
    "FailureState",
    "Handler",
    "HttpTarget",
    "InvalidTaskError",
    "InvalidTaskNameError",
    "InvalidTaskRetryOptionsError",
    "Job",
    "JobState",
    "JobTotals",
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
    "TaskFailed",
    "TaskInfo",
    "TaskOutcome",
    "TaskRetryOptions",
    "TombstonedTaskError",
    "UnknownQueueError",
    "UnverifiedEnvelope",
    "VersionSkewError",
    "application",
    "batch",
    "cancel_job",
    "cloud_tasks",
    "configure",
    "current_job",
    "current_task",
    "defer",
    "execute_task",
    "idempotent",
    "invoke_member",
    "iterate",
    "ndb_context",
    "once_per_entity",
    "pause_job",
    "queue_name",
    "reset_clients",
    "resume_job",
    "run",
    "run_from_datastore",
    "serialize",
    "set_log_level",
    "settings",
    "sweep",
    "task_execution_count",
    "task_name",
    "task_retry_count",
]
