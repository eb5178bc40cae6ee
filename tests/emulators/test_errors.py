"""The emulators' errors live in one module, under one root, and keep their built-in bases."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import socket

import pytest

import gae_deferred.local
from gae_deferred.local import errors
from gae_deferred.local.cloudtasks import CloudTasksEmulator
from gae_deferred.local.datastore import DatastoreEmulator
from gae_deferred.local.errors import EmulatorError, PortInUseError, StackError


def _local_modules() -> list[str]:
    found = pkgutil.walk_packages(gae_deferred.local.__path__, "gae_deferred.local.")
    return [info.name for info in found if not info.name.endswith("__main__")]


def test_no_module_but_errors_defines_a_public_error() -> None:
    defined_elsewhere = []
    for name in _local_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attribute.startswith("_")
                and name != errors.__name__
            ):
                defined_elsewhere.append(f"{name}.{attribute}")
    assert defined_elsewhere == []


def test_every_error_descends_from_the_one_root() -> None:
    classes = [
        value
        for value in vars(errors).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert len(classes) >= 10
    assert [c.__name__ for c in classes if not issubclass(c, EmulatorError)] == []


@pytest.mark.parametrize(
    "emulator",
    [lambda port: CloudTasksEmulator(port=port, queue_yaml=None), DatastoreEmulator],
    ids=["cloudtasks", "datastore"],
)
def test_both_emulators_raise_the_same_port_in_use_error(emulator) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=str(port)) as raised:
            emulator(port=port).start()
    # Callers that caught OSError (the emulators' old base) or StackError (the stack's) still do.
    assert isinstance(raised.value, OSError)
    assert isinstance(raised.value, StackError)
    assert isinstance(raised.value, EmulatorError)
