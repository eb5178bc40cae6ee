"""Every error the emulators and the local stack raise on purpose, under one root.

``except EmulatorError`` catches them all; each also keeps the built-in base callers caught
before (a port in use is an OSError, a bad YAML file a ValueError, ...)::

    try:
        CloudTasksEmulator(port=8123).start()
    except PortInUseError as exc:
        print(exc)  # names the port

RpcError never leaves a server: its handler wrapper answers the gRPC status it carries, the
one the real service would answer (HttpError does the same in the local front end)::

    raise RpcError(grpc.StatusCode.NOT_FOUND, "Task does not exist: projects/p/…/tasks/1")

This module imports no third-party package: the dev server imports it before checking that the
``[local]`` extra (grpc among it) is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class EmulatorError(Exception):
    """Root of the emulators' and the local stack's errors."""


class RpcError(EmulatorError):
    """An RPC failure with the gRPC status code the real service uses for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    """A malformed request (INVALID_ARGUMENT)."""
    import grpc  # here, not at the top: see the module docstring

    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


class HttpError(EmulatorError):
    """The local front end answers the client with ``status`` and closes (RpcError's twin)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StackError(EmulatorError, RuntimeError):
    """The local stack could not start (or a child died); the message says which part and why."""


class PortInUseError(StackError, OSError):
    """A port is taken: an emulator could not bind it, or the stack found something on it.

    The message names the port (and, from the stack, the option that changes it).
    """


class DataDirInUseError(EmulatorError, RuntimeError):
    """Another Datastore emulator process holds the data dir."""


class IndexYamlError(EmulatorError, ValueError):
    """index.yaml is missing or not a valid Datastore index definition."""


class AppYamlError(EmulatorError, ValueError):
    """app.yaml is missing or cannot be used; the message is one line naming the file."""


class CronYamlError(EmulatorError, ValueError):
    """cron.yaml cannot be read; the message names the file."""


class GoogleEmulatorUnavailable(EmulatorError, RuntimeError):
    """The SDK, the emulator component or Java is missing; the message (one line) says what to
    install."""


class StubInternalsChanged(EmulatorError, ImportError):
    """The installed Datastore stub lacks an internal the emulator relies on, or changed its
    signature."""
