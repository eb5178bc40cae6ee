"""Envelopes between two Pythons: ``python -m tests.cross_python make`` prints envelopes of
every callable kind as JSON; ``... run`` reads such JSON on stdin and prints what each did.

tests/test_cross_python.py runs one side under this interpreter and the other under another
(3.11 and 3.13, 3.11 and 3.12), in both directions.
"""

from __future__ import annotations

import functools
import json
import operator
import sys

from gae_deferred import PayloadLoadError, VersionSkewError, envelope
from tests.callables import Adder, add


def _closure():
    base = 5

    def inner(value):
        return base + value

    return inner


class _Local:
    """Stands for a class defined inside a function: pickled by value when it lives in __main__."""


def kinds() -> dict[str, tuple]:
    """Each callable kind with its arguments and the result it must give."""

    class Local:
        def __init__(self, base):
            self.base = base

        def twice(self, value):
            return (self.base + value) * 2

    return {
        "module function": (add, (1, 2), 3),
        "bound method": (Adder(4).method, (3,), 12),
        "classmethod": (Adder.make, (7,), 7),
        "staticmethod": (Adder.static, (2,), -2),
        "builtin": (operator.add, (2, 3), 5),
        "functools.partial": (functools.partial(add, 10), (1,), 11),
        "lambda": (lambda value: value * 3, (3,), 9),
        "closure": (_closure(), (1,), 6),
        "local class method": (Local(1).twice, (2,), 6),
    }


def make() -> dict[str, str]:
    return {
        name: envelope.build(obj, args).hex() for name, (obj, args, _) in sorted(kinds().items())
    }


def run(made: dict[str, str]) -> dict[str, str]:
    """Per kind: "ran" (right result), or the failure's type and message."""
    expected = {name: result for name, (_, _, result) in kinds().items()}
    outcome = {}
    for name, data in made.items():
        try:
            obj, args, kwargs = envelope.load_call(envelope.open_envelope(bytes.fromhex(data)))
            result = obj(*args, **kwargs)
        except (VersionSkewError, PayloadLoadError) as exc:
            outcome[name] = f"{type(exc).__name__}: {exc}"
            continue
        outcome[name] = "ran" if result == expected[name] else f"wrong result {result!r}"
    return outcome


if __name__ == "__main__":
    if sys.argv[1] == "make":
        json.dump({"python": envelope.PYTHON_VERSION, "envelopes": make()}, sys.stdout)
    else:
        json.dump(run(json.load(sys.stdin)["envelopes"]), sys.stdout)
