"""What the python27 app deferred: Python 2.7 pickled calls of these (tests/legacy_py2/)."""

from __future__ import annotations

RUNS: list = []


def record(*args, **kwargs):
    RUNS.append((args, kwargs))


class Counter:
    """An importable class whose bound method the legacy library wrapped in invoke_member."""

    def __init__(self, start):
        self.start = start

    def add(self, value):
        RUNS.append(("Counter.add", self.start + value))


def boom(message):
    raise RuntimeError(message)
