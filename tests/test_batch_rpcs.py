"""batch() and the dashboard's bulk deletes on Cloud Tasks' batch RPCs, and their fallback.

Where Cloud Tasks answers BatchCreateTasks or BatchDeleteTasks with UNIMPLEMENTED or
PERMISSION_DENIED, gae_deferred sends one CreateTask (DeleteTask) per task from then on, once
per process, with a log line. ``Refusing`` is a real gRPC server in front of the emulator that
refuses the batch RPCs and forwards every other call as it is.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from gae_deferred import batch, cloud_tasks
from tests.callables import add

BATCH_RPCS = ("BatchCreateTasks", "BatchDeleteTasks")
_SERVICE = "/google.cloud.tasks.v2.CloudTasks/"


class Refusing(grpc.GenericRpcHandler):
    """A gRPC server answering ``code`` to the batch RPCs and forwarding the rest upstream."""

    def __init__(self, upstream: str, code: grpc.StatusCode) -> None:
        self.code = code
        self.refused: list[str] = []
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        if method.removeprefix(_SERVICE) in BATCH_RPCS:
            return grpc.unary_unary_rpc_method_handler(
                lambda _, context: self._refuse(method, context)
            )
        forward = self._upstream.unary_unary(method)  # bytes in, bytes out

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return forward(request, timeout=context.time_remaining())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(relay)

    def _refuse(self, method: str, context: grpc.ServicerContext) -> None:
        self.refused.append(method.removeprefix(_SERVICE))
        context.abort(self.code, f"{method} refused by the test")

    def __enter__(self) -> Refusing:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0)
        self._upstream.close()


@pytest.fixture(params=[grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED])
def refusing(request, paused, tasks_emulator, monkeypatch):
    """The client pointed at a Refusing server in front of the session's emulator."""
    with Refusing(f"127.0.0.1:{tasks_emulator.port}", request.param) as proxy:
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", f"127.0.0.1:{proxy.port}")
        cloud_tasks.reset_client()
        tasks_emulator.reset_counts()
        try:
            yield proxy
        finally:
            monkeypatch.undo()
            cloud_tasks.reset_client()


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "one call per task" in r.getMessage()]


def test_batch_falls_back_to_create_task_once_per_process(refusing, paused, tasks_emulator, caplog):
    caplog.set_level(logging.WARNING, logger="gae_deferred")
    with batch(concurrency=1) as first:
        for number in range(150):
            first.defer(add, number, 1)
    with batch(concurrency=4) as second:
        for number in range(120):
            second.defer(add, number, 2, _queue="reports")
    # Asked once: the first group was refused, every later group went straight to CreateTask.
    assert refusing.refused == ["BatchCreateTasks"]
    assert tasks_emulator.rpc_counts["CreateTask"] == 270
    assert len(paused()) == 150 and len(paused("reports")) == 120
    assert {task.name for task in first.tasks} == {t.name.rsplit("/", 1)[-1] for t in paused()}
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "BatchCreateTasks" in lines[0]
    assert f"with {refusing.code.name} (" in lines[0]


def test_bulk_delete_falls_back_to_delete_task_once_per_process(
    refusing, paused, tasks_emulator, caplog
):
    caplog.set_level(logging.WARNING, logger="gae_deferred")
    with batch() as made:
        for number in range(5):
            made.defer(add, number, 3)
    names = [task.name for task in made.tasks]
    tasks_emulator.reset_counts()
    errors = cloud_tasks.delete_tasks("default", [*names[:3], "never-there"])
    assert errors[:3] == [None, None, None]
    assert isinstance(errors[3], Exception) and "not" in str(errors[3]).lower()
    assert cloud_tasks.delete_tasks("default", names[3:]) == [None, None]
    assert refusing.refused.count("BatchDeleteTasks") == 1
    assert tasks_emulator.rpc_counts["DeleteTask"] == 6
    assert paused() == []
    lines = _fallback_lines(caplog)
    assert any("BatchDeleteTasks" in line for line in lines)
