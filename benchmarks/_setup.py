"""Process set-up shared by every benchmark: import paths and a fixed test signing key.

``python -m benchmarks`` calls :func:`prepare` before importing the benchmark modules, because
gae_deferred reads its environment on first use.
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH_SIGNING_KEY = "b3" * 32
BENCH_PROJECT = "bench-project"
#: Variables a developer's shell may carry from `. .local/env`: they would point the in-process
#: benchmarks at a running stack instead of their own emulators.
_STACK_ENV = (
    "DATASTORE_EMULATOR_HOST",
    "CLOUD_TASKS_EMULATOR_HOST",
    "GAE_DEFERRED_SIGNING_KEY_FILE",
    "GAE_DEFERRED_QUEUE_YAML",
    "GAE_DEFERRED_LOCAL",
)


def prepare() -> None:
    """The repo root on sys.path (main.py, tests' task modules), and a benchmark-only key.

    gae_deferred itself is the editable install of this checkout that `make` puts in .venv."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in _STACK_ENV:
        os.environ.pop(name, None)
    os.environ["GAE_DEFERRED_SIGNING_KEY"] = BENCH_SIGNING_KEY
    os.environ["GOOGLE_CLOUD_PROJECT"] = BENCH_PROJECT
    # The benchmarks count RPCs: the metrics thread's flush (a transaction, once a minute) once
    # landed inside the 8 MiB spill's count. The metrics benchmark flushes by itself.
    os.environ["GAE_DEFERRED_METRICS_FLUSH_SECONDS"] = "3600"
    os.environ["GAE_DEFERRED_METRICS_FIRST_FLUSH_SECONDS"] = "3600"


#: What pointing this process at a LocalStack sets (stack.env); forgotten when it stops.
STACK_ENV = (
    "DATASTORE_EMULATOR_HOST",
    "CLOUD_TASKS_EMULATOR_HOST",
    "GAE_DEFERRED_SIGNING_KEY_FILE",
    "GAE_DEFERRED_LOCAL",
    "GAE_DEFERRED_QUEUE_YAML",
    "GAE_DEFERRED_LOCATION",
)


def forget_stack_env() -> None:
    """Drop a stopped stack's settings from this process's environment."""
    for name in STACK_ENV:
        os.environ.pop(name, None)
