"""The emulators' errors, under one root (EmulatorError).

RpcError carries the gRPC status the real service would answer; each server's handler
wrapper turns it into that status::

    raise RpcError(grpc.StatusCode.NOT_FOUND, "Task does not exist: projects/p/…/tasks/1")
"""

from __future__ import annotations

import grpc


class EmulatorError(Exception):
    """Root of every error the emulators and the local stack raise on purpose."""


class RpcError(EmulatorError):
    """An RPC failure with the gRPC status code the real service uses for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    """A malformed request (INVALID_ARGUMENT)."""
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)
