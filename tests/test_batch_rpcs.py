"""batch() and bulk task deletes on Cloud Tasks' batch RPCs, against the emulator, and their
fallback.

BatchCreateTasks takes up to 100 tasks of a queue; each task is answered on its own. Where
Cloud Tasks answers BatchCreateTasks or BatchDeleteTasks with UNIMPLEMENTED or
PERMISSION_DENIED, gae_deferred sends one CreateTask (DeleteTask) per task from then on, once
per process, with a log line. ``Between`` is a real gRPC server in front of the emulator that
forwards every call but those a test answers itself: ``Refusing`` refuses the batch RPCs,
``StillRunning`` reports a batch's operation as running for a while.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc
import pytest
from google.cloud import ndb
from google.longrunning import operations_pb2

from gae_deferred import (
    BatchDeferError,
    TaskAlreadyExistsError,
    batch,
    cloud_tasks,
    defer,
    envelope,
)
from tests.callables import add
from tests.fault_proxy import FaultProxy

BATCH_RPCS = ("BatchCreateTasks", "BatchDeleteTasks")


class Between(grpc.GenericRpcHandler):
    """A real gRPC server in front of ``upstream``: the RPCs ``answer`` names (by short name)
    are answered by ``answer`` (given the request bytes, the context and a function that
    forwards them upstream), every other call is forwarded as it is."""

    def __init__(self, upstream: str) -> None:
        self.calls: list[str] = []
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def answer(self, rpc: str, request: bytes, context: grpc.ServicerContext, forward) -> bytes:
        return forward(request)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        rpc = details.method.rsplit("/", 1)[-1]
        upstream = self._upstream.unary_unary(details.method)  # bytes in, bytes out

        def relay(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls.append(rpc)
            try:
                return self.answer(rpc, request, context, lambda body: upstream(body, timeout=10))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(relay)

    def __enter__(self) -> Between:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0)
        self._upstream.close()


class Refusing(Between):
    """Answers ``code`` to the batch RPCs."""

    def __init__(self, upstream: str, code: grpc.StatusCode) -> None:
        super().__init__(upstream)
        self.code = code
        self.refused: list[str] = []

    def answer(self, rpc: str, request: bytes, context: grpc.ServicerContext, forward) -> bytes:
        if rpc not in BATCH_RPCS:
            return forward(request)
        self.refused.append(rpc)
        context.abort(self.code, f"{rpc} refused by the test")


class StillRunning(Between):
    """Says a batch's operation is still running, at first and to the next ``polls`` GetOperation
    calls (the emulator's operations are done at once; Cloud Tasks' need not be)."""

    def __init__(self, upstream: str, polls: int) -> None:
        super().__init__(upstream)
        self.polls = polls

    def answer(self, rpc: str, request: bytes, context: grpc.ServicerContext, forward) -> bytes:
        answer = forward(request)
        if rpc in BATCH_RPCS or (rpc == "GetOperation" and self.polls > 0):
            self.polls -= rpc == "GetOperation"
            operation = operations_pb2.Operation.FromString(answer)
            running = operations_pb2.Operation(name=operation.name, metadata=operation.metadata)
            return running.SerializeToString()
        return answer


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


def _counts(emulator) -> tuple[int, int]:
    return emulator.rpc_counts["BatchCreateTasks"], emulator.rpc_counts["CreateTask"]


def _short_names(tasks) -> set[str]:
    return {task.name.rsplit("/", 1)[-1] for task in tasks}


def test_batch_groups_tasks_per_queue_in_calls_of_100(paused, tasks_emulator):
    tasks_emulator.reset_counts()
    with batch() as b:
        for number in range(250):
            b.defer(add, number, 4, _queue="reports" if number % 5 == 0 else "default")
    # 200 for default (2 calls), 50 for reports (1 call); no CreateTask.
    assert _counts(tasks_emulator) == (3, 0)
    assert [envelope.read_header(t.payload)["args"] for t in b.tasks] == [
        f"{n}, 4" for n in range(250)
    ]
    default = [t.name for t in b.tasks if t.queue == "default"]
    assert _short_names(paused()) == set(default) and len(default) == 200
    assert len(paused("reports")) == 50


def test_a_name_in_use_fails_that_task_alone(paused, tasks_emulator):
    defer(add, 0, 0, _name="taken-1")
    tasks_emulator.reset_counts()
    with pytest.raises(BatchDeferError) as raised, batch() as b:
        b.defer(add, 1, 0, _name="free-1")
        b.defer(add, 2, 0, _name="taken-1")
        b.defer(add, 3, 0)
    ((index, error),) = raised.value.failures
    assert index == 1 and type(error) is TaskAlreadyExistsError
    assert "taken-1" in str(error)
    assert b.tasks[1] is None and b.tasks[0].name == "free-1"
    assert _counts(tasks_emulator) == (1, 0)
    assert _short_names(paused()) == {"taken-1", "free-1", b.tasks[2].name}


def test_inline_and_spilled_calls_share_the_batch_call(paused, tasks_emulator):
    tasks_emulator.reset_counts()
    with batch() as b:
        b.defer(add, os.urandom(300_000), 0)
        b.defer(add, 1, 0)
    assert [task.spilled for task in b.tasks] == [True, False]
    assert _counts(tasks_emulator) == (1, 0)
    assert _short_names(paused()) == {task.name for task in b.tasks}


def test_transactional_batch_creates_its_tasks_in_one_call_on_commit(paused, tasks_emulator):
    tasks_emulator.reset_counts()

    @ndb.transactional()
    def place():
        with batch() as b:
            for number in range(30):
                b.defer(add, number, 5, _transactional=True)
        assert _counts(tasks_emulator) == (0, 0)
        return b.tasks

    tasks = place()
    assert _counts(tasks_emulator) == (1, 0)
    assert _short_names(paused()) == {task.name for task in tasks}


def test_delete_tasks_is_one_batch_call_with_an_answer_per_name(paused, tasks_emulator):
    with batch() as made:
        for number in range(4):
            made.defer(add, number, 6)
    names = [task.name for task in made.tasks]
    tasks_emulator.reset_counts()
    errors = cloud_tasks.delete_tasks("default", [*names, "never-there"])
    assert errors[:4] == [None] * 4
    assert "NotFound" in type(errors[4]).__name__
    assert (
        tasks_emulator.rpc_counts["BatchDeleteTasks"],
        tasks_emulator.rpc_counts["DeleteTask"],
    ) == (1, 0)
    assert paused() == []


def test_a_batch_whose_answer_is_lost_is_settled_task_by_task(paused, tasks_emulator, monkeypatch):
    """BatchCreateTasks landed and its answer was lost: each task is asked for again by name,
    and ALREADY_EXISTS settles it as created by that batch: every task once, no error."""
    with FaultProxy(("127.0.0.1", tasks_emulator.port)) as proxy:
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", proxy.address)
        cloud_tasks.reset_client()
        tasks_emulator.reset_counts()
        proxy.lose_next_reply()
        try:
            with batch() as b:
                for number in range(3):
                    b.defer(add, number, 7)
        finally:
            monkeypatch.undo()
            cloud_tasks.reset_client()
    assert proxy.counts["lost_replies"] == 1
    assert _counts(tasks_emulator) == (1, 3)
    assert sorted(t.name.rsplit("/", 1)[-1] for t in paused()) == sorted(t.name for t in b.tasks)


def test_a_batch_whose_operation_is_still_running_is_polled_until_done(
    paused, tasks_emulator, monkeypatch
):
    with StillRunning(f"127.0.0.1:{tasks_emulator.port}", polls=2) as proxy:
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", f"127.0.0.1:{proxy.port}")
        cloud_tasks.reset_client()
        try:
            with batch() as b:
                for number in range(3):
                    b.defer(add, number, 8, _name=f"polled-{number}")
            named = [task.name for task in b.tasks]
            with pytest.raises(BatchDeferError) as raised, batch() as again:
                again.defer(add, 0, 8, _name="polled-0")
                again.defer(add, 9, 8, _name="polled-9")
        finally:
            monkeypatch.undo()
            cloud_tasks.reset_client()
    assert named == ["polled-0", "polled-1", "polled-2"]
    # The first operation was asked for until done (2 running answers, then the real one);
    # the second's per-task refusal was read from its finished metadata.
    assert proxy.calls.count("BatchCreateTasks") == 2
    assert proxy.calls.count("GetOperation") == 4
    assert [(index, type(error)) for index, error in raised.value.failures] == [
        (0, TaskAlreadyExistsError)
    ]
    assert _short_names(paused()) == {*named, "polled-9"}


class Measuring(Between):
    """Notes the size of every BatchCreateTasks request. Its gRPC server keeps the default
    4 MiB limit on a received message, as a server or proxy in front of Cloud Tasks may."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.sizes: list[int] = []

    def answer(self, rpc: str, request: bytes, context: grpc.ServicerContext, forward) -> bytes:
        if rpc == "BatchCreateTasks":
            self.sizes.append(len(request))
        return forward(request)


