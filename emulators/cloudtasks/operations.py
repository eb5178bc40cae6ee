"""Long-running operations of the batch RPCs (google.longrunning.Operation), as Cloud Tasks does.

BatchCreateTasks and BatchDeleteTasks are not atomic: each item succeeds or fails on its
own. The operation comes back already done; ``metadata`` holds the state and the failed
items by index (``failed_requests``), ``response`` what the successful ones produced. When
every item fails, ``error`` is ABORTED instead of a response (BatchDeleteTasksMetadata
documents this; the emulator does the same for BatchCreateTasks)::

    ops = Operations()
    op = ops.run("BatchDeleteTasks", queue_name, "", [step, step], kind)
    ops.get(op.name)  # the same Operation; None for an unknown name

Not thread-safe: the emulator calls it under its one lock.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.longrunning import operations_pb2
from google.rpc import status_pb2

from ..errors import RpcError

#: Finished operations kept for GetOperation; the oldest are forgotten beyond this.
KEPT_OPERATIONS = 1000


@dataclass(frozen=True)
class BatchKind:
    """What one batch RPC reports: its metadata message and how its response is built."""

    metadata: Any  # the raw protobuf class, e.g. BatchCreateTasksMetadata.pb()
    response: Callable[[list[Any]], Any]  # successful items' results -> response message
    succeeded: int  # metadata State values (they differ between the two messages)
    partially_succeeded: int


class Operations:
    """Runs a batch's items one by one and keeps the finished operations by name."""

    def __init__(self) -> None:
        self._done: collections.OrderedDict[str, tuple[str, operations_pb2.Operation]] = (
            collections.OrderedDict()
        )

    def run(
        self,
        method: str,
        parent: str,
        request_id: str,
        items: Sequence[Callable[[], Any]],
        kind: BatchKind,
    ) -> operations_pb2.Operation:
        """Run each item (a call raising RpcError on failure) and return the done operation.

        ``request_id`` names the operation, so a retry with the same id returns the first
        outcome instead of running the items again (BatchCreateTasksRequest.request_id).
        """
        if "/" in request_id:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"invalid request_id {request_id!r}: no '/'"
            )
        location = parent.rpartition("/queues/")[0]
        name = f"{location}/operations/{request_id or uuid.uuid4()}"
        earlier = self._done.get(name)
        if earlier is not None:
            if earlier[0] != method:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request_id {request_id!r} was already used by a {earlier[0]} call",
                )
            return _copy(earlier[1])
        metadata = kind.metadata()
        metadata.start_time.GetCurrentTime()
        results = []
        for index, item in enumerate(items):
            try:
                results.append(item())
            except RpcError as exc:
                failed = metadata.failed_requests[index]
                failed.code = exc.code.value[0]
                failed.message = exc.message
        metadata.end_time.GetCurrentTime()
        operation = operations_pb2.Operation(name=name, done=True)
        if metadata.failed_requests:
            metadata.state = kind.partially_succeeded
        else:
            metadata.state = kind.succeeded
        operation.metadata.Pack(metadata)
        if results:
            operation.response.Pack(kind.response(results))
        else:
            operation.error.CopyFrom(
                status_pb2.Status(
                    code=grpc.StatusCode.ABORTED.value[0],
                    message="None of the requests succeeded, refer to "
                    f"{metadata.DESCRIPTOR.name}.failed_requests for individual error details",
                )
            )
        self._keep(method, operation)
        return _copy(operation)

    def get(self, name: str) -> operations_pb2.Operation | None:
        """The finished operation called ``name``, or None."""
        kept = self._done.get(name)
        return None if kept is None else _copy(kept[1])

    def _keep(self, method: str, operation: operations_pb2.Operation) -> None:
        self._done[operation.name] = (method, operation)
        while len(self._done) > KEPT_OPERATIONS:
            self._done.popitem(last=False)


def _copy(operation: operations_pb2.Operation) -> operations_pb2.Operation:
    copy = operations_pb2.Operation()
    copy.CopyFrom(operation)
    return copy
