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
from typing import Any

#: Modules whose names stay out of __all__: a star import must not bring in webapp2.
_NOT_STARRED = (".webapp2",)


@functools.cache
def _exports() -> dict[str, tuple[str, str | None]]:
    """Each public name: (the module it comes from, relative to this package; the attribute
    of that module, or None for the module itself), from the imports of ``__init__.pyi``."""
    import importlib.resources  # here: 10 ms that a bare `import gae_deferred` need not pay

    stub = importlib.resources.files(__name__).joinpath("__init__.pyi").read_text("utf-8")
    found: dict[str, tuple[str, str | None]] = {}
    for node in ast.parse(stub).body:
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