def test_batch_requests_stay_under_4_mib_however_big_the_tasks(paused, tasks_emulator, monkeypatch):
    """100 inline tasks of ~90 KB (9 MB in all) go in three requests under 4 MiB; the old
    grouping sent one request of 9 MB, which this gRPC server refuses."""
    with Measuring(f"127.0.0.1:{tasks_emulator.port}") as proxy:
        monkeypatch.setenv("CLOUD_TASKS_EMULATOR_HOST", f"127.0.0.1:{proxy.port}")
        cloud_tasks.reset_client()
        tasks_emulator.reset_counts()
        try:
            with batch() as b:
                for number in range(100):
                    b.defer(add, os.urandom(90_000), number)
                b.defer(add, 1, 2)
        finally:
            monkeypatch.undo()
            cloud_tasks.reset_client()
    assert not any(task.spilled for task in b.tasks)
    assert len(proxy.sizes) == 3 and _counts(tasks_emulator) == (3, 0)
    assert max(proxy.sizes) <= cloud_tasks.BATCH_CREATE_BYTES < 4 * 1024 * 1024
    assert sum(proxy.sizes) > 9_000_000
    # The basic view: 9 MB of bodies would not fit in one ListTasks answer either.
    listed, _ = cloud_tasks.list_tasks_page("default", page_size=1000)
    assert _short_names(listed) == {task.name for task in b.tasks}


def test_groups_split_by_queue_count_and_bytes():
    groups = cloud_tasks._groups
    queues = ["a", "b", "a", "a", "a", "b"]
    assert groups(queues, [1] * 6, 100, 1000) == [[0, 2, 3, 4], [1, 5]]
    assert groups(queues, [1] * 6, 2, 1000) == [[0, 2], [3, 4], [1, 5]]
    sizes = [600, 10, 400, 700, 2000, 990]
    assert groups(queues, sizes, 100, 1000) == [[0, 2], [3], [4], [1, 5]]
    assert groups(queues, sizes, 100, 1300) == [[0, 2], [3], [4], [1, 5]]
    assert groups(queues, sizes, 100, 2700) == [[0, 2, 3], [4], [1, 5]]
    assert groups(["a"] * 3, [500, 500, 1], 100, 1000) == [[0, 1], [2]]
    assert groups(["a"] * 3, [500, 501, 1], 100, 1000) == [[0], [1, 2]]
