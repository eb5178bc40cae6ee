"""Task functions the benchmarks defer and run.

This module imports nothing but the standard library: the legacy handler benchmark runs it in
a separate interpreter (``.venv-bench-legacy``) that has neither gae_deferred nor its pins, and
the gunicorn app of the throughput benchmark imports it by its dotted name.
"""

from __future__ import annotations

import os

#: Where :func:`mark_done` appends; set by the throughput benchmark in the app's environment.
DONE_FILE_ENV = "GAE_DEFERRED_BENCH_DONE_FILE"


def add(a: int, b: int) -> int:
    """The small task of the handler benchmark: a module function with two ints."""
    return a + b


def mark_done(number: int) -> None:
    """A no-op task that records its completion as one appended line (O_APPEND: atomic)."""
    fd = os.open(os.environ[DONE_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%d\n" % number)
    finally:
        os.close(fd)


def consume(*args: object) -> None:
    """A task that takes a payload and does nothing with it (serialization benchmarks)."""
