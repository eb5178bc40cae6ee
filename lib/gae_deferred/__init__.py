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

import ast
import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The one list of public names. Type checkers read these imports; at run time
    # _exports() reads them from this file (as lazy_loader's attach_stub reads a stub), and
    # the lazy lookup, dir() and __all__ all come from it.
    from . import cloud_tasks
    from ._config import Settings, configure, settings
    from ._datastore import ndb_context
    from .batching import batch
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

    # The legacy webapp2 handler class: the one name that imports webapp2.
    from .webapp2 import TaskHandler as TaskHandler

#: Modules whose names stay out of __all__: a star import must not bring in webapp2.
_NOT_STARRED = (".webapp2",)


@functools.cache
def _exports() -> dict[str, tuple[str, str | None]]:
    """Each public name: (the module it comes from, relative to this package; the attribute
    of that module, or None for the module itself), from the TYPE_CHECKING imports above."""
    with open(__file__, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    found: dict[str, tuple[str, str | None]] = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if node.module is None:
                    found[alias.name] = ("." + alias.name, None)
                else:
                    found[alias.asname or alias.name] = ("." + node.module, alias.name)
    return found


def _all() -> list[str]:
    """The star-import names: the exports but webapp2's, and the functions defined here."""
    here = [
        name
        for name, value in globals().items()
        if callable(value) and getattr(value, "__module__", None) == __name__
        if not name.startswith("_")
    ]
    exported = [name for name, (module, _) in _exports().items() if module not in _NOT_STARRED]
    return sorted([*exported, *here])


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``gae_deferred.cloud_tasks``), on first use."""
    if name == "__all__":
        value: Any = _all()
    elif name in _exports():
        module, attribute = _exports()[name]
        value = importlib.import_module(module, __name__)
        if attribute is not None:
            value = getattr(value, attribute)
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
    return sorted({*globals(), *_exports()})


def reset_clients() -> None:
    """Forget configure() calls and cached clients; the next use reads the environment again.

    For tests and tools that point one process at another emulator or project.
    """
    from . import _config, _datastore, cloud_tasks

    _config.reset()
    cloud_tasks.reset_client()
    _datastore.reset_client()
