"""The one list of gae_deferred's public names, and their types.

Type checkers read this stub for the package. At run time ``__init__.py`` reads these imports
(as lazy_loader's ``attach_stub`` does) for its lazy lookup, ``dir()`` and ``__all__``: a data
file, so the list is there in a zip or an install without the ``.py`` sources. The ``X as X``
form is a stub's way to say a name is re-exported.
"""

from . import cloud_tasks as cloud_tasks
from ._config import Settings as Settings, configure as configure, settings as settings
from ._datastore import ndb_context as ndb_context
from .batching import batch as batch
from .context import (
    TaskInfo as TaskInfo,
    current_task as current_task,
    queue_name as queue_name,
    task_execution_count as task_execution_count,
    task_name as task_name,
    task_retry_count as task_retry_count,
)
from .enqueue import DeferredTask as DeferredTask, defer as defer
from .envelope import serialize as serialize
from .errors import (
    AdminError as AdminError,
    BadTransactionStateError as BadTransactionStateError,
    BatchDeferError as BatchDeferError,
    ConfigurationError as ConfigurationError,
    DatastoreRefusedError as DatastoreRefusedError,
    DatastoreUnavailableError as DatastoreUnavailableError,
    DeferError as DeferError,
    DuplicateDeliveryRunning as DuplicateDeliveryRunning,
    EnqueueError as EnqueueError,
    EnqueueOutcomeUnknown as EnqueueOutcomeUnknown,
    Error as Error,
    InvalidTaskError as InvalidTaskError,
    InvalidTaskNameError as InvalidTaskNameError,
    InvalidTaskRetryOptionsError as InvalidTaskRetryOptionsError,
    PayloadLoadError as PayloadLoadError,
    PayloadTooLargeError as PayloadTooLargeError,
    PermanentTaskFailure as PermanentTaskFailure,
    QueueNotFoundError as QueueNotFoundError,
    SerializationError as SerializationError,
    SingularTaskFailure as SingularTaskFailure,
    SpilledPayloadMissing as SpilledPayloadMissing,
    TaskAlreadyExistsError as TaskAlreadyExistsError,
    TaskFailed as TaskFailed,
    TombstonedTaskError as TombstonedTaskError,
    UnknownQueueError as UnknownQueueError,
    UnverifiedEnvelope as UnverifiedEnvelope,
    VersionSkewError as VersionSkewError,
)
from .execution import (
    TaskOutcome as TaskOutcome,
    execute_task as execute_task,
    run as run,
    set_log_level as set_log_level,
)
from .failures import FailureState as FailureState
from .http_target import HttpTarget as HttpTarget
from .idempotency import idempotent as idempotent
from .iteration import (
    Job as Job,
    JobState as JobState,
    JobTotals as JobTotals,
    cancel_job as cancel_job,
    current_job as current_job,
    iterate as iterate,
    once_per_entity as once_per_entity,
    pause_job as pause_job,
    resume_job as resume_job,
)
from .legacy import (
    Handler as Handler,
    application as application,
    invoke_member as invoke_member,
    run_from_datastore as run_from_datastore,
)
from .retry import TaskRetryOptions as TaskRetryOptions
from .spillover import PayloadState as PayloadState
from .sweeper import SweepReport as SweepReport, sweep as sweep

# The legacy webapp2 handler class: the one name that imports webapp2.
from .webapp2 import TaskHandler as TaskHandler

def reset_clients() -> None: ...
