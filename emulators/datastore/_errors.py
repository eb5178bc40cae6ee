"""Errors the emulator raises, each carrying the gRPC status the real service would return."""

from __future__ import annotations

import grpc


class RpcError(Exception):
    """An RPC failure with the gRPC status code Datastore uses for it.

    >>> raise RpcError(grpc.StatusCode.NOT_FOUND, "no entity to update: Thing:1")
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    """A malformed request (INVALID_ARGUMENT)."""
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


class DataDirInUseError(RuntimeError):
    """Another emulator process holds the data dir."""


class IndexYamlError(ValueError):
    """index.yaml is missing or not a valid Datastore index definition."""
